// rmsnorm, rmsnorm_residual, rope, swiglu (and tk_swiglu_concat) against the reference.
#include <cmath>

#include "ops.h"

namespace tk::test {

// ---------------------------------------------------------------------------
// rmsnorm / rmsnorm_residual
// ---------------------------------------------------------------------------
RmsnormTest::RmsnormTest(RmsnormShape s) : s_(s) {}

std::string RmsnormShape::name() const {
  return tag(dtype) + tag("_T", T) + tag("_D", D) + layout_spec(layout).tag +
         (in_place ? "_inplace" : "") + (magnitude > 10 ? "_large" : "");
}

void RmsnormTest::build(Rng& rng) {
  const LayoutSpec l = layout_spec(s_.layout);
  const Elem e = elem_of(s_.dtype);
  const std::vector<int64_t> shape{s_.T, s_.D};
  x = add(Tensor("x", e, s_.in_place ? Role::InOut : Role::In, shape, padded_strides(shape, l.pad),
                 l.lead));
  x->fill(rng, -s_.magnitude, s_.magnitude);
  if (s_.residual) {
    residual = add(Tensor("residual", e, Role::InOut, shape, padded_strides(shape, l.pad * 2), l.lead));
    residual->fill(rng, -s_.magnitude, s_.magnitude);
  }
  weight = add(Tensor("weight", e, Role::In, {s_.D}, {}, l.lead));
  weight->fill(rng, -2, 2);
  if (!s_.in_place)
    y = add(Tensor("y", e, Role::Out, shape, padded_strides(shape, l.pad ? l.pad + 5 : 0), l.lead));
}

tk_rmsnorm_params RmsnormTest::params(const Bound& b) const {
  tk_rmsnorm_params p{};
  p.dtype = s_.dtype;
  p.rows = s_.T;
  p.dim = s_.D;
  p.x = b(x);
  p.x_stride = x->stride(0);
  if (residual) {
    p.residual = b(residual);
    p.residual_stride = residual->stride(0);
  }
  p.weight = b(weight);
  const Tensor* out = s_.in_place ? x : y;
  p.y = b(out);
  p.y_stride = out->stride(0);
  p.eps = 1e-5f;
  return p;
}

tk_status RmsnormTest::call(tk_context* ctx, const tk_rmsnorm_params& p) const {
  return tk_rmsnorm(ctx, &p);
}

void RmsnormTest::compare(const Result& out, const Result& ref) const {
  const Tol tol = tolerance(OpKind::Elementwise, s_.dtype);
  const Tensor* result = s_.in_place ? x : y;
  EXPECT_TRUE(compare_close(out.of(result), ref.of(result), tol));
  if (residual) {
    EXPECT_TRUE(compare_close(out.of(residual), ref.of(residual), tol));
  }
}

std::vector<Case> rmsnorm_cases(bool residual) {
  struct TD { int64_t T, D; };
  const TD shapes[] = {{1, 1},  {1, 3},    {3, 113}, {2, 4097}, {5, 31}, {4, 32},
                       {3, 33}, {16, 4096}, {1, 8192}, {7, 64},  {0, 16},
                       // f32 output over 16 MiB: the CPU's non-temporal store path.
                       {1021, 4113}};
  std::vector<Case> cases;
  int i = 0;
  for (tk_dtype d : kDtypes)
    for (const TD& td : shapes) {
      RmsnormShape s{d, td.T, td.D, kLayouts[i % 4], residual, i % 5 == 2,
                     i % 3 == 1 ? (d == TK_F16 ? 300.0 : 1e4) : 1.0};
      ++i;
      cases.push_back({s.name(), [s] { return std::make_unique<RmsnormTest>(s); }});
    }
  return cases;
}

std::vector<Case> rmsnorm_cases_plain() { return rmsnorm_cases(false); }
std::vector<Case> rmsnorm_cases_residual() { return rmsnorm_cases(true); }
TK_OP_SUITE(Rmsnorm, rmsnorm_cases_plain);
TK_OP_SUITE(RmsnormResidual, rmsnorm_cases_residual);

// The CPU backend and the reference, for the tests below that call both.
class CpuAgainstReference : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    cpu = context(TK_BACKEND_CPU, &why);
    ASSERT_NE(cpu, nullptr) << why;
    ref = context(TK_BACKEND_REFERENCE, &why);
    ASSERT_NE(ref, nullptr) << why;
  }
  tk_context* cpu = nullptr;
  tk_context* ref = nullptr;
};

