// CPU projections: dense matmul, int4 matmul, the fused FFN front and the fused
// attention front. All of them are x[T, K] . W[N, K]^T with T small (decode):
// the weights stream from memory exactly once, the activations (staged once
// per call as f32 rows) stay in L1/L2, and threads split the N output rows.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/matmul.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <cmath>
#include <cstring>
#include <limits>

#include "cpu/kernels.h"
#include "cpu/simd-inl.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace tk::cpu::HWY_NAMESPACE {
namespace {

// Tokens per register block. A block keeps kRows x kTokens accumulators plus
// kRows weight vectors live: 4 x 4 + 4 fits AVX-512's and NEON's 32 vector
// registers; AVX2 has 16, so it takes 2 tokens at a time.
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr int kTokens = 2;
#else
constexpr int kTokens = 4;
#endif
constexpr int kRows = 4;
// Output rows per task: a multiple of kRows, small enough that T x kBlock f32
// outputs stay in L1 and that 14336 rows split into many tasks for balance.
constexpr int64_t kBlock = 64;
// Tokens per pass over a row block (prefill): 32 staged f32 rows of K = 4096
// are 512 KB, which stay in L2 beside the block's weight rows while every
// row block walks over them, instead of streaming all of x once per 4 rows.
constexpr int64_t kTokenChunk = 32;
// Software prefetch distance in weight streams, requested into L2 (PrefetchL2:
// L1 requests capped the f16 matvec at ~3.9 ms, the int4 fused FFN at ~6.2
// ms, on Zen 4): 4 to 16 KB ahead measured within noise of each other.
constexpr int64_t kPrefetchBytes = 4096;

size_t RoundUpLanes(size_t n) {
  const size_t N = hn::Lanes(DF());
  return (n + N - 1) / N * N;
}

// Activations as f32 rows padded with zeros to whole vectors, so the inner
// loops never need a partial load of x.
struct Staged {
  const float* x;
  size_t stride;  // >= K, a multiple of the vector length
  int64_t T;
};

template <class T>
const T* RowPtr(const void* base, int64_t r, int64_t stride) {
  return static_cast<const T*>(base) + r * stride;
}

Staged StageRows(tk_dtype dtype, const void* x, int64_t x_stride, int64_t T, int64_t K,
                 ScratchSlot slot) {
  const size_t stride = RoundUpLanes(size_t(K));
  float* xs = scratch<float>(slot, size_t(T) * stride);
  const size_t es = dtype_size(dtype);
  for (int64_t t = 0; t < T; ++t) {
    float* r = xs + size_t(t) * stride;
    RowToF32(dtype, static_cast<const char*>(x) + t * x_stride * int64_t(es), r, size_t(K));
    for (size_t k = size_t(K); k < stride; ++k) r[k] = 0.0f;
  }
  return {xs, stride, T};
}

// h[t] = rmsnorm(x[t]) * norm_weight, f32, staged like StageRows.
Staged StageNormRows(tk_dtype dtype, const void* x, int64_t x_stride, const void* norm_weight,
                     float eps, int64_t T, int64_t D, ScratchSlot slot) {
  const size_t stride = RoundUpLanes(size_t(D));
  float* hs = scratch<float>(slot, size_t(T) * stride);
  VisitDtype(dtype, [&](auto tag) {
    using TA = typename decltype(tag)::type;
    for (int64_t t = 0; t < T; ++t) {
      const TA* xr = RowPtr<TA>(x, t, x_stride);
      float* h = hs + size_t(t) * stride;
      const float inv = InvRms(SumSquares(xr, size_t(D)), size_t(D), eps);
      NormRowF32(xr, static_cast<const TA*>(norm_weight), inv, h, size_t(D));
      for (size_t k = size_t(D); k < stride; ++k) h[k] = 0.0f;
    }
  });
  return {hs, stride, T};
}

// ---------------------------------------------------------------------------
// Dense rows.

// out[tb][r] = w_r . x_tb for kRows weight rows and TB tokens.
template <int TB, class TW>
HWY_INLINE void DenseBlock(const TW* const* HWY_RESTRICT w, const float* HWY_RESTRICT x,
                           size_t xstride, size_t K, float out[kTokens][kRows]) {
  const DF d;
  const size_t N = hn::Lanes(d);
  VF acc[TB][kRows];
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < kRows; ++r) acc[t][r] = hn::Zero(d);
  size_t k = 0;
  for (; k + N <= K; k += N) {
    VF wv[kRows];
    for (int r = 0; r < kRows; ++r) {
      // Requested 4 KB ahead: two cores only reach DRAM bandwidth with more
      // reads in flight than the hardware prefetcher keeps.
      PrefetchL2(reinterpret_cast<const char*>(w[r] + k) + kPrefetchBytes);
      wv[r] = LoadF32(d, w[r] + k);
    }
    for (int t = 0; t < TB; ++t) {
      const VF xv = hn::LoadU(d, x + size_t(t) * xstride + k);
      for (int r = 0; r < kRows; ++r) acc[t][r] = hn::MulAdd(wv[r], xv, acc[t][r]);
    }
  }
  if (k < K) {
    VF wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = LoadF32Partial(d, w[r] + k, K - k);
    for (int t = 0; t < TB; ++t) {
      const VF xv = hn::LoadU(d, x + size_t(t) * xstride + k);
      for (int r = 0; r < kRows; ++r) acc[t][r] = hn::MulAdd(wv[r], xv, acc[t][r]);
    }
  }
  for (int t = 0; t < TB; ++t)
    for (int r = 0; r < kRows; ++r) out[t][r] = ReduceSum(d, acc[t][r]);
}

