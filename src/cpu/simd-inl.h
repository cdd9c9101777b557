// The one vectorised load / convert / store layer of the CPU backend, compiled
// once per SIMD target (Highway's foreach_target idiom: this header is included
// again for every target, so it uses a toggling include guard).
//
// Storage types are float, hwy::float16_t and hwy::bfloat16_t; arithmetic is
// always f32. Every kernel loads and stores activations, weights and caches
// through Load / Store / LoadPartial / StorePartial below, never by hand.
#if defined(TK_CPU_SIMD_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef TK_CPU_SIMD_INL_H_
#undef TK_CPU_SIMD_INL_H_
#else
#define TK_CPU_SIMD_INL_H_
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/dtype.h"
#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"

namespace tk::cpu {
// Whether the CPU has AVX512_BF16 (cpu_backend.cpp; false off x86).
extern const bool kCpuHasAvx512Bf16;
}  // namespace tk::cpu

HWY_BEFORE_NAMESPACE();
namespace tk::cpu::HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;
using f16 = hwy::float16_t;
using bf16 = hwy::bfloat16_t;
using DF = hn::ScalableTag<float>;
using VF = hn::Vec<DF>;

// Hardware f16 <-> f32 conversion (round to nearest even, Inf/NaN kept): F16C
// on x86 from AVX2 up, native on NEON. Highway 1.0.3's emulation elsewhere
// truncates, so those targets convert lane by lane with core/dtype.h instead.
#if (HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2) || (HWY_ARCH_ARM_A64 && HWY_TARGET == HWY_NEON)
constexpr bool kNativeF16 = true;
#else
constexpr bool kNativeF16 = false;
#endif

// The widest vector of any target here, in floats: bounds the stack buffers
// that hold partial vectors.
constexpr size_t kMaxLanes = HWY_MAX_BYTES / sizeof(float);

template <class T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T the storage type of `dtype`. The switch that turns
// a runtime dtype into a template argument, in one place.
template <class F>
HWY_INLINE void VisitDtype(tk_dtype dtype, const F& f) {
  switch (dtype) {
    case TK_F32: f(Tag<float>{}); break;
    case TK_F16: f(Tag<f16>{}); break;
    case TK_BF16: f(Tag<bf16>{}); break;
  }
}

HWY_INLINE uint16_t Bits16(const void* p) {
  uint16_t u;
  std::memcpy(&u, p, 2);
  return u;
}

// ---------------------------------------------------------------------------
// Full vectors: Lanes(d) elements at p (no alignment needed).

template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D d, const float* HWY_RESTRICT p) {
  return hn::LoadU(d, p);
}

template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D d, const bf16* HWY_RESTRICT p) {
  const hn::Rebind<bf16, D> dh;
  return hn::PromoteTo(d, hn::LoadU(dh, p));
}

template <class D>
HWY_INLINE hn::Vec<D> LoadF32(D d, const f16* HWY_RESTRICT p) {
  if constexpr (kNativeF16) {
    const hn::Rebind<f16, D> dh;
    return hn::PromoteTo(d, hn::LoadU(dh, p));
  } else {
    alignas(64) float buf[kMaxLanes];
    for (size_t i = 0; i < hn::Lanes(d); ++i) buf[i] = f16_to_f32(Bits16(p + i));
    return hn::Load(d, buf);
  }
}

template <class D>
HWY_INLINE void StoreF32(D d, hn::Vec<D> v, float* HWY_RESTRICT p) {
  hn::StoreU(v, d, p);
}

