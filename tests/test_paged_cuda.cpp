// paged_attention cases aimed at the CUDA kernel's own structure: the split
// counts its heuristic picks (one chunk per split, a multiple of 64 tokens),
// splits whose chunk lies past a short sequence's end, 16-row tiles (GQA group
// x query tokens at, below and above 16), the 128-split cap of the merge, and
// the narrow-load path (odd layouts) under a split. Same harness and reference
// as the PagedAttention suite in test_attention.cpp; every backend runs them.
#include <vector>

#include "ops.h"

namespace tk::test {
namespace {

std::vector<Case> paged_cuda_cases() {
  using Seqs = std::vector<std::pair<int64_t, int64_t>>;
  std::vector<Case> cases;
  auto push = [&](PagedShape p) { cases.push_back(make_case<PagedTest>(p)); };
  for (tk_dtype d : {TK_F16, TK_BF16}) {
    // A small batch splits its longest context into 64-token chunks; the
    // short sequences end inside the first chunks and skip the rest.
    PagedShape many{d, 8, 8, 128, 16, Seqs{{1, 200}, {1, 5}, {1, 64}, {1, 65}}};
    many.lse = true;
    push(many);
    // One sequence, one kv head: as many splits as 64-token chunks, up to the
    // merge's 128 (8192 tokens), and past it (9000: chunks of 128 tokens).
    push(PagedShape{d, 4, 1, 64, 16, Seqs{{1, 8192}}, false, true});
    push(PagedShape{d, 2, 1, 64, 256, Seqs{{1, 9000}}, false, true});
    // Contexts at and around the 16-token step and the 64-token chunk.
    push(PagedShape{d, 4, 2, 128, 8, Seqs{{1, 16}, {1, 15}, {1, 17}, {1, 63}, {1, 64}, {1, 65}},
                    false, true});
    // Row tiles: G x q_len = 16 (one full tile), 20 (a second, mostly empty
    // one), 96 (MQA, six tiles re-reading the same KV).
    PagedShape tile16{d, 8, 2, 128, 16, Seqs{{4, 300}, {1, 2}}, true, true};
    push(tile16);
    PagedShape tile20{d, 8, 2, 64, 4, Seqs{{5, 130}, {3, 3}}, true, true};
    push(tile20);
    PagedShape mqa{d, 32, 1, 64, 32, Seqs{{3, 700}, {1, 1}}, true, true};
    push(mqa);
    // Head dim 256 (2 CTAs per SM, the largest ring) split, with chunked prefill.
    PagedShape d256{d, 4, 2, 256, 64, Seqs{{7, 1500}}, true, true};
    push(d256);
    // The narrow-load fallback (K/V, q and out not 16-byte aligned) under a split.
    PagedShape odd{d, 8, 2, 128, 16, Seqs{{1, 1000}, {2, 77}}, true, true};
    odd.layout = Layout::Offset;
    push(odd);
    PagedShape odd2{d, 4, 4, 64, 1, Seqs{{1, 333}}, false, true};
    odd2.layout = Layout::Odd;
    odd2.qk_range = 10;
    push(odd2);
  }
  return cases;
}

}  // namespace

TK_OP_SUITE(PagedSplits, paged_cuda_cases);

}  // namespace tk::test
