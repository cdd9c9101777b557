// Dense decode weight streaming (T <= 8, x and W of one 16-bit dtype): the
// structure of qstream_kernel (qstream.cuh) for f16/bf16 weights.
//
// One block of kWarps warps per SM, persistent: block b takes the 16-row
// tiles b, b + grid, ... (at any moment the grid reads one contiguous window
// of W, as a grid-stride read does). All warps of a block work on the same
// tile and split K: warp w takes the K slices w, w + kWarps, ... of it (a
// slice: kChunks 16-byte chunks of each of the tile's 16 rows), so together
// they read the rows front to back. Each warp copies its slices with cp.async
// into its own part of a shared-memory ring `stages` items deep and keeps
// stages - 1 items in flight while it multiplies one, across tile boundaries:
// the SM's stream of requests does not stop for the arithmetic or the
// epilogue. A warp reads back only what it copied (the ring needs __syncwarp,
// not block barriers). The copies read whole lines: one cp.async instruction
// of a warp covers 32 / kChunks rows x kChunks x 16 contiguous bytes.
//
// x is staged in shared memory once per block (cp.async in the first group,
// K padded with zeros to whole slices), and read as mma B fragments:
// mma.sync m16n8k16, A = 16 W rows, B = 8 tokens. Lane (g, t4) reads 16 bytes
// (8 k) of rows g and g + 8 and the same 16 bytes of x of token g: two mmas
// as they stand (the mma only needs A and B to agree on which k sits in each
// slot; see matmul.cu's mma path).
//
// At the end of a tile the warps' partial sums meet in shared memory (two
// buffers, one block barrier per tile: every warp has the same number of
// items) and the first warps store the tile, in a fixed order of warps.
//
// Two products:
//   kFfn = false: y[t, n] = x[t] . W[n] (matmul), a tile = rows n0 .. n0 + 15.
//   kFfn = true (fused_ffn): a tile = 8 output columns f0 .. f0 + 7: A rows
//   0..7 are Wg rows f0.., rows 8..15 the Wu rows of the same columns, so a
//   lane's sums c0, c1 (gate) and c2, c3 (up) are one column's. B is the
//   normalised row, x * (1/rms) * norm weight, staged once by each block as
//   two planes of the activation dtype (hi + lo, see the prologue).
// Everything here is sm_80 PTX (cp.async, mma.sync): the portable path too.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/attention/primitives.cuh"
#include "cuda/ops.h"
#include "cuda/qmma.cuh"
#include "cuda/qstream.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace tk::cuda {

struct DsArgs {
  const void* w0;  // W (matmul) or Wg (ffn); rows of w0_stride elements (int4: packed rows of K / 2 bytes)
  int64_t w0_stride;
  const void* w1;  // Wu (ffn)
  int64_t w1_stride;
  // int4 (group 128): scales ([rows][K / 128], f16 or bf16 bits) and zero codes (or null) of w0, w1
  const uint16_t* s0;
  const uint16_t* s1;
  const uint8_t* z0;
  const uint8_t* z1;
  bool bf16_scales;
  const void* x;
  int64_t x_stride;
  int64_t T;  // 1..8
  const void* norm_weight;  // ffn
  float eps;
  void* y;
  int64_t y_stride;
  int64_t N;  // rows of W (matmul), F (ffn) or rotation units (attn_front)
  int64_t K;  // multiple of 8
  // attn_front (kAttn): the op's params, its rotation units (a pair of rows
  // that RoPE mixes, or one row past rot_dim) and the sticky error flag.
  tk_attn_front_params af;
  int64_t units_per_head;
  unsigned int* error_flag;
};

// Local rows (within a head) of rotation unit u: b < 0 for a single row (attn_front.cu's layout).
__host__ __device__ inline void ds_unit_rows(int64_t u, int64_t half, int64_t rot_dim, bool neox, int64_t* a,
                                             int64_t* b) {
  if (u < half) {
    *a = neox ? u : 2 * u;
    *b = neox ? u + half : 2 * u + 1;
  } else {
    *a = rot_dim + (u - half);
    *b = -1;
  }
}

// Head of rotation unit `unit` (units < 2^31: try_dstream_attn). A 32-bit
// division is a few instructions; an int64 one is a call of dozens, and
// attn_front's row setup, cos / sin loads and epilogue divide per tile.
__device__ __forceinline__ int64_t ds_unit_head(int64_t unit, int64_t units_per_head) {
  return int64_t(uint32_t(unit) / uint32_t(units_per_head));
}

