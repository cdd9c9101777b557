// paged_attention on CUDA: decode (and chunked prefill / speculative
// verification) over a paged KV cache, bound by memory bandwidth.
//
// One CTA owns one (sequence, kv head, split) and up to kRows query rows, a
// row being one (query token, q head of the group): every K/V row it reads
// from the cache serves all of them, so a GQA group costs one pass over its
// KV. Each token row is read by D / 8 lanes, 16 bytes each, through a
// cp.async ring kStages deep. A thread reads back from shared memory only the
// bytes it copied itself, so the ring needs no barrier: cp.async.wait_group
// alone orders it. Each lane group keeps its own online softmax over the tokens
// it saw; the groups merge by log-sum-exp through shared memory at the end.
//
// Long contexts split into chunks (grid.y) when the caller gives a workspace:
// each chunk writes a normalised partial output and its log2-sum-exp, and a
// second kernel merges them. On Hopper the merge is a programmatic dependent
// launch: its CTAs are resident before the decode grid ends, so the launch gap
// between the two kernels leaves the critical path.
#include <algorithm>
#include <climits>

#include "cuda/attention/primitives.cuh"
#include "cuda/ops.h"
#include "cuda/reduce.cuh"

namespace tk::cuda {
namespace {

using namespace attn;

struct PagedArgs {
  const void* q;  // [total_q, Hq, D]
  int64_t q_tok, q_head;
  void* out;  // [total_q, Hq, D]
  int64_t o_tok, o_head;
  float* lse;  // [Hq, total_q] or null
  const void* k_cache;  // [num_blocks, page_size, Hkv, D]
  const void* v_cache;
  const int32_t* block_table;  // [num_seqs, max_blocks]
  int64_t max_blocks, num_blocks;
  int page_shift;
  int num_kv_heads, group, num_q_heads;
  const int32_t* cu_q;          // [num_seqs + 1] or null
  const int32_t* context_lens;  // [num_seqs]
  int64_t total_q, max_q_len, max_ctx;
  int num_seqs, row_tiles;
  float scale_log2;
  int splits, chunk;  // chunk: tokens per split
  float* part_o;      // [splits, total_q * Hq, D] when splits > 1
  float* part_lse;    // [splits, total_q * Hq], log2 domain
  bool q_vec16, o_vec16, kv_vec16;
  // The merge kernel is a programmatic dependent launch (sm_90, not portable):
  // its CTAs start while the decode grid runs and wait for it in-kernel.
  bool pdl;
  unsigned int* error_flag;
};

// Query rows per CTA: each thread keeps kDecodeRows x 8 query and accumulator
// floats in registers. 4 rows (a Llama GQA group of one token) keep a thread
// near 128 registers and 4 CTAs per SM; with 8 rows (231 registers, 2 CTAs
// per SM) a 32-token tile took ~2 us even for a lone CTA on an H100: the loop
// is latency-bound and needs the occupancy more than the KV reuse. Groups
// larger than 4 take several row tiles, whose KV re-reads mostly hit L2 (the
// row tiles of one kv head are neighbours in the grid).
constexpr int kDecodeRows = 4;

// Threads, tiles and the shared-memory ring. 128 threads with 16 bytes each
// give 2 KB per token step; kUnroll steps per stage and kStages - 1 stages in
// flight put 32 KB per CTA in flight, enough with 2+ CTAs per SM to cover
// HBM latency (bandwidth x latency ~ 3.3 TB/s x 0.6 us / 132 SMs ~ 15 KB).
template <int D>
struct DecodeConfig {
  static constexpr int kThreads = 128;
  static constexpr int kLanesPerRow = D / 8;
  static constexpr int kSlots = kThreads / kLanesPerRow;  // tokens per step
  static constexpr int kUnroll = 4;
  static constexpr int kTile = kSlots * kUnroll;  // tokens per stage
  static constexpr int kStages = 3;
  static constexpr int kRows = kDecodeRows;
  static constexpr int kRingBytes = kStages * kUnroll * 2 * kThreads * 16;
  static constexpr int kMergeBytes = kSlots * kRows * (D + 2) * 4;
  static constexpr int kSmemBytes = kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes;
  static_assert(kSmemBytes <= 48 * 1024, "static shared memory is capped at 48 KB");
  static_assert(kLanesPerRow <= 32 && 32 % kLanesPerRow == 0, "a token row stays in one warp");
};

// Split until the grid fills one wave (4 CTAs per SM at <= 128 registers and
// 48 KB of shared memory); a second, partial wave would only add a tail. A
// lone CTA needs ~1.2 us per 32-token tile (H100, D 128), so short chunks of
// kMinChunk = 2 tiles keep a small batch's critical path short.
constexpr int kCtasPerSm = 4;
constexpr int kMinChunk = 64;
constexpr int kMaxSplits = 128;

int64_t choose_splits(int64_t base_ctas, int64_t max_ctx, int num_sms) {
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  // From one CTA per SM on, splitting only adds the merge (H100, B32 Hq32 Hkv8
  // ctx 4096, 256 CTAs: 2.68 TB/s unsplit vs 2.59 split in two).
  if (base_ctas >= sms) return 1;
  int64_t splits = kCtasPerSm * sms / base_ctas;
  splits = std::min<int64_t>(splits, (max_ctx + kMinChunk - 1) / kMinChunk);
  return std::max<int64_t>(1, std::min<int64_t>(splits, kMaxSplits));
}

struct SeqInfo {
  int64_t q0;
  int q_len, ctx;
  bool ok;
};

// Device-resident lengths are checked here, by every kernel that reads them.
__device__ __forceinline__ SeqInfo seq_info(const PagedArgs& a, int s) {
  int64_t q0 = s, q1 = s + 1;
  if (a.cu_q) {
    q0 = a.cu_q[s];
    q1 = a.cu_q[s + 1];
  }
  const int64_t ctx = a.context_lens[s];
  SeqInfo si;
  si.ok = 0 <= q0 && q0 <= q1 && q1 <= a.total_q && q1 - q0 <= a.max_q_len && ctx >= q1 - q0 &&
          ctx <= a.max_ctx && ctx <= (a.max_blocks << a.page_shift);
  si.q0 = q0;
  si.q_len = int(q1 - q0);
  si.ctx = int(ctx);
  return si;
}

template <typename T, int D>
__global__ void __launch_bounds__(DecodeConfig<D>::kThreads, kCtasPerSm)
    paged_decode_kernel(const PagedArgs a) {
  using C = DecodeConfig<D>;
  constexpr int kU = C::kUnroll, kR = C::kRows, kLanes = C::kLanesPerRow;
  __shared__ __align__(16) unsigned char smem[C::kSmemBytes];
#if __CUDA_ARCH__ >= 900
  // The merge's griddepcontrol.wait still waits for this whole grid to finish
  // and flush; triggering at once only takes its launch off the critical path.
  if (a.pdl) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif

  const int tid = threadIdx.x;
  const int slot = tid / kLanes, sub = tid % kLanes;
  int cta = blockIdx.x;
  const int rt = cta % a.row_tiles;
  cta /= a.row_tiles;
  const int kvh = cta % a.num_kv_heads;
  const int s = cta / a.num_kv_heads;
  const int split = blockIdx.y;
  const int tok_begin = split * a.chunk;

  // Block ids run one tile ahead of the copies, so the table lookup's latency
  // hides behind a tile of math instead of stalling the copy issue. They need
  // only the table's bounds, not the context length, so the first tile's ids
  // load alongside context_lens: one DRAM round trip less before the first
  // copy. Entries past the context are fetched but never used (issue checks).
  const int32_t* blocks = a.block_table + int64_t(s) * a.max_blocks;
  int32_t blk[kU];
  auto fetch_blocks = [&](int tile) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int tok = tok_begin + tile * C::kTile + u * C::kSlots + slot;
      blk[u] = (tok >> a.page_shift) < a.max_blocks ? __ldg(blocks + (tok >> a.page_shift)) : -1;
    }
  };
  fetch_blocks(0);

