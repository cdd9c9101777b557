// Scratch A/B timing of paged_attention.cu (not built by CMake). Times the
// bench's three decode shapes (Hq 32, Hkv 8, D 128, page 16, bf16, pages in
// shuffled order) the way the bench does (read-pass L2 flush, then cudaEvents
// around the op, median), for a reference version ("v2b", commit dd71f16:
// built from its own copy of the file, so a change is timed against it in one
// binary) and this tree's at its own choices and at forced split counts, the
// decode kernel without its merge, and two floors: an empty kernel and one
// read pass over the same KV bytes. Every output is compared with v2b's.
// paged_tune.sh builds and runs it in one device call.
//
//   git show dd71f16:src/cuda/paged_attention.cu > src/cuda/attention/paged_v2b.cu
//   F="-O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a --expt-relaxed-constexpr -Iinclude -Isrc"
//   nvcc $F -Dpaged_attention=paged_attention_v2b \
//     -Dpaged_attention_workspace_size=paged_attention_workspace_size_v2b \
//     -c src/cuda/attention/paged_v2b.cu -o /tmp/v2b.o
//   nvcc $F src/cuda/attention/paged_tune.cu /tmp/v2b.o -o paged_tune
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "../paged_attention.cu"
#include "../tune/timing.cuh"

namespace tk::cuda {
tk_status paged_attention_v2b(const tk_paged_attention_params& p, const Launch& l);
size_t paged_attention_workspace_size_v2b(int64_t total_q, int64_t num_q_heads, int64_t head_dim,
                                         int64_t max_context_len, int num_sms);
}  // namespace tk::cuda

using namespace tk::cuda;
tk_status tk::fail(tk_status s, const char*, ...) { return s; }

// Named: a second anonymous namespace confuses nvcc's host stub for the kernels.
namespace paged_tune {

#define CK(x)                                                                        \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::printf("CUDA error %s at %s:%d\n", cudaGetErrorString(e_), __FILE__, __LINE__); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

__global__ void empty_kernel() {}

__global__ void fill_bf16(__nv_bfloat16* p, size_t n, uint32_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    uint32_t h = uint32_t(i) * 2654435761u ^ seed;
    h ^= h >> 13;
    h *= 0x5bd1e995u;
    h ^= h >> 15;
    p[i] = __float2bfloat16(float(h & 0xffff) / 32768.f - 1.f);
  }
}

constexpr int64_t kHq = 32, kHkv = 8, kD = 128, kPage = 16;

struct Problem {
  int64_t B, ctx;
  __nv_bfloat16 *kv, *q, *out, *out_ref;
  int32_t *table, *lens;
  void* ws;
  size_t ws_bytes;
  double kv_bytes;
  tk_paged_attention_params p;
};