// The arguments of a dense matmul / dense fused_ffn / int4 fused_ffn.
inline DsArgs ds_args(const void* w0, int64_t w0_stride, const void* w1, int64_t w1_stride, const void* x,
                      int64_t x_stride, int64_t T, const void* norm_weight, float eps, void* y,
                      int64_t y_stride, int64_t N, int64_t K) {
  DsArgs a{};
  a.w0 = w0, a.w0_stride = w0_stride, a.w1 = w1, a.w1_stride = w1_stride;
  a.x = x, a.x_stride = x_stride, a.T = T, a.norm_weight = norm_weight, a.eps = eps;
  a.y = y, a.y_stride = y_stride, a.N = N, a.K = K;
  return a;
}

struct DsPlan {
  int stages;  // ring depth in items, 2..8
  int x_rows;  // tokens staged: T; token slot g reads row min(g, x_rows - 1)
  int slices;  // K slices of a row: ceil(16-byte chunks of a weight row / kChunks)
  int rounds;  // slices per warp per tile: ceil(slices / kWarps)
  uint32_t x_off, red_off, ss_off, inv_off;  // shared-memory offsets (the ring is at 0)
  uint32_t sc_off, z_off;  // int4: the block's scales and zero codes, [local tile][16 rows][K / 128]
};

// Byte offset of 16-byte chunk c of row `row` in a warp's ring item
// [16 rows][kChunks chunks]: odd rows swap the 64-byte halves of each 128
// bytes, so rows g and g + 1 (one quarter-warp of mma lanes) read different banks.
template <int kChunks>
__device__ __forceinline__ uint32_t ds_wchunk(uint32_t row, uint32_t c) {
  return row * (kChunks * 16) + ((c ^ ((row & 1u) << 2)) * 16);
}
// Position of chunk c of staged x row `tok`, the same swizzle by token parity.
__device__ __forceinline__ uint32_t ds_xchunk(uint32_t c, uint32_t tok) { return c ^ ((tok & 1u) << 2); }

