// The one 16-byte vectorised load/store and dtype-conversion helper of the
// CUDA backend. Memory-bound kernels reach HBM bandwidth only with 16-byte
// accesses per thread (LDG.E.128 / STG.E.128), coalesced across the warp.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "tiny_kernel/tiny_kernel.h"

namespace tk::cuda {

// Elements of T in one 16-byte access.
template <class T>
inline constexpr int kPack = int(16 / sizeof(T));

// Scalar conversions (f32 math, 16-bit storage; round to nearest even).
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Raw 16-byte accesses. p must be 16-byte aligned.
__device__ __forceinline__ uint4 ld16(const void* p) { return *static_cast<const uint4*>(p); }
__device__ __forceinline__ void st16(void* p, const uint4& v) { *static_cast<uint4*>(p) = v; }
// Read-only data streamed once (weights): the non-coherent path, no L1 allocation,
// so the small re-used activations keep L1. Never use on memory the kernel writes.
__device__ __forceinline__ uint4 ld16_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// 16 bytes <-> kPack<T> floats.
template <class T>
__device__ __forceinline__ void unpack(const uint4& u, float (&v)[kPack<T>]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = __uint_as_float(w[i]);
  } else if constexpr (std::is_same_v<T, __half>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {  // bf16 is the top half of an f32: shifts, no conversion instruction
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}

template <class T>
__device__ __forceinline__ uint4 pack(const float (&v)[kPack<T>]) {
  uint32_t w[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(v[i]);
  } else if constexpr (std::is_same_v<T, __half>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __half2 h = __floats2half2_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
      w[i] = *reinterpret_cast<const uint32_t*>(&h);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <class T>
__device__ __forceinline__ void load_pack(const T* p, float (&v)[kPack<T>]) {
  unpack<T>(ld16(p), v);
}
template <class T>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[kPack<T>]) {
  st16(p, pack<T>(v));
}

// Activations whose dtype is a run-time value (kernels templated on the weight
// dtype only, to keep instantiations few): N elements from p, which must be
// aligned to N * element size (capped at 16 bytes). The switch is uniform.
template <int N>
__device__ __forceinline__ void load_act(tk_dtype dtype, const void* p, float (&v)[N]) {
  static_assert(N == 4 || N == 8, "activation chunks are 4 or 8 elements");
  if (dtype == TK_F32) {
#pragma unroll
    for (int i = 0; i < N; i += 4) {
      const float4 f = static_cast<const float4*>(p)[i / 4];
      v[i] = f.x; v[i + 1] = f.y; v[i + 2] = f.z; v[i + 3] = f.w;
    }
    return;
  }
  uint32_t w[N / 2];
  if constexpr (N == 8) {
    const uint4 u = ld16(p);
    w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
  } else {
    const uint2 u = *static_cast<const uint2*>(p);
    w[0] = u.x; w[1] = u.y;
  }
  if (dtype == TK_F16) {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
      v[2 * i] = f.x;
      v[2 * i + 1] = f.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
      v[2 * i] = __uint_as_float(w[i] << 16);
      v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
}

// Element i of a run-time-typed tensor, as float / stored from float.
__device__ __forceinline__ float load_any(tk_dtype dtype, const void* p, int64_t i) {
  switch (dtype) {
    case TK_F32: return static_cast<const float*>(p)[i];
    case TK_F16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  }
}
__device__ __forceinline__ void store_any(tk_dtype dtype, void* p, int64_t i, float v) {
  switch (dtype) {
    case TK_F32: static_cast<float*>(p)[i] = v; break;
    case TK_F16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    default: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
  }
}

// Host side: may a [rows, *] tensor at p with row stride `stride` (elements of
// `elem` bytes) use 16-byte accesses at every row start?
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline bool rows_aligned16(const void* p, int64_t stride, size_t elem, int64_t rows = 2) {
  return aligned16(p) && (rows <= 1 || (stride * int64_t(elem)) % 16 == 0);
}

}  // namespace tk::cuda

// Runs the statements with T bound to the storage type of a tk_dtype
// (float, __half, __nv_bfloat16). Falls through for an unknown dtype.
#define TK_DISPATCH_DTYPE(dtype, T, ...)                                  \
  switch (dtype) {                                                        \
    case TK_F32: { using T = float; __VA_ARGS__ } break;                  \
    case TK_F16: { using T = __half; __VA_ARGS__ } break;                 \
    case TK_BF16: { using T = __nv_bfloat16; __VA_ARGS__ } break;         \
  }
