// flash_attention on Hopper (sm_90a), the FlashAttention-3 way:
//   - a producer warp issues TMA copies (128-byte swizzled tiles) of Q once and
//     of K and V into a ring of kStages shared-memory stages, each guarded by a
//     "full" mbarrier (copy landed) and an "empty" one (consumers done);
//   - two (head dim 128) or three (64) consumer warpgroups own 64 query rows each and run
//     S = Q K^T (wgmma, Q and K from shared memory) and O += P V (wgmma, P from
//     registers, V from shared memory through the descriptor's transpose bit);
//   - within a warpgroup the softmax of tile j overlaps the P V product of
//     tile j - 1 (both in flight on the tensor cores), and the warpgroups
//     take turns issuing their products (named barriers), so one's softmax
//     overlaps the other's matrix work;
//   - setmaxnreg moves registers from the producer to the consumers;
//   - scores live in the log2 domain with the scale folded in (one FFMA + EX2).
// Key tiles are visited last-to-first so the masked ones (sequence end, causal
// diagonal) come first. Output goes through shared memory and plain 16-byte
// stores bounded by the sequence (a TMA store would spill into the next
// sequence of a variable-length batch).
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda/attention/flash_sm90.h"
#include "cuda/attention/hopper.cuh"
#include "cuda/attention/primitives.cuh"