// kInt4 (fused_ffn only): the weights are int4 rows of group 128 (the
// qmatmul_int4 layout), dequantised as qstream_kernel does (qmma_group): a
// slice of 128 bytes per row is two groups; x is staged as pre-permuted B
// fragments (qmma_b_frags, swizzled by qs_xchunk), both planes (hi, lo:
// qmma_group's two token tiles); the block's scales and
// zero codes are staged once, in the first cp.async group, as tables
// [local tile][16 rows][groups] (rows 0..7 gate, 8..15 up).
template <class T, bool kFfn, int kChunks, int kWarps, bool kInt4 = false, bool kAttn = false>
__global__ void __launch_bounds__(kWarps * 32, 1) dstream_kernel(DsArgs p, DsPlan pl) {
  static_assert(kChunks == 8 || kChunks == 16, "a ring row is 128 or 256 bytes");
  static_assert(!kInt4 || (kFfn && kChunks == 8), "int4: fused_ffn, two groups per slice");
  static_assert(!kAttn || (kFfn && !kInt4), "attn_front: the fused_ffn tile (8 units x 2 rows), dense");
  using attn::cp_async16;
  using attn::ld_shared16;
  using Q = QmmaType<T>;
  constexpr int kThreads = kWarps * 32;
  constexpr uint32_t kWarpItem = 16 * kChunks * 16, kItem = kWarpItem * kWarps;
  constexpr int kRowsPerCopy = 32 / kChunks, kCopies = 16 * kChunks / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t N = p.N, kchunks = p.K / 8;  // x: 16-byte chunks of a row
  const int64_t wchunks = kInt4 ? p.K / 32 : kchunks;  // W: 16-byte chunks of a row
  const int64_t tiles = kFfn ? (N + 7) / 8 : (N + 15) / 16;
  const int nt = int((tiles - blockIdx.x + gridDim.x - 1) / gridDim.x);
  const int rounds = pl.rounds, stages = pl.stages;
  const int items = nt * rounds;
  const uint32_t sbase = attn::smem_addr(smem);
  const uint32_t ring = sbase + uint32_t(warp) * kWarpItem;  // + slot * kItem
  const int crow = lane / kChunks, cchunk = lane % kChunks;
  const char* w0 = static_cast<const char*>(p.w0);
  const char* w1 = static_cast<const char*>(p.w1);
  // Bytes per row step.
  const int64_t rs0 = kInt4 ? p.K / 2 : p.w0_stride * int64_t(sizeof(T));
  const int64_t rs1 = kInt4 ? p.K / 2 : p.w1_stride * int64_t(sizeof(T));

  // Issue side of the ring: item (tile lt, round r) into slot is_slot.
  int is_lt = 0, is_r = 0, is_slot = 0, issued = 0;
  const char* rowp[kCopies];  // row starts of copy j (row j kRowsPerCopy + crow of the tile)
  uint32_t wdst[kCopies];
  const auto set_rows = [&] {  // rows past the end are clamped (read, results dropped)
    const int64_t tile = blockIdx.x + int64_t(is_lt) * gridDim.x;
#pragma unroll
    for (int j = 0; j < kCopies; ++j) {
      const int row = j * kRowsPerCopy + crow;
      if constexpr (kAttn) {  // rows 0..7: the units' first rows; 8..15: their partners (or again the first)
        const int64_t unit = std::min<int64_t>(tile * 8 + (row & 7), N - 1);
        const int64_t h = ds_unit_head(unit, p.units_per_head), dh = p.af.cache.head_dim;
        int64_t a, b;
        ds_unit_rows(unit - h * p.units_per_head, p.af.rot_dim / 2, p.af.rot_dim, p.af.rope_style == TK_ROPE_NEOX,
                     &a, &b);
        rowp[j] = w0 + (h * dh + (row < 8 || b < 0 ? a : b)) * rs0;
      } else if constexpr (kFfn) {
        const int64_t f = std::min<int64_t>(tile * 8 + (row & 7), N - 1);
        rowp[j] = row < 8 ? w0 + f * rs0 : w1 + f * rs1;
      } else {
        rowp[j] = w0 + std::min<int64_t>(tile * 16 + row, N - 1) * rs0;
      }
    }
  };
#pragma unroll
  for (int j = 0; j < kCopies; ++j) wdst[j] = ring + ds_wchunk<kChunks>(uint32_t(j * kRowsPerCopy + crow), uint32_t(cchunk));
  // Loads whose round trips would otherwise sit on the prologue's critical
  // path, issued before anything waits: the norm weight into L2 (the prologue
  // reads it after x has landed) and, attn_front, each token's position and
  // sequence (the start of the positions -> block table chain).
  if constexpr (kFfn) {
    for (int64_t c = tid; c < kchunks; c += kThreads)
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(static_cast<const char*>(p.norm_weight) + c * 16));
  }
  int32_t a_pos = -1, a_seq = -1, a_block = -1;
  bool a_table = false;  // a_block was loaded from the block table
  if constexpr (kAttn) {
    if (tid < p.T) a_pos = p.af.positions[tid], a_seq = p.af.seq_ids[tid];
  }
  set_rows();
  const auto issue = [&] {
    const int64_t c = int64_t(is_r * kWarps + warp) * kChunks + cchunk;  // this lane's chunk of the row
    const bool valid = c < wchunks;  // past K (or past the last slice): zeros
    const int64_t off = valid ? c * 16 : 0;
    const uint32_t dst = uint32_t(is_slot) * kItem;
#pragma unroll
    for (int j = 0; j < kCopies; ++j) cp_async16(wdst[j] + dst, rowp[j] + off, valid);
    if (++is_r == rounds) {
      is_r = 0, ++is_lt;
      if (is_lt < nt) set_rows();
    }
    if (++is_slot == stages) is_slot = 0;
    ++issued;
  };

  // Prologue: stages - 1 items in flight; x (and the int4 tables) ride in the first group.
  if (issued < items) issue();
  const uint32_t xs = sbase + pl.x_off;
  // Chunks of a staged row: dense pads K to whole slices with zeros; int4
  // never reads x past K (groups past the end are skipped).
  const int xc = kInt4 ? int(kchunks) : pl.slices * kChunks;
  const uint32_t xpitch = uint32_t(xc) * 16;
  const auto xchunk = [](uint32_t c, uint32_t tok) { return kInt4 ? qs_xchunk(c, tok) : ds_xchunk(c, tok); };
  const T* x = static_cast<const T*>(p.x);
  for (int tok = 0; tok < pl.x_rows; ++tok)
    for (int c = tid; c < xc; c += kThreads)
      cp_async16(xs + uint32_t(tok) * xpitch + xchunk(uint32_t(c), uint32_t(tok)) * 16,
                 x + tok * p.x_stride + (c < kchunks ? int64_t(c) * 8 : 0), c < kchunks);
  const int ngroups = int(p.K / 128);
  if constexpr (kInt4) {
    // Per local tile: gate rows f0..f0+7 then up rows, each a contiguous piece
    // of the scales (16 ngroups bytes) and zero codes (8 ngroups bytes, ngroups
    // even: ds_plan) in memory. Rows past F: zero scales (results dropped).
    const int csc = ngroups, cz = p.z0 ? ngroups / 2 : 0, per_half = csc + cz;
    const int64_t sc_end = N * ngroups * 2, z_end = N * ngroups;
    for (int i = tid; i < nt * 2 * per_half; i += kThreads) {
      const int lt = i / (2 * per_half), rem = i - lt * 2 * per_half, half = rem / per_half, c = rem - half * per_half;
      const int64_t f0 = (blockIdx.x + int64_t(lt) * gridDim.x) * 8;
      const bool z = c >= csc;
      const int64_t off = z ? f0 * ngroups + int64_t(c - csc) * 16 : f0 * ngroups * 2 + int64_t(c) * 16;
      const int bytes = int(std::max<int64_t>(0, std::min<int64_t>(16, (z ? z_end : sc_end) - off)));
      const char* base = z ? reinterpret_cast<const char*>(half ? p.z1 : p.z0)
                           : reinterpret_cast<const char*>(half ? p.s1 : p.s0);
      const uint32_t dst = z ? pl.z_off + uint32_t((lt * 16 + half * 8) * ngroups + (c - csc) * 16)
                             : pl.sc_off + uint32_t((lt * 16 + half * 8) * ngroups * 2 + c * 16);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(sbase + dst),
                   "l"(base + (bytes ? off : 0)), "r"(bytes));
    }
  }
  attn::cp_async_commit();
  for (int s = 1; s < stages - 1; ++s) {
    if (issued < items) issue();
    attn::cp_async_commit();
  }
  if constexpr (kAttn) {
    // Bad indices raise the error flag (as attn_front.cu: a bad position skips
    // all of the token's writes, a bad sequence or block its k and v writes).
    // The block-table entry is loaded here and first used after the prologue.
    if (tid < p.T) {
      const tk_paged_kv_cache& c = p.af.cache;
      if (a_pos < 0 || a_pos >= p.af.max_pos) {
        raise_index_error(p.error_flag);
        a_pos = -1;
      } else {
        const int64_t bi = a_pos / c.page_size;
        if (a_seq < 0 || a_seq >= c.num_seqs || bi >= c.max_blocks_per_seq) {
          raise_index_error(p.error_flag);
        } else {
          a_block = c.block_table[int64_t(a_seq) * c.max_blocks_per_seq + bi];
          a_table = true;
        }
      }
    }
  }
  float* red = reinterpret_cast<float*>(smem + pl.red_off);  // [2][kWarps][4][32]
  float* inv_s = reinterpret_cast<float*>(smem + pl.inv_off);  // [8] (ffn): 1 / rms of the tokens
  const uint32_t xlo = uint32_t(pl.x_rows) * xpitch;  // fused_ffn: the plane of the low parts of B
  if constexpr (kFfn) {
    // The tokens' 1/rms from the staged x (this thread's chunks: its first
    // group has landed), in f32; then this thread's chunks -> x * (1/rms) *
    // norm weight (f32) split into hi + lo, both of T, in two planes (int4:
    // as B fragments). Two mmas per A fragment then carry the normalised
    // activations to ~2^-16 (bf16) / ~2^-22 (f16) instead of one rounding of
    // the dtype: the accuracy of the f32 CUDA-core kernels these replace,
    // which the tests hold fused_ffn to (one rounded plane measured up to 1.4x
    // their tolerances on an H100, and simulates up to 40x for D 64 F 1 in
    // bf16: tune/NOTES.md). Normalised first, |hi| <= sqrt(D) |norm weight|:
    // f16 overflows only for norm weights past 65504 / sqrt(D).
    attn::cp_async_wait_upto(stages - 2);
    float* ss_s = reinterpret_cast<float*>(smem + pl.ss_off);  // [kWarps][8]
    const T* nw = static_cast<const T*>(p.norm_weight);
    for (int tok = 0; tok < pl.x_rows; ++tok) {
      float ss = 0.0f;
      for (int c = tid; c < kchunks; c += kThreads) {
        float xf[8];
        unpack<T>(ld_shared16(xs + uint32_t(tok) * xpitch + xchunk(uint32_t(c), uint32_t(tok)) * 16), xf);
#pragma unroll
        for (int e = 0; e < 8; ++e) ss = fmaf(xf[e], xf[e], ss);
      }
      ss = warp_sum(ss);
      if (lane == 0) ss_s[warp * 8 + tok] = ss;
    }
    __syncthreads();
    if (tid < pl.x_rows) {
      float ss = 0.0f;
      for (int w = 0; w < kWarps; ++w) ss += ss_s[w * 8 + tid];
      inv_s[tid] = rsqrtf(ss / float(p.K) + p.eps);
    }
    __syncthreads();
    for (int tok = 0; tok < pl.x_rows; ++tok) {
      const float inv = inv_s[tok];
      for (int c = tid; c < xc; c += kThreads) {
        const uint32_t a = xs + uint32_t(tok) * xpitch + xchunk(uint32_t(c), uint32_t(tok)) * 16;
        if (c >= kchunks) {  // dense padding: zeros in both planes (the copy zero-filled hi)
          attn::st_shared16(a + xlo, make_uint4(0, 0, 0, 0));
          continue;
        }
        float xf[8], nf[8], hf[8];
        unpack<T>(ld_shared16(a), xf);
        unpack<T>(ld16(nw + int64_t(c) * 8), nf);
#pragma unroll
        for (int e = 0; e < 8; ++e) xf[e] = xf[e] * inv * nf[e];
        const uint4 hi = pack<T>(xf);
        unpack<T>(hi, hf);
#pragma unroll
        for (int e = 0; e < 8; ++e) hf[e] = xf[e] - hf[e];
        const uint4 lo = pack<T>(hf);
        attn::st_shared16(a, kInt4 ? qmma_b_frags(hi) : hi);
        attn::st_shared16(a + xlo, kInt4 ? qmma_b_frags(lo) : lo);
      }
    }
    __syncthreads();
  } else {
    attn::cp_async_wait_upto(stages - 2);
    __syncthreads();
  }
  // attn_front: each token's position and cache slot, once per block, in the
  // sums-of-squares area (free after the prologue); then each epilogue lane
  // (tid < 64) loads the cos / sin of its first tile, and every epilogue the
  // next tile's, so no tile's epilogue waits on a table round trip.
  int32_t* tok_pos = reinterpret_cast<int32_t*>(smem + pl.ss_off);        // [8], -1: bad
  int64_t* tok_slot = reinterpret_cast<int64_t*>(smem + pl.ss_off + 32);  // [8], -1: bad
  float2 cs{1.0f, 0.0f};  // cos, sin of this lane's unit and token in tile lt (attn_front)
  const auto rope_cs = [&](int tl) {
    const int64_t unit = (blockIdx.x + int64_t(tl) * gridDim.x) * 8 + ((tid & 31) >> 2);
    const int t = 2 * (tid & 3) + (tid >> 5);
    const int32_t pos = t < p.T ? tok_pos[t] : -1;
    if (tl >= nt || unit >= N || pos < 0) return float2{1.0f, 0.0f};
    const int64_t h = ds_unit_head(unit, p.units_per_head), u = unit - h * p.units_per_head, half = p.af.rot_dim / 2;
    if (h >= p.af.num_q_heads + p.af.cache.num_kv_heads || u >= half) return float2{1.0f, 0.0f};
    return float2{p.af.cos_table[int64_t(pos) * half + u], p.af.sin_table[int64_t(pos) * half + u]};
  };
  if constexpr (kAttn) {
    if (tid < p.T) {
      int64_t slot = -1;
      if (a_table) {
        const tk_paged_kv_cache& c = p.af.cache;
        if (a_block < 0 || a_block >= c.num_blocks) raise_index_error(p.error_flag);
        else slot = int64_t(a_block) * c.page_size + a_pos % c.page_size;
      }
      tok_pos[tid] = a_pos;
      tok_slot[tid] = slot;
    }
    __syncthreads();
    if (tid < 64) cs = rope_cs(0);
  }

  const int tok = std::min(g, pl.x_rows - 1);
  const uint32_t xlane = xs + uint32_t(tok) * xpitch, xsw = uint32_t(tok & 1) << 2;
  const uint32_t wa_off = uint32_t(g) * (kChunks * 16), wb_off = wa_off + 8 * kChunks * 16;
  const uint32_t wsw = uint32_t(g & 1) << 2;  // rows g and g + 8: the same parity
  uint32_t xoff[4] = {};  // int4: chunk 16 gi + 4 t4 + w of the lane's token, after qs_xchunk
  if constexpr (kInt4) {
#pragma unroll
    for (int w = 0; w < 4; ++w) xoff[w] = qs_xchunk(uint32_t(4 * t4 + w), uint32_t(tok)) * 16;
  }
  const bool bf16s = p.bf16_scales;
  const uint16_t* ssc = reinterpret_cast<const uint16_t*>(smem + pl.sc_off);
  const uint8_t* szz = smem + pl.z_off;
  float acc[4] = {};
  int lt = 0, r = 0, slot = 0;
  for (int i = 0; i < items; ++i) {
    warp_ring_step(issued < items, issue, stages);  // item i has landed
    const int slice = r * kWarps + warp;
    const uint32_t src = ring + uint32_t(slot) * kItem;
    if constexpr (kInt4) {
      const int ea_i = (lt * 16 + g) * ngroups, eb_i = ea_i + 8 * ngroups;  // rows g, g + 8 of the tables
      const auto group = [&](int u) {
        const int gi = 2 * slice + u;
        const uint4 wa = ld_shared16(src + wa_off + ((4 * u + t4) ^ wsw) * 16);
        const uint4 wb = ld_shared16(src + wb_off + ((4 * u + t4) ^ wsw) * 16);
        const uint32_t ea = ssc[ea_i + gi], eb = ssc[eb_i + gi];
        const uint32_t za = p.z0 ? szz[ea_i + gi] : 8u, zb = p.z0 ? szz[eb_i + gi] : 8u;
        const uint32_t xg = xlane + uint32_t(gi) * 256;  // 16 chunks per group
        float c[2][4] = {};  // products with the high and the low parts of B
        qmma_group<T, 2, true>(wa, wb, za, zb,
                               [&](int tt, int w) { return ld_shared16(xg + (tt ? xlo : 0u) + xoff[w]); }, c);
        const float fa = qmma_scale(uint16_t(ea), bf16s), fb = qmma_scale(uint16_t(eb), bf16s);
        acc[0] = fmaf(fa, c[0][0] + c[1][0], acc[0]);
        acc[1] = fmaf(fa, c[0][1] + c[1][1], acc[1]);
        acc[2] = fmaf(fb, c[0][2] + c[1][2], acc[2]);
        acc[3] = fmaf(fb, c[0][3] + c[1][3], acc[3]);
      };
      if (2 * slice + 1 < ngroups) {  // a full item: the mma chains interleave
        group(0);
        group(1);
      } else if (2 * slice < ngroups) {
        group(0);
      }
    } else if (slice < pl.slices) {  // warp-uniform
#pragma unroll
      for (int q = 0; q < kChunks / 4; ++q) {
        const uint32_t c = uint32_t(4 * q + t4);
        const uint4 ra = ld_shared16(src + wa_off + (c ^ wsw) * 16);
        const uint4 rb = ld_shared16(src + wb_off + (c ^ wsw) * 16);
        const uint32_t xa = xlane + ((uint32_t(slice * kChunks) + c) ^ xsw) * 16;
        const uint4 xv = ld_shared16(xa);
        const uint32_t a0[4] = {ra.x, rb.x, ra.y, rb.y};
        const uint32_t a1[4] = {ra.z, rb.z, ra.w, rb.w};
        Q::mma(acc, a0, xv.x, xv.y);
        Q::mma(acc, a1, xv.z, xv.w);
        if constexpr (kFfn) {  // the low parts of B
          const uint4 xl = ld_shared16(xa + xlo);
          Q::mma(acc, a0, xl.x, xl.y);
          Q::mma(acc, a1, xl.z, xl.w);
        }
      }
    }
    if (r == rounds - 1) {  // the warp's share of tile lt is done: uniform over the block
      float* rb = red + (lt & 1) * (kWarps * 4 * 32);
#pragma unroll
      for (int j = 0; j < 4; ++j) rb[(warp * 4 + j) * 32 + lane] = acc[j], acc[j] = 0.0f;
      __syncthreads();  // also: the sums of tile lt - 2 in this buffer were read before
      const int64_t tile = blockIdx.x + int64_t(lt) * gridDim.x;
      const int j = tid >> 5, ln = tid & 31, lg = ln >> 2, lt4 = ln & 3;
      if constexpr (kAttn) {
        if (tid < 64) {  // j: token 2 lt4 + j; the unit's first row in c_j, its partner in c_{j + 2}
          float va = 0.0f, vb = 0.0f;
          for (int w = 0; w < kWarps; ++w) {
            va += rb[(w * 4 + j) * 32 + ln];
            vb += rb[(w * 4 + j + 2) * 32 + ln];
          }
          const int64_t unit = tile * 8 + lg, t = 2 * lt4 + j;
          const int32_t pos = t < p.T ? tok_pos[t] : -1;
          if (unit < N && pos >= 0) {
            const tk_attn_front_params& af = p.af;
            const int64_t dh = af.cache.head_dim, half = af.rot_dim / 2;
            const int64_t hq = af.num_q_heads, hkv = af.cache.num_kv_heads;
            const int64_t h = ds_unit_head(unit, p.units_per_head), u = unit - h * p.units_per_head;
            int64_t ra, rb2;
            ds_unit_rows(u, half, af.rot_dim, af.rope_style == TK_ROPE_NEOX, &ra, &rb2);
            if (h < hq + hkv && u < half) {  // cs: this unit's cos, sin (rope_cs)
              const float x0 = va, x1 = vb;
              va = x0 * cs.x - x1 * cs.y;
              vb = x0 * cs.y + x1 * cs.x;
            }
            T* dst = nullptr;
            if (h < hq) {
              dst = static_cast<T*>(af.q_out) + (t * hq + h) * dh;
            } else if (tok_slot[t] >= 0) {
              const bool is_k = h < hq + hkv;
              dst = static_cast<T*>(is_k ? af.cache.k : af.cache.v) +
                    (tok_slot[t] * hkv + (h - hq - (is_k ? 0 : hkv))) * dh;
            }
            if (dst) {
              dst[ra] = from_f32<T>(va);
              if (rb2 >= 0) dst[rb2] = from_f32<T>(vb);
            }
          }
          cs = rope_cs(lt + 1);  // in flight until the next tile's epilogue
        }
      } else if constexpr (kFfn) {
        if (tid < 64) {  // j: token 2 lt4 + j; gate in c_j, up in c_{j + 2}
          float gate = 0.0f, up = 0.0f;
          for (int w = 0; w < kWarps; ++w) {
            gate += rb[(w * 4 + j) * 32 + ln];
            up += rb[(w * 4 + j + 2) * 32 + ln];
          }
          const int64_t f = tile * 8 + lg, t = 2 * lt4 + j;
          if (f < N && t < p.T) {
            static_cast<T*>(p.y)[t * p.y_stride + f] = from_f32<T>(gate / (1.0f + expf(-gate)) * up);
          }
        }
      } else {
        if (tid < 128) {  // c_j: row lg (+ 8 for j >= 2), token 2 lt4 + (j & 1)
          float v = 0.0f;
          for (int w = 0; w < kWarps; ++w) v += rb[(w * 4 + j) * 32 + ln];
          const int64_t n = tile * 16 + lg + (j >= 2 ? 8 : 0), t = 2 * lt4 + (j & 1);
          if (n < N && t < p.T) static_cast<T*>(p.y)[t * p.y_stride + n] = from_f32<T>(v);
        }
      }
    }
    if (++r == rounds) r = 0, ++lt;
    if (++slot == stages) slot = 0;
  }
}