  const SeqInfo si = seq_info(a, s);
  if (!si.ok) {
    if (tid == 0 && rt == 0 && kvh == 0 && split == 0) raise_index_error(a.error_flag);
    return;
  }
  const int G = a.group;
  const int row0 = rt * kR;
  const int nrows = min(kR, si.q_len * G - row0);
  if (nrows <= 0) return;
  // Query i of the sequence sees positions [0, ctx - q_len + i].
  const int first_vis = si.ctx - si.q_len + 1;
  const int tok_end = min(tok_begin + a.chunk, first_vis + (row0 + nrows - 1) / G);
  if (tok_begin >= tok_end) return;  // the merge reads no split past a row's context

  const T* k_base = static_cast<const T*>(a.k_cache) + kvh * D + sub * 8;
  const T* v_base = static_cast<const T*>(a.v_cache) + kvh * D + sub * 8;
  const int64_t tok_stride = int64_t(a.num_kv_heads) * D;
  const int page_mask = (1 << a.page_shift) - 1;
  const uint32_t ring = smem_addr(smem);
  auto ring_at = [&](int stage, int u, int kv) {
    return ring + uint32_t((((stage * kU + u) * 2 + kv) * C::kThreads + tid) * 16);
  };

  uint32_t live = 0;  // bit stage * kU + u: that token was copied and may be used
  auto issue = [&](int tile, int stage) {
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int tok = tok_begin + tile * C::kTile + u * C::kSlots + slot;
      const uint32_t bit = 1u << (stage * kU + u);
      bool ok = tok < tok_end;
      if (ok && (blk[u] < 0 || blk[u] >= a.num_blocks)) {
        raise_index_error(a.error_flag);
        ok = false;
      }
      live = ok ? live | bit : live & ~bit;
      // Dead slots are zero-filled, not skipped: their probability is 0, and
      // 0 x (stale shared memory, possibly NaN) would still poison the sum.
      const int64_t row =
          ok ? ((int64_t(blk[u]) << a.page_shift) | (tok & page_mask)) * tok_stride : 0;
      if (a.kv_vec16) {
        cp_async16(ring_at(stage, u, 0), k_base + row, ok);
        cp_async16(ring_at(stage, u, 1), v_base + row, ok);
      } else {
        const uint4 zero = make_uint4(0, 0, 0, 0);
        st_shared16(ring_at(stage, u, 0), ok ? load8_unaligned(k_base + row) : zero);
        st_shared16(ring_at(stage, u, 1), ok ? load8_unaligned(v_base + row) : zero);
      }
    }
  };

  float m[kR], l[kR], acc[kR][8];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[r][e] = 0.f;
  }

  const int n_tiles = (tok_end - tok_begin + C::kTile - 1) / C::kTile;