namespace tk::cuda {
namespace {

using namespace attn;

struct Sm90Args {
  // [tokens, heads, D] tensors as 3-D tensor maps (D, heads, tokens) whose box
  // is 64 columns (128 bytes, the swizzle span) x 1 head x a tile of rows.
  CUtensorMap q_map, k_map, v_map;
  void* out;
  float* lse;  // [Hq, total_q] or null
  int64_t o_tok, o_head;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t total_q, total_k, max_q, max_k;
  int group;  // Hq / Hkv
  int heads;     // Hq
  int m_blocks;  // query tiles per (sequence, head)
  int num_tiles; // batch * heads * m_blocks
  int pairs;        // batch * heads
  int sched_heads;  // (sequence, head) pairs per group of the tile order (sm90_tile)
  float scale_log2;
  int causal;
  unsigned int* error_flag;
};

// Tile shapes. wgmma's M is 64 per consumer warpgroup; 128-key tiles give
// each S = Q K^T wgmma N = 128. Per consumer thread that is 64 score + D / 2
// output + 32 probability registers. D 128: two consumer warpgroups (128
// query rows) at 232 registers each. D 64 has half the matrix work per
// exponential, so the special-function unit is as busy as the tensor cores;
// three consumer warpgroups (192 rows, FlashAttention-3's choice) give the
// scheduler more to overlap, at 160 registers each (4 warpgroups share 64K).
// Shared memory: two Q tiles (the next tile's Q lands while this one runs;
// each also stages its tile's output) and kStages K and V tiles (D 128:
// 2 x 32 + 2 x 64 KB; D 64: 2 x 24 + 3 x 32 KB), plus 1 KB to align the
// swizzle pattern to 1024 bytes.
// (A third stage at D 128 measured the same on H100, 2026-11-25.)
template <int D>
struct Sm90Config {
  static constexpr int kConsumers = D == 64 ? 3 : 2;  // consumer warpgroups
  static constexpr int kBlockM = 64 * kConsumers;
  static constexpr int kBlockN = 128;
  static constexpr int kStages = D == 64 ? 3 : 2;
  static constexpr int kThreads = 128 * (kConsumers + 1);  // + the producer warpgroup
  static constexpr int kProducerRegs = D == 64 ? 32 : 40;
  static constexpr int kConsumerRegs = D == 64 ? 160 : 232;
  static constexpr uint32_t kQBytes = kBlockM * D * 2;
  static constexpr uint32_t kKVBytes = kBlockN * D * 2;
  static constexpr int kSmemBytes = 1024 + 2 * int(kQBytes) + 2 * kStages * int(kKVBytes);
  static_assert(D == 64 || D == 128, "the sm_90 kernel takes head dims 64 and 128");
  static_assert(kProducerRegs * 128 + kConsumerRegs * 128 * kConsumers <= 65536, "register file");
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

// One query tile of the persistent schedule and what its rows see.
struct Sm90Tile {
  int b, h, level;  // level: 0 = the sequence's heaviest query tile
  int64_t q0, k0;
  int len_q, len_k, m_begin;
  int n_tiles;  // key tiles to visit (0: the rows see no key)
};

#if TK_SM90A
// Tile t of the launch. The (sequence, head) pairs form groups of
// sched_heads; a group's tiles come level by level (level r: the r-th query
// tile counted from the heaviest, the same level of every pair of the group
// side by side), heaviest level first in the last group and in every second
// group before it, lightest first in the others. So the cost of consecutive
// tiles changes slowly (the snake of sm90_tile_index then pairs heavy with
// light), the launch ends on the lightest tiles, and the CTAs in flight
// share the K and V of a few heads in L2 (sm90_sched_heads picks the size).
// The query tiles are aligned to the end of the sequence,
// where causal rows see the most keys: a partial tile (a length not a
// multiple of kBlockM) is then the lightest, whose rows before the
// sequence's start are computed and dropped, instead of the heaviest.
// Returns false when the tile has no rows (a shorter sequence of the batch)
// or its sequence's offsets are out of range (raising the device flag).
template <int D>
__device__ __forceinline__ bool sm90_tile(const Sm90Args& a, int t, bool raise, Sm90Tile& w) {
  using Cfg = Sm90Config<D>;
  const int pairs = a.pairs;
  const int per_group = a.sched_heads * a.m_blocks;
  const int grp = t / per_group, i = t - grp * per_group;
  const int in_group = min(a.sched_heads, pairs - grp * a.sched_heads);
  int r = i / in_group;  // level, 0 = the heaviest query tile
  const int bh = grp * a.sched_heads + i % in_group;
  if (a.sched_heads > 1 && (((pairs - 1) / a.sched_heads - grp) & 1)) r = a.m_blocks - 1 - r;
  w.level = r;
  w.h = bh % a.heads;
  w.b = bh / a.heads;
  const int64_t q0 = a.cu_q[w.b], q1 = a.cu_q[w.b + 1];
  const int64_t k0 = a.cu_k[w.b], k1 = a.cu_k[w.b + 1];
  if (!(0 <= q0 && q0 <= q1 && q1 <= a.total_q && q1 - q0 <= a.max_q && 0 <= k0 && k0 <= k1 &&
        k1 <= a.total_k && k1 - k0 <= a.max_k)) {
    if (raise && r == 0 && w.h == 0) raise_index_error(a.error_flag);
    return false;
  }
  w.q0 = q0;
  w.k0 = k0;
  w.len_q = int(q1 - q0);
  w.len_k = int(k1 - k0);
  if (r * Cfg::kBlockM >= w.len_q) return false;
  w.m_begin = w.len_q - (r + 1) * Cfg::kBlockM;  // may be negative
  // Causal is aligned to the bottom right: row i sees keys j <= i + len_k - len_q.
  const int n_end = a.causal ? max(0, min(w.len_k, w.m_begin + Cfg::kBlockM + w.len_k - w.len_q))
                             : w.len_k;
  w.n_tiles = (n_end + Cfg::kBlockN - 1) / Cfg::kBlockN;
  return true;
}

// The persistent schedule: CTA c takes position c of each even round of
// gridDim.x tiles and position gridDim.x - 1 - c of each odd one, so the
// heavy and light ends of the rounds even out. A grid of one CTA per tile is
// the plain one-tile-per-CTA launch.
__device__ __forceinline__ int sm90_tile_index(int round) {
  const int g = int(gridDim.x), c = int(blockIdx.x);
  return round * g + ((round & 1) ? g - 1 - c : c);
}

// The next tile with rows to compute at or after `round` of this CTA's
// schedule; false when there is none.
template <int D>
__device__ __forceinline__ bool sm90_next(const Sm90Args& a, int& round, bool raise, Sm90Tile& w) {
  for (;; ++round) {
    const int t = sm90_tile_index(round);
    if (t >= a.num_tiles) return false;
    if (sm90_tile<D>(a, t, raise, w)) return true;
  }
}
#endif  // TK_SM90A

template <typename T, int D>
__global__ void __launch_bounds__(Sm90Config<D>::kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ Sm90Args a) {
#if TK_SM90A
  using namespace attn::sm90;
  using Cfg = Sm90Config<D>;
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kS = Cfg::kStages;
  constexpr int kWG = Cfg::kConsumers;
  constexpr int kBlocks = D / 64;  // 128-byte column blocks, one TMA box each
  constexpr uint32_t kQBytes = Cfg::kQBytes, kKVBytes = Cfg::kKVBytes;
  extern __shared__ unsigned char smem_raw[];
  // q_full[2], q_empty[2], k_full[kS], v_full[kS], k_empty[kS], v_empty[kS]
  __shared__ __align__(8) uint64_t bars[4 + 4 * kS];

  const int tid = threadIdx.x;
  const uint32_t base = (smem_addr(smem_raw) + 1023u) & ~1023u;
  // Two Q buffers, tile j in buffer j % 2: the next tile's Q lands while this
  // one runs; a buffer also stages its tile's output.
  auto sQ = [&](int buf) { return base + uint32_t(buf) * kQBytes; };
  auto sK = [&](int s) { return base + 2 * kQBytes + uint32_t(s) * kKVBytes; };
  auto sV = [&](int s) { return base + 2 * kQBytes + uint32_t(kS + s) * kKVBytes; };
  const uint32_t bar0 = smem_addr(bars);
  auto q_full = [&](int buf) { return bar0 + 8u * uint32_t(buf); };
  auto q_empty = [&](int buf) { return bar0 + 8u * uint32_t(2 + buf); };
  auto k_full = [&](int s) { return bar0 + 8u * uint32_t(4 + s); };
  auto v_full = [&](int s) { return bar0 + 8u * uint32_t(4 + kS + s); };
  auto k_empty = [&](int s) { return bar0 + 8u * uint32_t(4 + 2 * kS + s); };
  auto v_empty = [&](int s) { return bar0 + 8u * uint32_t(4 + 3 * kS + s); };

  if (tid == 0) {
#pragma unroll
    for (int buf = 0; buf < 2; ++buf) {
      mbar_init(q_full(buf), 1);         // the producer's arrive.expect_tx; TMA bytes complete it
      mbar_init(q_empty(buf), 4 * kWG);  // lane 0 of each consumer warp, after its epilogue
    }
#pragma unroll
    for (int s = 0; s < kS; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(k_empty(s), 4 * kWG);
      mbar_init(v_empty(s), 4 * kWG);
    }
    mbar_init_fence();
  }
  __syncthreads();

  // Both roles walk the same schedule; the K/V ring and the Q buffer count
  // their fills (and so their mbarrier phases) across tiles.
  if (tid < 128) {
    // Producer warpgroup: one thread issues every copy; the rest idle out.
    regs_dealloc<Cfg::kProducerRegs>();
    if (tid == 0) {
      tma_prefetch_map(&a.q_map);
      tma_prefetch_map(&a.k_map);
      tma_prefetch_map(&a.v_map);
      int fill = 0;  // K/V fills so far
      int tiles = 0;
      Sm90Tile w;
      for (int round = 0; sm90_next<D>(a, round, true, w); ++round, ++tiles) {
        // Q of tile j overwrites buffer j % 2 once tile j - 2 is out of it.
        const int buf = tiles & 1;
        if (tiles >= 2) mbar_wait(q_empty(buf), uint32_t((tiles >> 1) - 1) & 1u);
        mbar_arrive_expect_tx(q_full(buf), kQBytes);
#pragma unroll
        for (int c = 0; c < kBlocks; ++c)
          tma_load_3d(sQ(buf) + uint32_t(c) * kBM * 128, &a.q_map, 64 * c, w.h,
                      int(w.q0) + w.m_begin, q_full(buf));
        const int kvh = w.h / a.group;
        for (int i = 0; i < w.n_tiles; ++i, ++fill) {
          const int s = fill % kS;
          const int row = int(w.k0) + (w.n_tiles - 1 - i) * kBN;
          // Fill f of stage s reuses it after fill f - kS was consumed.
          const uint32_t empty_parity = uint32_t((fill / kS) - 1) & 1u;
          if (fill >= kS) mbar_wait(k_empty(s), empty_parity);
          mbar_arrive_expect_tx(k_full(s), kKVBytes);
#pragma unroll
          for (int c = 0; c < kBlocks; ++c)
            tma_load_3d(sK(s) + uint32_t(c) * kBN * 128, &a.k_map, 64 * c, kvh, row, k_full(s));
          if (fill >= kS) mbar_wait(v_empty(s), empty_parity);
          mbar_arrive_expect_tx(v_full(s), kKVBytes);
#pragma unroll
          for (int c = 0; c < kBlocks; ++c)
            tma_load_3d(sV(s) + uint32_t(c) * kBN * 128, &a.v_map, 64 * c, kvh, row, v_full(s));
        }
      }
    }
    return;
  }

  // Consumer warpgroups.
  regs_alloc<Cfg::kConsumerRegs>();
  const int wg = tid / 128 - 1;  // rows 64 wg .. 64 wg + 63 of the tile
  const int warp = (tid / 32) % 4, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int row0 = 64 * wg + 16 * warp + g;  // tile row of this thread's first row (+8: second)

  // Descriptors. Q and K: K-major, a k16 step is +32 B within a 128-byte row,
  // each 64-column block of the tile lies kRows * 128 B after the previous.
  // V: MN-major (transposed), a k16 step is 16 rows = 2048 B; the second
  // 64-column block is the instruction's leading byte offset.
  int buf = 0;  // this tile's Q buffer
  auto q_desc = [&](int kk) {
    return smem_desc(sQ(buf) + uint32_t(wg) * 64 * 128 + uint32_t(kk / 4) * kBM * 128 +
                         uint32_t(kk % 4) * 32,
                     16, 1024);
  };
  auto k_desc = [&](int s, int kk) {
    return smem_desc(sK(s) + uint32_t(kk / 4) * kBN * 128 + uint32_t(kk % 4) * 32, 16, 1024);
  };
  auto v_desc = [&](int s, int kk) {
    return smem_desc(sV(s) + uint32_t(kk) * 16 * 128, kBN * 128, 1024);
  };

  float o[D / 2];
  float s_acc[kBN / 2];             // S accumulators, 8-column chunk j in s_acc[4j .. 4j + 3]
  uint32_t p[kBN / 16][4];          // P as the A operand of each k16 step of P V
  float row_max[2], row_sum[2];
  float alpha[2];

  auto issue_qk = [&](int s) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_ss_n128<T>(s_acc, q_desc(kk), k_desc(s, kk), kk > 0);
    wgmma_commit();
  };
  auto issue_pv = [&](int s) {
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) wgmma_pv<T, D>(o, p[kk], v_desc(s, kk));
    wgmma_commit();
  };
  auto release = [&](uint32_t bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };
  // The warpgroups take turns issuing their wgmmas, round robin (named
  // barriers 4 + wg, FlashAttention-3's ping-pong): one's softmax then runs
  // while the others' products occupy the tensor cores. Warpgroup 0 goes
  // first; each issues n_tiles + 1 batches per tile, and the turns run on
  // across tiles: the last warpgroup hands its last batch of a tile over only
  // when a later tile has batches, and otherwise starts the next one with a
  // bare hand-over, so no barrier is left half-arrived. (Barriers 1 .. kWG:
  // each warpgroup's epilogue; 7: all consumers, once, after a tile's first batch.)
  auto my_turn = [&] { named_sync(4 + wg, 256); };
  auto your_turn = [&] { named_arrive(4 + (wg + 1) % kWG, 256); };