// W[n] . x for one token. A single token goes a row at a time, so each thread
// reads one sequential stream instead of four interleaved ones (f16
// [1x4096]->14336 on one Zen 4 core, cold: ~6.0 -> ~5.2 ms); four chains of
// FMAs keep up with that easily.
template <class TW>
HWY_INLINE float DenseRow(const TW* HWY_RESTRICT w, const float* HWY_RESTRICT x, size_t K) {
  const DF d;
  const size_t N = hn::Lanes(d);
  VF acc[4] = {hn::Zero(d), hn::Zero(d), hn::Zero(d), hn::Zero(d)};
  size_t k = 0;
  for (; k + 4 * N <= K; k += 4 * N) {
    PrefetchL2(reinterpret_cast<const char*>(w + k) + kPrefetchBytes);
    for (int u = 0; u < 4; ++u) acc[u] = hn::MulAdd(LoadF32(d, w + k + u * N), hn::LoadU(d, x + k + u * N), acc[u]);
  }
  for (; k + N <= K; k += N) acc[0] = hn::MulAdd(LoadF32(d, w + k), hn::LoadU(d, x + k), acc[0]);
  if (k < K) acc[1] = hn::MulAdd(LoadF32Partial(d, w + k, K - k), hn::LoadU(d, x + k), acc[1]);
  return ReduceSum(d, hn::Add(hn::Add(acc[0], acc[1]), hn::Add(acc[2], acc[3])));
}

// tile[t * ld + (n - n0)] = W[n] . x[t] for n in [n0, n1), every staged token.
template <class TW>
void DenseRows(const TW* w, int64_t w_stride, int64_t K, int64_t n0, int64_t n1, const Staged& a,
               float* tile, size_t ld) {
  if (a.T == 1) {
    for (int64_t n = n0; n < n1; ++n) tile[size_t(n - n0)] = DenseRow(w + n * w_stride, a.x, size_t(K));
    return;
  }
  float out[kTokens][kRows];
  for (int64_t c0 = 0; c0 < a.T; c0 += kTokenChunk)
  for (int64_t n = n0; n < n1; n += kRows) {
    const int rows = int(std::min<int64_t>(kRows, n1 - n));
    const TW* wr[kRows];
    // Missing rows of the last block repeat row n: computed, then dropped.
    for (int r = 0; r < kRows; ++r) wr[r] = w + (n + (r < rows ? r : 0)) * w_stride;
    for (int64_t t0 = c0; t0 < std::min(a.T, c0 + kTokenChunk); t0 += kTokens) {
      const int tb = int(std::min<int64_t>(kTokens, a.T - t0));
      const float* x = a.x + size_t(t0) * a.stride;
      switch (tb) {
        case 1: DenseBlock<1>(wr, x, a.stride, size_t(K), out); break;
        case 2: DenseBlock<2>(wr, x, a.stride, size_t(K), out); break;
#if !(HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3)
        case 3: DenseBlock<3>(wr, x, a.stride, size_t(K), out); break;
        case 4: DenseBlock<4>(wr, x, a.stride, size_t(K), out); break;
#endif
      }
      for (int t = 0; t < tb; ++t)
        for (int r = 0; r < rows; ++r) tile[size_t(t0 + t) * ld + size_t(n - n0 + r)] = out[t][r];
    }
  }
}

// ---------------------------------------------------------------------------
// int4 rows (layout in tiny_kernel.h).
//
// Byte j of a row holds k = 2j (low nibble) and k = 2j + 1 (high nibble), so
// the activations are staged split into even and odd elements: a vector of
// bytes widened to 32-bit lanes then meets x_even in its low nibbles and x_odd
// in its high nibbles, with no shuffles in the inner loop. The zero point is
// applied once per group through the group sum of x:
//   sum_k (q_k - z) x_k = sum_k q_k x_k - z * sum_k x_k.

struct Int4Staged {
  // The VNNI path (AVX3_DL) instead fills `vnni` and leaves the rest null.
  const struct VnniStaged* vnni;
  const float* even;  // [T][K/2]
  const float* odd;   // [T][K/2]
  const float* gsum;  // [T][K/group]
  int64_t T, half, groups;
};

Int4Staged StageInt4Float(const Staged& a, int64_t K, int64_t group, ScratchSlot slot) {
  const int64_t half = K / 2, groups = K / group;
  float* buf = scratch<float>(slot, size_t(a.T) * size_t(2 * half + groups));
  float* even = buf;
  float* odd = buf + a.T * half;
  float* gsum = odd + a.T * half;
  for (int64_t t = 0; t < a.T; ++t) {
    const float* x = a.x + size_t(t) * a.stride;
    for (int64_t j = 0; j < half; ++j) {
      even[t * half + j] = x[2 * j];
      odd[t * half + j] = x[2 * j + 1];
    }
    for (int64_t g = 0; g < groups; ++g) {
      float s = 0.0f;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) s += x[k];
      gsum[t * groups + g] = s;
    }
  }
  return {nullptr, even, odd, gsum, a.T, half, groups};
}