// f32 -> bf16 bits with round to nearest even (Highway 1.0.3's DemoteTo
// truncates). Where the CPU has AVX512_BF16, one VCVTNEPS2BF16 per vector
// instead of the ten integer ops below, which took bf16 rmsnorm from 0.164 to
// 0.103 ns per element (one Zen 4 core, rows in L1). Highway 1.0.3 has no
// target with the extension, so it is written as asm and taken after the
// CPUID check. It rounds and quiets NaNs as the sequence does, but flushes
// f32 denormals (|v| < 2^-126) to zero.
template <class D>
HWY_INLINE hn::Vec<hn::Rebind<uint16_t, D>> Bf16Bits(D /*d*/, hn::Vec<D> v) {
  const hn::Rebind<uint16_t, D> du16;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3 && (defined(__GNUC__) || defined(__clang__))
  if constexpr (sizeof(v.raw) == 64) {
    if (kCpuHasAvx512Bf16) {
      __m256i h;
      asm("vcvtneps2bf16 %1, %0" : "=v"(h) : "v"(v.raw));
      return hn::Vec<hn::Rebind<uint16_t, D>>{h};
    }
  }
#endif
  const hn::RebindToUnsigned<D> du;
  const hn::RebindToSigned<D> di;
  const auto bits = hn::BitCast(du, v);
  const auto lsb = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1));
  const auto rounded = hn::ShiftRight<16>(hn::Add(bits, hn::Add(lsb, hn::Set(du, 0x7fff))));
  const auto quiet = hn::Or(hn::ShiftRight<16>(bits), hn::Set(du, 0x40));
  const auto is_nan = hn::Ne(v, v);
  const auto out = hn::IfThenElse(hn::RebindMask(du, is_nan), quiet, rounded);
  return hn::DemoteTo(du16, hn::BitCast(di, out));
}

template <class D>
HWY_INLINE void StoreF32(D d, hn::Vec<D> v, bf16* HWY_RESTRICT p) {
  hn::StoreU(Bf16Bits(d, v), hn::Rebind<uint16_t, D>(), reinterpret_cast<uint16_t*>(p));
}

template <class D>
HWY_INLINE void StoreF32(D d, hn::Vec<D> v, f16* HWY_RESTRICT p) {
  if constexpr (kNativeF16) {
    const hn::Rebind<f16, D> dh;
    hn::StoreU(hn::DemoteTo(dh, v), dh, p);
  } else {
    alignas(64) float buf[kMaxLanes];
    hn::Store(v, d, buf);
    for (size_t i = 0; i < hn::Lanes(d); ++i) {
      const uint16_t h = f32_to_f16(buf[i]);
      std::memcpy(p + i, &h, 2);
    }
  }
}

// Like StoreF32, but a non-temporal store to a p aligned to the stored
// vector: for outputs far larger than the caches, it skips reading each line
// before overwriting it (a third of a copy's traffic). Callers end with
// hwy::FlushStream().
template <class D, class T>
HWY_INLINE void StreamF32(D d, hn::Vec<D> v, T* HWY_RESTRICT p) {
  if constexpr (std::is_same_v<T, float>) {
    hn::Stream(v, d, p);
  } else if constexpr (std::is_same_v<T, f16> && kNativeF16) {
    const hn::Rebind<uint16_t, D> du16;
    hn::Stream(hn::BitCast(du16, hn::DemoteTo(hn::Rebind<f16, D>(), v)), du16,
               reinterpret_cast<uint16_t*>(p));
  } else if constexpr (std::is_same_v<T, bf16>) {
    hn::Stream(Bf16Bits(d, v), hn::Rebind<uint16_t, D>(), reinterpret_cast<uint16_t*>(p));
  } else {
    StoreF32(d, v, p);  // emulated f16: a plain store
  }
}

// Whether a row of T starting at p can take StreamF32 at every whole vector.
template <class T>
HWY_INLINE bool StreamAligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (hn::Lanes(DF()) * sizeof(T)) == 0;
}

// ---------------------------------------------------------------------------
// Partial vectors: the first n < Lanes(d) elements; the other lanes load as 0
// and are never written. Row tails go through these, so no kernel reads or
// writes past the end of a row.

template <class D, class T>
HWY_INLINE hn::Vec<D> LoadF32Partial(D d, const T* HWY_RESTRICT p, size_t n) {
  alignas(64) T buf[kMaxLanes] = {};
  std::memcpy(buf, p, n * sizeof(T));
  return LoadF32(d, buf);
}