// Shared-memory plan for this shape and device; false when x (and, int4, the
// block's scale tables) leave no room for a ring 2 items deep (dense: T = 8
// with K past about 10k on an H100): the callers' short-block kernels take those.
template <int kChunks, int kWarps>
bool ds_plan(int64_t T, int64_t K, int64_t N, bool ffn, const Launch& l, int max_stages, DsPlan& pl,
             unsigned& grid, size_t& smem_bytes, bool int4 = false, bool zeros = false) {
  constexpr int64_t kItem = int64_t(kWarps) * 16 * kChunks * 16;
  if (T < 1 || T > 8 || K <= 0 || N <= 0 || K % (int4 ? 128 : 8) != 0) return false;
  if (int4 && (!ffn || kChunks != 8 || (zeros && (K / 128) % 2 != 0))) return false;
  pl.x_rows = int(T);
  const int64_t wchunks = int4 ? K / 32 : K / 8;
  const int64_t slices = (wchunks + kChunks - 1) / kChunks;
  if (slices >= (int64_t(1) << 24)) return false;
  pl.slices = int(slices);
  pl.rounds = int((slices + kWarps - 1) / kWarps);
  const int64_t tiles = ffn ? (N + 7) / 8 : (N + 15) / 16;
  const int64_t blocks = std::min<int64_t>(tiles, l.num_sms);
  const int64_t nt = (tiles + blocks - 1) / blocks;  // tiles of the first block, the most
  const int64_t x_bytes = (ffn ? 2 : 1) * T * (int4 ? K / 8 : slices * kChunks) * 16;  // ffn: hi and lo planes
  const int64_t red_bytes = int64_t(2) * kWarps * 4 * 32 * 4, ss_bytes = int64_t(kWarps) * 8 * 4;
  const int64_t sc_bytes = int4 ? nt * 16 * (K / 128) * 2 : 0, z_bytes = int4 && zeros ? nt * 16 * (K / 128) : 0;
  const int64_t fixed = x_bytes + red_bytes + ss_bytes + 32 + sc_bytes + z_bytes;
  if (fixed + 2 * kItem > l.smem_optin) return false;
  pl.stages = int(std::min<int64_t>(std::min(max_stages, 8), (l.smem_optin - fixed) / kItem));
  pl.x_off = uint32_t(pl.stages * kItem);
  pl.red_off = pl.x_off + uint32_t(x_bytes);
  pl.ss_off = pl.red_off + uint32_t(red_bytes);
  pl.inv_off = pl.ss_off + uint32_t(ss_bytes);
  pl.sc_off = pl.inv_off + 32;
  pl.z_off = pl.sc_off + uint32_t(sc_bytes);
  smem_bytes = size_t(pl.z_off) + size_t(z_bytes);
  grid = unsigned(blocks);
  return true;
}

