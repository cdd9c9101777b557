// The persistent streaming kernel of qmatmul_int4's decode path (T <= 8),
// moved here unchanged from qmatmul_int4.cu so that other weight-streaming
// kernels (dense decode matmul, fused_ffn) can share its pieces: the ring
// item layout, the x swizzle, the cp.async wait and the shared-memory plan.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/attention/primitives.cuh"
#include "cuda/ops.h"
#include "cuda/qmma.cuh"

namespace tk::cuda {

// ---- decode path (T <= 8): a persistent grid streaming through a ring ----
// One block per SM owns a contiguous range of 16-row tiles (at most
// kQsMaxTiles); its 8 warps split K, and the block reads each tile's rows
// front to back together. Each warp copies its weights with cp.async into its
// own part of a shared-memory ring `stages` items deep (an item: kSteps
// adjacent groups of 16 rows), so it keeps stages - 1 items in flight while it
// dequantises one, across tile boundaries: the SM's stream of requests never
// stops for the arithmetic.
// The copies read whole 128-byte lines: a warp's 16-byte copies cover 4 rows x
// 128 contiguous bytes (kSteps = 2) per instruction. The qmma lane layout read
// straight from global memory (8 rows x 64 bytes per instruction,
// qmma_kernel in qmatmul_int4.cu) measured 1.5 TB/s however deep the ring.
// A warp reads back only what it copied, so the ring needs __syncwarp, not
// block barriers. Staged once per block, with cp.async in the first group (the
// first items wait for nothing else): x (16-byte chunks swizzled so that a
// warp's B-fragment reads hit distinct banks, then turned into B fragments in
// place) and the block's scales and zero codes.
// Everything here is sm_80 PTX (cp.async, mma.sync): the portable path too.
constexpr int kQsMaxTiles = 8;   // row tiles per block (shared-memory tables)
// One ring item of all warps: 16 rows x kSteps groups x 64 bytes per warp.
template <int kSteps, int kWarps>
constexpr uint32_t qs_item_bytes() { return uint32_t(kWarps) * 16 * kSteps * 64; }

struct QsPlan {
  int ksplit_log2;  // warps per tile: 1 << ksplit_log2
  int stages;       // ring depth in items, 2..8 (attn::cp_async_wait_upto)
  int x_rows;       // tokens staged: min(T, 8); token slot g reads row min(g, x_rows - 1)
  int interleave;   // block b takes row tiles b, b + grid, ... (else one contiguous range)
  uint32_t x_off, sc_off, z_off, red_off;  // shared-memory offsets (the ring is at 0)
};

// Position of 16-byte chunk c of staged x row `tok`: chunk c holds k 8c .. 8c + 7.
// A warp's B-fragment read for (group, word w) touches chunks 16 gi + 4 t4 + w
// of rows g: t4 = 0 and 2 would share banks (64 bytes apart) and so would
// neighbouring rows; the xor spreads the 8 lanes of each quarter-warp over the
// 8 16-byte bank groups.
__device__ __forceinline__ uint32_t qs_xchunk(uint32_t c, uint32_t tok) {
  return c ^ (((c >> 2) & 2u) | (tok & 1u));
}

// Byte offset of 16-byte chunk c (of 4 kSteps) of row `row` in a warp's ring
// item [16 rows][kSteps x 64 bytes]: odd rows swap the halves of each 128
// bytes, so rows g and g + 1 (one quarter-warp of qmma lanes) read
// different banks.
template <int kSteps>
__device__ __forceinline__ uint32_t qs_wchunk(uint32_t row, uint32_t c) {
  return row * (kSteps * 64) + ((c ^ ((row & 1u) << 2)) * 16);
}

// One step of a per-warp cp.async ring (qstream, dstream): the slot freed by
// the last item is refilled (issue(), or only an empty group past the last
// item, so every lane's group count stays in step), then the oldest item is
// waited for.
template <class Issue>
__device__ __forceinline__ void warp_ring_step(bool more, const Issue& issue, int stages) {
  __syncwarp();  // every lane is done with the slot the next copies overwrite
  if (more) issue();
  attn::cp_async_commit();
  attn::cp_async_wait_upto(stages - 1);  // this lane's copies of the oldest item have landed
  __syncwarp();                          // and so have the other lanes'
}

// kMemOnly (tune/q4_tune.cu only): the same copies and reads, no arithmetic.
template <class Ta, int kSteps, int kWarps, bool kMemOnly = false>
__global__ void __launch_bounds__(kWarps * 32, 1)
    qstream_kernel(tk_qmatmul_int4_params p, QsPlan pl) {
  using attn::cp_async16;
  using attn::ld_shared16;
  constexpr int kQsWarps = kWarps, kQsThreads = kWarps * 32;
  constexpr uint32_t kItem = qs_item_bytes<kSteps, kWarps>(), kWarpItem = kItem / kQsWarps;
  constexpr int kChunksPerRow = 4 * kSteps, kCopies = 16 * kChunksPerRow / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t N = p.w.N, K = p.w.K;
  const int ngroups = int(K / 128);
  const int64_t row_tiles = (N + 15) / 16;
  // Local tile lt is row tile tile0 + lt * tmul: blocks interleaved (tmul =
  // grid) or each a contiguous range (tmul = 1).
  int64_t tile0, tmul;
  int nt;  // <= kQsMaxTiles
  if (pl.interleave) {
    tile0 = blockIdx.x, tmul = gridDim.x;
    nt = int((row_tiles - tile0 + tmul - 1) / tmul);
  } else {
    tile0 = row_tiles * blockIdx.x / gridDim.x, tmul = 1;
    nt = int(row_tiles * (blockIdx.x + 1) / gridDim.x - tile0);
  }
  const int64_t row0 = tile0 * 16, rmul = tmul * 16;  // rows of local tile lt: row0 + lt rmul + 0..15
  const int ksplit = 1 << pl.ksplit_log2, kpart = warp & (ksplit - 1);
  const int tfirst = warp >> pl.ksplit_log2, tstep = kQsWarps >> pl.ksplit_log2;
  // Item (tile lt, round r) of warp kpart: groups r ksplit kSteps + kpart kSteps + u, u < kSteps.
  const int rounds = (ngroups + ksplit * kSteps - 1) / (ksplit * kSteps);
  const int items = tfirst < nt ? (nt - tfirst + tstep - 1) / tstep * rounds : 0;
  const int stages = pl.stages;
  const uint32_t sbase = attn::smem_addr(smem);
  const uint32_t ring = sbase + uint32_t(warp) * kWarpItem;  // + slot * kItem
  const int64_t row_bytes = K / 2;
  // Copy j of this lane: row 32 j / kChunksPerRow + lane / kChunksPerRow, chunk c.
  const int crow = lane / kChunksPerRow, cchunk = lane % kChunksPerRow;

  // Issue side of the ring: item (tile lt, round r) into slot `slot`. Copy j
  // reads row j 32 / kChunksPerRow + crow of the tile at byte `goff` of it.
  int is_lt = tfirst, is_r = 0, is_slot = 0, issued = 0;
  const uint8_t* rowp[kCopies];
  uint32_t wdst[kCopies];
  const int64_t tile_bytes = int64_t(tstep) * rmul * row_bytes;  // from one of the warp's tiles to the next
  const auto set_rows = [&] {  // rows of tile is_lt; only the matrix's last tile needs clamping
    const int64_t n0 = row0 + int64_t(is_lt) * rmul;
#pragma unroll
    for (int j = 0; j < kCopies; ++j)
      rowp[j] = p.w.packed + std::min(n0 + j * (32 / kChunksPerRow) + crow, N - 1) * row_bytes + 16 * (cchunk % 4);
  };
  const auto next_rows = [&] {
    if (row0 + int64_t(is_lt) * rmul + 16 <= N) {
#pragma unroll
      for (int j = 0; j < kCopies; ++j) rowp[j] += tile_bytes;
    } else {
      set_rows();
    }
  };
#pragma unroll
  for (int j = 0; j < kCopies; ++j) wdst[j] = ring + qs_wchunk<kSteps>(uint32_t(j * (32 / kChunksPerRow) + crow), uint32_t(cchunk));
  set_rows();
  const int gfirst = kpart * kSteps + cchunk / 4, gstep = ksplit * kSteps;
  const auto issue = [&] {
    // groups past the end: clamped (read, never used)
    const uint32_t goff = uint32_t(std::min(gfirst + is_r * gstep, ngroups - 1)) * 64;
    const uint32_t dst = uint32_t(is_slot) * kItem;
#pragma unroll
    for (int j = 0; j < kCopies; ++j) cp_async16(wdst[j] + dst, rowp[j] + goff, true);
    if (++is_r == rounds) {
      is_r = 0, is_lt += tstep;
      next_rows();
    }
    if (++is_slot == stages) is_slot = 0;
    ++issued;
  };

  // Prologue: stages - 1 items in flight; x rides in the first group.
  if (issued < items) issue();
  const uint32_t xs = sbase + pl.x_off;
  const uint32_t x_row_bytes = uint32_t(K) * 2;
  {
    const int xchunks = int(K / 8);
    const char* x = static_cast<const char*>(p.x);
    for (int i = tid; i < pl.x_rows * xchunks; i += kQsThreads) {
      const int tok = i / xchunks, c = i - tok * xchunks;
      cp_async16(xs + uint32_t(tok) * x_row_bytes + qs_xchunk(uint32_t(c), uint32_t(tok)) * 16,
                 x + (int64_t(tok) * p.x_stride + int64_t(c) * 8) * int64_t(sizeof(Ta)), true);
    }
  }
  // Scales and zero codes of the block's tiles, raw: [local row][group] (a
  // tile's are contiguous in memory: 32 ngroups and 16 ngroups bytes).
  const int tile_sc = 32 * ngroups, tile_z = 16 * ngroups;
  const char* scg = static_cast<const char*>(p.w.scales);
  const char* zg = reinterpret_cast<const char*>(p.w.zeros);
  {  // in the first group, beside item 0 and x
    const int64_t sc_end = N * ngroups * 2, z_end = N * ngroups;
    const int csc = tile_sc / 16, cz = zg ? tile_z / 16 : 0;
    for (int i = tid; i < nt * (csc + cz); i += kQsThreads) {
      const int lt = i / (csc + cz), c = i - lt * (csc + cz);
      const int64_t t = tile0 + lt * tmul;
      const bool z = c >= csc;
      const int64_t off = z ? t * tile_z + (c - csc) * 16 : t * tile_sc + c * 16;
      const int64_t end = z ? z_end : sc_end;
      const int bytes = int(std::max<int64_t>(0, std::min<int64_t>(16, end - off)));  // the last tile's rows past N
      const uint32_t dst = sbase + (z ? pl.z_off + lt * tile_z + (c - csc) * 16 : pl.sc_off + lt * tile_sc + c * 16);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst),
                   "l"((z ? zg : scg) + (bytes ? off : 0)), "r"(bytes));
    }
  }
  attn::cp_async_commit();
  for (int s = 1; s < stages - 1; ++s) {
    if (issued < items) issue();
    attn::cp_async_commit();
  }
  attn::cp_async_wait_upto(stages - 2);  // the first group: item 0, this thread's x chunks and scales
  {  // x chunks -> B fragments, in place: each thread converts the chunks it copied
    const int xchunks = int(K / 8);
    for (int i = tid; i < pl.x_rows * xchunks; i += kQsThreads) {
      const int tok = i / xchunks, c = i - tok * xchunks;
      const uint32_t a = xs + uint32_t(tok) * x_row_bytes + qs_xchunk(uint32_t(c), uint32_t(tok)) * 16;
      attn::st_shared16(a, qmma_b_frags(ld_shared16(a)));
    }
  }
  __syncthreads();

  const bool bf16s = p.w.scale_dtype == TK_BF16;
  const int tok = std::min(g, pl.x_rows - 1);
  const uint32_t xlane = xs + uint32_t(tok) * x_row_bytes;
  uint32_t xoff[4];  // chunk 16 gi + 4 t4 + w of the lane's token, after qs_xchunk
