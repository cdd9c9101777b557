// The harness's own tests: the comparator fails on wrong results, the run
// checks catch unwritten outputs and stray writes, and the reference (the
// oracle) agrees with hand-computed values and with itself across ops.
#include <gtest/gtest-spi.h>

#include <cmath>

#include "ops.h"

namespace tk::test {
namespace {

Tensor filled(const char* name, tk_dtype d, std::vector<int64_t> shape, Rng& rng, int64_t pad = 0) {
  std::vector<int64_t> st = padded_strides(shape, pad);
  Tensor t(name, elem_of(d), Role::Out, std::move(shape), std::move(st));
  t.fill(rng, -2, 2);
  return t;
}

// ---------------------------------------------------------------------------
// Comparator
// ---------------------------------------------------------------------------
TEST(Harness, ComparatorPassesIdentical) {
  Rng rng(1);
  for (tk_dtype d : kDtypes) {
    Tensor a = filled("y", d, {3, 17}, rng, 3);
    EXPECT_TRUE(compare_close(a, a, tolerance(OpKind::Elementwise, d)));
  }
}

TEST(Harness, ComparatorFailsOnOneWrongElement) {
  Rng rng(2);
  for (tk_dtype d : kDtypes) {
    Tensor ref = filled("y", d, {4, 33}, rng, 5);
    Tensor out = ref;
    out.put({1, 2}, ref.at({1, 2}) * 1.05 + 0.01);
    ::testing::AssertionResult r = compare_close(out, ref, tolerance(OpKind::Elementwise, d));
    EXPECT_FALSE(r) << tag(d);
    EXPECT_NE(std::string(r.message()).find("[1, 2]"), std::string::npos) << r.message();
  }
}

TEST(Harness, ComparatorAllowsOneUlpAndRejectsEight) {
  Rng rng(3);
  for (tk_dtype d : {TK_F16, TK_BF16}) {
    Tensor ref = filled("y", d, {64}, rng);
    ref.put({5}, 1.5);
    Tensor one = ref, eight = ref;
    const double ulp = d == TK_F16 ? 1.0 / 1024 : 1.0 / 128;  // at [1, 2)
    one.put({5}, 1.5 + ulp);
    eight.put({5}, 1.5 + 8 * ulp);
    EXPECT_TRUE(compare_close(one, ref, tolerance(OpKind::Elementwise, d))) << tag(d);
    EXPECT_FALSE(compare_close(eight, ref, tolerance(OpKind::Elementwise, d))) << tag(d);
  }
}

TEST(Harness, ComparatorRejectsSystematicBias) {
  // Every element 1 % high: each one within bf16's rtol, the normalised error is not.
  Rng rng(4);
  Tensor ref = filled("y", TK_F32, {1000}, rng);
  Tensor out = ref;
  out.for_each([&](const std::vector<int64_t>&, int64_t e) { out.set(e, ref.get(e) * 1.01); });
  EXPECT_FALSE(compare_close(out, ref, tolerance(OpKind::Elementwise, TK_BF16)));
}

TEST(Harness, ComparatorNeverPassesNaN) {
  Rng rng(5);
  for (tk_dtype d : kDtypes) {
    Tensor ref = filled("y", d, {2, 8}, rng);
    Tensor out = ref;
    out.put({1, 7}, NAN);
    EXPECT_FALSE(compare_close(out, ref, {1e9, 1e9, 1e9})) << tag(d);
    EXPECT_FALSE(compare_close(ref, out, {1e9, 1e9, 1e9})) << "NaN in the reference, " << tag(d);
    Tensor lowp = ref;
    EXPECT_FALSE(compare_within_lowp(out, ref, lowp, d)) << tag(d);
  }
}

TEST(Harness, ComparatorMatchesInfinitiesExactly) {
  Tensor ref("lse", Elem::F32, Role::Out, {3});
  ref.set(0, -INFINITY);
  ref.set(1, 2.0);
  ref.set(2, 3.0);
  Tensor out = ref;
  EXPECT_TRUE(compare_close(out, ref, {1e-5, 1e-5, 1e-5}));
  out.set(0, -1e30);
  EXPECT_FALSE(compare_close(out, ref, {1e-5, 1e-5, 1e-5}));
  out.set(0, INFINITY);
  EXPECT_FALSE(compare_close(out, ref, {1e-5, 1e-5, 1e-5}));
}

TEST(Harness, LowpBoundAcceptsLowpAndRejectsThreeTimesItsError) {
  Rng rng(6);
  Tensor ref = filled("out", TK_BF16, {8, 2, 16}, rng);
  Tensor lowp = ref, out = ref, bad = ref;
  lowp.put({3, 1, 4}, ref.at({3, 1, 4}) + 0.05);
  out.put({0, 0, 0}, ref.at({0, 0, 0}) + 0.06);   // within 2 x 0.05 + rounding
  bad.put({0, 0, 0}, ref.at({0, 0, 0}) + 0.15);   // 3 x the plain error
  EXPECT_TRUE(compare_within_lowp(lowp, ref, lowp, TK_BF16));
  EXPECT_TRUE(compare_within_lowp(out, ref, lowp, TK_BF16));
  EXPECT_FALSE(compare_within_lowp(bad, ref, lowp, TK_BF16));
}

// ---------------------------------------------------------------------------
// Run checks, on a fake op that misbehaves on purpose. It runs on host
// contexts (the pointers are host memory) and behaves well on the reference.
// ---------------------------------------------------------------------------
enum class Misdeed { None, SkipOne, WriteAfter, WriteBefore, WriteGap, WriteInput, WrongValue,
                     Unsupported, ErrorAfterWriting };

class FakeOp : public OpTest {
 public:
  explicit FakeOp(Misdeed m) : m_(m) {}
  void build(Rng& rng) override {
    x = add(Tensor("x", Elem::F32, Role::In, {3, 5}, padded_strides({3, 5}, 2)));
    x->fill(rng, -1, 1);
    y = add(Tensor("y", Elem::F32, Role::Out, {3, 5}, padded_strides({3, 5}, 3)));
  }
  tk_status run(tk_context* ctx, const Bound& b) override {
    const bool bad = tk_context_backend(ctx) != TK_BACKEND_REFERENCE;
    if (bad && m_ == Misdeed::Unsupported) return TK_ERR_UNSUPPORTED;
    const float* xs = static_cast<const float*>(b(x));
    float* ys = static_cast<float*>(b(y));
    for (int64_t i = 0; i < 3; ++i)
      for (int64_t j = 0; j < 5; ++j) {
        if (bad && m_ == Misdeed::SkipOne && i == 2 && j == 4) continue;
        ys[i * 8 + j] = 2 * xs[i * 7 + j] + (bad && m_ == Misdeed::WrongValue && i == 1 ? 0.01f : 0);
      }
    if (!bad) return TK_OK;
    switch (m_) {
      case Misdeed::WriteAfter: ys[2 * 8 + 5] = 0; break;    // one past the last element
      case Misdeed::WriteBefore: ys[-1] = 0; break;
      case Misdeed::WriteGap: ys[0 * 8 + 6] = 0; break;      // between rows 0 and 1
      case Misdeed::WriteInput: const_cast<float*>(xs)[3] = 7; break;
      case Misdeed::ErrorAfterWriting: return TK_ERR_INVALID_ARGUMENT;
      default: break;
    }
    return TK_OK;
  }
  void compare(const Result& out, const Result& ref) const override {
    EXPECT_TRUE(compare_close(out.of(y), ref.of(y), tolerance(OpKind::Elementwise, TK_F32)));
  }
  Tensor *x = nullptr, *y = nullptr;

