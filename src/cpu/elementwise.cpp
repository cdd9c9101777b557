// CPU rmsnorm (+ residual), rope and swiglu: memory-bound row kernels.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/elementwise.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include "cpu/kernels.h"
#include "cpu/simd-inl.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace tk::cpu::HWY_NAMESPACE {
namespace {

// Outputs of at least this many bytes are written with non-temporal stores:
// they cannot stay cached for the next op anyway (half a 32 MB LLC), and a
// plain store reads every line before overwriting it.
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <class T>
T* row(const void* base, int64_t r, int64_t stride) {
  return const_cast<T*>(static_cast<const T*>(base)) + r * stride;
}

// Requests the row of n elements at p into L2, one line per call, spread over
// the n / Lanes iterations of a pass: call with i = 0, N, 2N, ... .
template <class T>
HWY_INLINE void PrefetchRowStep(const T* p, size_t i) {
  if ((i * sizeof(T)) % 64 == 0) PrefetchL2(p + i);
}

// y = rmsnorm(x) * w, or with a residual: r <- round(x + r), y = rmsnorm(r) * w.
// The second pass re-reads the row from L1/L2, not from memory, so on its own
// it leaves DRAM reads idle while it writes: with prefetch_next (every row of
// a task but its last) it requests the next row of x (and of the residual)
// into L2 as it goes, which keeps reads and writes overlapped. f16
// [16384x8192] on 2 Zen 4 cores: 13.0 -> 8.9 ms in the bench (medians, runs
// side by side); a prefetch distance inside the row instead, or summing the
// next row's squares in the same loop, were slower than neither in a
// stand-alone loop (15.5-15.9 against 13.4-14.1 ms).
//
// wf is the weight row, of T or (plain rmsnorm in f16 / bf16) in f32,
// converted once per task by the caller instead of once per row. On Zen 4
// with memory at its fast rate (copy roof ~90 GB/s) rmsnorm f16 is
// compute-bound, as fast with its rows in L2 as in memory (0.128 ns per
// element on one core), and the weight's conversion is a quarter of its
// conversions: 0.128 -> 0.111 ns per element (rows of 4096 in L2, one core);
// bench, 2 cores, runs side by side at copy roof 86-92 GB/s: [4096x4096]
// 1.13-1.15 -> 0.94-0.98 ms, [16384x8192] 8.94-9.01 -> 8.19-8.79 ms.
// With the residual the f32 weight is not used: it took 0.215 -> 0.197 ns
// per element in L2, but in memory 1.95-2.27 -> 1.94-2.41 ms (fast memory)
// and 2.14-2.42 -> 2.34-2.55 ms (slow): x, r, y and a 16 KB f32 weight no
// longer fit the 32 KB L1 together. Keeping the first pass's f32 values in
// a per-thread row for the second pass instead of converting them again was
// slower too (0.209 ns with the residual, 64-byte stores to L1/L2). Measured
// again with x + r as an FMA (off the add pipes that Zen 4's conversions
// share): 0.213 -> 0.189 ns per element in L2 and 1.86 -> 1.69-1.80 ms in
// the bench's in-cache column, but the row itself, from memory, went from
// 2.23-2.47 to 2.38-2.88 ms (four alternating runs each); the FMA alone
// changed neither beyond noise.
template <class T, class W>
void RmsNormRow(const tk_rmsnorm_params& p, int64_t t, const W* HWY_RESTRICT wf, bool stream,
                bool prefetch_next) {
  const DF d;
  const size_t N = hn::Lanes(d), n = size_t(p.dim);
  const T* x = row<T>(p.x, t, p.x_stride);
  T* y = row<T>(p.y, t, p.y_stride);
  const T* h = x;
  float ss;
  if (p.residual) {
    T* r = row<T>(p.residual, t, p.residual_stride);
    VF acc = hn::Zero(d);
    size_t i = 0;
    // The norm is of h as stored (rounded to T), so it is read back after the store.
    for (; i + N <= n; i += N) {
      StoreF32(d, hn::Add(LoadF32(d, x + i), LoadF32(d, r + i)), r + i);
      const VF v = LoadF32(d, r + i);
      acc = hn::MulAdd(v, v, acc);
    }
    if (i < n) {
      StoreF32Partial(d, hn::Add(LoadF32Partial(d, x + i, n - i), LoadF32Partial(d, r + i, n - i)), r + i,
                   n - i);
      const VF v = LoadF32Partial(d, r + i, n - i);
      acc = hn::MulAdd(v, v, acc);
    }
    ss = ReduceSum(d, acc);
    h = r;
  } else {
    ss = SumSquares(x, n);
  }
  const VF inv = hn::Set(d, InvRms(ss, n, p.eps));
  const T* nx = prefetch_next ? row<T>(p.x, t + 1, p.x_stride) : nullptr;
  const T* nr = prefetch_next && p.residual ? row<T>(p.residual, t + 1, p.residual_stride) : nullptr;
  const auto out = [&](size_t i) {
    if (nx) PrefetchRowStep(nx, i);
    if (nr) PrefetchRowStep(nr, i);
    return hn::Mul(hn::Mul(LoadF32(d, h + i), inv), LoadF32(d, wf + i));
  };
  size_t i = 0;
  if (stream && StreamAligned(y)) {
    for (; i + N <= n; i += N) StreamF32(d, out(i), y + i);
  }
  for (; i + N <= n; i += N) StoreF32(d, out(i), y + i);
  if (i < n) {
    const VF v = hn::Mul(hn::Mul(LoadF32Partial(d, h + i, n - i), inv), LoadF32Partial(d, wf + i, n - i));
    StoreF32Partial(d, v, y + i, n - i);
  }
}

}  // namespace