  int fill = 0;        // K/V fills consumed so far (the producer's count)
  int tiles = 0;       // tiles (Q fills) so far
  bool handed = false; // the last warpgroup's last batch handed the turn to warpgroup 0
  Sm90Tile w, next;
  int round = 0;
  bool have = sm90_next<D>(a, round, false, w);
  while (have) {
    // The next tile (read after this one's main loop, off its registers).
    int next_round = round + 1;
    bool have_next = false;
    const int len_q = w.len_q, len_k = w.len_k, m_begin = w.m_begin, n_tiles = w.n_tiles;
    const int diag = len_k - len_q;

    // Masks the tile of keys n0 .. n0 + kBN - 1, updates the running max and sum,
    // leaves the probabilities in s_acc and the factor rescaling O in alpha.
    auto softmax = [&](int n0) {
      const bool need_mask = n0 + kBN > len_k ||
                             (a.causal && n0 + kBN - 1 > m_begin + 64 * wg + 16 * warp + diag);
      if (need_mask) {
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m_begin + row0 + 8 * (e / 2);
            const int col = n0 + 8 * j + 2 * t + (e % 2);
            if (col >= len_k || (a.causal && col > row + diag)) s_acc[4 * j + e] = -INFINITY;
          }
      }
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        // The row max heads the chain of a warpgroup's turn (the exponentials
        // wait for it): a tree of 5 levels, not 16 dependent steps. Exact in any order.
        static_assert(kBN == 128, "the tree below reduces 16 pair maxima");
        float m[16];
#pragma unroll
        for (int j = 0; j < 16; ++j) m[j] = fmaxf(s_acc[4 * j + 2 * hr], s_acc[4 * j + 2 * hr + 1]);
#pragma unroll
        for (int j = 0; j < 8; ++j) m[j] = fmaxf(m[j], m[j + 8]);
#pragma unroll
        for (int j = 0; j < 4; ++j) m[j] = fmaxf(m[j], m[j + 4]);
        m[0] = fmaxf(m[0], m[2]);
        m[1] = fmaxf(m[1], m[3]);
        float mx = fmaxf(m[0], m[1]);
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[hr], mx * a.scale_log2);
        // A row with no visible key so far keeps max -inf; subtracting 0 keeps exp2 at 0, not NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        alpha[hr] = fast_exp2(row_max[hr] - m_use);
        row_max[hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
          for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
            s_acc[4 * j + e] = fast_exp2(s_acc[4 * j + e] * a.scale_log2 - m_use);
            sum += s_acc[4 * j + e];
          }
        row_sum[hr] = row_sum[hr] * alpha[hr] + sum;
      }
    };
    auto pack_p = [&] {
#pragma unroll
      for (int kk = 0; kk < kBN / 16; ++kk) {
        p[kk][0] = pack2<T>(s_acc[8 * kk + 0], s_acc[8 * kk + 1]);
        p[kk][1] = pack2<T>(s_acc[8 * kk + 2], s_acc[8 * kk + 3]);
        p[kk][2] = pack2<T>(s_acc[8 * kk + 4], s_acc[8 * kk + 5]);
        p[kk][3] = pack2<T>(s_acc[8 * kk + 6], s_acc[8 * kk + 7]);
      }
    };
    auto rescale_o = [&] {
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[4 * j + 0] *= alpha[0];
        o[4 * j + 1] *= alpha[0];
        o[4 * j + 2] *= alpha[1];
        o[4 * j + 3] *= alpha[1];
      }
    };