// The CPU backend converts an f16 / bf16 weight row to f32 once per task, in
// a per-thread scratch row that later calls reuse: calls that change the
// weight and the dim (growing, shrinking, growing back) must each use their
// own weight, here one element past a 64-byte boundary, with and without
// the residual, on rows split between threads.
TEST_F(CpuAgainstReference, RmsnormWeightOfEachCall) {
  Rng rng(test_seed());
  const int64_t T = 37;
  for (tk_dtype dt : {TK_F16, TK_BF16})
    for (bool residual : {false, true})
      for (int64_t D : {4097, 8, 4097, 131, 8192, 4097}) {
        const auto bits = [&](double v) { return dt == TK_F16 ? f32_to_f16(float(v)) : f32_to_bf16(float(v)); };
        const auto value = [&](uint16_t h) { return dt == TK_F16 ? f16_to_f32(h) : bf16_to_f32(h); };
        std::vector<uint16_t> x(size_t(T * D)), w(size_t(D + 1)), r(size_t(T * D)), y(size_t(T * D), 0x7fc0);
        for (auto& v : x) v = bits(rng.uniform(-3, 3));
        for (auto& v : r) v = bits(rng.uniform(-3, 3));
        for (auto& v : w) v = bits(rng.uniform(-2, 2));
        std::vector<uint16_t> r_ref = r, y_ref(y.size());
        tk_rmsnorm_params p{dt, T, D, x.data(), D, residual ? r.data() : nullptr, D, w.data() + 1,
                            y.data(), D, 1e-5f};
        ASSERT_EQ(tk_rmsnorm(cpu, &p), TK_OK) << tk_last_error();
        p.residual = residual ? r_ref.data() : nullptr;
        p.y = y_ref.data();
        ASSERT_EQ(tk_rmsnorm(ref, &p), TK_OK) << tk_last_error();
        const double rel = dt == TK_F16 ? 2e-3 : 1.6e-2;
        size_t bad = 0;
        for (size_t i = 0; i < y.size(); ++i) {
          const double got = value(y[i]), want = value(y_ref[i]);
          bad += !(std::fabs(got - want) <= rel * std::fabs(want) + rel * 1e-2);
          if (residual) bad += r[i] != r_ref[i];
        }
        EXPECT_EQ(bad, 0u) << tk_dtype_name(dt) << " D " << D << (residual ? " residual" : "");
      }
}