#pragma unroll
  for (int st = 0; st < C::kStages - 1; ++st) {
    if (st < n_tiles) {
      issue(st, st);
      fetch_blocks(st + 1);
    }
    cp_async_commit();
  }

  // The query rows load after the first copies are issued: they are needed
  // only by the first tile's math, so their DRAM round trip overlaps the KV's
  // instead of preceding it.
  float qf[kR][8];
  int vis[kR];
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    vis[r] = 0;
#pragma unroll
    for (int e = 0; e < 8; ++e) qf[r][e] = 0.f;
    if (r < nrows) {
      const int rr = row0 + r, i = rr / G, h = kvh * G + rr % G;
      vis[r] = first_vis + i;
      const T* qp = static_cast<const T*>(a.q) + (si.q0 + i) * a.q_tok + h * a.q_head + sub * 8;
      const uint4 raw = a.q_vec16 ? ld16(qp) : load8_unaligned(qp);
      unpack<T>(raw, qf[r]);
#pragma unroll
      for (int e = 0; e < 8; ++e) qf[r][e] *= a.scale_log2;
    }
  }

  for (int it = 0; it < n_tiles; ++it) {
    const int ahead = it + C::kStages - 1;
    if (ahead < n_tiles) {
      issue(ahead, ahead % C::kStages);
      fetch_blocks(ahead + 1);
    }
    cp_async_commit();
    cp_async_wait<C::kStages - 1>();
    const int stage = it % C::kStages;
    const int base = tok_begin + it * C::kTile + slot;

    float sc[kU][kR];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float kf[8];
      unpack<T>(ld_shared16(ring_at(stage, u, 0)), kf);
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        float d = 0.f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d = fmaf(qf[r][e], kf[e], d);
        sc[u][r] = d;
      }
    }
    // Every row runs, padding rows included (q 0, vis 0: fully masked): a
    // per-row exit would split the rows into basic blocks and serialise their
    // shuffle and exp2 chains, which is the latency this loop lives on.
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
      for (int u = 0; u < kU; ++u) {
#pragma unroll
        for (int off = kLanes / 2; off >= 1; off /= 2)
          sc[u][r] += __shfl_xor_sync(0xffffffffu, sc[u][r], off);
        const bool ok = (live >> (stage * kU + u)) & 1u;
        if (!ok || base + u * C::kSlots >= vis[r]) sc[u][r] = -INFINITY;
      }
      float mx = sc[0][r];