 private:
  Misdeed m_;
};

// The failures `fn` adds, intercepted (so that the running test stays green).
std::vector<std::string> failures_of(const std::function<void()>& fn) {
  ::testing::TestPartResultArray results;
  {
    ::testing::ScopedFakeTestPartResultReporter reporter(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &results);
    fn();
  }
  std::vector<std::string> out;
  for (int i = 0; i < results.size(); ++i)
    if (results.GetTestPartResult(i).failed()) out.push_back(results.GetTestPartResult(i).message());
  return out;
}

// Passes when one of the failures of `fn` says `part`.
::testing::AssertionResult reports(const std::function<void()>& fn, const std::string& part) {
  const std::vector<std::string> f = failures_of(fn);
  for (const std::string& m : f)
    if (m.find(part) != std::string::npos) return ::testing::AssertionSuccess();
  ::testing::AssertionResult r = ::testing::AssertionFailure();
  r << "no failure says \"" << part << "\"; " << f.size() << " failures:";
  for (const std::string& m : f) r << "\n  " << m;
  return r;
}

void run_fake(Misdeed m) {
  FakeOp op(m);
  check_against_reference(TK_BACKEND_CPU, op, 7);
}

TEST(Harness, FakeOpThatBehavesPasses) {
  EXPECT_TRUE(failures_of([] { run_fake(Misdeed::None); }).empty());
  run_fake(Misdeed::None);
}
TEST(Harness, CatchesUnwrittenOutput) {
  EXPECT_TRUE(reports([] { run_fake(Misdeed::SkipOne); }, "1 of 15 elements are NaN"));
}
TEST(Harness, CatchesWritePastTheEnd) {
  EXPECT_TRUE(reports([] { run_fake(Misdeed::WriteAfter); }, "out-of-bounds write after y"));
}
TEST(Harness, CatchesWriteBeforeTheStart) {
  EXPECT_TRUE(reports([] { run_fake(Misdeed::WriteBefore); }, "out-of-bounds write before y"));
}
TEST(Harness, CatchesWriteIntoAStrideGap) {
  EXPECT_TRUE(reports([] { run_fake(Misdeed::WriteGap); }, "between rows"));
}
TEST(Harness, CatchesModifiedInput) {
  EXPECT_TRUE(reports([] { run_fake(Misdeed::WriteInput); }, "input x was modified at [0, 3]"));
}
TEST(Harness, CatchesWrongValues) {
  EXPECT_TRUE(reports([] { run_fake(Misdeed::WrongValue); }, "y differs from the reference"));
}
TEST(Harness, CatchesWorkBeforeAnError) {
  // A failed call must not have touched its outputs.
  FakeOp op(Misdeed::ErrorAfterWriting);
  Rng rng(8);
  op.build(rng);
  std::string why;
  const Result r = execute(context(TK_BACKEND_CPU, &why), op);
  EXPECT_EQ(r.status, TK_ERR_INVALID_ARGUMENT);
  EXPECT_TRUE(reports([&] { expect_untouched(op, r); }, "y was changed by a call that returned"));
}
TEST(Harness, UnsupportedIsReportedNotPassed) {
  FakeOp op(Misdeed::Unsupported);
  const Verdict v = check_against_reference(TK_BACKEND_CPU, op, 9);
  EXPECT_FALSE(v.supported);
}

TEST(Harness, SeedsDifferPerTestAndRepeat) {
  const uint64_t a = test_seed();
  EXPECT_EQ(a, test_seed());
  EXPECT_NE(a, run_seed());
}

// ---------------------------------------------------------------------------
// The oracle: hand-computed values, and ops that must agree with each other.
// ---------------------------------------------------------------------------
tk_context* ref_ctx() {
  std::string why;
  tk_context* c = context(TK_BACKEND_REFERENCE, &why);
  EXPECT_NE(c, nullptr) << why;
  return c;
}

TEST(Reference, RmsnormByHand) {
  float x[4] = {1, 2, 3, 4}, w[4] = {1, -1, 2, 0.5f}, y[4];
  tk_rmsnorm_params p{TK_F32, 1, 4, x, 4, nullptr, 0, w, y, 4, 1e-5f};
  ASSERT_EQ(tk_rmsnorm(ref_ctx(), &p), TK_OK);
  const double inv = 1 / std::sqrt(7.5 + 1e-5);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i], x[i] * inv * w[i], 1e-6);
}