// out[tb] = dequant(W[n]) . x[t0 + tb] for TB tokens.
template <int TB>
HWY_INLINE void Int4Block(const tk_int4_weights& w, int64_t n, const Int4Staged& a, int64_t t0,
                          float* out) {
  const DF d;
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint8_t, DF> d8;
  const size_t N = hn::Lanes(d);
  // A group holds group/2 >= 16 bytes and N <= 16, so groups are whole vectors.
  const int64_t gbytes = w.group_size / 2;
  const uint8_t* q = w.packed + n * a.half;
  VF acc[TB];
  float zterm[TB];
  for (int t = 0; t < TB; ++t) {
    acc[t] = hn::Zero(d);
    zterm[t] = 0.0f;
  }
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t gi = n * a.groups + g;
    const float scale = load_as_f32(w.scale_dtype, w.scales, gi);
    const float zero = float(w.zeros ? w.zeros[gi] : 8);
    VF ga[TB];
    for (int t = 0; t < TB; ++t) ga[t] = hn::Zero(d);
    for (int64_t j = g * gbytes; j < (g + 1) * gbytes; j += int64_t(N)) {
      const auto b = hn::PromoteTo(di, hn::LoadU(d8, q + j));
      const VF lo = hn::ConvertTo(d, hn::And(b, hn::Set(di, 15)));
      const VF hi = hn::ConvertTo(d, hn::ShiftRight<4>(b));
      for (int t = 0; t < TB; ++t) {
        const int64_t row = (t0 + t) * a.half + j;
        ga[t] = hn::MulAdd(lo, hn::LoadU(d, a.even + row), ga[t]);
        ga[t] = hn::MulAdd(hi, hn::LoadU(d, a.odd + row), ga[t]);
      }
    }
    const VF s = hn::Set(d, scale);
    for (int t = 0; t < TB; ++t) {
      acc[t] = hn::MulAdd(ga[t], s, acc[t]);
      zterm[t] += scale * zero * a.gsum[(t0 + t) * a.groups + g];
    }
  }
  for (int t = 0; t < TB; ++t) out[t] = ReduceSum(d, acc[t]) - zterm[t];
}

void Int4RowsFloat(const tk_int4_weights& w, int64_t n0, int64_t n1, const Int4Staged& a, float* tile,
                   size_t ld) {
  float out[kTokens];
  for (int64_t c0 = 0; c0 < a.T; c0 += kTokenChunk)
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t t0 = c0; t0 < std::min(a.T, c0 + kTokenChunk); t0 += kTokens) {
      const int tb = int(std::min<int64_t>(kTokens, a.T - t0));
      switch (tb) {
        case 1: Int4Block<1>(w, n, a, t0, out); break;
        case 2: Int4Block<2>(w, n, a, t0, out); break;
#if !(HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3)
        case 3: Int4Block<3>(w, n, a, t0, out); break;
        case 4: Int4Block<4>(w, n, a, t0, out); break;
#endif
      }
      for (int t = 0; t < tb; ++t) tile[size_t(t0 + t) * ld + size_t(n - n0)] = out[t];
    }
}


#if HWY_TARGET == HWY_AVX3_DL
// int4 x int8 dot products with AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products
// summed into 16 i32 lanes per instruction). The f32 path above needs about
// 40 vector ops per 128 weights and cannot keep up with memory on 2 cores;
// this one needs about 20.
//
// Each activation is written as `levels` int8 digits in base 254 of its
// group's step s = max|x| / 127:  x ~= s * (d1 + d2 / 254 [+ d3 / 254^2]).
// Two digits resolve x to 1.5e-5 of its group's max, far below the rounding
// of f16 / bf16 activations; f32 activations get three (6e-8, f32-grade).
// The digits' dot products are combined exactly in i32 by Horner's rule.
struct VnniStaged {
  const int8_t* digits;     // [T][levels][2][half_pad]: even-k digits, then odd-k
  const float* lane_scale;  // [T][chunks][16]: the unit s / 254^(levels-1) of each lane's group
  const float* chunk_unit;  // [T][chunks]: the same per chunk where a chunk is one group (128), else null
  const float* gsum;        // [T][groups]: sum of the dequantised x over each group
  int64_t half_pad, chunks, groups;
  int levels;
};

constexpr int64_t kChunkBytes = 64;  // packed bytes per vector: 128 weights


