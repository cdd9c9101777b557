// RMSNorm and its residual variant on CUDA. One block per row; the row stays in
// registers between the sum of squares and the scaled write, so each byte of x
// (and residual) is read once and each output byte written once: the op is
// bound by HBM bandwidth, 2 (or 4 with residual) bytes moved per element.
#include <algorithm>
#include <type_traits>

#include "cuda/ops.h"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace tk::cuda {
namespace {

// Accesses a thread keeps in registers: four independent 16-byte loads in
// flight per thread hide HBM latency at the occupancy this kernel gets.
constexpr int kCached = 4;

// kW elements per access: kPack<T> when rows are 16-byte aligned, else 1.
// The row is cached raw (storage dtype, 4 registers per 16 bytes), not as
// floats: half the registers, so more rows in flight per SM.
template <class T, int kW>
struct Access {
  using Raw = std::conditional_t<kW == 1, T, uint4>;
  static __device__ __forceinline__ Raw load(const T* p) {
    if constexpr (kW == 1) return p[0];
    else return ld16(p);
  }
  static __device__ __forceinline__ void store(T* p, const Raw& r) {
    if constexpr (kW == 1) p[0] = r;
    else st16(p, r);
  }
  static __device__ __forceinline__ void to_floats(const Raw& r, float (&v)[kW]) {
    if constexpr (kW == 1) v[0] = to_f32(r);
    else unpack<T>(r, v);
  }
  static __device__ __forceinline__ Raw from_floats(const float (&v)[kW]) {
    if constexpr (kW == 1) return from_f32<T>(v[0]);
    else return pack<T>(v);
  }
};

// x (+ residual) -> h (raw, in T): residual <- h; returns the sum of h^2 (of h
// as stored). Each thread reads and writes only its own elements, so y may alias x.
template <class T, int kW>
__device__ __forceinline__ float load_h(const T* x, T* res, int64_t i,
                                        typename Access<T, kW>::Raw& raw) {
  using A = Access<T, kW>;
  raw = A::load(x + i * kW);
  float h[kW];
  A::to_floats(raw, h);
  if (res) {
    float r[kW];
    A::to_floats(A::load(res + i * kW), r);
#pragma unroll
    for (int e = 0; e < kW; ++e) h[e] += r[e];
    raw = A::from_floats(h);
    A::store(res + i * kW, raw);
    A::to_floats(raw, h);
  }
  float ss = 0.0f;
#pragma unroll
  for (int e = 0; e < kW; ++e) ss += h[e] * h[e];
  return ss;
}

template <class T, int kW>
__device__ __forceinline__ void store_y(T* y, const typename Access<T, kW>::Raw& wraw, int64_t i,
                                        const typename Access<T, kW>::Raw& raw, float inv) {
  using A = Access<T, kW>;
  float h[kW], wv[kW], out[kW];
  A::to_floats(raw, h);
  A::to_floats(wraw, wv);
#pragma unroll
  for (int e = 0; e < kW; ++e) out[e] = h[e] * inv * wv[e];
  A::store(y + i * kW, A::from_floats(out));
}

template <class T, int kW>
__global__ void rmsnorm_kernel(tk_rmsnorm_params p) {
  using A = Access<T, kW>;
  __shared__ float scratch[32];
  const int64_t row = blockIdx.x;
  const T* x = static_cast<const T*>(p.x) + row * p.x_stride;
  T* res = p.residual ? static_cast<T*>(p.residual) + row * p.residual_stride : nullptr;
  T* y = static_cast<T*>(p.y) + row * p.y_stride;
  const T* w = static_cast<const T*>(p.weight);
  const int64_t n = p.dim / kW;
  const int tid = threadIdx.x, bd = blockDim.x;

  // The weight is loaded with x, not after the reduction: for few rows the
  // kernel is a chain of memory round trips, and this takes one out of it.
  typename A::Raw cache[kCached], wcache[kCached];
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t i = tid + int64_t(j) * bd;
    if (i < n) wcache[j] = A::load(w + i * kW);
  }
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t i = tid + int64_t(j) * bd;
    if (i < n) ss += load_h<T, kW>(x, res, i, cache[j]);
  }
  // Rows longer than the register cache: the rest is read twice (the second
  // time mostly from L2).
  for (int64_t i = tid + int64_t(kCached) * bd; i < n; i += bd) {
    typename A::Raw raw;
    ss += load_h<T, kW>(x, res, i, raw);
  }
  ss = block_sum(ss, scratch);
  const float inv = rsqrtf(ss / float(p.dim) + p.eps);

#pragma unroll
  for (int j = 0; j < kCached; ++j) {
    const int64_t i = tid + int64_t(j) * bd;
    if (i < n) store_y<T, kW>(y, wcache[j], i, cache[j], inv);
  }
  for (int64_t i = tid + int64_t(kCached) * bd; i < n; i += bd)
    store_y<T, kW>(y, A::load(w + i * kW), i, A::load((res ? res : x) + i * kW), inv);  // residual holds h
}

template <class T>
tk_status launch(const tk_rmsnorm_params& p, const Launch& l) {
  const bool vec = p.dim % kPack<T> == 0 && rows_aligned16(p.x, p.x_stride, sizeof(T), p.rows) &&
                   rows_aligned16(p.y, p.y_stride, sizeof(T), p.rows) && aligned16(p.weight) &&
                   (!p.residual || rows_aligned16(p.residual, p.residual_stride, sizeof(T), p.rows));
  const int64_t n = vec ? p.dim / kPack<T> : p.dim;
  const int64_t per_thread = (n + kCached - 1) / kCached;
  const int threads = int(std::min<int64_t>(1024, std::max<int64_t>(32, (per_thread + 31) / 32 * 32)));
  if (vec)
    rmsnorm_kernel<T, kPack<T>><<<unsigned(p.rows), threads, 0, l.stream>>>(p);
  else
    rmsnorm_kernel<T, 1><<<unsigned(p.rows), threads, 0, l.stream>>>(p);
  return check_launch(p.residual ? "rmsnorm_residual" : "rmsnorm");
}

}  // namespace

tk_status rmsnorm(const tk_rmsnorm_params& p, const Launch& l) {
  if (p.rows == 0) return TK_OK;
  TK_DISPATCH_DTYPE(p.dtype, T, return launch<T>(p, l);)
  return fail(TK_ERR_UNSUPPORTED, "rmsnorm: unsupported dtype %d", int(p.dtype));
}

}  // namespace tk::cuda