TEST(Reference, SwigluAndRopeByHand) {
  float g[2] = {1, -100}, u[2] = {2, 3}, o[2];
  tk_swiglu_params s{TK_F32, 1, 2, g, 2, u, 2, o, 2};
  ASSERT_EQ(tk_swiglu(ref_ctx(), &s), TK_OK);
  EXPECT_NEAR(o[0], 2 / (1 + std::exp(-1.0)), 1e-6);
  EXPECT_LT(std::fabs(o[1]), 1e-30f);  // silu(-100) * 3: tiny, and no NaN from exp(100)

  // A quarter turn: (a, b) -> (-b, a) on pairs (0, 2), (1, 3) (NeoX) or (0, 1), (2, 3) (GPT-J).
  float cs[2] = {0, 0}, sn[2] = {1, 1};
  int32_t pos = 0;
  for (tk_rope_style style : {TK_ROPE_NEOX, TK_ROPE_GPTJ}) {
    float q[4] = {1, 2, 3, 4};
    tk_rope_params r{TK_F32, style, 1, 4, 4, q, 1, 4, 4, nullptr, 0, 0, 0, &pos, cs, sn, 1};
    ASSERT_EQ(tk_rope(ref_ctx(), &r), TK_OK);
    const float want_neox[4] = {-3, -4, 1, 2}, want_gptj[4] = {-2, 1, -4, 3};
    for (int i = 0; i < 4; ++i) EXPECT_FLOAT_EQ(q[i], (style == TK_ROPE_NEOX ? want_neox : want_gptj)[i]);
  }
}