#pragma unroll
  for (int w = 0; w < 4; ++w) xoff[w] = (qs_xchunk(uint32_t(4 * t4 + w), uint32_t(tok))) * 16;
  uint32_t woff[kSteps];  // the lane's 16 bytes of group u, row g (row g + 8: + 8 rows)
#pragma unroll
  for (int u = 0; u < kSteps; ++u) woff[u] = qs_wchunk<kSteps>(uint32_t(g), uint32_t(4 * u + t4));
  float* red = reinterpret_cast<float*>(smem + pl.red_off);
  const uint16_t* ssc = reinterpret_cast<const uint16_t*>(smem + pl.sc_off);
  const uint8_t* szz = smem + pl.z_off;
  // Results of local tile lt to y.
  const auto store = [&](int lt, const float (&v)[4]) {
    store_mma_tile(v, static_cast<Ta*>(p.y), p.y_stride, row0 + int64_t(lt) * rmul, 0, N, p.T);
  };

  float acc[4] = {};
  int lt = tfirst, r = 0, slot = 0;
  for (int i = 0; i < items; ++i) {
    warp_ring_step(issued < items, issue, stages);  // item i has landed
    const uint32_t src = ring + uint32_t(slot) * kItem;
    uint4 wa[kSteps], wb[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      wa[u] = ld_shared16(src + woff[u]);
      wb[u] = ld_shared16(src + woff[u] + 8 * kSteps * 64);
    }
    const int ea_i = (lt * 16 + g) * ngroups, eb_i = ea_i + 8 * ngroups;  // rows g, g + 8 of the tables
    const int gbase = r * ksplit * kSteps + kpart * kSteps;
    const auto group = [&](int u) {
      const int gi = gbase + u;
      const uint32_t ea = ssc[ea_i + gi], eb = ssc[eb_i + gi];
      const uint32_t za = zg ? szz[ea_i + gi] : 8u, zb = zg ? szz[eb_i + gi] : 8u;
      const uint32_t xg = xlane + uint32_t(gi) * 256;  // 16 chunks per group
      float c[1][4] = {};
      qmma_group<Ta, 1, true>(wa[u], wb[u], za, zb,
                              [&](int, int w) { return ld_shared16(xg + xoff[w]); }, c);
      const float fa = qmma_scale(uint16_t(ea), bf16s), fb = qmma_scale(uint16_t(eb), bf16s);
      acc[0] = fmaf(fa, c[0][0], acc[0]);
      acc[1] = fmaf(fa, c[0][1], acc[1]);
      acc[2] = fmaf(fb, c[0][2], acc[2]);
      acc[3] = fmaf(fb, c[0][3], acc[3]);
    };
    if constexpr (kMemOnly) {
      uint32_t h = 0;
#pragma unroll
      for (int u = 0; u < kSteps; ++u) h ^= wa[u].x ^ wa[u].y ^ wa[u].z ^ wa[u].w ^ wb[u].x ^ wb[u].y ^ wb[u].z ^ wb[u].w;
      acc[0] += float(h & 1u);
    } else if (gbase + kSteps - 1 < ngroups) {  // a full item: the mma chains interleave
#pragma unroll
      for (int u = 0; u < kSteps; ++u) group(u);
    } else {
#pragma unroll
      for (int u = 0; u < kSteps; ++u)
        if (gbase + u < ngroups) group(u);
    }
    if (r == rounds - 1) {  // the warp's share of tile lt is done
      if (ksplit == 1) {
        store(lt, acc);
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) red[((lt * ksplit + kpart) * 4 + j) * 32 + lane] = acc[j];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[j] = 0.0f;
    }
    if (++r == rounds) r = 0, lt += tstep;
    if (++slot == stages) slot = 0;
  }
  if (ksplit > 1) {  // uniform per block: warps add up each tile's K parts in a fixed order
    __syncthreads();
    for (int t = warp; t < nt; t += kQsWarps) {
      float v[4] = {};
      for (int j = 0; j < ksplit; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) v[i] += red[((t * ksplit + j) * 4 + i) * 32 + lane];
      store(t, v);
    }
  }
}

