// Scalar conversions between f32 and the 16-bit storage types, on the host.
// Round-to-nearest-even, NaN and Inf preserved. Used by the reference, the
// host helpers and the tests; SIMD paths convert in bulk themselves.
#pragma once

#include <cstdint>
#include <cstring>

#include "tiny_kernel/tiny_kernel.h"

namespace tk {

inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t man = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (man << 13));  // Inf / NaN
  if (exp == 0) {
    // Zero or subnormal: man * 2^-24.
    const float mag = float(man) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

inline uint16_t f32_to_f16(float f) {
  const uint32_t u = f32_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t au = u & 0x7fffffffu;
  if (au > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (au >= 0x477ff000u) return uint16_t(sign | 0x7c00u); // rounds to >= 65520: Inf
  if (au < 0x38800000u) {
    // Result is subnormal (or zero): round |f| * 2^24 to an integer, ties to even.
    const float a = bits_f32(au) * 16777216.0f;
    uint32_t r = uint32_t(a);
    const float frac = a - float(r);
    if (frac > 0.5f || (frac == 0.5f && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t m = au + 0xfffu + ((au >> 13) & 1u);  // round mantissa to 10 bits
  m -= 112u << 23;                               // rebias exponent 127 -> 15
  return uint16_t(sign | (m >> 13));
}

// Element i of a tensor of `dtype` at `p`, as float.
inline float load_as_f32(tk_dtype dtype, const void* p, int64_t i) {
  switch (dtype) {
    case TK_F32: return static_cast<const float*>(p)[i];
    case TK_F16: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case TK_BF16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.0f;
}

inline void store_from_f32(tk_dtype dtype, void* p, int64_t i, float v) {
  switch (dtype) {
    case TK_F32: static_cast<float*>(p)[i] = v; break;
    case TK_F16: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
    case TK_BF16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
  }
}

// v rounded to what `dtype` can hold.
inline float round_to(tk_dtype dtype, float v) {
  switch (dtype) {
    case TK_F32: return v;
    case TK_F16: return f16_to_f32(f32_to_f16(v));
    case TK_BF16: return bf16_to_f32(f32_to_bf16(v));
  }
  return v;
}

inline size_t dtype_size(tk_dtype dtype) { return dtype == TK_F32 ? 4 : 2; }

}  // namespace tk
