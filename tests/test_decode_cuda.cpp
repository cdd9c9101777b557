// Shapes that reach the decode paths of the CUDA weight-streaming kernels (the
// other backends run them too, against the same reference): qmatmul_int4 with
// T <= 8 and group 128 streams a block's range of row tiles through a
// shared-memory ring, so these cover several tiles per block, a partial last
// tile, K with a partial last round (33 groups) or fewer than 8 groups (the
// warps then split into tile lanes), tokens 1..8, zero points and both scale
// dtypes, and an x too large to stage in shared memory (the short-block kernel).
#include "ops.h"

namespace tk::test {

std::vector<Case> decode_int4_cases() {
  struct TNK { int64_t T, N, K; };
  // N = 6341: 397 row tiles, several per block on any GPU with fewer than ~200
  // SMs; K = 16384 at T = 8: 256 KB of x, past any GPU's shared memory.
  const TNK shapes[] = {{1, 6341, 4096}, {8, 6341, 4224}, {2, 6341, 1024}, {5, 2053, 4096},
                        {1, 777, 384},   {8, 130, 128},   {3, 4133, 640},  {8, 40, 16384}};
  std::vector<Case> cases;
  int i = 0;
  for (const TNK& s : shapes) {
    const tk_dtype d = i % 3 == 2 ? TK_BF16 : TK_F16;
    const Int4Spec spec{128, i % 2 ? TK_BF16 : TK_F16, i % 4 >= 2, i % 3 == 1};
    cases.push_back(make_case<QmatmulTest>(QmatmulShape{d, s.T, s.N, s.K, spec, i % 2 ? Layout::Strided
                                                                                     : Layout::Contiguous}));
    ++i;
  }
  // fused_ffn with int4 weights, T <= 8: the streaming kernel (dstream.cuh,
  // kInt4) where zero codes come in whole 16-byte pieces (an even number of
  // groups) and x fits; a partial last tile (F 3001, 517), a partial last
  // round (34 groups), half a slice (3 and 1 groups), and the CUDA-core
  // kernel for 33 groups with zero points and for T 8 x D 16384.
  struct TDF { int64_t T, D, F; bool zeros; };
  const TDF ffn[] = {{1, 4096, 3001, false}, {8, 4224, 1030, true}, {2, 4352, 517, true},
                     {5, 384, 64, false},    {3, 128, 9, false},    {8, 16384, 40, false},
                     {4, 2048, 700, true},   {7, 4096, 1100, false}};
  for (const TDF& s : ffn) {
    FusedFfnShape f{i % 3 == 2 ? TK_BF16 : TK_F16, s.T, s.D, s.F};
    f.format = TK_WEIGHTS_INT4;
    f.q = Int4Spec{128, i % 2 ? TK_BF16 : TK_F16, s.zeros, i % 4 == 3};
    f.layout = i % 2 ? Layout::Strided : Layout::Contiguous;
    cases.push_back(make_case<FusedFfnTest>(f));
    ++i;
  }
  return cases;
}
TK_OP_SUITE(DecodeInt4, decode_int4_cases);

// Dense matmul and fused_ffn with T <= 8 and one 16-bit dtype take the
// persistent streaming kernel (dstream.cuh) where x fits its shared memory:
// several row tiles per block (N = 6341: 397 tiles; fused_ffn F = 3001: 376
// tiles of 8 columns), a partial last tile, K with a partial last slice (K =
// 1000, 4224: zero-filled chunks) or fewer slices than warps (K 72, 384, 8),
// tokens 1..8, strided rows, and x too large to stage (T 7 x K 16384: 229 KB,
// the short-block kernels).
std::vector<Case> decode_dense_cases() {
  struct TNK { int64_t T, N, K; };
  const TNK mm[] = {{1, 4133, 4096}, {8, 6341, 4224}, {2, 777, 384}, {5, 2053, 1000},
                    {3, 40, 72},     {8, 130, 8},     {4, 300, 12288}, {7, 300, 16384},
                    {6, 1111, 2048}};
  std::vector<Case> cases;
  int i = 0;
  for (const TNK& s : mm) {
    const tk_dtype d = i % 2 ? TK_BF16 : TK_F16;
    cases.push_back(make_case<MatmulTest>(
        MatmulShape{d, d, s.T, s.N, s.K, i % 3 == 1 ? Layout::Strided : Layout::Contiguous}));
    ++i;
  }
  // fused_ffn: T, D, F.
  const TNK ffn[] = {{8, 3001, 4096}, {2, 1030, 4224}, {1, 517, 1000}, {5, 64, 384},
                     {3, 9, 72},      {8, 40, 16384},  {4, 700, 2048}};
  for (const TNK& s : ffn) {
    FusedFfnShape f{i % 2 ? TK_BF16 : TK_F16, s.T, s.K, s.N};
    f.weight_dtype = f.dtype;
    f.layout = i % 3 == 1 ? Layout::Strided : Layout::Contiguous;
    cases.push_back(make_case<FusedFfnTest>(f));
    ++i;
  }
  return cases;
}
TK_OP_SUITE(DecodeDense, decode_dense_cases);

}  // namespace tk::test

namespace tk::test {

// attn_front with T <= 8 takes the streaming kernel (dstream.cuh, kAttn)
// where x fits: the bench's heads (Hq 32, Hkv 8, Dh 128, D 4096), rot_dim
// below head_dim (single-row units), a partial last slice (D 1000) and D
// below one slice per warp (72), GQA and MHA, both rope styles, tokens 1..8
// over several sequences, page sizes 1..32, and x too large to stage (T 8 x
// D 16384: the short-block kernels).
std::vector<Case> decode_attn_front_cases() {
  struct Cfg { tk_dtype d; int64_t D, Hq, Hkv, Dh, rot, page; std::vector<int64_t> tokens; };
  const Cfg cfgs[] = {{TK_F16, 4096, 32, 8, 128, 128, 16, {1}},
                      {TK_BF16, 1000, 4, 2, 64, 32, 8, {3, 2}},
                      {TK_F16, 256, 3, 1, 128, 64, 1, {1, 1, 1, 1, 1, 1, 1, 1}},
                      {TK_BF16, 72, 2, 2, 256, 256, 32, {2}},
                      {TK_F16, 16384, 2, 1, 64, 64, 16, {4, 4}},
                      {TK_BF16, 4096, 8, 8, 128, 96, 16, {7}}};
  std::vector<Case> cases;
  int i = 0;
  for (const Cfg& c : cfgs) {
    AttnFrontShape s{c.d, c.D, c.Hq, c.Hkv, c.Dh, c.rot, c.page, c.tokens,
                     i % 2 ? TK_ROPE_GPTJ : TK_ROPE_NEOX, i % 3 == 1 ? Layout::Strided : Layout::Contiguous};
    cases.push_back(make_case<AttnFrontTest>(s));
    ++i;
  }
  return cases;
}
TK_OP_SUITE(DecodeAttnFront, decode_attn_front_cases);

}  // namespace tk::test