Problem make(int64_t B, int64_t ctx, int sms) {
  Problem pr{};
  pr.B = B;
  pr.ctx = ctx;
  const int64_t per_seq = (ctx + kPage - 1) / kPage, blocks = B * per_seq;
  const size_t cache = size_t(blocks * kPage * kHkv * kD);
  CK(cudaMalloc(&pr.kv, 2 * cache * 2));
  fill_bf16<<<1024, 256>>>(pr.kv, 2 * cache, 7);
  CK(cudaMalloc(&pr.q, size_t(B * kHq * kD) * 2));
  fill_bf16<<<64, 256>>>(pr.q, size_t(B * kHq * kD), 11);
  CK(cudaMalloc(&pr.out, size_t(B * kHq * kD) * 2));
  CK(cudaMalloc(&pr.out_ref, size_t(B * kHq * kD) * 2));
  std::vector<int32_t> table(static_cast<size_t>(blocks));
  std::iota(table.begin(), table.end(), 0);
  std::shuffle(table.begin(), table.end(), std::mt19937(42));
  CK(cudaMalloc(&pr.table, table.size() * 4));
  CK(cudaMemcpy(pr.table, table.data(), table.size() * 4, cudaMemcpyHostToDevice));
  std::vector<int32_t> lens(static_cast<size_t>(B), int32_t(ctx));
  CK(cudaMalloc(&pr.lens, lens.size() * 4));
  CK(cudaMemcpy(pr.lens, lens.data(), lens.size() * 4, cudaMemcpyHostToDevice));
  // Room for any split count (the merge caps them at kMaxSplits).
  pr.ws_bytes = size_t(kMaxSplits) * split_bytes(B, kHq, kD);
  CK(cudaMalloc(&pr.ws, pr.ws_bytes));
  pr.kv_bytes = 2.0 * double(cache) * 2.0;
  tk_paged_attention_params& p = pr.p;
  p.dtype = TK_BF16;
  p.num_q_heads = kHq;
  p.q = pr.q;
  p.q_token_stride = kHq * kD;
  p.q_head_stride = kD;
  p.out = pr.out;
  p.out_token_stride = kHq * kD;
  p.out_head_stride = kD;
  p.total_q = B;
  p.max_q_len = 1;
  p.cache.dtype = TK_BF16;
  p.cache.k = pr.kv;
  p.cache.v = pr.kv + cache;
  p.cache.num_blocks = blocks;
  p.cache.page_size = kPage;
  p.cache.num_kv_heads = kHkv;
  p.cache.head_dim = kD;
  p.cache.block_table = pr.table;
  p.cache.num_seqs = B;
  p.cache.max_blocks_per_seq = per_seq;
  p.context_lens = pr.lens;
  p.max_context_len = ctx;
  p.scale = float(1.0 / std::sqrt(double(kD)));
  p.workspace = pr.ws;
  p.workspace_bytes = paged_attention_workspace_size(B, kHq, kD, ctx, sms);
  (void)sms;
  return pr;
}

// The launcher of paged_attention() with tuning overrides.
tk_status run_v2(const tk_paged_attention_params& p, const Launch& l, PagedTuning t) {
  PagedArgs a{};
  const tk_paged_kv_cache& c = p.cache;
  a.q = p.q;
  a.q_tok = p.q_token_stride;
  a.q_head = p.q_head_stride;
  a.out = p.out;
  a.o_tok = p.out_token_stride;
  a.o_head = p.out_head_stride;
  a.lse = p.lse;
  a.k_cache = c.k;
  a.v_cache = c.v;
  a.block_table = c.block_table;
  a.max_blocks = c.max_blocks_per_seq;
  a.num_blocks = c.num_blocks;
  int shift = 0;
  while ((int64_t(1) << shift) < c.page_size) ++shift;
  a.page_shift = shift;
  a.num_kv_heads = int(c.num_kv_heads);
  a.group = int(p.num_q_heads / c.num_kv_heads);
  a.num_q_heads = int(p.num_q_heads);
  a.cu_q = p.cu_seqlens_q;
  a.context_lens = p.context_lens;
  a.total_q = p.total_q;
  a.max_q_len = p.max_q_len;
  a.max_ctx = p.max_context_len;
  a.num_seqs = int(c.num_seqs);
  a.row_tiles = int((p.max_q_len * a.group + kPagedRows - 1) / kPagedRows);
  a.scale_log2 = p.scale * kLog2e;
  a.q_vec16 = a.o_vec16 = a.kv_vec16 = true;
  a.error_flag = l.error_flag;
  return dispatch_head_dim<__nv_bfloat16>(a, c.head_dim, p.workspace_bytes, p.workspace, l, t);
}

}  // namespace paged_tune

using namespace paged_tune;