template <class D, class T>
HWY_INLINE void StoreF32Partial(D d, hn::Vec<D> v, T* HWY_RESTRICT p, size_t n) {
  alignas(64) T buf[kMaxLanes];
  StoreF32(d, v, buf);
  std::memcpy(p, buf, n * sizeof(T));
}

// ---------------------------------------------------------------------------
// Whole rows.

// dst[0, n) = float(src[0, n)).
template <class T>
HWY_INLINE void RowToF32(const T* HWY_RESTRICT src, float* HWY_RESTRICT dst, size_t n) {
  const DF d;
  const size_t N = hn::Lanes(d);
  size_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(LoadF32(d, src + i), d, dst + i);
  if (i < n) StoreF32Partial(d, LoadF32Partial(d, src + i, n - i), dst + i, n - i);
}

// dst[0, n) = T(src[0, n)), rounded to nearest even.
template <class T>
HWY_INLINE void RowFromF32(const float* HWY_RESTRICT src, T* HWY_RESTRICT dst, size_t n) {
  const DF d;
  const size_t N = hn::Lanes(d);
  size_t i = 0;
  for (; i + N <= n; i += N) StoreF32(d, hn::LoadU(d, src + i), dst + i);
  if (i < n) StoreF32Partial(d, LoadF32Partial(d, src + i, n - i), dst + i, n - i);
}

HWY_INLINE void RowToF32(tk_dtype dtype, const void* src, float* dst, size_t n) {
  VisitDtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    RowToF32(static_cast<const T*>(src), dst, n);
  });
}

HWY_INLINE void RowFromF32(const float* src, tk_dtype dtype, void* dst, size_t n) {
  VisitDtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    RowFromF32(src, static_cast<T*>(dst), n);
  });
}

// Requests the cache line at p into L2 only. On Zen 4 a T0 prefetch (Highway's
// Prefetch) holds one of the L1's few miss buffers until its line arrives,
// which caps two cores well below DRAM bandwidth; T2 requests are tracked by
// L2, which keeps several times more in flight.
HWY_INLINE void PrefetchL2(const void* p) {
#if defined(__GNUC__) || defined(__clang__)
  __builtin_prefetch(p, 0, 1);
#else
  hwy::Prefetch(p);
#endif
}

// ---------------------------------------------------------------------------
// Math.

HWY_INLINE float ReduceSum(DF d, VF v) { return hn::GetLane(hn::SumOfLanes(d, v)); }

// e^x for any x <= 88 (below -87 it returns a value < 1e-37 instead of the
// denormal; callers that need exact zeros mask them).
HWY_INLINE VF ExpClamped(DF d, VF x) { return hn::Exp(d, hn::Max(x, hn::Set(d, -87.0f))); }

// e^x for x in [-87, 88], within 2 ulp, in about 13 instructions (Highway's
// Exp takes twice that and made swiglu compute-bound on 2 cores): x = n ln2 +
// r with ln2 split in two (Cody-Waite), e^r by its Taylor series to r^7
// (|r| <= ln2 / 2), and 2^n built in the exponent bits.
HWY_INLINE VF ExpFast(DF d, VF x) {
  const hn::RebindToSigned<DF> di;
  const VF n = hn::Round(hn::Mul(x, hn::Set(d, 1.44269504088896341f)));
  VF r = hn::NegMulAdd(n, hn::Set(d, 0.693359375f), x);
  r = hn::NegMulAdd(n, hn::Set(d, -2.12194440e-4f), r);
  VF p = hn::Set(d, 1.0f / 5040);
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f / 720));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f / 120));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f / 24));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f / 6));
  p = hn::MulAdd(p, r, hn::Set(d, 0.5f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f));
  p = hn::MulAdd(p, r, hn::Set(d, 1.0f));
  const auto bits = hn::ShiftLeft<23>(hn::Add(hn::ConvertTo(di, n), hn::Set(di, 127)));
  return hn::Mul(p, hn::BitCast(d, bits));
}

