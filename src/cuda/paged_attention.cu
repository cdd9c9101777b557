// paged_attention on CUDA: decode (and chunked prefill / speculative
// verification) over a paged KV cache, bound by memory bandwidth.
//
// One CTA owns one (sequence, kv head, split) and up to 16 query rows, a row
// being one (query token, q head of the group): every K/V row it reads from
// the cache serves all of them, so a GQA group costs one pass over its KV.
// The scores and P.V run on the tensor cores (mma.sync, plain sm_80 PTX: the
// same kernel serves Ampere, Ada, Hopper and the portable path).
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

// Query rows per CTA: the M of mma.m16n8k16. Larger GQA groups and several
// query tokens take several row tiles, whose KV re-reads mostly hit L2 (the
// row tiles of one kv head are neighbours in the grid).
constexpr int kPagedRows = 16;

// The decode CTA: 4 warps (2 at D 256), 16 query rows (the M of mma.sync m16n8k16), K/V
// streamed in 16-token steps. Step j of a CTA's chunk belongs to warp j % 4,
// which copies it with cp.async into its own ring of three slots (K_j, V_j,
// K_j+1, ...: while one slot is read, the next two are in flight) and keeps its
// own online softmax; the four warps merge by log-sum-exp at the end. A warp
// reads back only what it copied itself, so the loop has no CTA barrier.
//
// Q.K^T and P.V run on the tensor cores as in FA2: S[16 rows x 16 tokens] from
// D/16 k-steps, then P (registers, rounded to T) times V[16 tokens x D]. A
// decode GQA group of 4 fills 4 of the 16 rows; the tensor cores have the
// throughput to spare. What matters is the instruction count per token: about
// 15 warp instructions per token and kv head, against ~75 for the CUDA-core
// dot products (16 lanes per token, 4 shuffle levels per score) this replaces.
template <int D>
struct DecodeConfig {
  // Head dim 256 holds 128 accumulators per thread and 8 KB slots: two warps
  // keep a CTA at 56 KB of shared memory, under the 99 KB an Ada or GA10x
  // block may have, and 4 CTAs (8 warps) per H100 SM.
  static constexpr int kWarps = D <= 128 ? 4 : 2;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = kPagedRows;
  static constexpr int kStep = 16;                    // tokens per warp step: one k16 of P.V
  static constexpr int kRound = kWarps * kStep;       // a split's chunk is a multiple of this
  static constexpr int kChunks = D / 8;               // 16-byte chunks per K/V/Q row
  static constexpr int kRowBytes = D * 2;
  static constexpr int kSlotBytes = kStep * kRowBytes;  // one K or one V step
  static constexpr int kSlots = 3;
  static constexpr int kQBytes = kRows * kRowBytes;
  static constexpr int kRingBytes = kWarps * kSlots * kSlotBytes;
  // The end-of-CTA merge: o[warp][row][kOStride] f32, then m and l [warp][row].
  // The 8-float pad puts a quad's float2 stores of 8 rows in 2 wavefronts.
  static constexpr int kOStride = D + 8;
  static constexpr int kMergeBytes = kWarps * kRows * (kOStride + 2) * 4;
  static constexpr int kSmemBytes =
      kQBytes + (kRingBytes > kMergeBytes ? kRingBytes : kMergeBytes);
  // 4 CTAs per H100 SM: D <= 128 at <= 128 registers and 52 KB; D 256 at 56
  // KB. Smaller parts (A100 164 KB, Ada 100 KB) hold fewer: the launcher asks
  // the occupancy calculator.
  static constexpr int kCtasPerSm = 4;
  static_assert(32 % kChunks == 0 && kChunks >= 8, "a warp copies whole token rows");
  static_assert(kSmemBytes * kCtasPerSm <= 224 * 1024, "shared memory of an H100 SM");
};

// Split a small batch until about 2 CTAs run per SM (never past the CTAs that
// fit: a second, partial wave would only add a tail). Every SM then streams,
// and each CTA has its chunk's K/V in flight within its first two steps. More
// splits only make the merge longer (H100, B1 Hq32 Hkv8 ctx 4096, paged_tune:
// decode + merge 14.2 / 14.1 / 14.8 us at 16 / 32 / 64 splits; decode alone
// 11.7 / 11.5 / 12.0).
constexpr int kMinChunk = 64;  // one step per warp (DecodeConfig::kRound)
constexpr int kMaxSplits = 128;
constexpr int kSplitCtasPerSm = 2;

