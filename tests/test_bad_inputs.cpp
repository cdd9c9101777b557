// The bad-input suite: for every op, each class of bad argument returns the
// right status and a message that names the problem, and touches no buffer.
// Index arrays (positions, block tables, lengths, offsets) live in device
// memory on CUDA: there the call runs, the kernel skips the bad index (never
// writing out of bounds: the guards are checked) and tk_check_device_errors()
// reports it.
#include <cmath>

#include "ops.h"

namespace tk::test {
namespace {

const void* nudge(const void* p, int bytes) { return static_cast<const char*>(p) + bytes; }
void* nudge(void* p, int bytes) { return static_cast<char*>(p) + bytes; }

class BadInput : public ::testing::TestWithParam<tk_backend> {
 protected:
  void SetUp() override {
    std::string why;
    ctx_ = context(GetParam(), &why);
    if (!ctx_) GTEST_SKIP() << why;
    rng_ = std::make_unique<Rng>(test_seed());
  }
  bool host() const { return GetParam() != TK_BACKEND_CUDA; }
  Rng& rng() { return *rng_; }

  // One broken argument: the call returns `want`, its message holds every one
  // of `parts`, and no tensor changed.
  template <class P>
  void rejects(OpTestOf<P>& op, const std::string& what, tk_status want,
               std::vector<std::string> parts, std::function<void(P&)> mutate) {
    SCOPED_TRACE(what);
    op.mutate = std::move(mutate);
    const Result r = execute(ctx_, op);
    op.mutate = nullptr;
    check(r, op, what, want, parts);
  }

  // A bad entry in an index array, made by `corrupt` and undone by `restore`.
  void bad_index(OpTest& op, const std::string& what, tk_status host_status,
                 std::vector<std::string> parts, const std::function<void()>& corrupt,
                 const std::function<void()>& restore) {
    SCOPED_TRACE(what);
    corrupt();
    const Result r = execute(ctx_, op);
    if (host()) {
      check(r, op, what, host_status, parts);
      return restore();
    }
    restore();
    if (r.status == TK_ERR_UNSUPPORTED) {
      skipped_.push_back(what + " (" + r.message + ")");
      return;
    }
    EXPECT_EQ(r.status, TK_OK) << what << ": a device-resident index is not read by the host; "
                               << r.message;
    EXPECT_EQ(tk_check_device_errors(ctx_), TK_ERR_OUT_OF_RANGE)
        << what << ": the kernel did not raise the device error flag";
    EXPECT_NE(std::string(tk_last_error()).find("out-of-range"), std::string::npos) << tk_last_error();
    EXPECT_EQ(tk_check_device_errors(ctx_), TK_OK) << "the device error flag must clear once read";
  }

  // Host backends only (the host validator reads the index arrays).
  template <class P>
  void rejects_on_host(OpTestOf<P>& op, const std::string& what, tk_status want,
                       std::vector<std::string> parts, const std::function<void()>& corrupt,
                       const std::function<void()>& restore) {
    if (!host()) return;
    SCOPED_TRACE(what);
    corrupt();
    const Result r = execute(ctx_, op);
    check(r, op, what, want, parts);
    restore();
  }

  void TearDown() override {
    if (!skipped_.empty()) {
      std::string all;
      for (const std::string& s : skipped_) all += "\n  " + s;
      GTEST_SKIP() << "device index checks not run, op unsupported:" << all;
    }
  }

  tk_context* ctx_ = nullptr;