Int4Staged StageInt4Vnni(const Staged& a, int64_t K, int64_t group, ScratchSlot slot,
                         int levels) {
  const int64_t half = K / 2, half_pad = (half + kChunkBytes - 1) / kChunkBytes * kChunkBytes;
  const int64_t chunks = half_pad / kChunkBytes, groups = K / group;
  const size_t digit_bytes = size_t(a.T * levels * 2 * half_pad);
  const size_t floats = size_t(a.T * (chunks * 17 + groups));
  char* buf = scratch<char>(slot, sizeof(VnniStaged) + 64 + floats * 4 + digit_bytes);
  VnniStaged* v = reinterpret_cast<VnniStaged*>(buf);
  float* lane_scale = reinterpret_cast<float*>(buf + (sizeof(VnniStaged) + 63) / 64 * 64);
  float* chunk_unit = lane_scale + a.T * chunks * 16;
  float* gsum = chunk_unit + a.T * chunks;
  int8_t* digits = reinterpret_cast<int8_t*>(gsum + a.T * groups);
  std::memset(digits, 0, digit_bytes);
  float* unit_of_group = scratch<float>(kScratchLocal3, size_t(groups));
  for (int64_t t = 0; t < a.T; ++t) {
    const float* x = a.x + size_t(t) * a.stride;
    int8_t* dt = digits + t * levels * 2 * half_pad;
    for (int64_t g = 0; g < groups; ++g) {
      // max |x| of the group, NaN if any element is.
      __m512 amax_v = _mm512_setzero_ps();
      __mmask16 nan = 0;
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        const __m512 xv = _mm512_loadu_ps(x + k);
        nan |= _mm512_cmp_ps_mask(xv, xv, _CMP_UNORD_Q);
        amax_v = _mm512_max_ps(amax_v, _mm512_abs_ps(xv));
      }
      const float amax = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(amax_v);
      // A NaN or Inf in the group poisons its scale, so it reaches the output
      // as NaN instead of vanishing in the integer digits.
      const bool finite = std::isfinite(amax) && !std::isnan(amax);
      const float s1 = finite ? amax / 127.0f : 0.0f;
      float step[3] = {s1, s1 / 254.0f, s1 / (254.0f * 254.0f)};
      // 16 elements at a time (a group is 32 or more): the digits of each
      // level, then their bytes split into even and odd k. The combined
      // digits of a group sum exactly in i32 (at most 128 * 8.2e6).
      __m512i total_v = _mm512_setzero_si512();
      const __m128i split = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
      for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
        __m512 r = finite ? _mm512_loadu_ps(x + k) : _mm512_setzero_ps();
        __m512i combined = _mm512_setzero_si512();
        for (int l = 0; l < levels; ++l) {
          const __m512 sv = _mm512_set1_ps(step[l]);
          const __m512 q = s1 > 0.0f ? _mm512_roundscale_ps(_mm512_div_ps(r, sv), _MM_FROUND_TO_NEAREST_INT)
                                     : _mm512_setzero_ps();
          const __m512 qc = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
          r = _mm512_fnmadd_ps(qc, sv, r);
          const __m512i d = _mm512_cvtps_epi32(qc);
          combined = _mm512_add_epi32(_mm512_mullo_epi32(combined, _mm512_set1_epi32(254)), d);
          const __m128i bytes = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(d), split);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(dt + (l * 2) * half_pad + k / 2), bytes);
          _mm_storeh_pi(reinterpret_cast<__m64*>(dt + (l * 2 + 1) * half_pad + k / 2), _mm_castsi128_ps(bytes));
        }
        total_v = _mm512_add_epi32(total_v, combined);
      }
      const double total = double(_mm512_reduce_add_epi32(total_v));
      const float unit = finite ? step[levels - 1] : std::numeric_limits<float>::quiet_NaN();
      unit_of_group[g] = unit;
      gsum[t * groups + g] = float(total * double(unit));
    }
    for (int64_t c = 0; c < chunks; ++c)
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t k = c * 2 * kChunkBytes + 8 * i;
        lane_scale[(t * chunks + c) * 16 + i] = k < K ? unit_of_group[k / group] : 0.0f;
      }
    for (int64_t c = 0; c < chunks; ++c) chunk_unit[t * chunks + c] = lane_scale[(t * chunks + c) * 16];
  }
  *v = {digits, lane_scale, group == 2 * kChunkBytes ? chunk_unit : nullptr, gsum, half_pad, chunks, groups, levels};
  return {v, nullptr, nullptr, nullptr, a.T, half, groups};
}

// Scales of int4 groups [g, g + count) (count <= 16) as f32, zeros past count.
template <bool kF16>
__attribute__((target("avx512vnni"))) inline __m512 VnniScales(const tk_int4_weights& w, int64_t g,
                                                                 __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(w.scales) + g);
  if constexpr (kF16) return _mm512_cvtph_ps(raw);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// Rows n .. n + R - 1 against tokens t0 .. t0 + TB - 1: out[r * kTokens + t].
