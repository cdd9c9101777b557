// Tensor-core core of qmatmul_int4 (group size 128, f16/bf16 activations):
// mma.sync m16n8k16 (sm_80 and later, so also the portable path) with the int4
// codes dequantised straight into the A operand registers.
//
// Why this beats the CUDA-core loop at every T: there, each code costs a
// shift, a mask, a subtract and one FMA per token; here two codes cost one
// LOP3 (code into the mantissa of 1024.0 or 128.0, see below) and one HSUB2,
// and the tensor core does the multiply-adds for 8 tokens at once.
//
// Exactness: q - zero is a small integer, exact in f16 and bf16, so A holds
// the exact integer codes; the tensor core accumulates in f32; the group
// scale multiplies each 128-k partial sum in f32. Precision matches the f32
// CUDA-core path.
//
// Layout per warp and K step of one group (128 k) of 16 weight rows: lane
// (g = lane / 4, t4 = lane % 4) loads 16 bytes (32 codes) of rows g and g + 8 at
// k offset 32 t4, coalesced as 64 contiguous bytes per row. The mma only needs
// A and B to agree on which real k sits in each k slot, so the k order inside
// a lane's 32 codes is chosen to make dequantisation cheap: nibbles i and i + 4
// of a 32-bit word sit 16 bits apart, so one mask puts both into a half2.
// Mma j = 2w + h (word w, half h) takes from that lane the codes
// {8w + 2h, 8w + 2h + 4} (slots 2t4, 2t4 + 1) and {8w + 2h + 1, 8w + 2h + 5}
// (slots 2t4 + 8, 2t4 + 9); B is built from x with the same pairing (PRMT).
#pragma once

#include <cstdint>
#include <type_traits>

#include "cuda/vec.cuh"

