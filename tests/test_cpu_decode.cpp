// Decode paths of the CPU backend that the op suites' shapes do not reach:
// paged attention over a batch with more query tiles than the pool wants
// units (no split: each thread claims whole sequences and requests the next
// one's first block while it finishes the current one), and int4 rows whose
// group-128 scales are worked out 16 chunks at a time with a partial last
// segment. Registered like every op suite, so the reference and CUDA run
// the same cases.
#include "harness.h"
#include "ops.h"

namespace tk::test {
namespace {

std::vector<Case> paged_batch_cases() {
  using Seqs = std::vector<std::pair<int64_t, int64_t>>;
  // Contexts ending mid-page and mid-block (64 keys), one key, exactly a block.
  const Seqs decode = {{1, 70}, {1, 1}, {1, 129}, {1, 300}, {1, 16},
                       {1, 64}, {1, 65}, {1, 200}, {1, 5},  {1, 250}};
  std::vector<Case> cases;
  // GQA 4 (the direct path), GQA 4 with Dh 64, MHA (one row per KV head).
  cases.push_back(make_case<PagedTest>(PagedShape{TK_F16, 8, 2, 128, 16, decode}));
  PagedShape bf{TK_BF16, 16, 4, 64, 8, decode};
  bf.lse = true;
  bf.qk_range = 10;
  cases.push_back(make_case<PagedTest>(bf));
  PagedShape mha{TK_F32, 4, 4, 128, 32, decode};
  mha.layout = Layout::Strided;
  cases.push_back(make_case<PagedTest>(mha));
  // Chunked prefill mixed with decode: some units see fewer keys than others.
  PagedShape mixed{TK_F16, 8, 2, 128, 16,
                   {{3, 40}, {1, 1}, {5, 5}, {2, 300}, {1, 90}, {1, 64}, {4, 130}, {1, 33}, {1, 7}}};
  mixed.cu_seqlens = true;
  mixed.lse = true;
  cases.push_back(make_case<PagedTest>(mixed));
  return cases;
}

std::vector<Case> int4_decode_cases() {
  std::vector<Case> cases;
  // K = 17 chunks of 128: one whole segment of 16 chunks and one of 1. N odd
  // (the last row goes alone). Decode and a few tokens, both scale dtypes,
  // symmetric and with zero points, f32 activations (three digits) too.
  for (tk_dtype d : kDtypes)
    for (int64_t T : {1, 3}) {
      const bool asym = d != TK_F16;
      cases.push_back(make_case<QmatmulTest>(QmatmulShape{
          d, T, 5, 17 * 128, Int4Spec{128, T == 1 ? TK_F16 : TK_BF16, asym, false}, Layout::Contiguous}));
    }
  return cases;
}

}  // namespace

TK_OP_SUITE(PagedDecodeBatch, paged_batch_cases);
TK_OP_SUITE(Int4Decode, int4_decode_cases);

}  // namespace tk::test