TEST(Reference, Int4ByHand) {
  // W[0, :] codes 0..7 (low nibble first), group 32 of scale 0.5, zero 8 then 3.
  const int64_t K = 64;
  std::vector<uint8_t> packed(K / 2), zeros{8, 3};
  for (int64_t j = 0; j < K / 2; ++j) packed[size_t(j)] = uint8_t((2 * j) % 16 | (((2 * j + 1) % 16) << 4));
  const uint16_t scales[2] = {f32_to_f16(0.5f), f32_to_f16(0.25f)};
  std::vector<float> x(K, 0.0f), y(1);
  x[5] = 1;   // code 5, group 0: (5 - 8) * 0.5
  x[40] = 2;  // code 8, group 1: (8 - 3) * 0.25
  tk_qmatmul_int4_params p{TK_F32, 1, x.data(), K, {packed.data(), scales, zeros.data(), TK_F16, 1, K, 32},
                           y.data(), 1};
  ASSERT_EQ(tk_qmatmul_int4(ref_ctx(), &p), TK_OK);
  EXPECT_FLOAT_EQ(y[0], -1.5f + 2 * 1.25f);
}

TEST(Reference, PagedAttentionAgreesWithFlashAttention) {
  // The same keys in a shuffled paged cache and in a contiguous tensor: paged
  // attention with q_len queries is causal flash attention with Lq = q_len.
  Rng rng(test_seed());
  const int64_t hq = 4, hkv = 2, dh = 16, ctx_len = 37, q_len = 3, page = 8;
  PagedShape ps{TK_F32, hq, hkv, dh, page, {{q_len, ctx_len}}, true, true};
  PagedTest paged(ps);
  paged.build(rng);
  const Result pr = execute(ref_ctx(), paged);
  ASSERT_EQ(pr.status, TK_OK) << pr.message;

  FlashShape fs{TK_F32, hq, hkv, dh, {{q_len, ctx_len}}, true, true};
  FlashTest flash(fs);
  flash.build(rng);
  for (int64_t t = 0; t < q_len; ++t)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t c = 0; c < dh; ++c) flash.q->put({t, h, c}, paged.q->at({t, h, c}));
  for (int64_t j = 0; j < ctx_len; ++j)
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t c = 0; c < dh; ++c) {
        flash.k->put({j, h, c}, paged.cache.k->get(paged.cache.slot(0, j, h) + c));
        flash.v->put({j, h, c}, paged.cache.v->get(paged.cache.slot(0, j, h) + c));
      }
  const Result fr = execute(ref_ctx(), flash);
  ASSERT_EQ(fr.status, TK_OK) << fr.message;
  const Tol exact{1e-6, 1e-6, 1e-6};
  Tensor a = pr.of(paged.out), b = fr.of(flash.out);
  EXPECT_TRUE(compare_close(a, b, exact));
  EXPECT_TRUE(compare_close(pr.of(paged.lse), fr.of(flash.lse), exact));
}

TEST(Reference, FusedFfnAgreesWithTheChain) {
  // rmsnorm -> two matmuls -> swiglu, all in f32, equals fused_ffn in f32.
  Rng rng(test_seed());
  const int64_t T = 3, D = 64, F = 17;
  FusedFfnShape fs{TK_F32, T, D, F};
  fs.weight_dtype = TK_F32;
  FusedFfnTest fused(fs);
  fused.build(rng);
  const Result fr = execute(ref_ctx(), fused);
  ASSERT_EQ(fr.status, TK_OK);
  auto f32 = [](Tensor* t) { return reinterpret_cast<float*>(t->bytes.data()); };
  std::vector<float> h(T * D), g(T * F), u(T * F), o(T * F);
  tk_rmsnorm_params rn{TK_F32, T, D, f32(fused.x), fused.x->stride(0), nullptr, 0,
                       f32(fused.norm_weight), h.data(), D, 1e-5f};
  ASSERT_EQ(tk_rmsnorm(ref_ctx(), &rn), TK_OK);
  tk_matmul_params mg{TK_F32, TK_F32, T, F, D, h.data(), D, f32(fused.w_gate), fused.w_gate->stride(0), g.data(), F};
  tk_matmul_params mu{TK_F32, TK_F32, T, F, D, h.data(), D, f32(fused.w_up), fused.w_up->stride(0), u.data(), F};
  ASSERT_EQ(tk_matmul(ref_ctx(), &mg), TK_OK);
  ASSERT_EQ(tk_matmul(ref_ctx(), &mu), TK_OK);
  tk_swiglu_params sw{TK_F32, T, F, g.data(), F, u.data(), F, o.data(), F};
  ASSERT_EQ(tk_swiglu(ref_ctx(), &sw), TK_OK);
  Tensor chain = fr.of(fused.out);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t f = 0; f < F; ++f) chain.put({t, f}, o[size_t(t * F + f)]);
  EXPECT_TRUE(compare_close(fr.of(fused.out), chain, {1e-5, 1e-5, 1e-5}));
}

}  // namespace
}  // namespace tk::test