int64_t choose_splits(int64_t base_ctas, int64_t max_ctx, int num_sms, int ctas_per_sm) {
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  // From one CTA per SM on, splitting only adds the merge (H100, B32 Hq32 Hkv8
  // ctx 4096, 256 CTAs, paged_tune: 185 us unsplit, 189 us split in two).
  if (base_ctas >= sms) return 1;
  int64_t splits = std::min(kSplitCtasPerSm, ctas_per_sm) * sms / base_ctas;
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

// 16-byte chunk c of row r in a [rows][D] 16-bit tile, XOR-swizzled so that the
// 8 rows one ldmatrix phase reads (same logical chunk) sit in 8 bank groups.
template <int D>
__device__ __forceinline__ uint32_t tile_off(int r, int c) {
  return uint32_t(r * (D * 2) + ((c ^ (r & 7)) << 4));
}

template <typename T, int D>
__global__ void __launch_bounds__(DecodeConfig<D>::kThreads, DecodeConfig<D>::kCtasPerSm)
    paged_decode_kernel(const PagedArgs a) {
  using C = DecodeConfig<D>;
  constexpr int kK = D / 16;  // k-steps of Q.K^T, n-tile pairs of P.V
  extern __shared__ __align__(128) unsigned char smem[];
#if __CUDA_ARCH__ >= 900
  // The merge's griddepcontrol.wait still waits for this whole grid to finish
  // and flush; triggering at once only takes its launch off the critical path.
  if (a.pdl) asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int cta = blockIdx.x;
  const int rt = cta % a.row_tiles;
  cta /= a.row_tiles;
  const int kvh = cta % a.num_kv_heads;
  const int s = cta / a.num_kv_heads;
  const int split = blockIdx.y;
  const int tok_begin = split * a.chunk;
  auto step_base = [&](int j) { return tok_begin + (j * C::kWarps + warp) * C::kStep; };

  // Lane l holds the block id of token l % 16 of one of this warp's steps. The
  // ids of the first two steps need only the table's bounds, so they load
  // alongside context_lens: one DRAM round trip before the first copy, and the
  // second step's copies need no second one. Ids past the context are fetched
  // but never used (step_valid checks them).
  const int32_t* blocks = a.block_table + int64_t(s) * a.max_blocks;
  auto fetch_ids = [&](int j) -> int32_t {
    const int64_t b = (step_base(j) + (lane & 15)) >> a.page_shift;
    return b < a.max_blocks ? __ldg(blocks + b) : -1;
  };
  int32_t ids_cur = fetch_ids(0), ids_next = fetch_ids(1);

  const SeqInfo si = seq_info(a, s);
  if (!si.ok) {
    if (threadIdx.x == 0 && rt == 0 && kvh == 0 && split == 0) raise_index_error(a.error_flag);
    return;
  }
  // Every early exit below is uniform over the CTA (it precedes __syncthreads).
  const int G = a.group;
  const int row0 = rt * C::kRows;
  const int nrows = min(C::kRows, si.q_len * G - row0);
  if (nrows <= 0) return;
  // Query i of the sequence sees positions [0, ctx - q_len + i].
  const int first_vis = si.ctx - si.q_len + 1;
  const int tok_end = min(tok_begin + a.chunk, first_vis + (row0 + nrows - 1) / G);
  if (tok_begin >= tok_end) return;  // the merge reads no split past a row's context
  const int n_steps = (tok_end - tok_begin + C::kStep - 1) / C::kStep;
  const int my_steps = (n_steps - warp + C::kWarps - 1) / C::kWarps;

  const uint32_t q_s = smem_addr(smem);
  const uint32_t ring = q_s + C::kQBytes + uint32_t(warp * C::kSlots * C::kSlotBytes);
  // This lane's 16-byte column of every K/V row it copies: chunk lane % kChunks.
  // Cache rows are addressed as 32-bit row numbers times a 32-bit byte
  // stride (one IMAD.WIDE): a cache of 2^31 token rows would not fit a GPU.
  const int col = lane % C::kChunks;
  const char* k_col = static_cast<const char*>(a.k_cache) + (int64_t(kvh) * D + col * 8) * 2;
  const char* v_col = static_cast<const char*>(a.v_cache) + (int64_t(kvh) * D + col * 8) * 2;
  const uint32_t row_bytes = uint32_t(a.num_kv_heads) * D * 2;
  const int page_mask = (1 << a.page_shift) - 1;

  // Bit t: token t of step j is inside the chunk and its block id in range.
  auto step_valid = [&](int j, int32_t ids) -> uint32_t {
    const bool in = step_base(j) + (lane & 15) < tok_end;
    const bool ok = in && ids >= 0 && ids < a.num_blocks;
    if (in && !ok && lane < 16) raise_index_error(a.error_flag);
    return __ballot_sync(0xffffffffu, ok) & 0xffffu;
  };
  // One K or V step into a ring slot. Dead tokens are zero-filled, not
  // skipped: their probability is 0, and 0 x (stale shared memory, possibly
  // NaN) would still poison the sum.
  auto issue = [&](int j, const char* head, int32_t ids, uint32_t valid, int slot) {
    const int base = step_base(j);
    const uint32_t dst0 = ring + uint32_t(slot * C::kSlotBytes);
    auto chunk = [&](int u, const char*& src, uint32_t& dst) {
      const int r = u * (32 / C::kChunks) + lane / C::kChunks;
      const uint32_t b = uint32_t(__shfl_sync(0xffffffffu, ids, r));
      const bool ok = (valid >> r) & 1u;
      const uint32_t row = ok ? (b << a.page_shift) | uint32_t((base + r) & page_mask) : 0u;
      src = head + uint64_t(row) * row_bytes;
      dst = dst0 + tile_off<D>(r, col);
      return ok;
    };
    if (a.kv_vec16) {
#pragma unroll
      for (int u = 0; u < C::kChunks / 2; ++u) {
        const char* src;
        uint32_t dst;
        const bool ok = chunk(u, src, dst);
        cp_async16(dst, src, ok);
      }
    } else {
#pragma unroll 1
      for (int u = 0; u < C::kChunks / 2; ++u) {
        const char* src;
        uint32_t dst;
        const bool ok = chunk(u, src, dst);
        st_shared16(dst, ok ? load8_unaligned(reinterpret_cast<const T*>(src))
                            : make_uint4(0, 0, 0, 0));
      }
    }
  };

  // Prologue: K_0 and the CTA's query rows (group 0), V_0 (group 1). The query
  // rows load after the first K copies are issued: only the first step's math
  // needs them, so their DRAM round trip overlaps the KV's.
  uint32_t valid_cur = 0;
  if (my_steps > 0) {
    valid_cur = step_valid(0, ids_cur);
    issue(0, k_col, ids_cur, valid_cur, 0);
  }
  for (int item = threadIdx.x; item < C::kRows * C::kChunks; item += C::kThreads) {
    const int r = item / C::kChunks, c = item % C::kChunks;
    const bool ok = r < nrows;
    const T* src = static_cast<const T*>(a.q);
    if (ok) {
      const int rr = row0 + r, i = rr / G, h = kvh * G + rr % G;
      src += (si.q0 + i) * a.q_tok + h * a.q_head + c * 8;
    }
    const uint32_t dst = q_s + tile_off<D>(r, c);
    if (a.q_vec16) {
      cp_async16(dst, src, ok);
    } else {
      st_shared16(dst, ok ? load8_unaligned(src) : make_uint4(0, 0, 0, 0));
    }
  }
  cp_async_commit();
  if (my_steps > 0) issue(0, v_col, ids_cur, valid_cur, 1);
  cp_async_commit();
  cp_async_wait<1>();
  __syncthreads();  // the query rows came from every thread

  // ldmatrix lane roles (fragment layouts of mma.m16n8k16): A (Q) and B^T (V,
  // transposed) take rows (lane & 7) + 8 * ((lane >> 3) & 1) and chunk bit
  // lane >> 4; B (K) takes rows (lane & 7) + 8 * (lane >> 4), chunk bit (lane >> 3) & 1.
  const int arow = (lane & 7) + 8 * ((lane >> 3) & 1), ahb = lane >> 4;
  const int krow = (lane & 7) + 8 * (lane >> 4), khb = (lane >> 3) & 1;

  // This thread's score rows: g and g + 8; rows past nrows see nothing.
  const int g = lane / 4, t2 = 2 * (lane % 4);
  const int vis_lo = g < nrows ? first_vis + (row0 + g) / G : 0;
  const int vis_hi = g + 8 < nrows ? first_vis + (row0 + g + 8) / G : 0;
  const float sl2 = a.scale_log2;
  float acc[2 * kK][4];
#pragma unroll
  for (int n = 0; n < 2 * kK; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = 0.f;
  float m_lo = -INFINITY, m_hi = -INFINITY, l_lo = 0.f, l_hi = 0.f;

  // Load n (K_j = 2j, V_j = 2j + 1) sits in slot n % 3; one cp.async group per
  // load, so "load n landed" is cp.async.wait_group 2 once load n + 2 is committed.
  for (int j = 0; j < my_steps; ++j) {
    const int base = step_base(j);
    const bool more = j + 1 < my_steps;
    const int32_t ids_j1 = ids_next;
    ids_next = fetch_ids(j + 2);  // used next step: its latency hides behind this one
    const int slot_k = (2 * j) % 3, slot_v = (2 * j + 1) % 3, slot_k1 = (2 * j + 2) % 3;

    uint32_t valid_j1 = 0;
    __syncwarp();  // every lane is done with V_j-1's slot
    if (more) {
      valid_j1 = step_valid(j + 1, ids_j1);
      issue(j + 1, k_col, ids_j1, valid_j1, slot_k1);
    }
    cp_async_commit();
    cp_async_wait<2>();
    __syncwarp();  // K_j from every lane

    // S = Q.K^T for 16 tokens: two n8 tiles, D/16 k-steps.
    float sc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    const uint32_t k_s = ring + uint32_t(slot_k * C::kSlotBytes);
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      uint32_t qa[4], kb[4];
      ldmatrix_x4(qa, q_s + tile_off<D>(arow, 2 * kk + ahb));
      ldmatrix_x4(kb, k_s + tile_off<D>(krow, 2 * kk + khb));
      mma_16816<T>(sc[0], qa, kb[0], kb[1]);
      mma_16816<T>(sc[1], qa, kb[2], kb[3]);
    }
    // Mask (chunk end, bad block ids, causal limit per row), then the online
    // softmax in the log2 domain with the scale folded into the exponent.
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int tr = 8 * n + t2 + e;
        const bool ok = (valid_cur >> tr) & 1u;
        if (!ok || base + tr >= vis_lo) sc[n][e] = -INFINITY;
        if (!ok || base + tr >= vis_hi) sc[n][2 + e] = -INFINITY;
        mx_lo = fmaxf(mx_lo, sc[n][e]);
        mx_hi = fmaxf(mx_hi, sc[n][2 + e]);
      }
#pragma unroll
    for (int off = 1; off <= 2; off *= 2) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    const float mn_lo = fmaxf(m_lo, mx_lo * sl2), mn_hi = fmaxf(m_hi, mx_hi * sl2);
    const float mu_lo = mn_lo == -INFINITY ? 0.f : mn_lo;
    const float mu_hi = mn_hi == -INFINITY ? 0.f : mn_hi;
    const float al_lo = fast_exp2(m_lo - mu_lo), al_hi = fast_exp2(m_hi - mu_hi);
    m_lo = mn_lo;
    m_hi = mn_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        sc[n][e] = fast_exp2(fmaf(sc[n][e], sl2, -mu_lo));
        sc[n][2 + e] = fast_exp2(fmaf(sc[n][2 + e], sl2, -mu_hi));
        sum_lo += sc[n][e];
        sum_hi += sc[n][2 + e];
      }
    l_lo = l_lo * al_lo + sum_lo;
    l_hi = l_hi * al_hi + sum_hi;
    // Once the running maxima settle, most steps leave them unchanged: skip
    // the rescale of the D/2 accumulators when no row of the warp moved.
    if (__any_sync(0xffffffffu, al_lo != 1.f || al_hi != 1.f)) {
#pragma unroll
      for (int n = 0; n < 2 * kK; ++n) {
        acc[n][0] *= al_lo;
        acc[n][1] *= al_lo;
        acc[n][2] *= al_hi;
        acc[n][3] *= al_hi;
      }
    }
    // P as the A operand of P.V: the S accumulators of the two n8 tiles are
    // exactly the A fragment of one k16 step (FA2's register reuse).
    uint32_t pa[4];
    pa[0] = pack2<T>(sc[0][0], sc[0][1]);
    pa[1] = pack2<T>(sc[0][2], sc[0][3]);
    pa[2] = pack2<T>(sc[1][0], sc[1][1]);
    pa[3] = pack2<T>(sc[1][2], sc[1][3]);

    __syncwarp();  // every lane is done with K_j's slot
    if (more) issue(j + 1, v_col, ids_j1, valid_j1, slot_k);
    cp_async_commit();
    cp_async_wait<2>();
    __syncwarp();  // V_j from every lane

    const uint32_t v_s = ring + uint32_t(slot_v * C::kSlotBytes);
#pragma unroll
    for (int kk = 0; kk < kK; ++kk) {
      uint32_t vb[4];
      ldmatrix_x4_trans(vb, v_s + tile_off<D>(arow, 2 * kk + ahb));
      mma_16816<T>(acc[2 * kk], pa, vb[0], vb[1]);
      mma_16816<T>(acc[2 * kk + 1], pa, vb[2], vb[3]);
    }
    valid_cur = valid_j1;
  }