constexpr int kQsInterleave = 1;

// Shared-memory plan of qstream_kernel for this shape and device; false when
// x or one tile's tables leave no room for a ring 2 items deep (T = 8 with K
// past about 12k on an H100) or the scales are not 16-byte aligned: the
// short-block kernel takes those.
template <int kSteps, int kWarps>
bool qs_plan(const tk_qmatmul_int4_params& p, const Launch& l, int max_stages, QsPlan& pl, unsigned& grid,
             size_t& smem_bytes) {
  constexpr int64_t kItem = qs_item_bytes<kSteps, kWarps>();
  constexpr int kMaxKsplitLog2 = kWarps == 16 ? 4 : 3;
  const int64_t optin = l.smem_optin;
  const int64_t ngroups = p.w.K / 128, row_tiles = (p.w.N + 15) / 16;
  int ksplit_log2 = 0;  // all warps on a tile when K has an item each to share
  while (ksplit_log2 < kMaxKsplitLog2 && ngroups >= int64_t(kSteps) << (ksplit_log2 + 1)) ++ksplit_log2;
  pl.ksplit_log2 = ksplit_log2;
  pl.interleave = kQsInterleave;
  pl.x_rows = int(std::min<int64_t>(p.T, 8));
  // scales and zeros come in with cp.async: 16-byte aligned (tiles start at multiples of 16 bytes)
  if (!aligned16(p.w.scales) || (p.w.zeros && !aligned16(p.w.zeros))) return false;
  const int64_t x_bytes = int64_t(pl.x_rows) * p.w.K * 2;
  const int64_t per_tile = 48 * ngroups + (ksplit_log2 ? (int64_t(512) << ksplit_log2) : 0);
  int64_t tiles = std::min<int64_t>(kQsMaxTiles, (row_tiles + l.num_sms - 1) / l.num_sms);
  while (tiles > 1 && x_bytes + tiles * per_tile + 2 * kItem > optin) --tiles;
  const int64_t fixed = x_bytes + tiles * per_tile;
  if (fixed + 2 * kItem > optin) return false;
  pl.stages = int(std::min<int64_t>(max_stages, (optin - fixed) / kItem));
  pl.x_off = uint32_t(pl.stages * kItem);
  pl.sc_off = pl.x_off + uint32_t(x_bytes);
  pl.z_off = pl.sc_off + uint32_t(tiles * 32 * ngroups);
  pl.red_off = pl.z_off + uint32_t(tiles * 16 * ngroups);
  smem_bytes = size_t(pl.red_off) + (ksplit_log2 ? size_t(tiles) * (size_t(512) << ksplit_log2) : 0);
  const int64_t blocks = (row_tiles + tiles - 1) / tiles;
  if (blocks >= (int64_t(1) << 31)) return false;
  grid = unsigned(blocks);
  return true;
}

template <class Ta, int kSteps, int kWarps, bool kMemOnly = false>
tk_status launch_qstream(const tk_qmatmul_int4_params& p, const Launch& l, const QsPlan& pl, unsigned grid,
                         size_t smem_bytes) {
  // Raised once per kernel to the device's opt-in limit, which every plan fits.
  static const cudaError_t attr = cudaFuncSetAttribute(
      qstream_kernel<Ta, kSteps, kWarps, kMemOnly>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      l.smem_optin);
  if (attr != cudaSuccess)
    return fail(TK_ERR_BACKEND, "qmatmul_int4: cannot reserve %zu bytes of shared memory: %s",
                smem_bytes, cudaGetErrorString(attr));
  qstream_kernel<Ta, kSteps, kWarps, kMemOnly><<<grid, kWarps * 32, smem_bytes, l.stream>>>(p, pl);
  return check_launch("qmatmul_int4");
}

// The ring shape the library runs (tune/q4_tune.cu measures the others).
constexpr int kQsSteps = 2, kQsWarps = 16, kQsStages = 2;

}  // namespace tk::cuda