// silu(g) = g / (1 + e^-g). The division is a reciprocal estimate plus one
// Newton step, r (2 - den r), which keeps g = +inf at +inf (den = 1).
// kLowp: for results rounded to f16 / bf16 (2^-11 relative or coarser), where
// the AVX-512 path below drops the Newton step (the 14-bit estimate is off by
// at most 6e-5, an eighth of an f16 ulp) and a polynomial degree.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
// Zen 4 runs 512-bit ops at half rate, and with ExpFast (~23 ops) swiglu f16
// took 13.2 ms against 7.5 ms with silu removed: every op counts. Two
// instructions do the range reduction: e^-g = 2^y with y = -g log2(e),
// VREDUCEPS gives y - floor(y) in [0, 1) (0 for y = +-inf) and VSCALEFPS
// multiplies by 2^floor(y), saturating to 0 / inf without the clamps and the
// exponent arithmetic of a bit-built 2^n. The f32 rounding of y bounds the
// relative error: 1e-6 for g >= -15, 4e-6 below (1.4e-4 with kLowp). The f32
// path floors g at -80 so that den and its reciprocal stay normal floats for
// its Newton step (den = inf would give inf * 0): silu(-inf) is -1e-33, not
// NaN; NaN g propagates (VMAXPS returns its second operand when one is NaN).
// kLowp skips the floor (one op of ~12 per vector): below g = -88.7, 2^y
// saturates to inf, the reciprocal to 0 and silu to -0, and g = -inf gives
// NaN, as the reference's g / (1 + e^-g) does.
// 2^f for f in [0, 1): minimax fits of the relative error, 1.2e-7 (degree 5)
// and 7.5e-5 (degree 3, kLowp: with the 14-bit reciprocal's 6.1e-5, silu
// stays within 1.4e-4, under half an f16 ulp, 2.4e-4; one FMA less than
// degree 4 took swiglu f16 from 0.240 to 0.218 ns per element on one Zen 4
// core with the floor dropped too).
template <bool kLowp = false>
HWY_INLINE VF Pow2Unit(DF d, VF f) {
  VF p;
  if constexpr (kLowp) {
    p = hn::Set(d, 7.802452147e-02f);
    p = hn::MulAdd(p, f, hn::Set(d, 2.260671556e-01f));
    p = hn::MulAdd(p, f, hn::Set(d, 6.958335638e-01f));
    p = hn::MulAdd(p, f, hn::Set(d, 9.999251962e-01f));
  } else {
    p = hn::Set(d, 1.893754e-3f);
    p = hn::MulAdd(p, f, hn::Set(d, 8.9495908e-3f));
    p = hn::MulAdd(p, f, hn::Set(d, 5.5860337e-2f));
    p = hn::MulAdd(p, f, hn::Set(d, 0.24014182f));
    p = hn::MulAdd(p, f, hn::Set(d, 0.69315451f));
    p = hn::MulAdd(p, f, hn::Set(d, 0.99999988f));
  }
  return p;
}

// 2^y = 2^(y - floor y) * 2^floor(y): VREDUCEPS gives the fraction (0 for
// y = +-inf), VSCALEFPS the power, saturating to 0 / inf.
template <bool kLowp = false>
HWY_INLINE VF Pow2(DF d, VF y) {
  const VF f{_mm512_reduce_ps(y.raw, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)};
  return VF{_mm512_scalef_ps(Pow2Unit<kLowp>(d, f).raw, y.raw)};
}

template <bool kLowp = false>
HWY_INLINE VF Silu(DF d, VF g) {
  const VF gc = kLowp ? g : VF{_mm512_max_ps(hn::Set(d, -80.0f).raw, g.raw)};
  const VF y = hn::Mul(gc, hn::Set(d, -1.44269504088896341f));
  const VF den = hn::Add(hn::Set(d, 1.0f), Pow2<kLowp>(d, y));
  const VF r = hn::ApproximateReciprocal(den);
  if constexpr (kLowp) return hn::Mul(gc, r);
  return hn::Mul(hn::Mul(gc, r), hn::NegMulAdd(den, r, hn::Set(d, 2.0f)));
}