#pragma unroll
  for (int off = 1; off <= 2; off *= 2) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
  }
  cp_async_wait<0>();
  __syncthreads();  // the merge area overlaps other warps' ring slots

  // Merge the 4 warps: o_s[warp][row][kOStride], then m_s and l_s [warp][row].
  float* o_s = reinterpret_cast<float*>(smem + C::kQBytes);
  float* m_s = o_s + C::kWarps * C::kRows * C::kOStride;
  float* l_s = m_s + C::kWarps * C::kRows;
  if (g < nrows) {
    float* dst = o_s + (warp * C::kRows + g) * C::kOStride + t2;
#pragma unroll
    for (int n = 0; n < 2 * kK; ++n)
      *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(acc[n][0], acc[n][1]);
    if (t2 == 0) {
      m_s[warp * C::kRows + g] = m_lo;
      l_s[warp * C::kRows + g] = l_lo;
    }
  }
  if (g + 8 < nrows) {
    float* dst = o_s + (warp * C::kRows + g + 8) * C::kOStride + t2;
#pragma unroll
    for (int n = 0; n < 2 * kK; ++n)
      *reinterpret_cast<float2*>(dst + 8 * n) = make_float2(acc[n][2], acc[n][3]);
    if (t2 == 0) {
      m_s[warp * C::kRows + g + 8] = m_hi;
      l_s[warp * C::kRows + g + 8] = l_hi;
    }
  }
  __syncthreads();

  const int64_t rows_total = a.total_q * a.num_q_heads;
  for (int item = threadIdx.x; item < nrows * C::kChunks; item += C::kThreads) {
    const int r = item / C::kChunks, c = item % C::kChunks;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < C::kWarps; ++w) mx = fmaxf(mx, m_s[w * C::kRows + r]);
    const float m_use = mx == -INFINITY ? 0.f : mx;
    float sum = 0.f, o[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < C::kWarps; ++w) {
      const float wt = fast_exp2(m_s[w * C::kRows + r] - m_use);
      sum += l_s[w * C::kRows + r] * wt;
      const float4* src =
          reinterpret_cast<const float4*>(o_s + (w * C::kRows + r) * C::kOStride + c * 8);
      const float4 x = src[0], y = src[1];
      o[0] += wt * x.x, o[1] += wt * x.y, o[2] += wt * x.z, o[3] += wt * x.w;
      o[4] += wt * y.x, o[5] += wt * y.y, o[6] += wt * y.z, o[7] += wt * y.w;
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
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t rows_per_seq = a.max_q_len * a.num_q_heads;
  const int s = int(blockIdx.x / rows_per_seq);
  const int rr = int(blockIdx.x % rows_per_seq);
  // The lengths are inputs, not the decode grid's outputs: they load while
  // that grid still runs, so only one L2 round trip follows the wait.
  const SeqInfo si = seq_info(a, s);
  if (!si.ok || rr >= si.q_len * a.num_q_heads) return;  // uniform over the CTA
#if __CUDA_ARCH__ >= 900
  if (a.pdl) asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  const int i = rr / a.num_q_heads, h = rr % a.num_q_heads;
  const int vis = si.ctx - si.q_len + i + 1;
  const int n = min(a.splits, (vis + a.chunk - 1) / a.chunk);
  const int per = (n + 3) / 4;
  const int j0 = warp * per;
  const int cnt = min(per, n - j0);  // this warp's splits; may be <= 0
  const int64_t tok = si.q0 + i;
  const int64_t rows_total = a.total_q * a.num_q_heads;
  const int64_t row = tok * a.num_q_heads + h;

  // A warp's first kBatch partial rows load together with the lse values
  // (rows of splits past cnt are zeros, never loaded): up to 4 * kBatch splits
  // cost one L2 round trip. An empty split has lse -inf, weight 0 and a zero row.
  float x[kBatch][kPer];
  auto load_batch = [&](int q0) {
#pragma unroll
    for (int q = 0; q < kBatch; ++q) {
      if (q0 + q < cnt) {
        ld_f32<kPer>(a.part_o + (int64_t(j0 + q0 + q) * rows_total + row) * D + lane * kPer, x[q]);
      } else {
#pragma unroll
        for (int e = 0; e < kPer; ++e) x[q][e] = 0.f;
      }
    }
  };
  load_batch(0);
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
    if (q0 > 0) load_batch(q0);
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

// Overrides for the tuning harness (paged_tune.cu); the library passes none.
struct PagedTuning {
  int splits = 0;           // > 0: this many splits (the workspace permitting)
  bool skip_merge = false;  // time the decode kernel alone
};

template <typename T, int D>
tk_status launch_paged(PagedArgs a, size_t workspace_bytes, void* workspace, const Launch& l,
                       const PagedTuning& tune = {}) {
  using C = DecodeConfig<D>;
  const int64_t base_ctas = int64_t(a.num_seqs) * a.num_kv_heads * a.row_tiles;
  if (base_ctas > INT_MAX)
    return fail(TK_ERR_UNSUPPORTED, "paged_attention: %lld work items exceed the cuda grid",
                (long long)base_ctas);
  auto kernel = paged_decode_kernel<T, D>;
  // Above 48 KB a kernel must opt in to dynamic shared memory; once per
  // instantiation (and device: the backend serves one device), with the CTAs
  // per SM that the split heuristic fills.
  static const cudaError_t smem_ok = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmemBytes);
  if (smem_ok != cudaSuccess)
    return fail(TK_ERR_BACKEND, "paged_attention: cannot reserve %d bytes of shared memory: %s",
                C::kSmemBytes, cudaGetErrorString(smem_ok));
  static const int ctas_per_sm = [&] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, C::kThreads, C::kSmemBytes) !=
        cudaSuccess)
      cudaGetLastError();
    return std::clamp(n, 1, C::kCtasPerSm);
  }();
  int64_t splits = tune.splits > 0 ? std::min(tune.splits, kMaxSplits)
                                   : choose_splits(base_ctas, a.max_ctx, l.num_sms, ctas_per_sm);
  const size_t per_split = split_bytes(a.total_q, a.num_q_heads, D);
  splits = std::min<int64_t>(splits, int64_t(workspace_bytes / per_split));
  int64_t chunk = a.max_ctx;
  if (splits > 1) {
    chunk = (a.max_ctx + splits - 1) / splits;
    chunk = (chunk + C::kRound - 1) / C::kRound * C::kRound;
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
  a.pdl = splits > 1 && !l.portable && l.sm_major >= 9 && !tune.skip_merge;
  kernel<<<dim3(unsigned(base_ctas), unsigned(splits)), C::kThreads, C::kSmemBytes, l.stream>>>(a);
  TK_TRY(check_launch("paged_attention"));
  if (splits > 1 && !tune.skip_merge) {
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
                            void* workspace, const Launch& l, const PagedTuning& tune = {}) {
  switch (head_dim) {
    case 64: return launch_paged<T, 64>(a, workspace_bytes, workspace, l, tune);
    case 128: return launch_paged<T, 128>(a, workspace_bytes, workspace, l, tune);
    case 256: return launch_paged<T, 256>(a, workspace_bytes, workspace, l, tune);
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
  a.row_tiles = int((p.max_q_len * a.group + kPagedRows - 1) / kPagedRows);
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
  // Each CTA holds at most kPagedRows rows, so at least total_q * Hq /
  // kPagedRows CTAs run before splitting: the most splits the launcher can ask for.
  const int64_t min_ctas =
      std::max<int64_t>(1, (total_q * num_q_heads + kPagedRows - 1) / kPagedRows);
  // The launcher's CTAs per SM are at most kCtasPerSm (the same for every D).
  const int64_t splits =
      choose_splits(min_ctas, max_context_len, num_sms, DecodeConfig<128>::kCtasPerSm);
  if (splits <= 1 || total_q == 0) return 0;
  return size_t(splits) * split_bytes(total_q, num_q_heads, head_dim);
}

}  // namespace tk::cuda