#pragma unroll
      for (int u = 1; u < kU; ++u) mx = fmaxf(mx, sc[u][r]);
      const float m_new = fmaxf(m[r], mx);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = fast_exp2(m[r] - m_use);
      m[r] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        sc[u][r] = fast_exp2(sc[u][r] - m_use);
        sum += sc[u][r];
      }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[r][e] *= alpha;
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      float vf[8];
      unpack<T>(ld_shared16(ring_at(stage, u, 1)), vf);
#pragma unroll
      for (int r = 0; r < kR; ++r) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[r][e] = fmaf(sc[u][r], vf[e], acc[r][e]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the merge area overlaps other threads' ring slots

  // Merge the kSlots lane groups: o_s[slot][row][D], then m_s and l_s [slot][row].
  float* o_s = reinterpret_cast<float*>(smem);
  float* m_s = o_s + C::kSlots * kR * D;
  float* l_s = m_s + C::kSlots * kR;
#pragma unroll
  for (int r = 0; r < kR; ++r) {
    if (r >= nrows) break;
    float4* dst = reinterpret_cast<float4*>(o_s + (slot * kR + r) * D + sub * 8);
    dst[0] = make_float4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
    dst[1] = make_float4(acc[r][4], acc[r][5], acc[r][6], acc[r][7]);
    if (sub == 0) {
      m_s[slot * kR + r] = m[r];
      l_s[slot * kR + r] = l[r];
    }
  }
  __syncthreads();

  const int64_t rows_total = a.total_q * a.num_q_heads;
  for (int item = tid; item < nrows * kLanes; item += C::kThreads) {
    const int r = item / kLanes, c = item % kLanes;
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < C::kSlots; ++j) mx = fmaxf(mx, m_s[j * kR + r]);
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int j = 0; j < C::kSlots; ++j) {
      const float w = fast_exp2(m_s[j * kR + r] - m_use);
      sum += l_s[j * kR + r] * w;
      const float4* src = reinterpret_cast<const float4*>(o_s + (j * kR + r) * D + c * 8);
      const float4 x = src[0], y = src[1];
      o[0] += w * x.x, o[1] += w * x.y, o[2] += w * x.z, o[3] += w * x.w;
      o[4] += w * y.x, o[5] += w * y.y, o[6] += w * y.z, o[7] += w * y.w;
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) o[e] *= inv;
    const float lse2 = sum > 0.f ? mx + __log2f(sum) : -INFINITY;
    const int rr = row0 + r, i = rr / G, h = kvh * G + rr % G;
    const int64_t tok = si.q0 + i;
    if (a.splits == 1) {
      T* op = static_cast<T*>(a.out) + tok * a.o_tok + h * a.o_head + c * 8;
      uint4 packed;
      packed.x = pack2<T>(o[0], o[1]);
      packed.y = pack2<T>(o[2], o[3]);
      packed.z = pack2<T>(o[4], o[5]);
      packed.w = pack2<T>(o[6], o[7]);
      store8(op, packed, a.o_vec16);
      if (a.lse && c == 0) a.lse[int64_t(h) * a.total_q + tok] = lse2 * kLn2;
    } else {
      const int64_t prow = int64_t(split) * rows_total + tok * a.num_q_heads + h;
      float4* dst = reinterpret_cast<float4*>(a.part_o + prow * D + c * 8);
      dst[0] = make_float4(o[0], o[1], o[2], o[3]);
      dst[1] = make_float4(o[4], o[5], o[6], o[7]);
      if (c == 0) a.part_lse[prow] = lse2;
    }
  }
}