 private:
  void check(const Result& r, const OpTest& op, const std::string& what, tk_status want,
             const std::vector<std::string>& parts) {
    EXPECT_EQ(r.status, want) << what << ": got " << tk_status_string(r.status) << " (\"" << r.message
                              << "\"), want " << tk_status_string(want);
    for (const std::string& part : parts)
      EXPECT_NE(r.message.find(part), std::string::npos)
          << what << ": the message \"" << r.message << "\" does not say \"" << part << "\"";
    expect_untouched(op, r);
  }
  std::unique_ptr<Rng> rng_;
  std::vector<std::string> skipped_;
};

// Builds a small valid op of type T from shape s.
template <class T, class S>
std::unique_ptr<T> built(const S& s, Rng& rng, tk_backend backend) {
  auto op = std::make_unique<T>(s);
  op->backend = backend;
  op->build(rng);
  return op;
}

// Out-of-range enum values are written as raw ints: C callers can pass any
// int, while a C++ enum holding a value outside its range is undefined
// behaviour (UBSan checks). 3 is within tk_dtype's range (two bits) yet no dtype.
constexpr tk_dtype kBadDtype = tk_dtype(3);
template <class E>
void set_raw(E& field, int v) {
  static_assert(sizeof(E) == sizeof(int));
  std::memcpy(&field, &v, sizeof v);
}

TEST_P(BadInput, NullContextAndParams) {
  tk_rmsnorm_params p{};
  EXPECT_EQ(tk_rmsnorm(nullptr, &p), TK_ERR_NULL_POINTER);
  EXPECT_NE(std::string(tk_last_error()).find("context is null"), std::string::npos);
  EXPECT_EQ(tk_rmsnorm(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_NE(std::string(tk_last_error()).find("params is null"), std::string::npos);
  EXPECT_EQ(tk_rope(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_EQ(tk_swiglu(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_EQ(tk_matmul(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_EQ(tk_qmatmul_int4(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_EQ(tk_fused_ffn(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_EQ(tk_attn_front(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_EQ(tk_flash_attention(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_EQ(tk_paged_attention(ctx_, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_EQ(tk_malloc(ctx_, 16, nullptr), TK_ERR_NULL_POINTER);
}

TEST_P(BadInput, Rmsnorm) {
  for (bool residual : {false, true}) {
    auto op = built<RmsnormTest>(RmsnormShape{TK_F16, 3, 40, Layout::Strided, residual}, rng(), GetParam());
    using P = tk_rmsnorm_params;
    const std::string name = residual ? "rmsnorm_residual" : "rmsnorm";
    rejects<P>(*op, "x null", TK_ERR_NULL_POINTER, {name, "x is null"}, [](P& p) { p.x = nullptr; });
    rejects<P>(*op, "weight null", TK_ERR_NULL_POINTER, {"weight is null"}, [](P& p) { p.weight = nullptr; });
    rejects<P>(*op, "y null", TK_ERR_NULL_POINTER, {"y is null"}, [](P& p) { p.y = nullptr; });
    rejects<P>(*op, "x misaligned", TK_ERR_MISALIGNED, {"x (", "not aligned to 2 bytes"},
               [](P& p) { p.x = nudge(p.x, 1); });
    rejects<P>(*op, "y misaligned", TK_ERR_MISALIGNED, {"y (", "not aligned"}, [](P& p) { p.y = nudge(p.y, 1); });
    rejects<P>(*op, "x stride", TK_ERR_INVALID_ARGUMENT, {"x row stride 39", "row length 40"},
               [](P& p) { p.x_stride = 39; });
    rejects<P>(*op, "y stride", TK_ERR_INVALID_ARGUMENT, {"y row stride"}, [](P& p) { p.y_stride = 1; });
    rejects<P>(*op, "dtype", TK_ERR_UNSUPPORTED, {"unsupported activation dtype 3"},
               [](P& p) { p.dtype = kBadDtype; });
    rejects<P>(*op, "eps", TK_ERR_INVALID_ARGUMENT, {"eps"}, [](P& p) { p.eps = 0; });
    rejects<P>(*op, "eps NaN", TK_ERR_INVALID_ARGUMENT, {"eps"}, [](P& p) { p.eps = NAN; });
    rejects<P>(*op, "dim", TK_ERR_INVALID_ARGUMENT, {"dim = 0"}, [](P& p) { p.dim = 0; });
    rejects<P>(*op, "rows", TK_ERR_INVALID_ARGUMENT, {"rows = -1"}, [](P& p) { p.rows = -1; });
    if (residual) {
      rejects<P>(*op, "residual stride", TK_ERR_INVALID_ARGUMENT, {"residual row stride"},
                 [](P& p) { p.residual_stride = 3; });
      rejects<P>(*op, "residual misaligned", TK_ERR_MISALIGNED, {"residual (", "not aligned"},
                 [](P& p) { p.residual = nudge(p.residual, 1); });
    }
  }
}

TEST_P(BadInput, Rope) {
  auto op = built<RopeTest>(RopeShape{TK_BF16, TK_ROPE_NEOX, 4, 4, 2, 64, 32, 100}, rng(), GetParam());
  using P = tk_rope_params;
  rejects<P>(*op, "q null", TK_ERR_NULL_POINTER, {"rope", "q is null"}, [](P& p) { p.q = nullptr; });
  rejects<P>(*op, "positions null", TK_ERR_NULL_POINTER, {"positions is null"},
             [](P& p) { p.positions = nullptr; });
  rejects<P>(*op, "cos_table null", TK_ERR_NULL_POINTER, {"cos_table is null"},
             [](P& p) { p.cos_table = nullptr; });
  rejects<P>(*op, "q misaligned", TK_ERR_MISALIGNED, {"q (", "not aligned"}, [](P& p) { p.q = nudge(p.q, 1); });
  rejects<P>(*op, "sin_table misaligned", TK_ERR_MISALIGNED, {"sin_table"},
             [](P& p) { p.sin_table = static_cast<const float*>(nudge(p.sin_table, 2)); });
  rejects<P>(*op, "rot_dim odd", TK_ERR_INVALID_ARGUMENT, {"rot_dim = 31"}, [](P& p) { p.rot_dim = 31; });
  rejects<P>(*op, "rot_dim > head_dim", TK_ERR_INVALID_ARGUMENT, {"rot_dim = 66", "head_dim = 64"},
             [](P& p) { p.rot_dim = 66; });
  rejects<P>(*op, "q heads overlap", TK_ERR_INVALID_ARGUMENT, {"q strides", "overlap"},
             [](P& p) { p.q_head_stride = 63; });
  rejects<P>(*op, "k tokens overlap", TK_ERR_INVALID_ARGUMENT, {"k strides", "overlap"},
             [](P& p) { p.k_token_stride = 64; });
  rejects<P>(*op, "k without heads", TK_ERR_INVALID_ARGUMENT, {"num_k_heads is 0"},
             [](P& p) { p.num_k_heads = 0; });
  rejects<P>(*op, "style", TK_ERR_INVALID_ARGUMENT, {"unknown rope style 5"},
             [](P& p) { set_raw(p.style, 5); });
  rejects<P>(*op, "dtype", TK_ERR_UNSUPPORTED, {"unsupported activation dtype"},
             [](P& p) { p.dtype = kBadDtype; });
  rejects<P>(*op, "max_pos", TK_ERR_INVALID_ARGUMENT, {"max_pos = 0"}, [](P& p) { p.max_pos = 0; });
  int32_t& pos = op->positions->i32()[1];
  const int32_t good = pos;
  bad_index(*op, "position past the table", TK_ERR_OUT_OF_RANGE,
            {"positions[1] = 100", "past the rope table"}, [&] { pos = 100; }, [&] { pos = good; });
  bad_index(*op, "negative position", TK_ERR_OUT_OF_RANGE, {"positions[1] = -1"}, [&] { pos = -1; },
            [&] { pos = good; });
}

TEST_P(BadInput, Swiglu) {
  for (bool concat : {false, true}) {
    auto op = built<SwigluTest>(SwigluShape{TK_F32, 3, 24, Layout::Contiguous, concat}, rng(), GetParam());
    using P = tk_swiglu_params;
    rejects<P>(*op, "gate null", TK_ERR_NULL_POINTER, {"swiglu", concat ? "gate_up is null" : "gate is null"},
               [](P& p) { p.gate = nullptr; });
    rejects<P>(*op, "out null", TK_ERR_NULL_POINTER, {"out is null"}, [](P& p) { p.out = nullptr; });
    rejects<P>(*op, "out misaligned", TK_ERR_MISALIGNED, {"out (", "not aligned to 4 bytes"},
               [](P& p) { p.out = nudge(p.out, 2); });
    rejects<P>(*op, "out stride", TK_ERR_INVALID_ARGUMENT, {"out row stride 23"}, [](P& p) { p.out_stride = 23; });
    rejects<P>(*op, "dtype", TK_ERR_UNSUPPORTED, {"unsupported activation dtype 3"},
               [](P& p) { p.dtype = kBadDtype; });
    if (concat) {
      rejects<P>(*op, "gate_up stride", TK_ERR_INVALID_ARGUMENT, {"gate_up row stride 47", "2 * dim = 48"},
                 [](P& p) { p.gate_stride = 47; });
      rejects<P>(*op, "gate_up misaligned", TK_ERR_MISALIGNED, {"not aligned"},
                 [](P& p) { p.gate = nudge(p.gate, 2); });
    } else {
      rejects<P>(*op, "up null", TK_ERR_NULL_POINTER, {"up is null"}, [](P& p) { p.up = nullptr; });
      rejects<P>(*op, "gate stride", TK_ERR_INVALID_ARGUMENT, {"gate row stride"},
                 [](P& p) { p.gate_stride = 5; });
      rejects<P>(*op, "dim", TK_ERR_INVALID_ARGUMENT, {"dim = 0"}, [](P& p) { p.dim = 0; });
    }
  }
}

TEST_P(BadInput, Matmul) {
  auto op = built<MatmulTest>(MatmulShape{TK_BF16, TK_F32, 3, 24, 40}, rng(), GetParam());
  using P = tk_matmul_params;
  rejects<P>(*op, "w null", TK_ERR_NULL_POINTER, {"matmul", "w is null"}, [](P& p) { p.w = nullptr; });
  rejects<P>(*op, "x null", TK_ERR_NULL_POINTER, {"x is null"}, [](P& p) { p.x = nullptr; });
  rejects<P>(*op, "w misaligned", TK_ERR_MISALIGNED, {"w (", "not aligned to 4 bytes"},
             [](P& p) { p.w = nudge(p.w, 2); });
  rejects<P>(*op, "x misaligned", TK_ERR_MISALIGNED, {"x (", "not aligned to 2 bytes"},
             [](P& p) { p.x = nudge(p.x, 1); });
  rejects<P>(*op, "w stride", TK_ERR_INVALID_ARGUMENT, {"w row stride 39", "row length 40"},
             [](P& p) { p.w_stride = 39; });
  rejects<P>(*op, "y stride", TK_ERR_INVALID_ARGUMENT, {"y row stride"}, [](P& p) { p.y_stride = 20; });
  rejects<P>(*op, "weight dtype", TK_ERR_UNSUPPORTED, {"unsupported weight dtype 3"},
             [](P& p) { p.weight_dtype = kBadDtype; });
  rejects<P>(*op, "dtype", TK_ERR_UNSUPPORTED, {"unsupported activation dtype"},
             [](P& p) { p.dtype = kBadDtype; });
  rejects<P>(*op, "N", TK_ERR_INVALID_ARGUMENT, {"N = 0"}, [](P& p) { p.N = 0; });
  rejects<P>(*op, "K", TK_ERR_INVALID_ARGUMENT, {"K = -3"}, [](P& p) { p.K = -3; });
  rejects<P>(*op, "T huge", TK_ERR_INVALID_ARGUMENT, {"T = "}, [](P& p) { p.T = int64_t(1) << 40; });
}

TEST_P(BadInput, QmatmulInt4) {
  auto op = built<QmatmulTest>(QmatmulShape{TK_F16, 2, 8, 96, Int4Spec{32, TK_F16, true}}, rng(), GetParam());
  using P = tk_qmatmul_int4_params;
  rejects<P>(*op, "group 48", TK_ERR_UNSUPPORTED, {"qmatmul_int4", "group size 48 is not one of 32, 64, 128"},
             [](P& p) { p.w.group_size = 48; });
  rejects<P>(*op, "group not dividing K", TK_ERR_INVALID_ARGUMENT, {"group size 64 does not divide K = 96"},
             [](P& p) { p.w.group_size = 64; });
  rejects<P>(*op, "scale dtype", TK_ERR_UNSUPPORTED, {"scale dtype must be f16 or bf16", "f32"},
             [](P& p) { p.w.scale_dtype = TK_F32; });
  rejects<P>(*op, "packed null", TK_ERR_NULL_POINTER, {"packed weights are null"},
             [](P& p) { p.w.packed = nullptr; });
  rejects<P>(*op, "scales null", TK_ERR_NULL_POINTER, {"scales is null"}, [](P& p) { p.w.scales = nullptr; });
  rejects<P>(*op, "scales misaligned", TK_ERR_MISALIGNED, {"scales", "not aligned"},
             [](P& p) { p.w.scales = nudge(p.w.scales, 1); });
  rejects<P>(*op, "x stride", TK_ERR_INVALID_ARGUMENT, {"x row stride 95"}, [](P& p) { p.x_stride = 95; });
  rejects<P>(*op, "N", TK_ERR_INVALID_ARGUMENT, {"shape [0, 96]"}, [](P& p) { p.w.N = 0; });
  rejects<P>(*op, "dtype", TK_ERR_UNSUPPORTED, {"unsupported activation dtype"},
             [](P& p) { p.dtype = kBadDtype; });
}

TEST(HostBadInput, QuantizeInt4) {
  std::vector<float> w(4 * 96, 0.5f);
  std::vector<uint8_t> packed(4 * 48), zeros(4 * 3);
  std::vector<uint16_t> scales(4 * 3);
  auto q = [&](tk_dtype src, int64_t stride, int64_t K, int64_t g, int sym, tk_dtype sd, uint8_t* z) {
    return tk_quantize_int4(src, w.data(), stride, 4, K, g, sym, sd, packed.data(), scales.data(), z);
  };
  auto says = [](const char* part) { return std::string(tk_last_error()).find(part) != std::string::npos; };
  EXPECT_EQ(q(TK_F32, 96, 96, 32, 1, TK_F16, nullptr), TK_OK) << tk_last_error();
  EXPECT_EQ(q(TK_F32, 96, 96, 48, 1, TK_F16, nullptr), TK_ERR_UNSUPPORTED);
  EXPECT_TRUE(says("group size 48")) << tk_last_error();
  EXPECT_EQ(q(TK_F32, 96, 96, 64, 1, TK_F16, nullptr), TK_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(says("does not divide K = 96")) << tk_last_error();
  EXPECT_EQ(q(TK_F32, 96, 96, 32, 0, TK_F16, nullptr), TK_ERR_NULL_POINTER);
  EXPECT_TRUE(says("asymmetric needs zeros")) << tk_last_error();
  EXPECT_EQ(q(kBadDtype, 96, 96, 32, 1, TK_F16, nullptr), TK_ERR_UNSUPPORTED);
  EXPECT_TRUE(says("unsupported source dtype 3")) << tk_last_error();
  EXPECT_EQ(q(TK_F32, 95, 96, 32, 1, TK_F16, nullptr), TK_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(says("w row stride 95")) << tk_last_error();
  EXPECT_EQ(q(TK_F32, 96, 96, 32, 1, TK_F32, nullptr), TK_ERR_UNSUPPORTED);
  EXPECT_TRUE(says("scale dtype")) << tk_last_error();
  w[100] = INFINITY;
  EXPECT_EQ(q(TK_F32, 96, 96, 32, 0, TK_BF16, zeros.data()), TK_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(says("w[1, 4] is not finite")) << tk_last_error();
}

TEST_P(BadInput, FusedFfn) {
  FusedFfnShape dense{TK_BF16, 2, 64, 24};
  dense.weight_dtype = TK_BF16;
  FusedFfnShape int4 = dense;
  int4.format = TK_WEIGHTS_INT4;
  int4.q = Int4Spec{64, TK_BF16, false};
  using P = tk_fused_ffn_params;
  auto d = built<FusedFfnTest>(dense, rng(), GetParam());
  rejects<P>(*d, "format", TK_ERR_INVALID_ARGUMENT, {"fused_ffn", "unknown weight format 7"},
             [](P& p) { set_raw(p.format, 7); });
  rejects<P>(*d, "algo", TK_ERR_INVALID_ARGUMENT, {"unknown algo 9"}, [](P& p) { set_raw(p.algo, 9); });
  rejects<P>(*d, "norm_weight null", TK_ERR_NULL_POINTER, {"norm_weight is null"},
             [](P& p) { p.norm_weight = nullptr; });
  rejects<P>(*d, "w_gate null", TK_ERR_NULL_POINTER, {"w_gate is null"}, [](P& p) { p.w_gate = nullptr; });
  rejects<P>(*d, "w_up stride", TK_ERR_INVALID_ARGUMENT, {"w_up row stride 63"}, [](P& p) { p.w_up_stride = 63; });
  rejects<P>(*d, "w_up misaligned", TK_ERR_MISALIGNED, {"w_up (", "not aligned"},
             [](P& p) { p.w_up = nudge(p.w_up, 1); });
  rejects<P>(*d, "weight dtype", TK_ERR_UNSUPPORTED, {"unsupported weight dtype"},
             [](P& p) { p.weight_dtype = kBadDtype; });
  rejects<P>(*d, "eps", TK_ERR_INVALID_ARGUMENT, {"eps = -1"}, [](P& p) { p.eps = -1; });
  rejects<P>(*d, "out stride", TK_ERR_INVALID_ARGUMENT, {"out row stride"}, [](P& p) { p.out_stride = 2; });
  auto q = built<FusedFfnTest>(int4, rng(), GetParam());
  rejects<P>(*q, "int4 shape", TK_ERR_INVALID_ARGUMENT, {"must both be [F, D] = [24, 64]"},
             [](P& p) { p.q_up.N = 25; });
  rejects<P>(*q, "int4 group", TK_ERR_UNSUPPORTED, {"q_gate group size 16"}, [](P& p) { p.q_gate.group_size = 16; });
  rejects<P>(*q, "int4 group not dividing", TK_ERR_INVALID_ARGUMENT, {"q_up group size 128 does not divide K = 64"},
             [](P& p) { p.q_up.group_size = 128; });
  rejects<P>(*q, "int4 packed null", TK_ERR_NULL_POINTER, {"q_up packed weights are null"},
             [](P& p) { p.q_up.packed = nullptr; });
}

TEST_P(BadInput, AttnFront) {
  AttnFrontShape s{TK_F16, 64, 4, 2, 64, 64, 16, {2, 1}};
  s.extra_pos = 400;
  auto op = built<AttnFrontTest>(s, rng(), GetParam());
  using P = tk_attn_front_params;
  rejects<P>(*op, "Hq not a multiple of Hkv", TK_ERR_INVALID_ARGUMENT,
             {"attn_front", "num_q_heads = 3 is not a multiple of num_kv_heads = 2"},
             [](P& p) { p.num_q_heads = 3; });
  rejects<P>(*op, "cache dtype", TK_ERR_UNSUPPORTED, {"cache dtype bf16 differs from f16"},
             [](P& p) { p.cache.dtype = TK_BF16; });
  rejects<P>(*op, "page size 3", TK_ERR_UNSUPPORTED, {"page_size = 3", "power of two"},
             [](P& p) { p.cache.page_size = 3; });
  rejects<P>(*op, "page size 512", TK_ERR_UNSUPPORTED, {"page_size = 512"}, [](P& p) { p.cache.page_size = 512; });
  rejects<P>(*op, "w_qkv stride", TK_ERR_INVALID_ARGUMENT, {"w_qkv row stride 63"},
             [](P& p) { p.w_qkv_stride = 63; });
  rejects<P>(*op, "q_out null", TK_ERR_NULL_POINTER, {"q_out is null"}, [](P& p) { p.q_out = nullptr; });
  rejects<P>(*op, "seq_ids null", TK_ERR_NULL_POINTER, {"seq_ids is null"}, [](P& p) { p.seq_ids = nullptr; });
  rejects<P>(*op, "cache.v misaligned", TK_ERR_MISALIGNED, {"cache.v (", "not aligned"},
             [](P& p) { p.cache.v = nudge(p.cache.v, 1); });
  rejects<P>(*op, "block_table null", TK_ERR_NULL_POINTER, {"cache.block_table is null"},
             [](P& p) { p.cache.block_table = nullptr; });
  rejects<P>(*op, "rot_dim", TK_ERR_INVALID_ARGUMENT, {"rot_dim = 65"}, [](P& p) { p.rot_dim = 65; });
  rejects<P>(*op, "head_dim", TK_ERR_INVALID_ARGUMENT, {"cache.head_dim = 0"}, [](P& p) { p.cache.head_dim = 0; });

  int32_t* seq = op->seq_ids->i32();
  int32_t* pos = op->positions->i32();
  int32_t* table = op->cache.block_table->i32();
  const int32_t s0 = seq[0], p0 = pos[0];
  const int64_t entry = s0 * op->cache.max_blocks + p0 / op->cache.page;
  const int32_t b0 = table[entry];
  bad_index(*op, "seq id out of range", TK_ERR_OUT_OF_RANGE, {"seq_ids[0] = 2", "out of range [0, 2)"},
            [&] { seq[0] = 2; }, [&] { seq[0] = s0; });
  bad_index(*op, "block-table entry out of range", TK_ERR_OUT_OF_RANGE,
            {"block_table[", "out of range [0, " + std::to_string(op->cache.num_blocks) + ")"},
            [&] { table[entry] = int32_t(op->cache.num_blocks); }, [&] { table[entry] = b0; });
  bad_index(*op, "negative block-table entry", TK_ERR_OUT_OF_RANGE, {"block_table["},
            [&] { table[entry] = -1; }, [&] { table[entry] = b0; });
  bad_index(*op, "position past the rope table", TK_ERR_OUT_OF_RANGE, {"positions[0]", "past the rope table"},
            [&] { pos[0] = int32_t(op->max_pos); }, [&] { pos[0] = p0; });
  const int32_t past_table = int32_t(op->cache.page * op->cache.max_blocks);
  ASSERT_LT(past_table, op->max_pos);
  bad_index(*op, "position past the block table", TK_ERR_OUT_OF_RANGE,
            {"needs", "but its block table holds " + std::to_string(op->cache.max_blocks)},
            [&] { pos[0] = past_table; }, [&] { pos[0] = p0; });
}

TEST_P(BadInput, FlashAttention) {
  FlashShape s{TK_BF16, 4, 2, 64, {{5, 7}, {3, 3}}, true, true};
  auto op = built<FlashTest>(s, rng(), GetParam());
  using P = tk_flash_attention_params;
  rejects<P>(*op, "Hq not a multiple of Hkv", TK_ERR_INVALID_ARGUMENT,
             {"flash_attention", "num_q_heads = 4 is not a multiple of num_kv_heads = 3"},
             [](P& p) { p.num_kv_heads = 3; });
  rejects<P>(*op, "scale", TK_ERR_INVALID_ARGUMENT, {"scale = 0"}, [](P& p) { p.scale = 0; });
  rejects<P>(*op, "scale NaN", TK_ERR_INVALID_ARGUMENT, {"scale"}, [](P& p) { p.scale = NAN; });
  rejects<P>(*op, "k null", TK_ERR_NULL_POINTER, {"k is null"}, [](P& p) { p.k = nullptr; });
  rejects<P>(*op, "v misaligned", TK_ERR_MISALIGNED, {"v (", "not aligned"}, [](P& p) { p.v = nudge(p.v, 1); });
  rejects<P>(*op, "lse misaligned", TK_ERR_MISALIGNED, {"lse (", "not aligned to 4"},
             [](P& p) { p.lse = static_cast<float*>(nudge(p.lse, 2)); });
  rejects<P>(*op, "out overlaps", TK_ERR_INVALID_ARGUMENT, {"out strides", "overlap"},
             [](P& p) { p.out_token_stride = 100; });
  rejects<P>(*op, "cu_seqlens_k null", TK_ERR_NULL_POINTER, {"cu_seqlens_k is null"},
             [](P& p) { p.cu_seqlens_k = nullptr; });
  rejects<P>(*op, "batch", TK_ERR_INVALID_ARGUMENT, {"batch = 0"}, [](P& p) { p.batch = 0; });
  rejects<P>(*op, "head_dim", TK_ERR_INVALID_ARGUMENT, {"head_dim = 0"}, [](P& p) { p.head_dim = 0; });
  rejects<P>(*op, "dtype", TK_ERR_UNSUPPORTED, {"unsupported activation dtype"}, [](P& p) { p.dtype = kBadDtype; });

  int32_t* cq = op->cu_q->i32();
  int32_t* ck = op->cu_k->i32();
  bad_index(*op, "cu_seqlens_q past total_q", TK_ERR_OUT_OF_RANGE, {"cu_seqlens_q[2] = 9", "past the 8 rows"},
            [&] { cq[2] = 9; }, [&] { cq[2] = 8; });
  bad_index(*op, "cu_seqlens_k past total_k", TK_ERR_OUT_OF_RANGE, {"cu_seqlens_k[2] = 11", "past the 10 rows"},
            [&] { ck[2] = 11; }, [&] { ck[2] = 10; });
  rejects_on_host(*op, "cu_seqlens_k decreasing", TK_ERR_INVALID_ARGUMENT, {"cu_seqlens_k decreases at 1"},
                  [&] { ck[2] = 6; }, [&] { ck[2] = 10; });
  rejects_on_host(*op, "sequence longer than max_seqlen", TK_ERR_INVALID_ARGUMENT,
                  {"sequence 0 has length 5, more than max_seqlen 4"},
                  [&] { op->mutate = [](P& p) { p.max_seqlen_q = 4; }; }, [&] { op->mutate = nullptr; });
  rejects_on_host(*op, "cu_seqlens_q[0] not 0", TK_ERR_INVALID_ARGUMENT, {"cu_seqlens_q[0] = 1 must be 0"},
                  [&] { cq[0] = 1; }, [&] { cq[0] = 0; });
}

TEST_P(BadInput, PagedAttention) {
  PagedShape s{TK_F16, 8, 2, 128, 16, {{1, 40}, {3, 20}}, true, true};
  auto op = built<PagedTest>(s, rng(), GetParam());
  using P = tk_paged_attention_params;
  rejects<P>(*op, "Hq not a multiple of Hkv", TK_ERR_INVALID_ARGUMENT,
             {"paged_attention", "num_q_heads = 6 is not a multiple of num_kv_heads = 4"},
             [](P& p) { p.num_q_heads = 6; p.cache.num_kv_heads = 4; });
  rejects<P>(*op, "page size 24", TK_ERR_UNSUPPORTED, {"page_size = 24", "power of two"},
             [](P& p) { p.cache.page_size = 24; });
  rejects<P>(*op, "workspace null", TK_ERR_NULL_POINTER, {"workspace is null but workspace_bytes = 64"},
             [](P& p) { p.workspace = nullptr; p.workspace_bytes = 64; });
  rejects<P>(*op, "no cu_seqlens, several queries", TK_ERR_INVALID_ARGUMENT, {"without cu_seqlens_q"},
             [](P& p) { p.cu_seqlens_q = nullptr; });
  rejects<P>(*op, "q null", TK_ERR_NULL_POINTER, {"q is null"}, [](P& p) { p.q = nullptr; });
  rejects<P>(*op, "context_lens null", TK_ERR_NULL_POINTER, {"context_lens is null"},
             [](P& p) { p.context_lens = nullptr; });
  rejects<P>(*op, "cache.k misaligned", TK_ERR_MISALIGNED, {"cache.k (", "not aligned"},
             [](P& p) { p.cache.k = nudge(p.cache.k, 1); });
  rejects<P>(*op, "scale", TK_ERR_INVALID_ARGUMENT, {"scale = -1"}, [](P& p) { p.scale = -1; });
  rejects<P>(*op, "max_q_len", TK_ERR_INVALID_ARGUMENT, {"max_q_len = 0"}, [](P& p) { p.max_q_len = 0; });
  rejects<P>(*op, "cache dtype", TK_ERR_UNSUPPORTED, {"cache dtype f32 differs from f16"},
             [](P& p) { p.cache.dtype = TK_F32; });
  if (op->workspace)
    rejects<P>(*op, "workspace misaligned", TK_ERR_MISALIGNED, {"workspace (", "not aligned to 16"},
               [](P& p) { p.workspace = nudge(p.workspace, 8); });

  int32_t* lens = op->context_lens->i32();
  int32_t* table = op->cache.block_table->i32();
  int32_t* cq = op->cu_q->i32();
  const int64_t mb = op->cache.max_blocks;
  const int32_t b1 = table[mb + 0];
  bad_index(*op, "block-table entry out of range", TK_ERR_OUT_OF_RANGE,
            {"block_table[1, 0] = " + std::to_string(op->cache.num_blocks + 5), "out of range"},
            [&] { table[mb] = int32_t(op->cache.num_blocks + 5); }, [&] { table[mb] = b1; });
  bad_index(*op, "negative block-table entry", TK_ERR_OUT_OF_RANGE, {"block_table[1, 0] = -3"},
            [&] { table[mb] = -3; }, [&] { table[mb] = b1; });
  // A context longer than its block table holds (max_context_len raised to match).
  const int32_t too_long = int32_t(op->cache.page * mb + 1);
  bad_index(*op, "context longer than its block table", TK_ERR_OUT_OF_RANGE,
            {"sequence 0 needs", "block table holds " + std::to_string(mb)},
            [&] { lens[0] = too_long; op->mutate = [=](P& p) { p.max_context_len = too_long; }; },
            [&] { lens[0] = 40; op->mutate = nullptr; });
  bad_index(*op, "cu_seqlens_q past total_q", TK_ERR_OUT_OF_RANGE, {"cu_seqlens_q[2] = 5", "past the 4 rows"},
            [&] { cq[1] = 2; cq[2] = 5; }, [&] { cq[1] = 1; cq[2] = 4; });
  rejects_on_host(*op, "context shorter than its queries", TK_ERR_INVALID_ARGUMENT,
                  {"context_lens[1] = 2", "q_len = 3"}, [&] { lens[1] = 2; }, [&] { lens[1] = 20; });
  rejects_on_host(*op, "context past max_context_len", TK_ERR_INVALID_ARGUMENT,
                  {"context_lens[0] = 41", "max_context_len = 40"}, [&] { lens[0] = 41; }, [&] { lens[0] = 40; });
}

// Head dims beyond the required 64 / 128 / 256: either right or refused by
// name, never a silent wrong answer (the op suites check "right").
TEST_P(BadInput, UnsupportedHeadDimIsNamed) {
  for (int64_t dh : {80, 40}) {
    FlashShape s{TK_F16, 2, 1, dh, {{4, 6}}, true, false};
    auto op = built<FlashTest>(s, rng(), GetParam());
    const Result r = execute(ctx_, *op);
    if (r.status == TK_ERR_UNSUPPORTED) {
      EXPECT_NE(r.message.find(std::to_string(dh)), std::string::npos)
          << "the message \"" << r.message << "\" does not name head dim " << dh;
      expect_untouched(*op, r);
    } else {
      EXPECT_EQ(r.status, TK_OK) << r.message;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Reference, BadInput, ::testing::Values(TK_BACKEND_REFERENCE));
INSTANTIATE_TEST_SUITE_P(Cpu, BadInput, ::testing::Values(TK_BACKEND_CPU));
INSTANTIATE_TEST_SUITE_P(Cuda, BadInput, ::testing::Values(TK_BACKEND_CUDA));

}  // namespace
}  // namespace tk::test
