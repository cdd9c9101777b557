// fused_ffn on CUDA: out[T, F] = silu(rmsnorm(x) . Wg^T) * (rmsnorm(x) . Wu^T)
// in one pass over the weights. A warp owns two output columns f: it streams
// rows f, f+1 of Wg and of Wu together (matvec.cuh), so the silu * up epilogue
// needs nothing from other warps and no [T, F] intermediate touches memory.
// The norm factors in as x * norm_weight along K and one 1/rms per token after
// the dot products (constant along K).
//   SPLIT: each block computes the 1/rms of its tokens once.
//   NAIVE: every warp (two outputs) recomputes them: the seed's lesson, for the bench.
#include "cuda/matvec.cuh"
#include "cuda/ops.h"

namespace tk::cuda {
namespace {

constexpr int kCols = 2;  // output columns per warp: 2 gate rows + 2 up rows
constexpr int kRows = 2 * kCols;

template <class T>
__device__ __forceinline__ float silu(float g) {
  return g / (1.0f + expf(-g));
}

// Weights: dense (kW elements of Tw per access) or int4 (Tw = void).
template <class Tw, int kW, int kT, bool kAligned>
__global__ void __launch_bounds__(kMvWarps * 32)
    ffn_kernel(tk_fused_ffn_params p, int64_t t_tiles, int ksplit, bool x_vec) {
  __shared__ float red[kMvWarps * kT * kRows];
  __shared__ float inv_block[kT];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = blockIdx.x % t_tiles, col_block = blockIdx.x / t_tiles;
  const int groups = kMvWarps / ksplit, kpart = warp % ksplit;
  const int64_t f0 = (col_block * groups + warp / ksplit) * kCols;
  const int64_t t0 = tile * kT;
  const int64_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const MvAct a{static_cast<const char*>(p.x) + t0 * p.x_stride * xsz, p.x_stride * xsz,
                int(std::min<int64_t>(kT, p.T - t0)), p.dtype, p.norm_weight};

  float acc[kT][kRows] = {};
  if constexpr (std::is_void_v<Tw>) {
    QRow w[kRows];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t f = std::min<int64_t>(f0 + c, p.F - 1);
      w[c] = qrow(p.q_gate, f);
      w[kCols + c] = qrow(p.q_up, f);
    }
    mv_dot_int4<kT, kRows, true, kAligned>(w, a, int64_t(kpart) * 32 + lane, p.D / 32, 32 * ksplit, acc);
  } else {
    const Tw* w[kRows];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t f = std::min<int64_t>(f0 + c, p.F - 1);
      w[c] = static_cast<const Tw*>(p.w_gate) + f * p.w_gate_stride;
      w[kCols + c] = static_cast<const Tw*>(p.w_up) + f * p.w_up_stride;
    }
    mv_dot<Tw, kW, kT, kRows, true>(w, a, int64_t(kpart) * 32 + lane, p.D / kW, 32 * ksplit, acc);
  }
  mv_reduce<kT, kRows>(acc, red, ksplit);
  // Statistics after the weight pass, so that the weight loads start at once
  // (x is in L1/L2 by now). SPLIT: once per block. NAIVE: every warp again.
  float inv[kT];
  if (p.algo == TK_FUSED_NAIVE) {
#pragma unroll
    for (int t = 0; t < kT; ++t)
      inv[t] = t < a.rows ? (x_vec ? mv_inv_rms<true>(p.dtype, a.x + t * a.stride_bytes, p.D, p.eps)
                                   : mv_inv_rms<false>(p.dtype, a.x + t * a.stride_bytes, p.D, p.eps))
                          : 0.0f;
  } else {
    for (int t = warp; t < a.rows; t += kMvWarps) {
      const char* row = a.x + t * a.stride_bytes;
      const float v = x_vec ? mv_inv_rms<true>(p.dtype, row, p.D, p.eps)
                            : mv_inv_rms<false>(p.dtype, row, p.D, p.eps);
      if (lane == 0) inv_block[t] = v;
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kT; ++t) inv[t] = t < a.rows ? inv_block[t] : 0.0f;
  }
  if (kpart != 0) return;
#pragma unroll
  for (int t = 0; t < kT; ++t)
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (lane == (t * kCols + c) % 32 && t < a.rows && f0 + c < p.F) {
        const float g = acc[t][c] * inv[t], u = acc[t][kCols + c] * inv[t];
        store_any(p.dtype, p.out, (t0 + t) * p.out_stride + f0 + c, silu<float>(g) * u);
      }
}