// Two rows at a time share every digit load and give the core two
// independent dependency chains per token; at T = 1, four rows (one core,
// weights in L2: 23.5-24.3 -> 21.6-21.9 us for 256 rows of 4096; bench
// [1x4096]->14336 g128 on 2 Zen 4 cores 555-635 -> 517-540 us). Each row
// requests the same bytes of its row in the next block (R rows on) into L2:
// with the distance fixed at two rows, four-row blocks took 0.94-1.01 ms. The loop over whole chunks is
// kept free of masks and branches (scale dtype and the partial last chunk
// are settled outside it): at T = 1 the loop, not memory, set the pace
// (about 95 instructions per two rows and chunk before, 0.91 ms for
// [1x4096]->14336 on two Zen 4 cores).
template <int R, int TB, int LEVELS, bool kF16>
__attribute__((target("avx512vnni"))) void VnniBlockT(const tk_int4_weights& w, int64_t n,
                                                       const Int4Staged& s, int64_t t0, float* out) {
  const VnniStaged& a = *s.vnni;
  const int64_t half = s.half, groups = a.groups;
  const int shift = w.group_size == 32 ? 2 : w.group_size == 64 ? 3 : 4;  // lane i holds k = 8i..8i+7
  const __m512i lane_group =
      _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), shift);
  const int64_t groups_per_chunk = 2 * kChunkBytes / w.group_size;
  const __m512i low4 = _mm512_set1_epi8(0x0f);
  const uint8_t* q[R];
  for (int r = 0; r < R; ++r) q[r] = w.packed + (n + r) * half;
  __m512 acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm512_setzero_ps();
  const int64_t full = half / kChunkBytes;
  const __mmask16 all_groups = __mmask16((1u << groups_per_chunk) - 1u);
  // Chunk c: the nibbles of each row against every token's digits. scale(r,
  // t, l, c) multiplies digit l's dot product into acc[r][t].
  auto chunk = [&](int64_t c, __mmask64 m, const auto& scale) HWY_ATTR {
    const int64_t j0 = c * kChunkBytes;
    __m512i lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      // The rows after this block, requested early: the loop does enough work
      // per byte that the hardware prefetcher alone falls behind (the
      // distance is R rows of K = 4096).
      PrefetchL2(q[r] + j0 + kPrefetchBytes * R / 2);
      const __m512i v = _mm512_maskz_loadu_epi8(m, q[r] + j0);
      lo[r] = _mm512_and_si512(v, low4);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    for (int t = 0; t < TB; ++t) {
      const int8_t* d = a.digits + (t0 + t) * LEVELS * 2 * a.half_pad + j0;
      __m512i dl[LEVELS], dh[LEVELS];
      for (int l = 0; l < LEVELS; ++l) {
        dl[l] = _mm512_loadu_si512(d + 2 * l * a.half_pad);
        dh[l] = _mm512_loadu_si512(d + (2 * l + 1) * a.half_pad);
      }
      for (int r = 0; r < R; ++r)
        for (int l = 0; l < LEVELS; ++l) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[r], dl[l]), hi[r], dh[l]);
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale(r, t, l, c), acc[r][t]);
        }
    }
  };
  // Digit l weighs 254^(LEVELS-1-l) units: each level's dot product goes to
  // f32 on its own (2 instructions) instead of an integer Horner step (4).
  float level_weight[LEVELS];
  for (int l = 0; l < LEVELS; ++l) {
    level_weight[l] = 1.0f;
    for (int e = l + 1; e < LEVELS; ++e) level_weight[l] *= 254.0f;
  }
  if (a.chunk_unit) {
    // A chunk is one group (128): its scales are one number per row, token and
    // digit, worked out 16 chunks at a time and broadcast from memory.
    constexpr int64_t kSeg = 16;
    alignas(64) float sc[R][TB][LEVELS][kSeg];
    for (int64_t c0 = 0; c0 < a.chunks; c0 += kSeg) {
      const int64_t nc = std::min(kSeg, a.chunks - c0);
      const __mmask16 cm = __mmask16((1u << nc) - 1u);
      for (int r = 0; r < R; ++r) {
        const __m512 ws = VnniScales<kF16>(w, (n + r) * groups + c0, cm);
        for (int t = 0; t < TB; ++t) {
          const __m512 u = _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(cm, a.chunk_unit + (t0 + t) * a.chunks + c0));
          for (int l = 0; l < LEVELS; ++l) _mm512_store_ps(sc[r][t][l], _mm512_mul_ps(u, _mm512_set1_ps(level_weight[l])));
        }
      }
      auto scale = [&](int r, int t, int l, int64_t c) HWY_ATTR { return _mm512_set1_ps(sc[r][t][l][c - c0]); };
      const int64_t whole = std::min(c0 + nc, full);
      for (int64_t c = c0; c < whole; ++c) chunk(c, ~__mmask64(0), scale);
      if (whole < c0 + nc) chunk(whole, (__mmask64(1) << (half - full * kChunkBytes)) - 1, scale);
    }
  } else {
    // Several groups per chunk: per-lane scales, the weights' permuted to the
    // lanes of their group.
    __m512 unit[R][TB];
    int64_t at = -1;
    auto scale = [&](int r, int t, int l, int64_t c) HWY_ATTR {
      if (at != c) {
        at = c;
        const int64_t g0 = c * groups_per_chunk, ng = std::min(groups_per_chunk, groups - g0);
        const __mmask16 gm = c < full ? all_groups : __mmask16((1u << ng) - 1u);
        for (int rr = 0; rr < R; ++rr) {
          const __m512 ws = _mm512_permutexvar_ps(lane_group, VnniScales<kF16>(w, (n + rr) * groups + g0, gm));
          for (int tt = 0; tt < TB; ++tt)
            unit[rr][tt] = _mm512_mul_ps(ws, _mm512_loadu_ps(a.lane_scale + ((t0 + tt) * a.chunks + c) * 16));
        }
      }
      return l == LEVELS - 1 ? unit[r][t] : _mm512_mul_ps(unit[r][t], _mm512_set1_ps(level_weight[l]));
    };
    for (int64_t c = 0; c < full; ++c) chunk(c, ~__mmask64(0), scale);
    if (full < a.chunks) chunk(full, (__mmask64(1) << (half - full * kChunkBytes)) - 1, scale);
  }
  // Zero points: sum_g scale_g * zero_g * (sum of x over g), 16 groups at a time.
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) {
      __m512 z = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; g += 16) {
        const int64_t cnt = std::min<int64_t>(16, groups - g);
        const __mmask16 m = __mmask16((1u << cnt) - 1u);
        const int64_t gi = (n + r) * groups + g;
        const __m512 zp = w.zeros ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, w.zeros + gi)))
                                  : _mm512_set1_ps(8.0f);
        const __m512 xs = _mm512_maskz_loadu_ps(m, a.gsum + (t0 + t) * groups + g);
        z = _mm512_fmadd_ps(_mm512_mul_ps(VnniScales<kF16>(w, gi, m), zp), xs, z);
      }
      out[r * kTokens + t] = _mm512_reduce_add_ps(acc[r][t]) - _mm512_reduce_add_ps(z);
    }
}