// f32 vector loads of N = 2, 4 or 8 consecutive floats (N * 4-byte aligned).
template <int N>
__device__ __forceinline__ void ld_f32(const float* p, float (&x)[N]) {
  if constexpr (N == 2) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    x[0] = v.x, x[1] = v.y;
  } else {
#pragma unroll
    for (int k = 0; k < N / 4; ++k) {
      const float4 v = reinterpret_cast<const float4*>(p)[k];
      x[4 * k] = v.x, x[4 * k + 1] = v.y, x[4 * k + 2] = v.z, x[4 * k + 3] = v.w;
    }
  }
}

// One CTA per (query token, q head): out = sum_j 2^lse_j O_j / sum_j 2^lse_j
// over the splits that cover the row's visible context. Each of the 4 warps
// takes a quarter of the splits (at most 32, kMaxSplits = 128), so a lane reads
// one split's lse and a warp's partial rows are kBatch independent loads in
// flight: the merge costs two L2 round trips, not one per split.
template <typename T, int D>
__global__ void __launch_bounds__(128) paged_merge_kernel(const PagedArgs a) {
  constexpr int kPer = D / 32;
  constexpr int kBatch = kPer <= 4 ? 16 : 8;
  static_assert(kMaxSplits <= 4 * 32, "one split per lane");
  __shared__ __align__(16) float red_o[4][D];
  __shared__ float red_m[4], red_l[4];
#if __CUDA_ARCH__ >= 900
  if (a.pdl) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows_per_seq = a.max_q_len * a.num_q_heads;
  const int s = int(blockIdx.x / rows_per_seq);
  const int rr = int(blockIdx.x % rows_per_seq);
  const SeqInfo si = seq_info(a, s);
  if (!si.ok || rr >= si.q_len * a.num_q_heads) return;  // uniform over the CTA
  const int i = rr / a.num_q_heads, h = rr % a.num_q_heads;
  const int vis = si.ctx - si.q_len + i + 1;
  const int n = min(a.splits, (vis + a.chunk - 1) / a.chunk);
  const int per = (n + 3) / 4;
  const int j0 = warp * per;
  const int cnt = min(per, n - j0);  // this warp's splits; may be <= 0
  const int64_t tok = si.q0 + i;
  const int64_t rows_total = a.total_q * a.num_q_heads;
  const int64_t row = tok * a.num_q_heads + h;

  // An empty split has lse -inf, weight 0 and a zero partial row.
  const float lj = lane < cnt ? a.part_lse[int64_t(j0 + lane) * rows_total + row] : -INFINITY;
  const float wmax = warp_max(lj);
  if (lane == 0) red_m[warp] = wmax;
  __syncthreads();
  const float mx = fmaxf(fmaxf(red_m[0], red_m[1]), fmaxf(red_m[2], red_m[3]));
  const float m_use = mx == -INFINITY ? 0.f : mx;
  const float w_lane = lane < cnt ? fast_exp2(lj - m_use) : 0.f;

  float o[kPer];
#pragma unroll
  for (int e = 0; e < kPer; ++e) o[e] = 0.f;
  for (int q0 = 0; q0 < cnt; q0 += kBatch) {
    float x[kBatch][kPer];
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      if (q0 + q < cnt) {
        ld_f32<kPer>(a.part_o + (int64_t(j0 + q0 + q) * rows_total + row) * D + lane * kPer, x[q]);
      } else {
#pragma unroll
        for (int e = 0; e < kPer; ++e) x[q][e] = 0.f;
      }
    }
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      // q0 + q < 32: cnt <= 32 and kBatch divides 32. Lanes past cnt weigh 0.
      const float w = __shfl_sync(0xffffffffu, w_lane, q0 + q);
#pragma unroll
      for (int e = 0; e < kPer; ++e) o[e] = fmaf(w, x[q][e], o[e]);
    }
  }
  const float wsum = warp_sum(w_lane);
