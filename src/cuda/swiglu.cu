// SwiGLU on CUDA: out = silu(gate) * up, element-wise. Bound by HBM bandwidth
// (3 accesses per element); each thread keeps several 16-byte loads of gate and
// up in flight. Contiguous tensors are treated as one long row so that no block
// idles at a row end.
#include <algorithm>

#include "cuda/ops.h"
#include "cuda/vec.cuh"

namespace tk::cuda {
namespace {

// Accesses per thread, all loads issued before the first use: 8 loads of 16
// bytes in flight per thread.
constexpr int kUnroll = 4;
constexpr int kThreads = 256;

template <class T>
__device__ __forceinline__ float silu(float g) {
  // f32 data gets the accurate expf and division; 16-bit outputs cannot see
  // the error of the approximate ones, which cost a few instructions instead
  // of a few dozen (this op must keep up with HBM).
  if constexpr (sizeof(T) == 4) return g / (1.0f + expf(-g));
  else return __fdividef(g, 1.0f + __expf(-g));
}

template <class T, int kW>
__global__ void swiglu_kernel(tk_swiglu_params p, int64_t n, int64_t rows) {
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const T* g = static_cast<const T*>(p.gate) + r * p.gate_stride;
    const T* u = static_cast<const T*>(p.up) + r * p.up_stride;
    T* o = static_cast<T*>(p.out) + r * p.out_stride;
    const int64_t base = int64_t(blockIdx.x) * kThreads * kUnroll + threadIdx.x;
    float gv[kUnroll][kW], uv[kUnroll][kW];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + int64_t(j) * kThreads;
      if (i < n) {
        if constexpr (kW == 1) {
          gv[j][0] = to_f32(g[i]);
          uv[j][0] = to_f32(u[i]);
        } else {
          load_pack<T>(g + i * kW, gv[j]);
          load_pack<T>(u + i * kW, uv[j]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const int64_t i = base + int64_t(j) * kThreads;
      if (i < n) {
        float ov[kW];
#pragma unroll
        for (int e = 0; e < kW; ++e) ov[e] = silu<T>(gv[j][e]) * uv[j][e];
        if constexpr (kW == 1) o[i] = from_f32<T>(ov[0]);
        else store_pack<T>(o + i * kW, ov);
      }
    }
  }
}

template <class T>
tk_status launch(const tk_swiglu_params& p, const Launch& l) {
  const int64_t esz = sizeof(T);
  const bool vec = p.dim % kPack<T> == 0 && rows_aligned16(p.gate, p.gate_stride, esz, p.rows) &&
                   rows_aligned16(p.up, p.up_stride, esz, p.rows) &&
                   rows_aligned16(p.out, p.out_stride, esz, p.rows);
  const int kw = vec ? kPack<T> : 1;
  int64_t rows = p.rows, n = p.dim / kw;
  const int64_t per_block = int64_t(kThreads) * kUnroll;
  const bool contiguous = p.rows == 1 || (p.gate_stride == p.dim && p.up_stride == p.dim &&
                                          p.out_stride == p.dim);
  if (contiguous && (rows * n + per_block - 1) / per_block < (int64_t(1) << 31)) {
    n *= rows;
    rows = 1;
  }
  const int64_t bx = (n + per_block - 1) / per_block;
  if (bx >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "swiglu: dim %lld is too large for one launch", (long long)p.dim);
  const dim3 grid(unsigned(bx), unsigned(std::min<int64_t>(rows, 65535)));
  if (vec)
    swiglu_kernel<T, kPack<T>><<<grid, kThreads, 0, l.stream>>>(p, n, rows);
  else
    swiglu_kernel<T, 1><<<grid, kThreads, 0, l.stream>>>(p, n, rows);
  return check_launch("swiglu");
}

}  // namespace

tk_status swiglu(const tk_swiglu_params& p, const Launch& l) {
  if (p.rows == 0) return TK_OK;
  TK_DISPATCH_DTYPE(p.dtype, T, return launch<T>(p, l);)
  return fail(TK_ERR_UNSUPPORTED, "swiglu: unsupported dtype %d", int(p.dtype));
}

}  // namespace tk::cuda