// bf16 outputs round to nearest even, NaNs stay NaN and overflow gives inf,
// bit for bit as the reference rounds them, on whole vectors and row tails
// (on AVX512_BF16 CPUs the backend rounds in hardware): r <- x + r of
// rmsnorm_residual with sums at ties, just off ties, past the largest bf16,
// and with NaN and inf operands. (Results below 2^-126 are left out: the
// hardware flushes them to zero, as the header says.)
TEST_F(CpuAgainstReference, Bf16RoundsAsTheReference) {
  // (x, r) pairs as bf16 bits: 1 + 2^-8 (tie, to even 1), 1 + 3 * 2^-8 (tie,
  // up), 1 + 2^-8 + 2^-15 (past the tie), -1 - 2^-8, max + max (inf),
  // quiet and signalling NaN, inf - inf, and plain values.
  const uint16_t pairs[][2] = {{0x3f80, 0x3b80}, {0x3f80, 0x3c40}, {0x3f81, 0x3b80}, {0xbf80, 0xbb80},
                               {0x7f7f, 0x7f7f}, {0xff7f, 0xff7f}, {0x7fc1, 0x3f80}, {0x7f81, 0x3f80},
                               {0x7f80, 0xff80}, {0x4049, 0x3fc0}, {0xc2f7, 0x4111}, {0x0000, 0x8000}};
  constexpr size_t kPairs = sizeof(pairs) / sizeof(pairs[0]);
  const int64_t T = 3, D = 69;  // four vectors of 16 and a tail of 5 per row
  std::vector<uint16_t> x(size_t(T * D)), r(x.size()), w(size_t(D), 0x3f80), y(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    x[i] = pairs[(i * 7) % kPairs][0];
    r[i] = pairs[(i * 7) % kPairs][1];
  }
  std::vector<uint16_t> r_ref = r, y_ref(y.size());
  tk_rmsnorm_params p{TK_BF16, T, D, x.data(), D, r.data(), D, w.data(), y.data(), D, 1e-5f};
  ASSERT_EQ(tk_rmsnorm(cpu, &p), TK_OK) << tk_last_error();
  p.residual = r_ref.data();
  p.y = y_ref.data();
  ASSERT_EQ(tk_rmsnorm(ref, &p), TK_OK) << tk_last_error();
  const auto is_nan = [](uint16_t h) { return (h & 0x7fff) > 0x7f80; };
  for (size_t i = 0; i < r.size(); ++i) {
    if (is_nan(r_ref[i])) {
      EXPECT_TRUE(is_nan(r[i])) << "element " << i << ": " << std::hex << r[i];
    } else {
      EXPECT_EQ(r[i], r_ref[i]) << "element " << i << " x " << std::hex << x[i] << " r " << r_ref[i];
    }
  }
}

// ---------------------------------------------------------------------------
// rope
// ---------------------------------------------------------------------------
std::string RopeShape::name() const {
  return tag(dtype) + (style == TK_ROPE_NEOX ? "_neox" : "_gptj") + tag("_T", T) + tag("_Hq", Hq) +
         tag("_Hkv", Hkv) + tag("_Dh", Dh) + tag("_rot", rot) + layout_spec(layout).tag +
         (head_major ? "_headmajor" : "") + (llama3 ? "_llama3" : "");
}

RopeTest::RopeTest(RopeShape s) : s_(s) {}

namespace {
// [T, H, Dh] as token-major (padded) or head-major ([H, T, Dh] in memory).
Tensor heads_tensor(const char* name, Elem e, Role role, int64_t T, int64_t H, int64_t Dh,
                    int64_t pad, int64_t lead, bool head_major) {
  if (!head_major) return Tensor(name, e, role, {T, H, Dh}, padded_strides({T, H, Dh}, pad), lead);
  const int64_t token_stride = Dh + pad, head_stride = T * token_stride + pad;
  return Tensor(name, e, role, {T, H, Dh}, {token_stride, head_stride, 1}, lead);
}
}  // namespace

void RopeTest::build(Rng& rng) {
  const LayoutSpec l = layout_spec(s_.layout);
  const Elem e = elem_of(s_.dtype);
  q = add(heads_tensor("q", e, Role::InOut, s_.T, s_.Hq, s_.Dh, l.pad, l.lead, s_.head_major));
  q->fill(rng, -4, 4);
  if (s_.Hkv > 0) {
    k = add(heads_tensor("k", e, Role::InOut, s_.T, s_.Hkv, s_.Dh, l.pad, l.lead, s_.head_major));
    k->fill(rng, -4, 4);
  }
  positions = add(Tensor("positions", Elem::I32, Role::In, {s_.T}));
  for (int64_t t = 0; t < s_.T; ++t) positions->i32()[t] = int32_t(rng.range(0, s_.max_pos - 1));
  if (s_.T > 0) positions->i32()[s_.T - 1] = int32_t(s_.max_pos - 1);  // the table's last row
  const int64_t half = s_.rot / 2;
  cos_table = add(Tensor("cos_table", Elem::F32, Role::In, {s_.max_pos, half}));
  sin_table = add(Tensor("sin_table", Elem::F32, Role::In, {s_.max_pos, half}));
  const tk_rope_scaling llama3{1, 8.0f, 1.0f, 4.0f, 8192};
  const tk_status st = tk_rope_table(reinterpret_cast<float*>(cos_table->bytes.data()),
                                     reinterpret_cast<float*>(sin_table->bytes.data()), s_.max_pos,
                                     s_.rot, s_.llama3 ? 500000.0 : 10000.0,
                                     s_.llama3 ? &llama3 : nullptr);
  EXPECT_EQ(st, TK_OK) << tk_last_error();
}

