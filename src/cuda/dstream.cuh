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
//   lane's sums c0, c1 (gate) and c2, c3 (up) are one column's. B is x times
//   the norm weight rounded to the activation dtype (staged once, the row an
//   unfused chain would store); each block computes the tokens' 1/rms from
//   the staged x in f32 and applies it to the dot products (constant along K).
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
  const void* w0;  // W (matmul) or Wg (ffn); rows of w0_stride elements
  int64_t w0_stride;
  const void* w1;  // Wu (ffn)
  int64_t w1_stride;
  const void* x;
  int64_t x_stride;
  int64_t T;  // 1..8
  const void* norm_weight;  // ffn
  float eps;
  void* y;
  int64_t y_stride;
  int64_t N;  // rows of W (matmul) or F (ffn)
  int64_t K;  // multiple of 8
};

struct DsPlan {
  int stages;  // ring depth in items, 2..8
  int x_rows;  // tokens staged: T; token slot g reads row min(g, x_rows - 1)
  int slices;  // K slices of a row: ceil(K / (8 kChunks))
  int rounds;  // slices per warp per tile: ceil(slices / kWarps)
  uint32_t x_off, red_off, ss_off, inv_off;  // shared-memory offsets (the ring is at 0)
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

template <class T, bool kFfn, int kChunks, int kWarps>
__global__ void __launch_bounds__(kWarps * 32, 1) dstream_kernel(DsArgs p, DsPlan pl) {
  static_assert(kChunks == 8 || kChunks == 16, "a ring row is 128 or 256 bytes");
  using attn::cp_async16;
  using attn::ld_shared16;
  using Q = QmmaType<T>;
  constexpr int kThreads = kWarps * 32;
  constexpr uint32_t kWarpItem = 16 * kChunks * 16, kItem = kWarpItem * kWarps;
  constexpr int kRowsPerCopy = 32 / kChunks, kCopies = 16 * kChunks / 32;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t N = p.N, kchunks = p.K / 8;
  const int64_t tiles = kFfn ? (N + 7) / 8 : (N + 15) / 16;
  const int nt = int((tiles - blockIdx.x + gridDim.x - 1) / gridDim.x);
  const int rounds = pl.rounds, stages = pl.stages;
  const int items = nt * rounds;
  const uint32_t sbase = attn::smem_addr(smem);
  const uint32_t ring = sbase + uint32_t(warp) * kWarpItem;  // + slot * kItem
  const int crow = lane / kChunks, cchunk = lane % kChunks;
  const T* w0 = static_cast<const T*>(p.w0);
  const T* w1 = static_cast<const T*>(p.w1);

  // Issue side of the ring: item (tile lt, round r) into slot is_slot.
  int is_lt = 0, is_r = 0, is_slot = 0, issued = 0;
  const T* rowp[kCopies];  // row starts of copy j (row j kRowsPerCopy + crow of the tile)
  uint32_t wdst[kCopies];
  const auto set_rows = [&] {  // rows past the end are clamped (read, results dropped)
    const int64_t tile = blockIdx.x + int64_t(is_lt) * gridDim.x;
#pragma unroll
    for (int j = 0; j < kCopies; ++j) {
      const int row = j * kRowsPerCopy + crow;
      if constexpr (kFfn) {
        const int64_t f = std::min<int64_t>(tile * 8 + (row & 7), N - 1);
        rowp[j] = row < 8 ? w0 + f * p.w0_stride : w1 + f * p.w1_stride;
      } else {
        rowp[j] = w0 + std::min<int64_t>(tile * 16 + row, N - 1) * p.w0_stride;
      }
    }
  };
#pragma unroll
  for (int j = 0; j < kCopies; ++j) wdst[j] = ring + ds_wchunk<kChunks>(uint32_t(j * kRowsPerCopy + crow), uint32_t(cchunk));
  set_rows();
  const auto issue = [&] {
    const int64_t c = int64_t(is_r * kWarps + warp) * kChunks + cchunk;  // this lane's chunk of the row
    const bool valid = c < kchunks;  // past K (or past the last slice): zeros
    const int64_t off = valid ? c * 8 : 0;
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

  // Prologue: stages - 1 items in flight; x rides in the first group.
  if (issued < items) issue();
  const uint32_t xs = sbase + pl.x_off;
  const int xc = pl.slices * kChunks;  // chunks of a staged row
  const uint32_t xpitch = uint32_t(xc) * 16;
  const T* x = static_cast<const T*>(p.x);
  for (int tok = 0; tok < pl.x_rows; ++tok)
    for (int c = tid; c < xc; c += kThreads)
      cp_async16(xs + uint32_t(tok) * xpitch + ds_xchunk(uint32_t(c), uint32_t(tok)) * 16,
                 x + tok * p.x_stride + (c < kchunks ? int64_t(c) * 8 : 0), c < kchunks);
  attn::cp_async_commit();
  for (int s = 1; s < stages - 1; ++s) {
    if (issued < items) issue();
    attn::cp_async_commit();
  }
  float* red = reinterpret_cast<float*>(smem + pl.red_off);  // [2][kWarps][4][32]
  float* inv_s = reinterpret_cast<float*>(smem + pl.inv_off);  // [8] (ffn)
  if constexpr (kFfn) {
    // This thread's x chunks (its first group has landed) -> x * norm weight,
    // rounded, in place; the sums of squares of x in f32, per warp, per token.
    cp_async_wait_upto(stages - 2);
    float* ss_s = reinterpret_cast<float*>(smem + pl.ss_off);  // [kWarps][8]
    const T* nw = static_cast<const T*>(p.norm_weight);
    for (int tok = 0; tok < pl.x_rows; ++tok) {
      float ss = 0.0f;
      for (int c = tid; c < xc; c += kThreads) {
        if (c >= kchunks) continue;  // zeros stay zeros
        const uint32_t a = xs + uint32_t(tok) * xpitch + ds_xchunk(uint32_t(c), uint32_t(tok)) * 16;
        float xf[8], nf[8];
        unpack<T>(ld_shared16(a), xf);
        unpack<T>(ld16(nw + int64_t(c) * 8), nf);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          ss = fmaf(xf[e], xf[e], ss);
          xf[e] *= nf[e];
        }
        attn::st_shared16(a, pack<T>(xf));
      }
      ss = warp_sum(ss);
      if (lane == 0) ss_s[warp * 8 + tok] = ss;
    }
    __syncthreads();
    if (tid < pl.x_rows) {
      float ss = 0.0f;
      for (int w = 0; w < kWarps; ++w) ss += ss_s[w * 8 + tid];
      inv_s[tid] = rsqrtf(ss / float(p.K) + p.eps);  // read after the first tile's barrier
    }
  } else {
    cp_async_wait_upto(stages - 2);
    __syncthreads();
  }

  const int tok = std::min(g, pl.x_rows - 1);
  const uint32_t xlane = xs + uint32_t(tok) * xpitch, xsw = uint32_t(tok & 1) << 2;
  const uint32_t wa_off = uint32_t(g) * (kChunks * 16), wb_off = wa_off + 8 * kChunks * 16;
  const uint32_t wsw = uint32_t(g & 1) << 2;  // rows g and g + 8: the same parity
  float acc[4] = {};
  int lt = 0, r = 0, slot = 0;
  for (int i = 0; i < items; ++i) {
    __syncwarp();  // every lane is done with the slot the next copies overwrite
    if (issued < items) issue();
    attn::cp_async_commit();
    cp_async_wait_upto(stages - 1);  // this lane's copies of item i have landed
    __syncwarp();                    // and so have the other lanes'
    const int slice = r * kWarps + warp;
    if (slice < pl.slices) {  // warp-uniform
      const uint32_t src = ring + uint32_t(slot) * kItem;
#pragma unroll
      for (int q = 0; q < kChunks / 4; ++q) {
        const uint32_t c = uint32_t(4 * q + t4);
        const uint4 ra = ld_shared16(src + wa_off + (c ^ wsw) * 16);
        const uint4 rb = ld_shared16(src + wb_off + (c ^ wsw) * 16);
        const uint4 xv = ld_shared16(xlane + ((uint32_t(slice * kChunks) + c) ^ xsw) * 16);
        const uint32_t a0[4] = {ra.x, rb.x, ra.y, rb.y};
        const uint32_t a1[4] = {ra.z, rb.z, ra.w, rb.w};
        Q::mma(acc, a0, xv.x, xv.y);
        Q::mma(acc, a1, xv.z, xv.w);
      }
    }
    if (r == rounds - 1) {  // the warp's share of tile lt is done: uniform over the block
      float* rb = red + (lt & 1) * (kWarps * 4 * 32);
#pragma unroll
      for (int j = 0; j < 4; ++j) rb[(warp * 4 + j) * 32 + lane] = acc[j], acc[j] = 0.0f;
      __syncthreads();  // also: the sums of tile lt - 2 in this buffer were read before
      const int64_t tile = blockIdx.x + int64_t(lt) * gridDim.x;
      const int j = tid >> 5, ln = tid & 31, lg = ln >> 2, lt4 = ln & 3;
      if constexpr (kFfn) {
        if (tid < 64) {  // j: token 2 lt4 + j; gate in c_j, up in c_{j + 2}
          float gate = 0.0f, up = 0.0f;
          for (int w = 0; w < kWarps; ++w) {
            gate += rb[(w * 4 + j) * 32 + ln];
            up += rb[(w * 4 + j + 2) * 32 + ln];
          }
          const int64_t f = tile * 8 + lg, t = 2 * lt4 + j;
          if (f < N && t < p.T) {
            const float inv = inv_s[t];
            gate *= inv, up *= inv;
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

// Shared-memory plan for this shape and device; false when x leaves no room
// for a ring 2 items deep (T = 8 with K past about 10k on an H100): the
// callers' short-block kernels take those.
template <int kChunks, int kWarps>
bool ds_plan(int64_t T, int64_t K, int64_t N, bool ffn, const Launch& l, int max_stages, DsPlan& pl,
             unsigned& grid, size_t& smem_bytes) {
  constexpr int64_t kItem = int64_t(kWarps) * 16 * kChunks * 16;
  if (T < 1 || T > 8 || K % 8 != 0 || K <= 0 || N <= 0) return false;
  pl.x_rows = int(T);
  const int64_t slices = (K / 8 + kChunks - 1) / kChunks;
  if (slices >= (int64_t(1) << 24)) return false;
  pl.slices = int(slices);
  pl.rounds = int((slices + kWarps - 1) / kWarps);
  const int64_t x_bytes = T * slices * kChunks * 16;
  const int64_t red_bytes = int64_t(2) * kWarps * 4 * 32 * 4, ss_bytes = int64_t(kWarps) * 8 * 4;
  const int64_t fixed = x_bytes + red_bytes + ss_bytes + 32;
  if (fixed + 2 * kItem > l.smem_optin) return false;
  pl.stages = int(std::min<int64_t>(std::min(max_stages, 8), (l.smem_optin - fixed) / kItem));
  pl.x_off = uint32_t(pl.stages * kItem);
  pl.red_off = pl.x_off + uint32_t(x_bytes);
  pl.ss_off = pl.red_off + uint32_t(red_bytes);
  pl.inv_off = pl.ss_off + uint32_t(ss_bytes);
  smem_bytes = size_t(pl.inv_off) + 32;
  const int64_t tiles = ffn ? (N + 7) / 8 : (N + 15) / 16;
  grid = unsigned(std::min<int64_t>(tiles, l.num_sms));
  return true;
}

template <class T, bool kFfn, int kChunks, int kWarps>
tk_status launch_dstream(const DsArgs& a, const Launch& l, const DsPlan& pl, unsigned grid, size_t smem_bytes,
                         const char* op) {
  // Raised once per kernel to the device's opt-in limit, which every plan fits.
  static const cudaError_t attr = cudaFuncSetAttribute(
      dstream_kernel<T, kFfn, kChunks, kWarps>, cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem_optin);
  if (attr != cudaSuccess)
    return fail(TK_ERR_BACKEND, "%s: cannot reserve %zu bytes of shared memory: %s", op, smem_bytes,
                cudaGetErrorString(attr));
  dstream_kernel<T, kFfn, kChunks, kWarps><<<grid, kWarps * 32, smem_bytes, l.stream>>>(a, pl);
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
template <class T, bool kFfn>
bool try_dstream(const DsArgs& a, const Launch& l, tk_status* status, const char* op) {
  DsPlan pl;
  unsigned grid;
  size_t smem;
  if (!ds_plan<kDsChunks, kDsWarps>(a.T, a.K, a.N, kFfn, l, kDsStages, pl, grid, smem)) return false;
  *status = launch_dstream<T, kFfn, kDsChunks, kDsWarps>(a, l, pl, grid, smem, op);
  return true;
}

}  // namespace tk::cuda