template <class Tw, int kW, int kT, bool kAligned>
tk_status launch_tiles(const tk_fused_ffn_params& p, const Launch& l, int64_t accesses, bool x_vec) {
  const int64_t t_tiles = (p.T + kT - 1) / kT;
  const int64_t col_warps = (p.F + kCols - 1) / kCols;
  const int ksplit = mv_ksplit(col_warps * t_tiles, accesses, l.num_sms,
                               std::is_void_v<Tw> ? 1 : kMvUnroll);
  const int64_t cols_per_block = int64_t(kCols) * (kMvWarps / ksplit);
  const int64_t blocks = (p.F + cols_per_block - 1) / cols_per_block * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "fused_ffn: T = %lld x F = %lld is too large for one launch",
                (long long)p.T, (long long)p.F);
  ffn_kernel<Tw, kW, kT, kAligned>
      <<<unsigned(blocks), kMvWarps * 32, 0, l.stream>>>(p, t_tiles, ksplit, x_vec);
  return check_launch("fused_ffn");
}

template <class Tw>
tk_status launch_dense(const tk_fused_ffn_params& p, const Launch& l) {
  const size_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const bool x_vec = p.D % 8 == 0 && rows_aligned16(p.x, p.x_stride, xsz, p.T) &&
                     aligned16(p.norm_weight);
  const bool vec = x_vec && p.D % kPack<Tw> == 0 &&
                   rows_aligned16(p.w_gate, p.w_gate_stride, sizeof(Tw), p.F) &&
                   rows_aligned16(p.w_up, p.w_up_stride, sizeof(Tw), p.F);
  if (!vec) return launch_tiles<Tw, 1, 1, false>(p, l, p.D, x_vec);
  const int64_t acc = p.D / kPack<Tw>;
  if (p.T == 1) return launch_tiles<Tw, kPack<Tw>, 1, true>(p, l, acc, x_vec);
  if (p.T <= 4) return launch_tiles<Tw, kPack<Tw>, 4, true>(p, l, acc, x_vec);
  return launch_tiles<Tw, kPack<Tw>, 8, true>(p, l, acc, x_vec);
}

tk_status launch_int4(const tk_fused_ffn_params& p, const Launch& l) {
  const size_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const bool x_vec = rows_aligned16(p.x, p.x_stride, xsz, p.T) && aligned16(p.norm_weight);
  const bool aligned = x_vec && aligned16(p.q_gate.packed) && aligned16(p.q_up.packed);
  const int64_t acc = p.D / 32;
  if (!aligned) return launch_tiles<void, 32, 1, false>(p, l, acc, x_vec);
  if (p.T == 1) return launch_tiles<void, 32, 1, true>(p, l, acc, x_vec);
  if (p.T <= 4) return launch_tiles<void, 32, 4, true>(p, l, acc, x_vec);
  return launch_tiles<void, 32, 8, true>(p, l, acc, x_vec);
}

}  // namespace

tk_status fused_ffn(const tk_fused_ffn_params& p, const Launch& l) {
  if (p.T == 0) return TK_OK;
  if (p.format == TK_WEIGHTS_INT4) return launch_int4(p, l);
  TK_DISPATCH_DTYPE(p.weight_dtype, Tw, return launch_dense<Tw>(p, l);)
  return fail(TK_ERR_UNSUPPORTED, "fused_ffn: unsupported weight dtype %d", int(p.weight_dtype));
}

}  // namespace tk::cuda