tk_rope_params RopeTest::params(const Bound& b) const {
  tk_rope_params p{};
  p.dtype = s_.dtype;
  p.style = s_.style;
  p.tokens = s_.T;
  p.head_dim = s_.Dh;
  p.rot_dim = s_.rot;
  p.q = b(q);
  p.num_q_heads = s_.Hq;
  p.q_token_stride = q->stride(0);
  p.q_head_stride = q->stride(1);
  if (k) {
    p.k = b(k);
    p.num_k_heads = s_.Hkv;
    p.k_token_stride = k->stride(0);
    p.k_head_stride = k->stride(1);
  }
  p.positions = static_cast<const int32_t*>(b(positions));
  p.cos_table = static_cast<const float*>(b(cos_table));
  p.sin_table = static_cast<const float*>(b(sin_table));
  p.max_pos = s_.max_pos;
  return p;
}

tk_status RopeTest::call(tk_context* ctx, const tk_rope_params& p) const { return tk_rope(ctx, &p); }

void RopeTest::compare(const Result& out, const Result& ref) const {
  const Tol tol = tolerance(OpKind::Elementwise, s_.dtype);
  for (const Tensor* t : {q, k}) {
    if (!t) continue;
    EXPECT_TRUE(compare_close(out.of(t), ref.of(t), tol));
    // Partial rotary: the elements past rot_dim are passed through bit for bit.
    const Tensor& a = out.of(t);
    int64_t changed = 0;
    t->for_each([&](const std::vector<int64_t>& idx, int64_t e) {
      if (idx[2] >= s_.rot && std::memcmp(&a.bytes[e * elem_size(t->elem)],
                                          &t->bytes[e * elem_size(t->elem)], elem_size(t->elem)))
        ++changed;
    });
    EXPECT_EQ(changed, 0) << t->name << ": elements past rot_dim must not change";
  }
}

std::vector<Case> rope_cases() {
  struct Cfg { int64_t T, Hq, Hkv, Dh, rot, max_pos; };
  const Cfg cfgs[] = {{1, 1, 1, 64, 64, 1},      {3, 4, 1, 128, 128, 16},  {17, 8, 2, 128, 64, 4096},
                      {5, 32, 8, 128, 128, 8192}, {113, 2, 2, 256, 256, 200}, {2, 3, 0, 6, 4, 3},
                      {7, 1, 1, 2, 2, 7},        {33, 4, 4, 80, 32, 131072}, {4, 5, 5, 31, 30, 64},
                      {0, 2, 1, 64, 64, 8}};
  std::vector<Case> cases;
  int i = 0;
  for (tk_dtype d : kDtypes)
    for (const Cfg& c : cfgs) {
      RopeShape s{d, i % 2 ? TK_ROPE_GPTJ : TK_ROPE_NEOX, c.T, c.Hq, c.Hkv, c.Dh, c.rot,
                  c.max_pos, kLayouts[(i / 2) % 4], i % 7 == 3, c.max_pos >= 8192};
      ++i;
      cases.push_back({s.name(), [s] { return std::make_unique<RopeTest>(s); }});
    }
  return cases;
}
TK_OP_SUITE(Rope, rope_cases);

