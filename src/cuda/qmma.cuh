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

// Word w of a 16-byte chunk -> 4 pairs (codes i, i + 4) - zero, i = 0..3, as
// packed f16/bf16 pairs. zz: (bias + zero) in both halves.
template <class Ta>
__device__ __forceinline__ void qmma_dequant_word(uint32_t word, uint32_t zz, uint32_t (&out)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
    out[i] = QmmaType<Ta>::sub2(((word >> (4 * i)) & 0x000F000Fu) | QmmaType<Ta>::kMagic, zz);
}

// B fragments of one token for one lane's 32 k (X: the 32 activations as 16
// packed pairs, X[m] = x[2m], x[2m + 1]): mma j = 2w + h gets
// b0 = (x[8w + 2h], x[8w + 2h + 4]), b1 = (x[8w + 2h + 1], x[8w + 2h + 5]).
__device__ __forceinline__ void qmma_b_frags(const uint32_t (&X)[16], uint32_t (&b)[8][2]) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int w = j / 2, h = j % 2;
    const uint32_t xa = X[4 * w + h], xb = X[4 * w + h + 2];
    b[j][0] = __byte_perm(xa, xb, 0x5410);
    b[j][1] = __byte_perm(xa, xb, 0x7632);
  }
}

__device__ __forceinline__ float qmma_scale(const uint16_t* s, int64_t i, bool bf16) {
  const uint16_t b = s[i];
  return bf16 ? __uint_as_float(uint32_t(b) << 16) : __half2float(__ushort_as_half(b));
}

}  // namespace tk::cuda