template <int R, int TB, int LEVELS>
void VnniBlock(const tk_int4_weights& w, int64_t n, const Int4Staged& s, int64_t t0, float* out) {
  if (w.scale_dtype == TK_F16) VnniBlockT<R, TB, LEVELS, true>(w, n, s, t0, out);
  else VnniBlockT<R, TB, LEVELS, false>(w, n, s, t0, out);
}

template <int R, int LEVELS>
void VnniTokens(const tk_int4_weights& w, int64_t n, const Int4Staged& a, int64_t t0, int tb, float* out) {
  switch (tb) {
    case 1: VnniBlock<R, 1, LEVELS>(w, n, a, t0, out); break;
    case 2: VnniBlock<R, 2, LEVELS>(w, n, a, t0, out); break;
    case 3: VnniBlock<R, 3, LEVELS>(w, n, a, t0, out); break;
    case 4: VnniBlock<R, 4, LEVELS>(w, n, a, t0, out); break;
  }
}

template <int LEVELS>
void VnniRows(const tk_int4_weights& w, int64_t n0, int64_t n1, const Int4Staged& a, float* tile,
              size_t ld) {
  float out[4 * kTokens];
  for (int64_t c0 = 0; c0 < a.T; c0 += kTokenChunk)
    for (int64_t n = n0; n < n1;) {
      const int rows = a.T == 1 && n + 3 < n1 ? 4 : n + 1 < n1 ? 2 : 1;
      for (int64_t t0 = c0; t0 < std::min(a.T, c0 + kTokenChunk); t0 += kTokens) {
        const int tb = int(std::min<int64_t>(kTokens, a.T - t0));
        if (rows == 4) VnniBlock<4, 1, LEVELS>(w, n, a, t0, out);
        else if (rows == 2) VnniTokens<2, LEVELS>(w, n, a, t0, tb, out);
        else VnniTokens<1, LEVELS>(w, n, a, t0, tb, out);
        for (int r = 0; r < rows; ++r)
          for (int t = 0; t < tb; ++t) tile[size_t(t0 + t) * ld + size_t(n + r - n0)] = out[r * kTokens + t];
      }
      n += rows;
    }
}
#endif  // HWY_TARGET == HWY_AVX3_DL

// The activations of an int4 product, staged for this target's kernel:
// `dtype` is the caller's activation dtype (it sets the VNNI digit count).
Int4Staged StageInt4(const Staged& a, int64_t K, int64_t group, ScratchSlot slot, tk_dtype dtype) {
#if HWY_TARGET == HWY_AVX3_DL
  return StageInt4Vnni(a, K, group, slot, dtype == TK_F32 ? 3 : 2);
#else
  (void)dtype;
  return StageInt4Float(a, K, group, slot);
#endif
}

void Int4Rows(const tk_int4_weights& w, int64_t n0, int64_t n1, const Int4Staged& a, float* tile,
              size_t ld) {
#if HWY_TARGET == HWY_AVX3_DL
  if (a.vnni) {
    if (a.vnni->levels == 3) VnniRows<3>(w, n0, n1, a, tile, ld);
    else VnniRows<2>(w, n0, n1, a, tile, ld);
    return;
  }
#endif
  Int4RowsFloat(w, n0, n1, a, tile, ld);
}

// ---------------------------------------------------------------------------
// Drivers.

// Runs block(n0, n1, tile) over [0, N) in kBlock pieces spread over the pool;
// tile is a per-thread [T, kBlock] f32 buffer (row stride kBlock).
template <class F>
void ForRowBlocks(ThreadPool& pool, int64_t N, int64_t T, int64_t weight_bytes, ScratchSlot slot,
                  const F& block) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  const int64_t tasks = task_count(pool, blocks, weight_bytes);
  parallel_ranges(pool, blocks, tasks, [&](int64_t b0, int64_t b1, int) {
    float* tile = scratch<float>(slot, size_t(T) * kBlock);
    for (int64_t b = b0; b < b1; ++b)
      block(b * kBlock, std::min(N, (b + 1) * kBlock), tile);
  });
}

template <class F>
void VisitWeights(tk_dtype dtype, const void* w, const F& f) {
  VisitDtype(dtype, [&](auto tag) {
    using TW = typename decltype(tag)::type;
    f(static_cast<const TW*>(w));
  });
}

void StoreTile(const float* tile, int64_t T, int64_t n0, int64_t n1, tk_dtype dtype, void* y,
               int64_t y_stride) {
  const size_t es = dtype_size(dtype);
  for (int64_t t = 0; t < T; ++t)
    RowFromF32(tile + size_t(t) * kBlock, dtype,
               static_cast<char*>(y) + (t * y_stride + n0) * int64_t(es), size_t(n1 - n0));
}

int64_t Int4Bytes(const tk_int4_weights& w) {
  return w.N * (w.K / 2 + (w.K / w.group_size) * (w.zeros ? 3 : 2));
}

