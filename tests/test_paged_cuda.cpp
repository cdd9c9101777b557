// paged_attention cases aimed at the CUDA kernel's own structure: the split
// counts its heuristic picks (one chunk per split, a multiple of 64 tokens),
// splits whose chunk lies past a short sequence's end, 16-row tiles (GQA group
// x query tokens at, below and above 16), the 128-split cap of the merge, and
// the narrow-load path (odd layouts) under a split. Same harness and reference
// as the PagedAttention suite in test_attention.cpp; every backend runs them.
#include <cstring>
#include <vector>

#include "ops.h"

#if TK_TEST_CUDA
#include <cuda_runtime.h>
#endif

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

#if TK_TEST_CUDA
// Each call must stand alone and be capturable: a split call stores partial
// rows in the workspace and merges them in a second kernel (on sm_90 a
// programmatic dependent launch). On a CUDA context the call runs once, then
// three times back to back with the outputs poisoned before each, then twice
// as the replay of a captured graph (on a stream of its own); every run must
// give the first one's bytes. The harness then compares the last run's
// outputs with the reference.
class PagedRepeatTest : public PagedTest {
 public:
  using PagedTest::PagedTest;
  tk_status call(tk_context* ctx, const tk_paged_attention_params& p) const override {
    if (tk_context_backend(ctx) != TK_BACKEND_CUDA) return PagedTest::call(ctx, p);
    struct Buf {
      void* dev;
      size_t bytes;
    };
    // From each output's logical origin to the end of its span.
    std::vector<Buf> outs{{p.out, out->bytes.size() - size_t(out->lead) * elem_size(out->elem)}};
    if (p.lse) outs.push_back({p.lse, lse->bytes.size() - size_t(lse->lead) * 4});
    auto poison = [&](cudaStream_t st) {
      for (const Buf& b : outs)
        EXPECT_EQ(cudaMemsetAsync(b.dev, 0xFF, b.bytes, st), cudaSuccess);
    };
    auto download = [&] {
      std::vector<std::vector<uint8_t>> h;
      for (const Buf& b : outs) {
        h.emplace_back(b.bytes);
        EXPECT_EQ(tk_memcpy_to_host(ctx, h.back().data(), b.dev, b.bytes), TK_OK);
      }
      return h;
    };
    tk_status st = PagedTest::call(ctx, p);
    if (st != TK_OK) return st;
    const auto first = download();
    for (int i = 0; i < 3; ++i) {
      poison(nullptr);
      if ((st = PagedTest::call(ctx, p)) != TK_OK) return st;
    }
    EXPECT_TRUE(download() == first) << "back-to-back calls differ from the first call";

    cudaStream_t stream = nullptr;
    cudaGraph_t graph = nullptr;
    cudaGraphExec_t exec = nullptr;
    EXPECT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
    EXPECT_EQ(tk_context_set_stream(ctx, stream), TK_OK);
    EXPECT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
    poison(stream);
    st = PagedTest::call(ctx, p);
    EXPECT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
    if (st == TK_OK) {
      EXPECT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
      for (int i = 0; i < 2 && exec; ++i) EXPECT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
      EXPECT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
    }
    EXPECT_EQ(tk_context_set_stream(ctx, nullptr), TK_OK);
    if (exec) cudaGraphExecDestroy(exec);
    if (graph) cudaGraphDestroy(graph);
    cudaStreamDestroy(stream);
    if (st != TK_OK) return st;
    EXPECT_TRUE(download() == first) << "graph replays differ from the first call";
    return TK_OK;
  }
};

#else
using PagedRepeatTest = PagedTest;  // no CUDA: the plain cases
#endif

std::vector<Case> paged_repeat_cases() {
  using Seqs = std::vector<std::pair<int64_t, int64_t>>;
  std::vector<Case> cases;
  auto push = [&](PagedShape p) { cases.push_back(make_case<PagedRepeatTest>(p)); };
  // The bench's B1 decode (32 splits of 128 tokens on an H100).
  PagedShape b1{TK_BF16, 32, 8, 128, 16, Seqs{{1, 4096}}, false, true};
  b1.lse = true;
  push(b1);
  // Odd contexts: splits that end mid-step, sequences that end in an early
  // split (the later splits run no step and the merge skips them), 3 and 14 splits.
  PagedShape odd{TK_F16, 8, 2, 64, 8, Seqs{{1, 3001}, {1, 17}, {1, 1}, {1, 130}}, true, true};
  push(odd);
  push(PagedShape{TK_BF16, 4, 1, 128, 16, Seqs{{1, 130}}, false, true});
  push(PagedShape{TK_F16, 4, 4, 64, 32, Seqs{{1, 833}}, false, true});
  // Several query tokens (two row tiles), head dim 256, and no workspace.
  PagedShape multi{TK_BF16, 16, 2, 256, 16, Seqs{{3, 1000}, {1, 7}}, true, true};
  push(multi);
  PagedShape nows{TK_F16, 8, 1, 128, 64, Seqs{{1, 2000}}, false, true};
  nows.workspace = false;
  push(nows);
  return cases;
}

}  // namespace

TK_OP_SUITE(PagedSplits, paged_cuda_cases);
TK_OP_SUITE(PagedRepeat, paged_repeat_cases);

}  // namespace tk::test