#pragma unroll
    for (int i = 0; i < D / 2; ++i) o[i] = 0.f;
    row_max[0] = row_max[1] = -INFINITY;
    row_sum[0] = row_sum[1] = 0.f;

    buf = tiles & 1;
    mbar_wait(q_full(buf), uint32_t(tiles >> 1) & 1u);
    if (n_tiles > 0) {
      const int f0 = fill;  // this tile's first fill
      auto stage = [&](int i) { return (f0 + i) % kS; };
      auto phase = [&](int i) { return uint32_t((f0 + i) / kS) & 1u; };
      if (wg == kWG - 1 && !handed) named_arrive(4, 256);
      // Tile 0 (the last key tile): S, softmax, P.
      mbar_wait(k_full(stage(0)), phase(0));
      my_turn();
      wgmma_fence();
      issue_qk(stage(0));
      your_turn();
      wgmma_wait<0>();
      reg_fence(s_acc);
      release(k_empty(stage(0)));
      softmax((n_tiles - 1) * kBN);
      pack_p();
      // The box of the last key tile runs past the sequence's end into the next
      // sequence's rows (or padding rows past the last one). Their scores are
      // masked, but P = 0 times a NaN or inf there would still reach O, so those
      // V rows become zeros before any warpgroup multiplies by them. A row of
      // the tile is 128 contiguous bytes in each 64-column block (the swizzle
      // only permutes chunks within a row).
      const int tail = len_k - (n_tiles - 1) * kBN;  // valid rows of the tile, CTA-uniform
      if (tail < kBN) {
        mbar_wait(v_full(stage(0)), phase(0));
        constexpr int kRowChunks = 128 / 16;
        const uint32_t v0 = sV(stage(0));
        for (int i = tid - 128; i < (kBN - tail) * kBlocks * kRowChunks; i += 128 * kWG) {
          const int r = tail + i / (kBlocks * kRowChunks), c = (i / kRowChunks) % kBlocks;
          st_shared16(v0 + uint32_t(c) * kBN * 128 + uint32_t(r) * 128 + (i % kRowChunks) * 16,
                      make_uint4(0, 0, 0, 0));
        }
        fence_proxy_async();
        named_sync(7, 128 * kWG);
      }
      // Tile i: S(i) = Q K(i)^T and O += P(i-1) V(i-1) in flight together; the
      // softmax of S(i) runs while P V finishes, then O is rescaled.
      for (int i = 1; i < n_tiles; ++i) {
        const int s = stage(i), ps = stage(i - 1);
        mbar_wait(k_full(s), phase(i));
        mbar_wait(v_full(ps), phase(i - 1));
        reg_fence(o);
        reg_fence(p);
        my_turn();
        wgmma_fence();
        issue_qk(s);
        issue_pv(ps);
        your_turn();
        wgmma_wait<1>();
        reg_fence(s_acc);
        release(k_empty(s));
        softmax((n_tiles - 1 - i) * kBN);
        wgmma_wait<0>();
        reg_fence(o);
        release(v_empty(ps));
        rescale_o();
        pack_p();
      }
      const int ls = stage(n_tiles - 1);
      mbar_wait(v_full(ls), phase(n_tiles - 1));
      reg_fence(o);
      reg_fence(p);
      my_turn();
      wgmma_fence();
      issue_pv(ls);
      if (wg != kWG - 1) your_turn();
      have_next = sm90_next<D>(a, next_round, false, next);  // under this P V
      handed = have_next && next.n_tiles > 0;
      if (wg == kWG - 1 && handed) your_turn();
      wgmma_wait<0>();
      reg_fence(o);
      release(v_empty(ls));
      fill += n_tiles;
    } else {
      have_next = sm90_next<D>(a, next_round, false, next);
    }
    ++tiles;

    // Epilogue: normalise, write lse, stage O (16-bit) in this warpgroup's own
    // Q rows (same swizzle), then 16-byte stores of the rows inside the
    // sequence; then the buffer is free for the Q of tile j + 2.
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = row_sum[hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[4 * j + 2 * hr] *= inv;
        o[4 * j + 2 * hr + 1] *= inv;
      }
      const int row = m_begin + row0 + 8 * hr;
      if (a.lse && t == 0 && row >= 0 && row < len_q)
        a.lse[int64_t(w.h) * a.total_q + w.q0 + row] =
            l > 0.f ? (row_max[hr] + __log2f(l)) * kLn2 : -INFINITY;
    }
    named_sync(1 + wg, 128);  // every warp of this warpgroup is done reading its Q rows
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = row0 + 8 * hr;
        const uint32_t chunk = uint32_t((j % 8) ^ (r % 8));
        st_shared4(sQ(buf) + uint32_t(j / 8) * kBM * 128 + uint32_t(r) * 128 + (chunk << 4) + t * 4,
                   pack2<T>(o[4 * j + 2 * hr], o[4 * j + 2 * hr + 1]));
      }
    named_sync(1 + wg, 128);
    T* out = static_cast<T*>(a.out) + w.q0 * a.o_tok + w.h * a.o_head;
    constexpr int kChunks = D / 8;  // 16-byte chunks per row