#pragma unroll
  for (int e = 0; e < kPer; ++e) red_o[warp][lane * kPer + e] = o[e];
  if (lane == 0) red_l[warp] = wsum;
  __syncthreads();

  const float sum = red_l[0] + red_l[1] + red_l[2] + red_l[3];
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* op = static_cast<T*>(a.out) + tok * a.o_tok + h * a.o_head;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    op[d] = from_f32<T>((red_o[0][d] + red_o[1][d] + red_o[2][d] + red_o[3][d]) * inv);
  if (a.lse && threadIdx.x == 0)
    a.lse[int64_t(h) * a.total_q + tok] = sum > 0.f ? (mx + __log2f(sum)) * kLn2 : -INFINITY;
}

size_t split_bytes(int64_t total_q, int64_t num_q_heads, int64_t head_dim) {
  return size_t(total_q) * size_t(num_q_heads) * size_t(head_dim + 1) * sizeof(float);
}

template <typename T, int D>
tk_status launch_paged(PagedArgs a, size_t workspace_bytes, void* workspace, const Launch& l) {
  using C = DecodeConfig<D>;
  const int64_t base_ctas = int64_t(a.num_seqs) * a.num_kv_heads * a.row_tiles;
  if (base_ctas > INT_MAX)
    return fail(TK_ERR_UNSUPPORTED, "paged_attention: %lld work items exceed the cuda grid",
                (long long)base_ctas);
  int64_t splits = choose_splits(base_ctas, a.max_ctx, l.num_sms);
  const size_t per_split = split_bytes(a.total_q, a.num_q_heads, D);
  splits = std::min<int64_t>(splits, int64_t(workspace_bytes / per_split));
  int64_t chunk = a.max_ctx;
  if (splits > 1) {
    chunk = (a.max_ctx + splits - 1) / splits;
    chunk = (chunk + C::kTile - 1) / C::kTile * C::kTile;
    splits = (a.max_ctx + chunk - 1) / chunk;
  }
  if (splits <= 1) {
    splits = 1;
    chunk = a.max_ctx;
  }
  a.splits = int(splits);
  a.chunk = int(chunk);
  if (splits > 1) {
    a.part_o = static_cast<float*>(workspace);
    a.part_lse = a.part_o + splits * a.total_q * a.num_q_heads * D;
  }
  a.pdl = splits > 1 && !l.portable && l.sm_major >= 9;
  paged_decode_kernel<T, D><<<dim3(unsigned(base_ctas), unsigned(splits)), C::kThreads, 0,
                              l.stream>>>(a);
  TK_TRY(check_launch("paged_attention"));
  if (splits > 1) {
    const int64_t rows = int64_t(a.num_seqs) * a.max_q_len * a.num_q_heads;
    if (rows > INT_MAX) return fail(TK_ERR_UNSUPPORTED, "paged_attention: merge grid too large");
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(unsigned(rows));
    cfg.blockDim = dim3(128);
    cfg.stream = l.stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = a.pdl ? 1 : 0;
    const cudaError_t e = cudaLaunchKernelEx(&cfg, paged_merge_kernel<T, D>, a);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return fail(TK_ERR_BACKEND, "paged_attention merge: CUDA launch failed: %s",
                  cudaGetErrorString(e));
    }
    TK_TRY(check_launch("paged_attention merge"));
  }
  return TK_OK;
}