void RmsNorm(const tk_rmsnorm_params& p, ThreadPool& pool) {
  const int64_t out_bytes = p.rows * p.dim * int64_t(dtype_size(p.dtype));
  const int64_t bytes = out_bytes * (p.residual ? 4 : 2);
  const bool stream = out_bytes >= kStreamBytes;
  VisitDtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    parallel_ranges(pool, p.rows, task_count(pool, p.rows, bytes), [&](int64_t t0, int64_t t1, int) {
      const T* w = static_cast<const T*>(p.weight);
      if (std::is_same_v<T, float> || p.residual) {
        for (int64_t t = t0; t < t1; ++t) RmsNormRow<T>(p, t, w, stream, t + 1 < t1);
      } else {
        // The weight row in f32, converted once per task.
        float* wf = scratch<float>(kScratchLocal0, size_t(p.dim));
        RowToF32(w, wf, size_t(p.dim));
        for (int64_t t = t0; t < t1; ++t) RmsNormRow<T>(p, t, wf, stream, t + 1 < t1);
      }
      if (stream) hwy::FlushStream();
    });
  });
}

void Rope(const tk_rope_params& p, ThreadPool& pool) {
  const bool neox = p.style == TK_ROPE_NEOX;
  const size_t rot = size_t(p.rot_dim), half = rot / 2;
  const int64_t heads = p.num_q_heads + (p.k ? p.num_k_heads : 0);
  const int64_t bytes = p.tokens * heads * p.rot_dim * int64_t(dtype_size(p.dtype)) * 2;
  VisitDtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    parallel_ranges(pool, p.tokens, task_count(pool, p.tokens, bytes), [&](int64_t t0, int64_t t1, int) {
      float* gptj = scratch<float>(kScratchLocal0, 2 * rot);
      for (int64_t t = t0; t < t1; ++t) {
        const float* c = p.cos_table + int64_t(p.positions[t]) * int64_t(half);
        const float* s = p.sin_table + int64_t(p.positions[t]) * int64_t(half);
        if (!neox) GptjTables(c, s, rot, gptj, gptj + rot);
        for (int64_t h = 0; h < p.num_q_heads; ++h)
          RopeHead(row<T>(p.q, t, p.q_token_stride) + h * p.q_head_stride, neox, rot, c, s, gptj,
                   gptj + rot);
        if (p.k)
          for (int64_t h = 0; h < p.num_k_heads; ++h)
            RopeHead(row<T>(p.k, t, p.k_token_stride) + h * p.k_head_stride, neox, rot, c, s, gptj,
                     gptj + rot);
      }
    });
  });
}

