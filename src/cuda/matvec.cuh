// The core shared by the decode-sized matmul, fused_ffn and attn_front kernels:
// a warp computes kR rows of W against kT rows of activations.
//
// Decode matmuls are bound by reading the weights once from HBM. What that
// takes: every lane issues kR x kMvUnroll independent 16-byte weight loads before
// the first use (memory-level parallelism), consecutive lanes read consecutive
// 16 bytes of a row (coalesced), each weight byte is read once for all kT
// activation rows, and each activation load is reused for kR weight rows (L1
// traffic kT / kR times the weight traffic). Activations are a run-time dtype,
// weights a template parameter: that keeps instantiations few.
#pragma once

#include <algorithm>
#include <type_traits>

#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace tk::cuda {

constexpr int kMvWarps = 4;   // warps per block
constexpr int kMvUnroll = 2;  // weight accesses per lane per row in flight
// Decode (one activation row, 16-byte weight accesses): 4 accesses per row in
// flight, so a lane has kR x 4 independent 16-byte loads out before it needs
// the first (with mv_ksplit_short, a warp's whole share of K in one round).
constexpr int kMvDecodeUnroll = 4;
template <int kW, int kT>
constexpr int mv_unroll() { return kT == 1 && kW > 1 ? kMvDecodeUnroll : kMvUnroll; }

// kT rows of activations, dtype known at run time, optionally times a norm
// weight of the same dtype (x * w of RMSNorm; the 1/rms factor is applied to
// the dot products afterwards, since it is constant along K).
struct MvAct {
  const char* x;         // row 0
  int64_t stride_bytes;  // between rows
  int rows;              // valid rows, 1..kT; the rest repeat the last (results discarded)
  tk_dtype dtype;
  const void* norm_weight;
};

// kW elements of W per access: kPack<Tw> (16 bytes) or 1 (unaligned fallback).
template <class Tw, int kW>
struct WeightAccess {
  using Raw = uint4;
  static __device__ __forceinline__ Raw load(const Tw* p) { return ld16_stream(p); }
  static __device__ __forceinline__ void decode(const Raw& r, float (&v)[kW]) { unpack<Tw>(r, v); }
};
template <class Tw>
struct WeightAccess<Tw, 1> {
  using Raw = Tw;
  static __device__ __forceinline__ Raw load(const Tw* p) { return *p; }
  static __device__ __forceinline__ void decode(const Raw& r, float (&v)[1]) { v[0] = to_f32(r); }
};

template <int kW>
__device__ __forceinline__ void load_act_n(tk_dtype dtype, const void* p, float (&v)[kW]) {
  if constexpr (kW == 1) v[0] = load_any(dtype, p, 0);
  else load_act<kW>(dtype, p, v);
}

// acc[t][r] += sum over accesses p (p_begin, p_begin + step, ... < p_end) of
// W_r[p*kW : (p+1)*kW] . act_t[...]. w: kR row pointers (valid memory).
// kA == kR + 1 (with kNorm): acc[t][kR] += the sum of squares of act_t over the
// same accesses, so the ksplit warps of a row group together hold the row's
// RMS statistic without a second pass over x (which, for short blocks, would
// be a chain of L2 round trips after the weight stream).
template <class Tw, int kW, int kT, int kR, bool kNorm, int kU = kMvUnroll, int kA = kR>
__device__ __forceinline__ void mv_dot(const Tw* const (&w)[kR], const MvAct& a, int64_t p_begin,
                                       int64_t p_end, int step, float (&acc)[kT][kA]) {
  static_assert(kA == kR || (kNorm && kA == kR + 1), "acc holds kR dot products (+ sum of squares)");
  using WA = WeightAccess<Tw, kW>;
  const int64_t esz = a.dtype == TK_F32 ? 4 : 2;
  const char* xrow[kT];
#pragma unroll
  for (int t = 0; t < kT; ++t) xrow[t] = a.x + int64_t(t < a.rows ? t : a.rows - 1) * a.stride_bytes;
  for (int64_t p = p_begin; p < p_end; p += int64_t(step) * kU) {
    typename WA::Raw raw[kU][kR];
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t pu = p + int64_t(u) * step;
#pragma unroll
      for (int r = 0; r < kR; ++r)
        if (pu < p_end) raw[u][r] = WA::load(w[r] + pu * kW);
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t pu = p + int64_t(u) * step;
      if (pu >= p_end) break;
      float wv[kR][kW];
#pragma unroll
      for (int r = 0; r < kR; ++r) WA::decode(raw[u][r], wv[r]);
      float nw[kW];
      if constexpr (kNorm) load_act_n<kW>(a.dtype, static_cast<const char*>(a.norm_weight) + pu * kW * esz, nw);
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        float xv[kW];
        load_act_n<kW>(a.dtype, xrow[t] + pu * kW * esz, xv);
#pragma unroll
        for (int e = 0; e < kW; ++e) {
          if constexpr (kA > kR) acc[t][kR] = fmaf(xv[e], xv[e], acc[t][kR]);
          const float xe = kNorm ? xv[e] * nw[e] : xv[e];
#pragma unroll
          for (int r = 0; r < kR; ++r) acc[t][r] = fmaf(wv[r][e], xe, acc[t][r]);
        }
      }
    }
  }
}