template <typename T>
tk_status dispatch_head_dim(const PagedArgs& a, int64_t head_dim, size_t workspace_bytes,
                            void* workspace, const Launch& l) {
  switch (head_dim) {
    case 64: return launch_paged<T, 64>(a, workspace_bytes, workspace, l);
    case 128: return launch_paged<T, 128>(a, workspace_bytes, workspace, l);
    case 256: return launch_paged<T, 256>(a, workspace_bytes, workspace, l);
    default:
      return fail(TK_ERR_UNSUPPORTED,
                  "paged_attention: head_dim %lld is not supported on the cuda backend (64, 128, "
                  "256 are)",
                  (long long)head_dim);
  }
}

}  // namespace

tk_status paged_attention(const tk_paged_attention_params& p, const Launch& l) {
  const tk_paged_kv_cache& c = p.cache;
  if (p.dtype == TK_F32)
    return fail(TK_ERR_UNSUPPORTED,
                "paged_attention: f32 is not supported on the cuda backend (f16 and bf16 are)");
  if (c.head_dim != 64 && c.head_dim != 128 && c.head_dim != 256)
    return fail(TK_ERR_UNSUPPORTED,
                "paged_attention: head_dim %lld is not supported on the cuda backend (64, 128, "
                "256 are)",
                (long long)c.head_dim);
  if (p.max_context_len > INT_MAX / 2 || c.num_seqs > INT_MAX)
    return fail(TK_ERR_UNSUPPORTED,
                "paged_attention: max_context_len %lld or %lld sequences exceed 32-bit indexing",
                (long long)p.max_context_len, (long long)c.num_seqs);
  if (p.total_q == 0) return TK_OK;
  PagedArgs a{};
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
  a.row_tiles = int((p.max_q_len * a.group + kDecodeRows - 1) / kDecodeRows);
  a.scale_log2 = p.scale * kLog2e;
  a.q_vec16 = heads_aligned16(p.q, p.q_token_stride, p.q_head_stride);
  a.o_vec16 = heads_aligned16(p.out, p.out_token_stride, p.out_head_stride);
  // Cache rows are D elements apart, a multiple of 8: only the bases matter.
  a.kv_vec16 = aligned16(c.k) && aligned16(c.v);
  a.error_flag = l.error_flag;
  if (p.dtype == TK_F16)
    return dispatch_head_dim<__half>(a, c.head_dim, p.workspace_bytes, p.workspace, l);
  return dispatch_head_dim<__nv_bfloat16>(a, c.head_dim, p.workspace_bytes, p.workspace, l);
}

size_t paged_attention_workspace_size(int64_t total_q, int64_t num_q_heads, int64_t head_dim,
                                      int64_t max_context_len, int num_sms) {
  // Each CTA holds at most kRows rows, so at least total_q * Hq / kRows CTAs
  // run before splitting: the most splits the launcher can ask for.
  const int64_t min_ctas =
      std::max<int64_t>(1, (total_q * num_q_heads + kDecodeRows - 1) / kDecodeRows);
  const int64_t splits = choose_splits(min_ctas, max_context_len, num_sms);
  if (splits <= 1 || total_q == 0) return 0;
  return size_t(splits) * split_bytes(total_q, num_q_heads, head_dim);
}

}  // namespace tk::cuda