// e^x for x <= 0 (e^-inf = 0, NaN stays NaN): the softmax weights of
// attention, in 8 instructions. Other targets: ExpFast, where e^x below -87
// is 1e-37 instead of a denormal.
HWY_INLINE VF ExpNonPositive(DF d, VF x) { return Pow2(d, hn::Mul(x, hn::Set(d, 1.44269504088896341f))); }
#else
HWY_INLINE VF ExpNonPositive(DF d, VF x) { return ExpFast(d, hn::Max(x, hn::Set(d, -87.0f))); }

// e^-g clamped to [e^-87, e^88] (very negative g gives -0 to within 1e-36).
template <bool kLowp = false>
HWY_INLINE VF Silu(DF d, VF g) {
  const VF e = ExpFast(d, hn::Clamp(hn::Neg(g), hn::Set(d, -87.0f), hn::Set(d, 88.0f)));
  const VF den = hn::Add(hn::Set(d, 1.0f), e);
  const VF r = hn::ApproximateReciprocal(den);
  return hn::Mul(g, hn::Mul(r, hn::NegMulAdd(den, r, hn::Set(d, 2.0f))));
}
#endif

// Dot product of two f32 rows of n elements.
HWY_INLINE float DotF32(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b, size_t n) {
  const DF d;
  const size_t N = hn::Lanes(d);
  VF s0 = hn::Zero(d), s1 = hn::Zero(d);
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(d, a + i + N), hn::LoadU(d, b + i + N), s1);
  }
  for (; i + N <= n; i += N) s0 = hn::MulAdd(hn::LoadU(d, a + i), hn::LoadU(d, b + i), s0);
  if (i < n) s1 = hn::MulAdd(LoadF32Partial(d, a + i, n - i), LoadF32Partial(d, b + i, n - i), s1);
  return ReduceSum(d, hn::Add(s0, s1));
}

// Sum of squares of a row of T.
template <class T>
HWY_INLINE float SumSquares(const T* HWY_RESTRICT x, size_t n) {
  const DF d;
  const size_t N = hn::Lanes(d);
  VF s0 = hn::Zero(d), s1 = hn::Zero(d);
  size_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    const VF a = LoadF32(d, x + i), b = LoadF32(d, x + i + N);
    s0 = hn::MulAdd(a, a, s0);
    s1 = hn::MulAdd(b, b, s1);
  }
  for (; i + N <= n; i += N) {
    const VF a = LoadF32(d, x + i);
    s0 = hn::MulAdd(a, a, s0);
  }
  if (i < n) {
    const VF a = LoadF32Partial(d, x + i, n - i);
    s1 = hn::MulAdd(a, a, s1);
  }
  return ReduceSum(d, hn::Add(s0, s1));
}

// h[0, n) = x * inv_rms * w, in f32: the normalised row that fused ops feed
// straight into their projections (never rounded to the activation dtype).
template <class T>
HWY_INLINE void NormRowF32(const T* HWY_RESTRICT x, const T* HWY_RESTRICT w, float inv_rms,
                           float* HWY_RESTRICT h, size_t n) {
  const DF d;
  const size_t N = hn::Lanes(d);
  const VF inv = hn::Set(d, inv_rms);
  size_t i = 0;
  for (; i + N <= n; i += N)
    hn::StoreU(hn::Mul(hn::Mul(LoadF32(d, x + i), inv), LoadF32(d, w + i)), d, h + i);
  if (i < n) {
    const VF v = hn::Mul(hn::Mul(LoadF32Partial(d, x + i, n - i), inv), LoadF32Partial(d, w + i, n - i));
    StoreF32Partial(d, v, h + i, n - i);
  }
}