// out[t, f] = silu(gate) * up on the [T, kBlock] tiles of rows [n0, n1).
void SwigluTile(const float* gate, float* up, int64_t T, int64_t n0, int64_t n1) {
  const DF d;
  const size_t N = hn::Lanes(d), n = size_t(n1 - n0);
  for (int64_t t = 0; t < T; ++t) {
    const float* g = gate + size_t(t) * kBlock;
    float* u = up + size_t(t) * kBlock;
    size_t i = 0;
    for (; i + N <= n; i += N) hn::StoreU(hn::Mul(Silu(d, hn::LoadU(d, g + i)), hn::LoadU(d, u + i)), d, u + i);
    if (i < n)
      StoreF32Partial(d, hn::Mul(Silu(d, LoadF32Partial(d, g + i, n - i)), LoadF32Partial(d, u + i, n - i)),
                   u + i, n - i);
  }
}

}  // namespace

void Matmul(const tk_matmul_params& p, ThreadPool& pool) {
  if (p.T == 0) return;
  const Staged a = StageRows(p.dtype, p.x, p.x_stride, p.T, p.K, kScratchShared0);
  const int64_t bytes = p.N * p.K * int64_t(dtype_size(p.weight_dtype));
  VisitWeights(p.weight_dtype, p.w, [&](auto w) {
    ForRowBlocks(pool, p.N, p.T, bytes, kScratchLocal0, [&](int64_t n0, int64_t n1, float* tile) {
      DenseRows(w, p.w_stride, p.K, n0, n1, a, tile, kBlock);
      StoreTile(tile, p.T, n0, n1, p.dtype, p.y, p.y_stride);
    });
  });
}

void QmatmulInt4(const tk_qmatmul_int4_params& p, ThreadPool& pool) {
  if (p.T == 0) return;
  const Staged a = StageRows(p.dtype, p.x, p.x_stride, p.T, p.w.K, kScratchShared0);
  const Int4Staged q = StageInt4(a, p.w.K, p.w.group_size, kScratchShared1, p.dtype);
  ForRowBlocks(pool, p.w.N, p.T, Int4Bytes(p.w), kScratchLocal0, [&](int64_t n0, int64_t n1, float* tile) {
    Int4Rows(p.w, n0, n1, q, tile, kBlock);
    StoreTile(tile, p.T, n0, n1, p.dtype, p.y, p.y_stride);
  });
}

// SPLIT: the norm once per token (StageNormRows), then one pass over the
// gate and up rows side by side with silu * up applied to the tiles.
// NAIVE: the seed's lesson kept honest: every output row recomputes the norm
// statistics and the normalised row of its token before its two dot products.
void FusedFfn(const tk_fused_ffn_params& p, ThreadPool& pool) {
  if (p.T == 0) return;
  const bool int4 = p.format == TK_WEIGHTS_INT4;
  const int64_t bytes = int4 ? Int4Bytes(p.q_gate) + Int4Bytes(p.q_up)
                             : 2 * p.F * p.D * int64_t(dtype_size(p.weight_dtype));
  if (p.algo == TK_FUSED_NAIVE) {
    ForRowBlocks(pool, p.F, 1, bytes, kScratchLocal0, [&](int64_t n0, int64_t n1, float* tile) {
      float* gate = scratch<float>(kScratchLocal2, kBlock);
      for (int64_t t = 0; t < p.T; ++t) {
        for (int64_t f = n0; f < n1; ++f) {
          const Staged one = StageNormRows(p.dtype, RowPtr<char>(p.x, t, p.x_stride * int64_t(dtype_size(p.dtype))),
                                           0, p.norm_weight, p.eps, 1, p.D, kScratchLocal1);
          if (int4) {
            const Int4Staged q = StageInt4(one, p.D, p.q_gate.group_size, kScratchLocal4, p.dtype);
            Int4Rows(p.q_gate, f, f + 1, q, gate + (f - n0), 0);
            if (p.q_up.group_size != p.q_gate.group_size) {
              const Int4Staged qu = StageInt4(one, p.D, p.q_up.group_size, kScratchLocal4, p.dtype);
              Int4Rows(p.q_up, f, f + 1, qu, tile + (f - n0), 0);
            } else {
              Int4Rows(p.q_up, f, f + 1, q, tile + (f - n0), 0);
            }
          } else {
            VisitWeights(p.weight_dtype, p.w_gate, [&](auto wg) {
              using TW = std::remove_cv_t<std::remove_pointer_t<decltype(wg)>>;
              DenseRows(wg, p.w_gate_stride, p.D, f, f + 1, one, gate + (f - n0), 0);
              DenseRows(static_cast<const TW*>(p.w_up), p.w_up_stride, p.D, f, f + 1, one,
                        tile + (f - n0), 0);
            });
          }
        }
        SwigluTile(gate, tile, 1, n0, n1);
        StoreTile(tile, 1, n0, n1, p.dtype,
                  static_cast<char*>(p.out) + t * p.out_stride * int64_t(dtype_size(p.dtype)), 0);
      }
    });
    return;
  }
  const Staged h = StageNormRows(p.dtype, p.x, p.x_stride, p.norm_weight, p.eps, p.T, p.D,
                                 kScratchShared0);
  if (int4) {
    const Int4Staged qg = StageInt4(h, p.D, p.q_gate.group_size, kScratchShared1, p.dtype);
    const Int4Staged qu = p.q_up.group_size == p.q_gate.group_size
                              ? qg
                              : StageInt4(h, p.D, p.q_up.group_size, kScratchShared2, p.dtype);
    ForRowBlocks(pool, p.F, p.T, bytes, kScratchLocal0, [&](int64_t n0, int64_t n1, float* tile) {
      float* gate = scratch<float>(kScratchLocal1, size_t(p.T) * kBlock);
      Int4Rows(p.q_gate, n0, n1, qg, gate, kBlock);
      Int4Rows(p.q_up, n0, n1, qu, tile, kBlock);
      SwigluTile(gate, tile, p.T, n0, n1);
      StoreTile(tile, p.T, n0, n1, p.dtype, p.out, p.out_stride);
    });
    return;
  }
  VisitWeights(p.weight_dtype, p.w_gate, [&](auto wg) {
    using TW = std::remove_cv_t<std::remove_pointer_t<decltype(wg)>>;
    const TW* wu = static_cast<const TW*>(p.w_up);
    ForRowBlocks(pool, p.F, p.T, bytes, kScratchLocal0, [&](int64_t n0, int64_t n1, float* tile) {
      float* gate = scratch<float>(kScratchLocal1, size_t(p.T) * kBlock);
      DenseRows(wg, p.w_gate_stride, p.D, n0, n1, h, gate, kBlock);
      DenseRows(wu, p.w_up_stride, p.D, n0, n1, h, tile, kBlock);
      SwigluTile(gate, tile, p.T, n0, n1);
      StoreTile(tile, p.T, n0, n1, p.dtype, p.out, p.out_stride);
    });
  });
}