template <class T, bool kFfn, int kChunks, int kWarps, bool kInt4 = false, bool kAttn = false>
tk_status launch_dstream(const DsArgs& a, const Launch& l, const DsPlan& pl, unsigned grid, size_t smem_bytes,
                         const char* op) {
  // Raised once per kernel to the device's opt-in limit, which every plan fits.
  static const cudaError_t attr = cudaFuncSetAttribute(dstream_kernel<T, kFfn, kChunks, kWarps, kInt4, kAttn>,
                                                       cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem_optin);
  if (attr != cudaSuccess)
    return fail(TK_ERR_BACKEND, "%s: cannot reserve %zu bytes of shared memory: %s", op, smem_bytes,
                cudaGetErrorString(attr));
  dstream_kernel<T, kFfn, kChunks, kWarps, kInt4, kAttn><<<grid, kWarps * 32, smem_bytes, l.stream>>>(a, pl);
  return check_launch(op);
}

// The ring shape the library runs (tune/ds_tune.cu measures the others; H100,
// N 14336 K 4096 f16, matmul T = 1 / 2 / 4 / 8: 3 stages 42.1 / 42.0 / 42.3 /
// 42.9 us, 4 stages 42.9 / 43.0 / 43.1 / 43.5, 2 stages 43.0 / 43.0 / 43.4 /
// 43.7; 256-byte slices no better; fused_ffn T = 8: 3 stages 83.7 us).
constexpr int kDsChunks = 8, kDsWarps = 16, kDsStages = 3;
// Largest T the library sends here (1..8; the kernel takes any of them).
constexpr int64_t kDsMaxT = 8;