int main() {
  int sms = 0, dev = 0;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, dev));
  sms = prop.multiProcessorCount;
  std::printf("%s, %d SMs\n", prop.name, sms);
  unsigned* flag;
  CK(cudaMalloc(&flag, 4));
  CK(cudaMemset(flag, 0, 4));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  Launch l{};
  l.stream = st;
  l.error_flag = flag;
  l.num_sms = sms;
  l.sm_major = prop.major;
  l.sm_minor = prop.minor;
  l.smem_optin = int(prop.sharedMemPerBlockOptin);
  l.portable = false;
  const tk::tune::Timer timer(sms, st);
  auto time = [&](const char* name, double bytes, auto&& fn) {
    fn();
    CK(cudaStreamSynchronize(st));
    CK(cudaGetLastError());
    const tk::tune::Times t = timer.time(fn, 101);
    CK(cudaGetLastError());
    const double med = t.median();
    std::printf("  %-40s median %7.2f us  min %7.2f  p90 %7.2f  %7.0f GB/s of KV\n", name, med,
                t.min(), t.p90(), bytes / med / 1e3);
  };
  auto compare = [&](Problem& pr, const char* what) {
    const size_t n = size_t(pr.B * kHq * kD);
    std::vector<uint16_t> x(n), y(n);
    CK(cudaMemcpy(x.data(), pr.out_ref, n * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(y.data(), pr.out, n * 2, cudaMemcpyDeviceToHost));
    double md = 0, mx = 0;
    for (size_t i = 0; i < n; ++i) {
      float fx, fy;
      const uint32_t ux = uint32_t(x[i]) << 16, uy = uint32_t(y[i]) << 16;
      std::memcpy(&fx, &ux, 4);
      std::memcpy(&fy, &uy, 4);
      md = std::max(md, std::isnan(fy) ? INFINITY : double(std::fabs(fx - fy)));
      mx = std::max(mx, double(std::fabs(fx)));
    }
    unsigned f = 0;
    CK(cudaMemcpy(&f, flag, 4, cudaMemcpyDeviceToHost));
    std::printf("    %-38s vs v2b: max |diff| %.3g (max |out| %.3g), error flag %u\n", what, md,
                mx, f);
    CK(cudaMemset(pr.out, 0xFF, n * 2));
  };

  struct Variant {
    const char* name;
    PagedTuning t;
  };
  struct Shape {
    int64_t B, ctx;
    std::vector<Variant> v;
  };
  const std::vector<Shape> shapes = {
      {1, 4096,
       {{"16 splits", {16, false}},
        {"32 splits", {32, false}},
        {"64 splits", {64, false}},
        {"decode only, 16 splits", {16, true}},
        {"decode only, 32 splits", {32, true}}}},
      {32, 4096, {}},
      {64, 8192, {}},
  };
  for (const Shape& s : shapes) {
    Problem pr = make(s.B, s.ctx, sms);
    CK(cudaDeviceSynchronize());
    std::printf("B%lld ctx %lld: %.1f MB of KV, workspace %zu B\n", (long long)s.B,
                (long long)s.ctx, pr.kv_bytes / 1e6, pr.p.workspace_bytes);
    tk_paged_attention_params p1 = pr.p;
    p1.out = pr.out_ref;
    p1.workspace_bytes = paged_attention_workspace_size_v2b(s.B, kHq, kD, s.ctx, sms);
    tk_paged_attention_params p2 = pr.p;
    p2.workspace_bytes = pr.ws_bytes;
    for (int rep = 0; rep < 2; ++rep) {  // twice: the spread between identical runs
      time("v2b (dd71f16, merge kernel)", pr.kv_bytes, [&] { paged_attention_v2b(p1, l); });
      time("new default", pr.kv_bytes, [&] { paged_attention(pr.p, l); });
      if (rep == 0) compare(pr, "new default");
    }
    Launch lp = l;
    lp.portable = true;
    time("new default, portable", pr.kv_bytes, [&] { paged_attention(pr.p, lp); });
    compare(pr, "portable");
    for (const Variant& v : s.v) {
      time(v.name, pr.kv_bytes, [&] { run_v2(p2, l, v.t); });
      if (!v.t.skip_merge) compare(pr, v.name);
    }
    time("floor: read the KV bytes once", pr.kv_bytes, [&] {
      timer.read(pr.kv, size_t(pr.kv_bytes));
    });
    time("floor: empty kernel", pr.kv_bytes, [&] { empty_kernel<<<1, 32, 0, st>>>(); });
    cudaFree(pr.kv);
    cudaFree(pr.q);
    cudaFree(pr.out);
    cudaFree(pr.out_ref);
    cudaFree(pr.table);
    cudaFree(pr.lens);
    cudaFree(pr.ws);
  }
  std::printf("tune rc=%d (%s)\n", int(cudaDeviceSynchronize()),
              cudaGetErrorString(cudaGetLastError()));
  return 0;
}