// rmsnorm -> one projection to f32 [T, (Hq + 2 Hkv) Dh] -> rope in f32 -> a
// single rounding on the way to q_out and the cache.
void AttnFront(const tk_attn_front_params& p, ThreadPool& pool) {
  if (p.T == 0) return;
  const tk_paged_kv_cache& c = p.cache;
  const int64_t hq = p.num_q_heads, hkv = c.num_kv_heads, dh = c.head_dim;
  const int64_t rows = (hq + 2 * hkv) * dh;
  const Staged h = StageNormRows(p.dtype, p.x, p.x_stride, p.norm_weight, p.eps, p.T, p.D,
                                 kScratchShared0);
  float* qkv = scratch<float>(kScratchShared1, size_t(p.T * rows));
  const int64_t bytes = rows * p.D * int64_t(dtype_size(p.dtype));
  VisitWeights(p.dtype, p.w_qkv, [&](auto w) {
    ForRowBlocks(pool, rows, p.T, bytes, kScratchLocal0, [&](int64_t n0, int64_t n1, float*) {
      DenseRows(w, p.w_qkv_stride, p.D, n0, n1, h, qkv + n0, size_t(rows));
    });
  });
  const size_t rot = size_t(p.rot_dim), half = rot / 2, es = dtype_size(p.dtype);
  const bool neox = p.rope_style == TK_ROPE_NEOX;
  parallel_ranges(pool, p.T, task_count(pool, p.T, p.T * rows * 8), [&](int64_t t0, int64_t t1, int) {
    float* gptj = scratch<float>(kScratchLocal1, 2 * rot);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t pos = p.positions[t];
      const float* cs = p.cos_table + pos * int64_t(half);
      const float* sn = p.sin_table + pos * int64_t(half);
      if (!neox) GptjTables(cs, sn, rot, gptj, gptj + rot);
      float* r = qkv + t * rows;
      for (int64_t head = 0; head < hq + hkv; ++head)  // q heads, then k heads
        RopeHead(r + head * dh, neox, rot, cs, sn, gptj, gptj + rot);
      RowFromF32(r, p.dtype, static_cast<char*>(p.q_out) + t * hq * dh * int64_t(es), size_t(hq * dh));
      const int64_t block = c.block_table[int64_t(p.seq_ids[t]) * c.max_blocks_per_seq + pos / c.page_size];
      const int64_t slot = (block * c.page_size + pos % c.page_size) * hkv * dh;
      RowFromF32(r + hq * dh, p.dtype, static_cast<char*>(c.k) + slot * int64_t(es), size_t(hkv * dh));
      RowFromF32(r + (hq + hkv) * dh, p.dtype, static_cast<char*>(c.v) + slot * int64_t(es),
                 size_t(hkv * dh));
    }
  });
}

}  // namespace tk::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tk::cpu {
HWY_EXPORT(Matmul);
HWY_EXPORT(QmatmulInt4);
HWY_EXPORT(FusedFfn);
HWY_EXPORT(AttnFront);
void matmul(const tk_matmul_params& p, ThreadPool& pool) { HWY_DYNAMIC_DISPATCH(Matmul)(p, pool); }
void qmatmul_int4(const tk_qmatmul_int4_params& p, ThreadPool& pool) {
  HWY_DYNAMIC_DISPATCH(QmatmulInt4)(p, pool);
}
void fused_ffn(const tk_fused_ffn_params& p, ThreadPool& pool) { HWY_DYNAMIC_DISPATCH(FusedFfn)(p, pool); }
void attn_front(const tk_attn_front_params& p, ThreadPool& pool) { HWY_DYNAMIC_DISPATCH(AttnFront)(p, pool); }
}  // namespace tk::cpu
#endif
