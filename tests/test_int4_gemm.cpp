// Shapes that reach the CUDA prefill path of qmatmul_int4 (T > 8, f16/bf16
// activations, 16-byte aligned rows: src/cuda/qgemm_int4.cu; the other
// backends run them too, against the same reference). That kernel tiles 128
// weight rows x 32 tokens (T <= 32) or 64 tokens and streams K in stages of
// 128 through a ring up to 4 deep (on Hopper, T > 32: the wgmma kernel, 64
// tokens, a ring up to 7 deep), so these cover: partial row tiles (odd N),
// partial token tiles and several of them (T 9, 17, 33, 64, 100, 130), K with a
// partial last stage (K % 128 of 32, 64, 96) and K long enough to wrap the
// ring, every group size, zero points and symmetric, both scale dtypes, both
// activation dtypes, strided rows, and one misaligned layout (the CUDA-core
// fallback at T > 8).
#include "ops.h"

namespace tk::test {

std::vector<Case> gemm_int4_cases() {
  struct TNKG { int64_t T, N, K, group; };
  const TNKG shapes[] = {{9, 131, 128, 32},    {17, 257, 4224, 128}, {64, 383, 1024, 64}, {100, 129, 2080, 32},
                         {130, 255, 640, 128}, {33, 77, 96, 32},     {64, 1000, 4096, 128}, {100, 513, 320, 64},
                         {9, 2049, 1152, 128}, {130, 31, 2304, 64}};
  std::vector<Case> cases;
  int i = 0;
  for (const TNKG& s : shapes) {
    const tk_dtype d = i % 3 == 1 ? TK_BF16 : TK_F16;
    const Int4Spec spec{s.group, i % 2 ? TK_BF16 : TK_F16, i % 4 != 3, i % 5 == 2};
    const Layout layout = i == 7 ? Layout::Odd : i % 3 == 2 ? Layout::Strided : Layout::Contiguous;
    cases.push_back(make_case<QmatmulTest>(QmatmulShape{d, s.T, s.N, s.K, spec, layout}));
    ++i;
  }
  // The bench's shape, scaled down in N: a whole row tile and a partial one.
  for (tk_dtype d : {TK_F16, TK_BF16})
    cases.push_back(make_case<QmatmulTest>(
        QmatmulShape{d, 64, 200, 4096, Int4Spec{128, TK_F16, false, true}, Layout::Contiguous}));
  return cases;
}
TK_OP_SUITE(GemmInt4, gemm_int4_cases);

}  // namespace tk::test