#pragma unroll
    for (int it = 0; it < 64 * kChunks / 128; ++it) {
      const int i = (tid % 128) + it * 128;
      const int r = 64 * wg + i / kChunks, c = i % kChunks;
      const int row = m_begin + r;
      const uint32_t chunk = uint32_t((c % 8) ^ (r % 8));
      if (row >= 0 && row < len_q)
        st16(out + int64_t(row) * a.o_tok + c * 8,
             ld_shared16(sQ(buf) + uint32_t(c / 8) * kBM * 128 + uint32_t(r) * 128 + (chunk << 4)));
    }
    fence_proxy_async();  // these reads before the copy engine's next write of the buffer
    release(q_empty(buf));

    w = next;
    round = next_round;
    have = have_next;
  }
#endif  // TK_SM90A
}

// cuTensorMapEncodeTiled from the driver the runtime already loaded, so the
// library never links libcuda. Null when the driver lacks it.
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return PFN_cuTensorMapEncodeTiled_v12000(nullptr);
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A [tokens, heads, D] 16-bit tensor as a (D, heads, tokens) tensor map with a
// box of 64 columns x 1 head x `rows` tokens, 128-byte swizzled; rows past
// `tokens` read as zeros.
bool encode_heads(CUtensorMap* map, tk_dtype dt, const void* p, int64_t tokens, int64_t heads,
                  int64_t D, int64_t tok_stride, int64_t head_stride, int rows) {
  const auto encode = tensor_map_encoder();
  if (!encode) return false;
  const cuuint64_t dims[3] = {cuuint64_t(D), cuuint64_t(heads), cuuint64_t(std::max<int64_t>(tokens, 1))};
  const cuuint64_t strides[2] = {cuuint64_t(head_stride) * 2, cuuint64_t(tok_stride) * 2};
  const cuuint32_t box[3] = {64, 1, cuuint32_t(rows)};
  const cuuint32_t elem_strides[3] = {1, 1, 1};
  return encode(map, dt == TK_F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                3, const_cast<void*>(p), dims, strides, box, elem_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// Switches for A/B measurements, read once (the defaults are the measured
// best, see attention/flash_NOTES.md):
//   TK_FLASH_SM90_GRID  "tiles" (one CTA per tile), "persistent" (one per SM)
//                       or a CTA count, instead of the rule in sm90_grid;
//   TK_FLASH_SM90_GROUP n: (sequence, head) pairs per group of the tile order
//                       instead of sm90_sched_heads' choice (1: head by head).
struct Sm90Switches {
  int grid = 0;  // 0: the rule, -1: one CTA per tile, n: n CTAs (INT_MAX: one per SM)
  int group = 0;  // 0: sm90_sched_heads
};
const Sm90Switches& sm90_switches() {
  static const Sm90Switches sw = [] {
    Sm90Switches s;
    if (const char* e = std::getenv("TK_FLASH_SM90_GRID"); e && *e)
      s.grid = std::strcmp(e, "tiles") == 0        ? -1
               : std::strcmp(e, "persistent") == 0 ? INT_MAX
                                                   : std::max(0, std::atoi(e));
    if (const char* e = std::getenv("TK_FLASH_SM90_GROUP"); e && *e) s.group = std::max(0, std::atoi(e));
    return s;
  }();
  return sw;
}

// Grid: one CTA per SM looping over the tiles (persistent) once there are at
// least 8 rounds of tiles. That saves each tile the start of a CTA (Q and
// first K/V load latency, barrier setup) and runs the next tile's loads under
// this one's epilogue. Its schedule is static, so the tile order
// (sm90_sched_heads) must even the CTAs out; with it the persistent grid
// measured the same as one CTA per tile on long tiles (B1 H32 S16384, H100,
// attention/flash_NOTES.md), where it used to lose 1 %. With fewer rounds,
// one CTA per tile.
int sm90_grid(int num_tiles, int num_sms) {
  const int forced = sm90_switches().grid;
  constexpr int kMinRounds = 8;
  if (forced == -1) return num_tiles;
  if (forced > 0) return std::min(num_tiles, forced == INT_MAX ? std::max(num_sms, 1) : forced);
  const bool persistent = num_sms > 0 && num_tiles >= kMinRounds * num_sms;
  return persistent ? num_sms : num_tiles;
}

// The group size of the tile order (sm90_tile) for a persistent grid: the
// one whose static schedule leaves the busiest CTA the least work, found by
// running the schedule on the host for the call's shape, every sequence
// taken at the longest length (exact for equal lengths, a guess otherwise).
// A tile costs its key tiles plus one for its start and epilogue. Groups of
// up to 32 pairs, so that the CTAs in flight share the K and V of few heads
// in L2 (a bound chosen, not measured). Cached for the last shape of each
// thread. Costs O(tiles) per candidate: it stops at the first within 0.5 %
// of even, and tries fewer groups when there are many tiles (some 2M steps
// at most, ~ms of host time). Without a causal mask every tile of the
// simulated shape costs the same and the order changes nothing.
int sm90_sched_heads(int pairs, int m_blocks, int block_m, int64_t len_q, int64_t len_k,
                     bool causal, int grid) {
  const int forced = sm90_switches().group;
  if (forced > 0) return std::min(forced, pairs);
  const int num_tiles = pairs * m_blocks;
  if (grid >= num_tiles || !causal) return 1;  // one CTA per tile: the hardware balances
  struct Key {
    int pairs, m_blocks, block_m, grid;
    int64_t len_q, len_k;
    bool causal;
    bool operator==(const Key& o) const {
      return pairs == o.pairs && m_blocks == o.m_blocks && block_m == o.block_m && grid == o.grid &&
             len_q == o.len_q && len_k == o.len_k && causal == o.causal;
    }
  };
  thread_local Key last_key{};
  thread_local int last = 0;
  const Key key{pairs, m_blocks, block_m, grid, len_q, len_k, causal};
  if (last > 0 && key == last_key) return last;

  constexpr int kMaxGroup = 32;
  constexpr int kBlockN = 128;
  std::vector<int64_t> cost(size_t(m_blocks), 0);  // by level, 0 = the heaviest
  int64_t total = 0;
  for (int r = 0; r < m_blocks; ++r) {
    const int64_t m_begin = len_q - int64_t(r + 1) * block_m;
    const int64_t n_end =
        causal ? std::max<int64_t>(0, std::min(len_k, m_begin + block_m + len_k - len_q)) : len_k;
    cost[size_t(r)] = 1 + (n_end + kBlockN - 1) / kBlockN;
    total += cost[size_t(r)] * pairs;
  }
  std::vector<int64_t> load(static_cast<size_t>(grid));
  int best = 1;
  int64_t best_max = INT64_MAX;
  const int max_group = std::min({pairs, kMaxGroup, std::max(1, 2'000'000 / num_tiles)});
  for (int g = 1; g <= max_group; ++g) {
    std::fill(load.begin(), load.end(), 0);
    const int per_group = g * m_blocks, last_group = (pairs - 1) / g;
    for (int t = 0; t < num_tiles; ++t) {  // sm90_tile and sm90_tile_index, on the host
      const int grp = t / per_group, i = t - grp * per_group;
      int r = i / std::min(g, pairs - grp * g);
      if (g > 1 && ((last_group - grp) & 1)) r = m_blocks - 1 - r;
      const int round = t / grid, c = t - round * grid;
      load[size_t((round & 1) ? grid - 1 - c : c)] += cost[size_t(r)];
    }
    const int64_t mx = *std::max_element(load.begin(), load.end());
    if (mx < best_max) {
      best_max = mx;
      best = g;
    }
    if (best_max * 1000 <= total * 1005 / grid) break;
  }
  last_key = key;
  last = best;
  return best;
}

template <typename T, int D>
tk_status launch_sm90(const Sm90Args& a, const Launch& l) {
  using Cfg = Sm90Config<D>;
  auto kernel = flash_fwd_sm90_kernel<T, D>;
  static const cudaError_t attr = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (attr != cudaSuccess)
    return fail(TK_ERR_BACKEND, "flash_attention: cannot reserve %d bytes of shared memory: %s",
                Cfg::kSmemBytes, cudaGetErrorString(attr));
  const int grid = sm90_grid(a.num_tiles, l.num_sms);
  Sm90Args args = a;
  args.sched_heads = sm90_sched_heads(a.pairs, a.m_blocks, Cfg::kBlockM, a.max_q,
                                      a.max_k, a.causal != 0, grid);
  kernel<<<unsigned(grid), Cfg::kThreads, Cfg::kSmemBytes, l.stream>>>(args);
  return check_launch("flash_attention");
}

}  // namespace

bool flash_attention_sm90(const tk_flash_attention_params& p, const Launch& l, tk_status* status) {
#if defined(TK_CUDA_SM90A)
  if (l.portable || l.sm_major != 9 || l.sm_minor != 0) return false;
  if (p.dtype != TK_F16 && p.dtype != TK_BF16) return false;
  if (p.head_dim != 64 && p.head_dim != 128) return false;
  // TMA: 16-byte aligned bases and strides; the output's 16-byte stores too.
  if (!heads_aligned16(p.q, p.q_token_stride, p.q_head_stride) ||
      !heads_aligned16(p.k, p.k_token_stride, p.k_head_stride) ||
      !heads_aligned16(p.v, p.v_token_stride, p.v_head_stride) ||
      !heads_aligned16(p.out, p.out_token_stride, p.out_head_stride))
    return false;
  if (p.total_q > INT_MAX || p.total_k > INT_MAX) return false;  // TMA coordinates are int32
  const int q_rows = p.head_dim == 64 ? Sm90Config<64>::kBlockM : Sm90Config<128>::kBlockM;
  const int64_t tiles = p.batch * p.num_q_heads * ((p.max_seqlen_q + q_rows - 1) / q_rows);
  if (tiles > INT_MAX) return false;  // tile indices are int32
  Sm90Args a{};
  constexpr int kKeyRows = 128;
  static_assert(Sm90Config<64>::kBlockN == kKeyRows && Sm90Config<128>::kBlockN == kKeyRows,
                "one box height for K and V");
  if (!encode_heads(&a.q_map, p.dtype, p.q, p.total_q, p.num_q_heads, p.head_dim, p.q_token_stride,
                    p.q_head_stride, q_rows) ||
      !encode_heads(&a.k_map, p.dtype, p.k, p.total_k, p.num_kv_heads, p.head_dim,
                    p.k_token_stride, p.k_head_stride, kKeyRows) ||
      !encode_heads(&a.v_map, p.dtype, p.v, p.total_k, p.num_kv_heads, p.head_dim,
                    p.v_token_stride, p.v_head_stride, kKeyRows))
    return false;
  a.out = p.out;
  a.lse = p.lse;
  a.o_tok = p.out_token_stride;
  a.o_head = p.out_head_stride;
  a.cu_q = p.cu_seqlens_q;
  a.cu_k = p.cu_seqlens_k;
  a.total_q = p.total_q;
  a.total_k = p.total_k;
  a.max_q = p.max_seqlen_q;
  a.max_k = p.max_seqlen_k;
  a.group = int(p.num_q_heads / p.num_kv_heads);
  a.heads = int(p.num_q_heads);
  a.m_blocks = int((p.max_seqlen_q + q_rows - 1) / q_rows);
  a.num_tiles = int(tiles);
  a.pairs = int(p.batch * p.num_q_heads);
  a.scale_log2 = p.scale * kLog2e;
  a.causal = p.causal != 0;
  a.error_flag = l.error_flag;
  const bool f16 = p.dtype == TK_F16;
  if (p.head_dim == 64)
    *status = f16 ? launch_sm90<__half, 64>(a, l)
                  : launch_sm90<__nv_bfloat16, 64>(a, l);
  else
    *status = f16 ? launch_sm90<__half, 128>(a, l)
                  : launch_sm90<__nv_bfloat16, 128>(a, l);
  return true;
#else
  (void)p;
  (void)l;
  (void)status;
  return false;
#endif
}

}  // namespace tk::cuda