// One row of int4 weights (tiny_kernel.h layout): 16 bytes of `packed` hold 32
// consecutive k, so an access p covers k = 32p .. 32p + 31, inside one group
// (group sizes are multiples of 32).
struct QRow {
  const uint8_t* q;       // packed row, K/2 bytes
  const uint16_t* s;      // scales row, f16 or bf16 bits
  const uint8_t* z;       // zero points row, or null (8)
  int gshift;             // log2(group size)
  bool bf16;              // scale dtype
};

template <bool kAligned>
__device__ __forceinline__ uint4 load_q16(const uint8_t* p) {
  if constexpr (kAligned) {
    return ld16_stream(p);
  } else {
    uint32_t w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
      w[i] = uint32_t(p[4 * i]) | uint32_t(p[4 * i + 1]) << 8 | uint32_t(p[4 * i + 2]) << 16 |
             uint32_t(p[4 * i + 3]) << 24;
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

// acc[t][r] += dequant(W_r)[32p .. 32p+31] . act_t[...] over accesses p. The
// code q becomes the float 2^23 + q by OR-ing it into the mantissa of 2^23 (no
// int-to-float conversion), so q - zero costs one FADD, exactly; the group
// scale multiplies the 32-element partial sums once per access.
// kAligned: packed rows and activations allow 16-byte loads (else bytes and scalars).
// kA == kR + 1: acc[t][kR] += sum of squares of act_t, as in mv_dot.
template <int kT, int kR, bool kNorm, bool kAligned, int kA = kR>
__device__ __forceinline__ void mv_dot_int4(const QRow (&w)[kR], const MvAct& a, int64_t p_begin,
                                            int64_t p_end, int step, float (&acc)[kT][kA]) {
  static_assert(kA == kR || (kNorm && kA == kR + 1), "acc holds kR dot products (+ sum of squares)");
  const int64_t esz = a.dtype == TK_F32 ? 4 : 2;
  const char* xrow[kT];
#pragma unroll
  for (int t = 0; t < kT; ++t) xrow[t] = a.x + int64_t(t < a.rows ? t : a.rows - 1) * a.stride_bytes;
  for (int64_t p = p_begin; p < p_end; p += step) {
    uint4 raw[kR];
    float scale[kR], zero[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      raw[r] = load_q16<kAligned>(w[r].q + p * 16);
      const int64_t g = (p * 32) >> w[r].gshift;
      const uint16_t sb = w[r].s[g];
      scale[r] = w[r].bf16 ? __uint_as_float(uint32_t(sb) << 16) : __half2float(__ushort_as_half(sb));
      zero[r] = 8388608.0f + float(w[r].z ? w[r].z[g] : 8);
    }
    float part[kT][kR] = {};
#pragma unroll
    for (int c = 0; c < 4; ++c) {  // 32-bit word c: k = 32p + 8c .. + 7
      float wq[kR][8];
#pragma unroll
      for (int r = 0; r < kR; ++r) {
        const uint32_t word = c == 0 ? raw[r].x : c == 1 ? raw[r].y : c == 2 ? raw[r].z : raw[r].w;
#pragma unroll
        for (int e = 0; e < 8; ++e)
          wq[r][e] = __uint_as_float(0x4B000000u | ((word >> (4 * e)) & 0xFu)) - zero[r];
      }
      const int64_t k = p * 32 + c * 8;
      float nw[8];
      if constexpr (kNorm) {
        if constexpr (kAligned) load_act<8>(a.dtype, static_cast<const char*>(a.norm_weight) + k * esz, nw);
        else
#pragma unroll
          for (int e = 0; e < 8; ++e) nw[e] = load_any(a.dtype, a.norm_weight, k + e);
      }
#pragma unroll
      for (int t = 0; t < kT; ++t) {
        float xv[8];
        if constexpr (kAligned) load_act<8>(a.dtype, xrow[t] + k * esz, xv);
        else
#pragma unroll
          for (int e = 0; e < 8; ++e) xv[e] = load_any(a.dtype, xrow[t], k + e);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if constexpr (kA > kR) acc[t][kR] = fmaf(xv[e], xv[e], acc[t][kR]);
          const float xe = kNorm ? xv[e] * nw[e] : xv[e];
#pragma unroll
          for (int r = 0; r < kR; ++r) part[t][r] = fmaf(wq[r][e], xe, part[t][r]);
        }
      }
    }
#pragma unroll
    for (int t = 0; t < kT; ++t)
#pragma unroll
      for (int r = 0; r < kR; ++r) acc[t][r] = fmaf(scale[r], part[t][r], acc[t][r]);
  }
}

// Host: a QRow for row n of int4 weights.
__host__ __device__ inline QRow qrow(const tk_int4_weights& w, int64_t n) {
  const int64_t groups = w.K / w.group_size;
  return QRow{w.packed + n * (w.K / 2), static_cast<const uint16_t*>(w.scales) + n * groups,
              w.zeros ? w.zeros + n * groups : nullptr,
              w.group_size == 32 ? 5 : w.group_size == 64 ? 6 : 7, w.scale_dtype == TK_BF16};
}

// Sums acc over the warp, then over the ksplit consecutive warps that split K
// for the same rows. Afterwards every lane of a warp with warp % ksplit == 0
// holds the totals. smem: kMvWarps * kT * kR floats. All threads must call it.
template <int kT, int kR>
__device__ __forceinline__ void mv_reduce(float (&acc)[kT][kR], float* smem, int ksplit) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int t = 0; t < kT; ++t)
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[t][r] = warp_sum(acc[t][r]);
  if (ksplit == 1) return;
  if (lane == 0) {
#pragma unroll
    for (int t = 0; t < kT; ++t)
#pragma unroll
      for (int r = 0; r < kR; ++r) smem[(warp * kT + t) * kR + r] = acc[t][r];
  }
  __syncthreads();
  if (warp % ksplit == 0) {
    for (int j = 1; j < ksplit; ++j)
#pragma unroll
      for (int t = 0; t < kT; ++t)
#pragma unroll
        for (int r = 0; r < kR; ++r) acc[t][r] += smem[((warp + j) * kT + t) * kR + r];
  }
}