void Swiglu(const tk_swiglu_params& p, ThreadPool& pool) {
  // Rows are cut into column pieces too, so that a single long row still splits.
  constexpr int64_t kPiece = 4096;
  const int64_t pieces = (p.dim + kPiece - 1) / kPiece, units = p.rows * pieces;
  const int64_t out_bytes = p.rows * p.dim * int64_t(dtype_size(p.dtype));
  const int64_t bytes = out_bytes * 3;
  const bool stream = out_bytes >= kStreamBytes;
  VisitDtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr bool kLowp = !std::is_same_v<T, float>;
    parallel_ranges(pool, units, task_count(pool, units, bytes), [&](int64_t u0, int64_t u1, int) {
      const DF d;
      const size_t N = hn::Lanes(d);
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t t = u / pieces, c0 = (u % pieces) * kPiece;
        const size_t n = size_t(std::min(kPiece, p.dim - c0));
        const T* g = row<T>(p.gate, t, p.gate_stride) + c0;
        const T* up = row<T>(p.up, t, p.up_stride) + c0;
        T* o = row<T>(p.out, t, p.out_stride) + c0;
        const auto at = [&](size_t i) { return hn::Mul(Silu<kLowp>(d, LoadF32(d, g + i)), LoadF32(d, up + i)); };
        // Two vectors per step: silu is a ~40-cycle dependency chain, and two
        // of them side by side keep Zen 4's FMA pipes busier (2-5 % less time
        // per element, data in L2, one core).
        size_t i = 0;
        if (stream && StreamAligned(o)) {
          for (; i + 2 * N <= n; i += 2 * N) {
            const VF a = at(i), b = at(i + N);
            StreamF32(d, a, o + i);
            StreamF32(d, b, o + i + N);
          }
        }
        for (; i + 2 * N <= n; i += 2 * N) {
          const VF a = at(i), b = at(i + N);
          StoreF32(d, a, o + i);
          StoreF32(d, b, o + i + N);
        }
        for (; i + N <= n; i += N) StoreF32(d, at(i), o + i);
        if (i < n) {
          const VF v = hn::Mul(Silu<kLowp>(d, LoadF32Partial(d, g + i, n - i)), LoadF32Partial(d, up + i, n - i));
          StoreF32Partial(d, v, o + i, n - i);
        }
      }
      if (stream) hwy::FlushStream();
    });
  });
}

const char* TargetName() { return hwy::TargetName(HWY_TARGET); }

}  // namespace tk::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tk::cpu {
HWY_EXPORT(RmsNorm);
HWY_EXPORT(Rope);
HWY_EXPORT(Swiglu);
HWY_EXPORT(TargetName);
void rmsnorm(const tk_rmsnorm_params& p, ThreadPool& pool) { HWY_DYNAMIC_DISPATCH(RmsNorm)(p, pool); }
void rope(const tk_rope_params& p, ThreadPool& pool) { HWY_DYNAMIC_DISPATCH(Rope)(p, pool); }
void swiglu(const tk_swiglu_params& p, ThreadPool& pool) { HWY_DYNAMIC_DISPATCH(Swiglu)(p, pool); }
const char* simd_target_name() { return HWY_DYNAMIC_DISPATCH(TargetName)(); }
}  // namespace tk::cpu
#endif