namespace tk::cuda {

template <class Ta>
struct QmmaType;
template <>
struct QmmaType<__half> {
  static constexpr uint32_t kMagic = 0x64006400u;  // f16 1024.0: ulp 1, code in the low mantissa bits
  static constexpr uint32_t kBias = 0x6400u;
  static __device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    const __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct QmmaType<__nv_bfloat16> {
  static constexpr uint32_t kMagic = 0x43004300u;  // bf16 128.0: ulp 1 as well
  static constexpr uint32_t kBias = 0x4300u;
  static __device__ __forceinline__ uint32_t sub2(uint32_t a, uint32_t b) {
    const __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&a),
                                     *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const uint32_t*>(&r);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// The subtrahends of one group's dequantisation, from its zero code z.
//   zz: (bias + z) in both halves (codes OR-ed into the magic, minus zz: q - z).
//   zm (f16 only): -(64 + z) in both halves, for codes left 4 bits up in the
//   mantissa: (1024 + 16 q) / 16 - (64 + z) = q - z, one exact HFMA2.
struct QZero {
  uint32_t zz, zm;
};
template <class Ta>
__device__ __forceinline__ QZero qmma_zero(uint32_t z) {
  const uint32_t b = QmmaType<Ta>::kBias | z;
  const uint32_t m = 0xD400u | z << 4;  // f16 -64 - z: exponent of 64, ulp 1/16
  return QZero{b | b << 16, m | m << 16};
}

// (a & kMask) | kOr as one LOP3: written in C++, the two immediates make the
// compiler emit an AND and an OR (a LOP3 takes one immediate operand).
template <uint32_t kMask, uint32_t kOr>
__device__ __forceinline__ uint32_t and_or(uint32_t a) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "n"(kMask), "n"(kOr));
  return r;
}

// Word w of a 16-byte chunk -> 4 pairs (codes i, i + 4) - zero, i = 0..3, as
// packed f16/bf16 pairs. f16: nibbles 1 and 5 (3 and 7 after one shift by 8)
// are masked in place, 16 times their value, and scaled back by the HFMA2
// that subtracts the zero: one shift per word instead of three. bf16 (7
// mantissa bits) has no room for a code 4 bits up, so it shifts each pair down.
template <class Ta>
__device__ __forceinline__ void qmma_dequant_word(uint32_t word, const QZero& z, uint32_t (&out)[4]) {
  using Q = QmmaType<Ta>;
  if constexpr (std::is_same_v<Ta, __half>) {
    const uint32_t hi = word >> 8;
    const __half2 sixteenth = __half2half2(__ushort_as_half(0x2C00u));  // 1/16
    const __half2 zm = *reinterpret_cast<const __half2*>(&z.zm);
    const uint32_t l1 = and_or<0x00F000F0u, Q::kMagic>(word), l3 = and_or<0x00F000F0u, Q::kMagic>(hi);
    const __half2 r1 = __hfma2(*reinterpret_cast<const __half2*>(&l1), sixteenth, zm);
    const __half2 r3 = __hfma2(*reinterpret_cast<const __half2*>(&l3), sixteenth, zm);
    out[0] = Q::sub2(and_or<0x000F000Fu, Q::kMagic>(word), z.zz);
    out[1] = *reinterpret_cast<const uint32_t*>(&r1);
    out[2] = Q::sub2(and_or<0x000F000Fu, Q::kMagic>(hi), z.zz);
    out[3] = *reinterpret_cast<const uint32_t*>(&r3);
  } else {
    out[0] = Q::sub2(and_or<0x000F000Fu, Q::kMagic>(word), z.zz);
    out[1] = Q::sub2(and_or<0x000F000Fu, Q::kMagic>(word >> 4), z.zz);
    out[2] = Q::sub2(and_or<0x000F000Fu, Q::kMagic>(word >> 8), z.zz);
    out[3] = Q::sub2(and_or<0x000F000Fu, Q::kMagic>(word >> 12), z.zz);
  }
}

// B fragments of one token for mmas 2w + h, h = 0, 1 (lane's k 8w .. 8w + 7;
// x0 = X[4w + h] = (x[8w + 2h], x[8w + 2h + 1]), x2 = X[4w + h + 2]):
// b0 = (x[8w + 2h], x[8w + 2h + 4]), b1 = (x[8w + 2h + 1], x[8w + 2h + 5]),
// the pairing of qmma_dequant_word.
__device__ __forceinline__ void qmma_b_frag(uint32_t x0, uint32_t x2, uint32_t& b0, uint32_t& b1) {
  b0 = __byte_perm(x0, x2, 0x5410);
  b1 = __byte_perm(x0, x2, 0x7632);
}
// 16 bytes of x (k 8w .. 8w + 7 of a lane) -> the B fragments of mmas 2w and
// 2w + 1 in the order qmma_group<kPermuted> reads them.
__device__ __forceinline__ uint4 qmma_b_frags(const uint4& x) {
  uint4 r;
  qmma_b_frag(x.x, x.z, r.x, r.y);
  qmma_b_frag(x.y, x.w, r.z, r.w);
  return r;
}

// c[tt] = the 16 x 8 mma products of one group (128 k) of the lane's rows
// g, g + 8 (16 bytes of codes each, zero codes za, zb) with token tile tt,
// without the scale. xload(tt, w) returns the lane's 16 bytes of x for word w
// of tile tt (the group's k 32 t4 + 8 w .. + 7 of token g): word w of the
// lane's codes is the A operand of mmas 2w, 2w + 1, whose B fragments come
// from those 16 bytes (qmma_b_frag), or, kPermuted, are those 16 bytes
// ({b0, b1} of mma 2w, then of 2w + 1: qmma_b_frags applied once to x in
// shared memory). One word at a time keeps few operands live.
template <class Ta, int kTT, bool kPermuted = false, class XLoad>
__device__ __forceinline__ void qmma_group(const uint4& wa, const uint4& wb, uint32_t za, uint32_t zb,
                                           XLoad&& xload, float (&c)[kTT][4]) {
  const QZero zqa = qmma_zero<Ta>(za), zqb = qmma_zero<Ta>(zb);
  const uint32_t wra[4] = {wa.x, wa.y, wa.z, wa.w};
  const uint32_t wrb[4] = {wb.x, wb.y, wb.z, wb.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    uint32_t pa[4], pb[4];
    qmma_dequant_word<Ta>(wra[w], zqa, pa);
    qmma_dequant_word<Ta>(wrb[w], zqb, pb);
#pragma unroll
    for (int tt = 0; tt < kTT; ++tt) {
      const uint4 v = xload(tt, w);
      const uint32_t X[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint32_t a[4] = {pa[2 * h],       // row g,     slots 2t4, 2t4 + 1
                               pb[2 * h],       // row g + 8
                               pa[2 * h + 1],   // row g,     slots 2t4 + 8, 2t4 + 9
                               pb[2 * h + 1]};  // row g + 8
        uint32_t b0, b1;
        if constexpr (kPermuted) {
          b0 = X[2 * h];
          b1 = X[2 * h + 1];
        } else {
          qmma_b_frag(X[h], X[h + 2], b0, b1);
        }
        QmmaType<Ta>::mma(c[tt], a, b0, b1);
      }
    }
  }
}

__device__ __forceinline__ float qmma_scale(uint16_t b, bool bf16) {
  return bf16 ? __uint_as_float(uint32_t(b) << 16) : __half2float(__ushort_as_half(b));
}

// The k-split reduction of the tensor-core kernels: the ksplit consecutive
// warps of a row tile (kpart = warp % ksplit) add up their per-lane partial
// sums v through shared memory, in a fixed order; kpart 0 ends with the total.
// red: [warps of the block][kA * kB][32]. Holds a barrier when ksplit > 1
// (uniform per block): every thread of the block must call it.
template <int kA, int kB>
__device__ __forceinline__ void ksplit_sum(float (&v)[kA][kB], float (*red)[kA * kB][32], int ksplit, int kpart) {
  if (ksplit == 1) return;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int a = 0; a < kA; ++a)
#pragma unroll
    for (int b = 0; b < kB; ++b) red[warp][a * kB + b][lane] = v[a][b];
  __syncthreads();
  if (kpart == 0)
    for (int j = 1; j < ksplit; ++j)
#pragma unroll
      for (int a = 0; a < kA; ++a)
#pragma unroll
        for (int b = 0; b < kB; ++b) v[a][b] += red[warp + j][a * kB + b][lane];
}

// Stores one m16n8 accumulator tile of y[tokens, N] (y[tok * y_stride + row]):
// c[0], c[1] are row row0 + g, tokens tok0 + 2 t4 and + 1; c[2], c[3] row
// row0 + g + 8 (g = lane / 4, t4 = lane % 4). Rows past N and tokens past
// `tokens` are dropped.
template <class T>
__device__ __forceinline__ void store_mma_tile(const float (&c)[4], T* y, int64_t y_stride,
                                               int64_t row0, int64_t tok0, int64_t N,
                                               int64_t tokens) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + g + (i >= 2 ? 8 : 0), tok = tok0 + 2 * t4 + (i & 1);
    if (row < N && tok < tokens) y[tok * y_stride + row] = from_f32<T>(c[i]);
  }
}

}  // namespace tk::cuda