// 1 / rms of activation row t (length d), by one warp. Vector loads when the
// caller's alignment allows (kVec), else scalar.
template <bool kVec>
__device__ __forceinline__ float mv_inv_rms(tk_dtype dtype, const char* row, int64_t d, float eps) {
  const int lane = threadIdx.x & 31;
  float ss = 0.0f;
  if constexpr (kVec) {  // d % 8 == 0 and row 16-byte aligned
    const int64_t esz = dtype == TK_F32 ? 4 : 2;
    for (int64_t i = lane; i < d / 8; i += 32) {
      float v[8];
      load_act<8>(dtype, row + i * 8 * esz, v);
#pragma unroll
      for (int e = 0; e < 8; ++e) ss = fmaf(v[e], v[e], ss);
    }
  } else {
    for (int64_t i = lane; i < d; i += 32) {
      const float v = load_any(dtype, row, i);
      ss = fmaf(v, v, ss);
    }
  }
  ss = warp_sum(ss);
  return rsqrtf(ss / float(d) + eps);
}

// Host, decode (T = 1) grids: the most warps (<= kMvWarps) that split K for
// the same rows while each still gets a full step of 32 lanes x `unroll`
// accesses. Blocks then live for one or two load rounds, so the grid is many
// short waves: no SM idles through a long last wave, and every warp issues all
// of its kR x unroll loads before its first FMA.
inline int mv_ksplit_short(int64_t accesses_per_row, int unroll) {
  int ksplit = 1;
  while (ksplit < kMvWarps && accesses_per_row >= int64_t(64) * unroll * ksplit) ksplit *= 2;
  return ksplit;
}

// Host: how many warps split K for the same rows so that the grid holds
// enough warps to cover HBM latency (about 16 per SM), keeping at least two
// steps of 32 lanes x `unroll` accesses per warp.
inline int mv_ksplit(int64_t row_warps, int64_t accesses_per_row, int num_sms,
                     int unroll = kMvUnroll) {
  int ksplit = 1;
  while (ksplit < kMvWarps && row_warps * ksplit < 16 * int64_t(num_sms) &&
         accesses_per_row >= int64_t(64) * unroll * ksplit)
    ksplit *= 2;
  return ksplit;
}

// The short-block mma kernels (matmul_mma_kernel, ffn_mma_kernel): this
// lane's 16-byte chunks (chunk 4 q + t4) of two weight rows for the kU quad
// steps q0 .. q0 + kU - 1, all loads issued before any is used; zeros past
// q_end or past the rows' `chunks` (where the x side reads zeros too).
template <int kU, class T>
__device__ __forceinline__ void mma_quad_loads(uint4 (&ra)[kU], uint4 (&rb)[kU], const T* wa, const T* wb,
                                               int64_t q0, int64_t q_end, int64_t chunks, int t4) {
#pragma unroll
  for (int u = 0; u < kU; ++u) {
    const int64_t c = (q0 + u) * 4 + t4;
    ra[u] = rb[u] = make_uint4(0, 0, 0, 0);
    if (q0 + u < q_end && c < chunks) {
      ra[u] = ld16_stream(wa + c * 8);
      rb[u] = ld16_stream(wb + c * 8);
    }
  }
}

}  // namespace tk::cuda