// ---------------------------------------------------------------------------
// swiglu
// ---------------------------------------------------------------------------
std::string SwigluShape::name() const {
  return tag(dtype) + tag("_T", T) + tag("_F", F) + layout_spec(layout).tag +
         (concat ? "_concat" : "") + (large_gate ? "_gate100" : "");
}

SwigluTest::SwigluTest(SwigluShape s) : s_(s) {}

void SwigluTest::build(Rng& rng) {
  const LayoutSpec l = layout_spec(s_.layout);
  const Elem e = elem_of(s_.dtype);
  // Gates of +-100: exp(-g) overflows f32 at g = -100, which must give silu = 0, not NaN.
  const double g = s_.large_gate ? 100 : 6;
  if (s_.concat) {
    gate_up = add(Tensor("gate_up", e, Role::In, {s_.T, 2 * s_.F},
                         padded_strides({s_.T, 2 * s_.F}, l.pad), l.lead));
    gate_up->for_each([&](const std::vector<int64_t>& idx, int64_t off) {
      gate_up->set(off, idx[1] < s_.F ? rng.uniform(-g, g) : rng.uniform(-3, 3));
    });
  } else {
    gate = add(Tensor("gate", e, Role::In, {s_.T, s_.F}, padded_strides({s_.T, s_.F}, l.pad), l.lead));
    gate->fill(rng, -g, g);
    up = add(Tensor("up", e, Role::In, {s_.T, s_.F}, padded_strides({s_.T, s_.F}, 2 * l.pad), l.lead));
    up->fill(rng, -3, 3);
  }
  out = add(Tensor("out", e, Role::Out, {s_.T, s_.F},
                   padded_strides({s_.T, s_.F}, l.pad ? l.pad + 1 : 0), l.lead));
}

tk_swiglu_params SwigluTest::params(const Bound& b) const {
  tk_swiglu_params p{};
  p.dtype = s_.dtype;
  p.rows = s_.T;
  p.dim = s_.F;
  if (s_.concat) {  // tk_swiglu_concat's arguments travel in gate / gate_stride
    p.gate = b(gate_up);
    p.gate_stride = gate_up->stride(0);
  } else {
    p.gate = b(gate);
    p.gate_stride = gate->stride(0);
    p.up = b(up);
    p.up_stride = up->stride(0);
  }
  p.out = b(out);
  p.out_stride = out->stride(0);
  return p;
}

tk_status SwigluTest::call(tk_context* ctx, const tk_swiglu_params& p) const {
  if (s_.concat)
    return tk_swiglu_concat(ctx, p.dtype, p.rows, p.dim, p.gate, p.gate_stride, p.out, p.out_stride);
  return tk_swiglu(ctx, &p);
}

void SwigluTest::compare(const Result& o, const Result& ref) const {
  EXPECT_TRUE(compare_close(o.of(out), ref.of(out), tolerance(OpKind::Elementwise, s_.dtype)));
}

std::vector<Case> swiglu_cases() {
  struct TF { int64_t T, F; };
  const TF shapes[] = {{1, 1},  {1, 3}, {3, 113}, {2, 4097}, {5, 31},
                       {4, 32}, {3, 33}, {16, 14336}, {0, 7},
                       {585, 7177}};  // f32 output over 16 MiB: non-temporal stores
  std::vector<Case> cases;
  int i = 0;
  for (tk_dtype d : kDtypes)
    for (const TF& tf : shapes)
      for (bool concat : {false, true}) {
        SwigluShape s{d, tf.T, tf.F, kLayouts[i % 4], concat, i % 3 == 0};
        ++i;
        cases.push_back({s.name(), [s] { return std::make_unique<SwigluTest>(s); }});
      }
  return cases;
}
TK_OP_SUITE(Swiglu, swiglu_cases);

}  // namespace tk::test