HWY_INLINE float InvRms(float sum_squares, size_t n, float eps) {
  return 1.0f / std::sqrt(sum_squares / float(n) + eps);
}

// Rotates the first rot_dim elements of one head in place (both pairings).
// cos_row / sin_row: the table rows of this position, rot_dim/2 each.
// GPT-J pairs are adjacent, so its rotation needs the table duplicated per
// pair: gptj_cos / gptj_sin hold (c0, c0, c1, c1, ...) and (-s0, s0, -s1, s1,
// ...), built once per token by GptjTables and shared by all its heads.
template <class T>
HWY_INLINE void RopeHead(T* HWY_RESTRICT head, bool neox, size_t rot_dim,
                         const float* HWY_RESTRICT cos_row, const float* HWY_RESTRICT sin_row,
                         const float* HWY_RESTRICT gptj_cos, const float* HWY_RESTRICT gptj_sin) {
  const DF d;
  const size_t N = hn::Lanes(d);
  if (neox) {
    const size_t half = rot_dim / 2;
    T* HWY_RESTRICT a = head;
    T* HWY_RESTRICT b = head + half;
    for (size_t i = 0; i < half; i += N) {
      const size_t n = half - i < N ? half - i : N;
      const VF x0 = n == N ? LoadF32(d, a + i) : LoadF32Partial(d, a + i, n);
      const VF x1 = n == N ? LoadF32(d, b + i) : LoadF32Partial(d, b + i, n);
      const VF c = n == N ? hn::LoadU(d, cos_row + i) : LoadF32Partial(d, cos_row + i, n);
      const VF s = n == N ? hn::LoadU(d, sin_row + i) : LoadF32Partial(d, sin_row + i, n);
      const VF y0 = hn::NegMulAdd(x1, s, hn::Mul(x0, c));
      const VF y1 = hn::MulAdd(x1, c, hn::Mul(x0, s));
      if (n == N) {
        StoreF32(d, y0, a + i);
        StoreF32(d, y1, b + i);
      } else {
        StoreF32Partial(d, y0, a + i, n);
        StoreF32Partial(d, y1, b + i, n);
      }
    }
  } else if (N < 2) {
    // One-lane target: no pair to swap within a vector.
    for (size_t i = 0; i < rot_dim; i += 2) {
      const float x0 = hn::GetLane(LoadF32(d, head + i)), x1 = hn::GetLane(LoadF32(d, head + i + 1));
      const float c = gptj_cos[i], s = gptj_sin[i + 1];
      StoreF32(d, hn::Set(d, x0 * c - x1 * s), head + i);
      StoreF32(d, hn::Set(d, x0 * s + x1 * c), head + i + 1);
    }
  } else {
    for (size_t i = 0; i < rot_dim; i += N) {
      const size_t n = rot_dim - i < N ? rot_dim - i : N;
      const VF x = n == N ? LoadF32(d, head + i) : LoadF32Partial(d, head + i, n);
      const VF c = n == N ? hn::LoadU(d, gptj_cos + i) : LoadF32Partial(d, gptj_cos + i, n);
      const VF s = n == N ? hn::LoadU(d, gptj_sin + i) : LoadF32Partial(d, gptj_sin + i, n);
      const VF y = hn::MulAdd(hn::Reverse2(d, x), s, hn::Mul(x, c));
      if (n == N) StoreF32(d, y, head + i);
      else StoreF32Partial(d, y, head + i, n);
    }
  }
}

HWY_INLINE void GptjTables(const float* cos_row, const float* sin_row, size_t rot_dim,
                           float* gptj_cos, float* gptj_sin) {
  for (size_t i = 0; i < rot_dim / 2; ++i) {
    gptj_cos[2 * i] = gptj_cos[2 * i + 1] = cos_row[i];
    gptj_sin[2 * i] = -sin_row[i];
    gptj_sin[2 * i + 1] = sin_row[i];
  }
}

}  // namespace tk::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard toggle
