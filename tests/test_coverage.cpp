// Coverage: one small case of every op, dtype and variant the issues require.
// The op suites report "unsupported" as a skip; here the CPU backend FAILS if
// it reports unsupported for any of them (it must support everything), and
// the CUDA backend skips with the list of what it lacks (or passes when it
// lacks nothing). Every case is also checked against the reference.
#include "ops.h"

namespace tk::test {
namespace {

std::vector<Case> required_cases(tk_backend backend) {
  std::vector<Case> c;
  for (tk_dtype d : kDtypes) {
    c.push_back(make_case<RmsnormTest>(RmsnormShape{d, 3, 64}));
    c.push_back(make_case<RmsnormTest>(RmsnormShape{d, 3, 64, Layout::Contiguous, true}));
    for (tk_rope_style st : {TK_ROPE_NEOX, TK_ROPE_GPTJ}) {
      c.push_back(make_case<RopeTest>(RopeShape{d, st, 3, 4, 2, 128, 128, 64}));
      c.push_back(make_case<RopeTest>(RopeShape{d, st, 3, 4, 2, 128, 64, 64}));  // partial rotary
    }
    for (bool concat : {false, true})
      c.push_back(make_case<SwigluTest>(SwigluShape{d, 3, 64, Layout::Contiguous, concat}));
    for (tk_dtype wd : kDtypes) c.push_back(make_case<MatmulTest>(MatmulShape{d, wd, 3, 16, 64}));
    for (int64_t g : {32, 64, 128})
      for (tk_dtype sd : {TK_F16, TK_BF16})
        for (bool zeros : {false, true})
          c.push_back(make_case<QmatmulTest>(QmatmulShape{d, 2, 8, 128, Int4Spec{g, sd, zeros}}));
    for (tk_fused_algo algo : {TK_FUSED_SPLIT, TK_FUSED_NAIVE}) {
      FusedFfnShape dense{d, 2, 128, 16};
      dense.weight_dtype = d;
      dense.algo = algo;
      c.push_back(make_case<FusedFfnTest>(dense));
      FusedFfnShape int4 = dense;
      int4.format = TK_WEIGHTS_INT4;
      int4.q = Int4Spec{128, TK_BF16, false};
      c.push_back(make_case<FusedFfnTest>(int4));
    }
    c.push_back(make_case<AttnFrontTest>(AttnFrontShape{d, 64, 4, 2, 128, 128, 16, {2, 1}}));
    // Issue 4 asks CUDA attention for f16 and bf16; the CPU does all three.
    if (backend == TK_BACKEND_CUDA && d == TK_F32) continue;
    for (int64_t dh : {64, 128, 256}) {
      for (bool causal : {true, false})
        c.push_back(make_case<FlashTest>(FlashShape{d, 4, 2, dh, {{5, 9}, {3, 3}}, causal, true}));
      for (int64_t page : {1, 16, 256})
        c.push_back(make_case<PagedTest>(PagedShape{d, 4, 2, dh, page, {{1, 20}, {2, 33}}, true, true}));
    }
  }
  return c;
}

class Coverage : public ::testing::TestWithParam<tk_backend> {};

TEST_P(Coverage, EveryRequiredOp) {
  const tk_backend backend = GetParam();
  std::string why;
  if (!context(backend, &why)) GTEST_SKIP() << why;
  std::vector<std::string> missing;
  for (const Case& c : required_cases(backend)) {
    SCOPED_TRACE(c.name);
    std::unique_ptr<OpTest> op = c.make();
    const Verdict v = check_against_reference(backend, *op, test_seed());
    if (!v.supported) missing.push_back(c.name + ": " + v.why);
  }
  std::string list;
  for (const std::string& m : missing) list += "\n  " + m;
  if (backend == TK_BACKEND_CPU)
    EXPECT_TRUE(missing.empty()) << "the CPU backend must support every op and dtype; "
                                 << missing.size() << " unsupported:" << list;
  else if (!missing.empty())
    GTEST_SKIP() << missing.size() << " required cases unsupported on " << backend_label(backend)
                 << ":" << list;
}

INSTANTIATE_TEST_SUITE_P(Cpu, Coverage, ::testing::Values(TK_BACKEND_CPU));
INSTANTIATE_TEST_SUITE_P(Cuda, Coverage, ::testing::Values(TK_BACKEND_CUDA));
INSTANTIATE_TEST_SUITE_P(Reference, Coverage, ::testing::Values(TK_BACKEND_REFERENCE));

}  // namespace
}  // namespace tk::test