// Launches the streaming kernel when its plan fits; false (nothing launched) otherwise.
template <class T, bool kFfn, bool kAttn = false>
bool try_dstream(const DsArgs& a, const Launch& l, tk_status* status, const char* op) {
  DsPlan pl;
  unsigned grid;
  size_t smem;
  if (!ds_plan<kDsChunks, kDsWarps>(a.T, a.K, a.N, kFfn, l, kDsStages, pl, grid, smem)) return false;
  *status = launch_dstream<T, kFfn, kDsChunks, kDsWarps, false, kAttn>(a, l, pl, grid, smem, op);
  return true;
}

// attn_front (T <= 8, x and Wqkv of one 16-bit dtype, rows 16-byte aligned):
// the fused_ffn tile with units for columns. False (nothing launched) where
// the plan does not fit.
template <class T>
bool try_dstream_attn(const tk_attn_front_params& af, int64_t units_per_head, const Launch& l, tk_status* status) {
  const int64_t units = (af.num_q_heads + 2 * af.cache.num_kv_heads) * units_per_head;
  if (units >= (int64_t(1) << 31)) return false;  // ds_unit_head divides in 32 bits
  DsArgs a = ds_args(af.w_qkv, af.w_qkv_stride, nullptr, 0, af.x, af.x_stride, af.T, af.norm_weight, af.eps,
                     nullptr, 0, units, af.D);
  a.af = af, a.units_per_head = units_per_head, a.error_flag = l.error_flag;
  return try_dstream<T, true, true>(a, l, status, "attn_front");
}

// fused_ffn with int4 weights: 16 warps with a ring 2 items deep (H100, D 4096
// F 14336 f16, T = 1: 26.1 us; 3 / 4 stages 27.1 / 28.3; T = 8: 28.4), or, where
// x's two planes leave no room for that (T = 8 at D 4096 on an H100), 8 warps
// (T = 1: 29.0 us at 3 stages, which 8 warps measured best).
template <class T>
bool try_dstream_int4(const DsArgs& a, const Launch& l, tk_status* status, const char* op) {
  DsPlan pl;
  unsigned grid;
  size_t smem;
  const bool z = a.z0 != nullptr;
  if (ds_plan<8, 16>(a.T, a.K, a.N, true, l, 2, pl, grid, smem, true, z)) {
    *status = launch_dstream<T, true, 8, 16, true>(a, l, pl, grid, smem, op);
    return true;
  }
  if (ds_plan<8, 8>(a.T, a.K, a.N, true, l, 3, pl, grid, smem, true, z)) {
    *status = launch_dstream<T, true, 8, 8, true>(a, l, pl, grid, smem, op);
    return true;
  }
  return false;
}

}  // namespace tk::cuda
