// CPU attention: flash attention (prefill, varlen) and paged attention
// (decode, chunked prefill), both built on one online-softmax block routine.
//
// A unit of work is a tile of query tokens against a range of keys, for one
// or more KV heads with the query rows of all the q heads that share them
// (GQA). Where a KV head has many query rows (prefill tiles), every key/value
// row is converted to f32 once per unit and used by all of them; where it has
// few (decode), rows are converted in registers straight from the cache. Flash attention takes one KV head per unit; paged
// attention takes all of them, so that it streams whole [token, head, dim]
// rows of the cache (a single head's 256-byte slices, 2 KB apart, defeat the
// hardware prefetchers). Long paged contexts are cut into chunks whose partial
// (max, sum, output) triples are merged by log-sum-exp afterwards.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <atomic>
#include <cmath>
#include <limits>

#include "cpu/kernels.h"
#include "cpu/simd-inl.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace tk::cpu::HWY_NAMESPACE {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Keys per block (at most 64): the block's K and V rows, converted to f32,
// stay in L2 (1 MB per core on Zen 4) while every query row of the unit walks
// over them: 8192 floats of K (32 KB) and as many of V, e.g. 64 keys of one
// head of dim 128, or 8 keys of 8 heads.
constexpr int64_t kKeyBlock = 64;
int64_t KeyBlock(size_t row_floats) {
  return std::clamp<int64_t>(int64_t(8192 / row_floats), 2, kKeyBlock);
}
// Keys per block when K/V are read in place: nothing is staged, so only the
// softmax bookkeeping per block (max, rescale) sets it.
constexpr int64_t kDirectKeyBlock = 64;
// Query tokens per unit: with 8 q heads per KV head that is 128 query rows.
constexpr int64_t kQueryTile = 16;
// Paged contexts are chunked no finer than this many keys: below it the
// merge costs more than the parallelism gains.
constexpr int64_t kMinChunk = 256;

size_t Padded(int64_t n) {
  const size_t N = hn::Lanes(DF());
  return (size_t(n) + N - 1) / N * N;
}

// The working set of one unit: rows query rows and one key block. Rows are
// grouped by KV head: row r reads KV head r / rows_per_head of the unit.
struct Unit {
  size_t dp;        // head dim padded to whole vectors (pad lanes are zero)
  int64_t rows, heads, rows_per_head;
  float* q;         // [rows][dp], pre-multiplied by the softmax scale
  float* o;         // [rows][dp], unnormalised output
  float* m;         // [rows] running max
  float* l;         // [rows] running sum of exp
  int64_t* visible; // [rows] keys [0, visible) of the sequence are visible
  float* kf;        // [kKeyBlock][heads][dp]
  float* vf;        // [kKeyBlock][heads][dp]
  float* s;         // [4][kKeyBlock] scores of a row group
};

Unit MakeUnit(int64_t rows, int64_t dh, int64_t heads = 1) {
  Unit u;
  u.dp = Padded(dh);
  u.rows = rows;
  u.heads = heads;
  u.rows_per_head = rows / heads;
  const size_t r = size_t(rows), kb = size_t(kKeyBlock), hd = size_t(heads) * u.dp;
  float* f = scratch<float>(kScratchLocal0, 2 * r * u.dp + 2 * r + 2 * kb * hd + 4 * size_t(kKeyBlock));
  u.q = f;
  u.o = u.q + r * u.dp;
  u.m = u.o + r * u.dp;
  u.l = u.m + r;
  u.kf = u.l + r;
  u.vf = u.kf + kb * hd;
  u.s = u.vf + kb * hd;
  u.visible = scratch<int64_t>(kScratchLocal1, r);
  for (size_t i = 0; i < r; ++i) {
    u.m[i] = kNegInf;
    u.l[i] = 0.0f;
  }
  std::fill(u.o, u.o + r * u.dp, 0.0f);
  return u;
}

// q row i <- scale * q (padded with zeros).
template <class T>
void StageQuery(Unit& u, int64_t i, const T* q, int64_t dh, float scale) {
  float* dst = u.q + size_t(i) * u.dp;
  RowToF32(q, dst, size_t(dh));
  for (size_t c = size_t(dh); c < u.dp; ++c) dst[c] = 0.0f;
  const DF d;
  const VF sv = hn::Set(d, scale);
  for (size_t c = 0; c < u.dp; c += hn::Lanes(d)) hn::StoreU(hn::Mul(hn::LoadU(d, dst + c), sv), d, dst + c);
}

constexpr int64_t kRowGroup = 4;
// Keys scored per step: each key vector meets every query row of the group
// from registers, and the step's dot products are reduced together. 4 x 4
// accumulators fit AVX-512's and NEON's 32 registers; AVX2 has 16.
// Value vectors per pass: each broadcast weight p_ij meets this many (4 x 4
// accumulators again).
#if HWY_ARCH_X86 && HWY_TARGET > HWY_AVX3
constexpr int kKeyStep = 2;
constexpr int kValueStep = 2;
#else
constexpr int kKeyStep = 4;
constexpr int kValueStep = 4;
#endif

// Where a key block lives: key j of the block, KV head h, starts at
// k[j] + h * head_step (likewise v). Either the staged f32 rows of the unit or
// the cache's own rows, converted in registers as they are used.
template <class TK>
struct KeyRows {
  const TK* const* k;
  const TK* const* v;
  size_t head_step;
  // The next block's rows (or null): each load of the block requests the
  // bytes at the same place of the next block into L2, so the requests are
  // spread evenly over the work, one block ahead (B1 decode: 0.91 -> 0.61 ms
  // with L2 requests, against one burst of L1 requests per block).
  const TK* const* k_next = nullptr;
  const TK* const* v_next = nullptr;
  // Whether loads also request the rows a few keys ahead into L1: for staged
  // rows, which wait in L2. Rows read in place stream from DRAM with the L2
  // requests above, where the L1 requests only took load slots: without them
  // B32 / B64 decode (ctx 4096, 2 Zen 4 cores) took 3-9 % less time, B1 the
  // same, prefill rows (staged) 0-10 % more.
  bool request_l1 = true;
};

// Fixed-width targets of 4+ lanes reduce a key step's vectors together.
#undef TK_JOINT_SUMS
#if HWY_TARGET == HWY_SCALAR || HWY_HAVE_SCALABLE
#define TK_JOINT_SUMS 0
#else
#define TK_JOINT_SUMS 1
// Sum of the 128-bit blocks of v: a 4-lane vector.
template <class D>
HWY_INLINE hn::Vec<hn::Full128<float>> FoldBlocks(D d, hn::Vec<D> v) {
  if constexpr (hn::MaxLanes(D()) <= 4) {
    return v;
  } else {
    const hn::Half<D> dh;
    return FoldBlocks(dh, hn::Add(hn::LowerHalf(dh, v), hn::UpperHalf(dh, v)));
  }
}
#endif

// out[t] = sum of the lanes of a[t], t < kKeyStep. Reducing the step's
// vectors together (interleave, add, fold the blocks) costs about a third of
// one full reduction per vector.
HWY_INLINE void StoreSums(DF d, const VF* a, float* out) {
#if TK_JOINT_SUMS
  {
    const hn::Repartition<uint64_t, DF> d64;
    // With two keys per step, the second pair repeats the first.
    const VF a2 = a[2 % kKeyStep], a3 = a[3 % kKeyStep];
    const VF ab = hn::Add(hn::InterleaveLower(d, a[0], a[1]), hn::InterleaveUpper(d, a[0], a[1]));
    const VF cd = hn::Add(hn::InterleaveLower(d, a2, a3), hn::InterleaveUpper(d, a2, a3));
    const auto ab64 = hn::BitCast(d64, ab), cd64 = hn::BitCast(d64, cd);
    const VF sum = hn::Add(hn::BitCast(d, hn::InterleaveLower(d64, ab64, cd64)),
                           hn::BitCast(d, hn::InterleaveUpper(d64, ab64, cd64)));
    alignas(16) float lanes[4];
    hn::Store(FoldBlocks(d, sum), hn::Full128<float>(), lanes);
    for (int t = 0; t < kKeyStep; ++t) out[t] = lanes[t];
  }
#else
  for (int t = 0; t < kKeyStep; ++t) out[t] = ReduceSum(d, a[t]);
#endif
}

// RG query rows at q against kKeyStep keys k[t] (+ hoff): acc[i][t] = the
// lane-wise products summed over the head dim. Requests the bytes at the
// same place of the next step's keys into L1 (kr.request_l1) and, when kr has one,
// of this step's keys in the next block into L2.
template <int RG, class TK>
HWY_INLINE void DotKeys(const float* HWY_RESTRICT q, size_t dp, const KeyRows<TK>& kr, size_t hoff,
                        int64_t j, int64_t nk, VF (&acc)[RG][kKeyStep]) {
  const DF d;
  const size_t N = hn::Lanes(d);
  const TK* k[kKeyStep];
  const TK* ahead[kKeyStep];
  const TK* next[kKeyStep];
  for (int t = 0; t < kKeyStep; ++t) {
    k[t] = kr.k[std::min<int64_t>(j + t, nk - 1)] + hoff;
    ahead[t] = kr.k[std::min<int64_t>(j + kKeyStep + t, nk - 1)] + hoff;
    next[t] = kr.k_next ? kr.k_next[std::min<int64_t>(j + t, nk - 1)] + hoff : nullptr;
  }
  for (int i = 0; i < RG; ++i)
    for (int t = 0; t < kKeyStep; ++t) acc[i][t] = hn::Zero(d);
  for (size_t c = 0; c < dp; c += N) {
    VF kv[kKeyStep];
    const bool line = (c * sizeof(TK)) % 64 == 0;  // one request per cache line
    for (int t = 0; t < kKeyStep; ++t) {
      if (line) {
        if (kr.request_l1) hwy::Prefetch(ahead[t] + c);
        if (kr.k_next) PrefetchL2(next[t] + c);
      }
      kv[t] = LoadF32(d, k[t] + c);
    }
    for (int i = 0; i < RG; ++i) {
      const VF qv = hn::LoadU(d, q + size_t(i) * dp + c);
      for (int t = 0; t < kKeyStep; ++t) acc[i][t] = hn::MulAdd(qv, kv[t], acc[i][t]);
    }
  }
}

// s[i][j] = q_i . k_j for the RG query rows at q and keys [0, nk) of the block
// (a step past nk repeats key nk - 1; those scores are never used). s rows
// are kKeyBlock apart. (Reducing a whole vector of keys at once, 16 per
// AVX-512 vector, takes a third fewer shuffles but measured no faster.)
template <int RG, class TK>
HWY_INLINE void ScoreKeys(const float* HWY_RESTRICT q, size_t dp, const KeyRows<TK>& kr, size_t hoff,
                          int64_t nk, float* HWY_RESTRICT s) {
  const DF d;
  VF acc[RG][kKeyStep];
  for (int64_t j = 0; j < nk; j += kKeyStep) {
    DotKeys<RG>(q, dp, kr, hoff, j, nk, acc);
    for (int i = 0; i < RG; ++i) StoreSums(d, acc[i], s + i * kKeyBlock + j);
  }
}

// Keys ahead whose value rows are requested into L1 (kr.request_l1).
constexpr int64_t kValueAhead = 4;
// o_i = alpha_i o_i + sum_j p_ij v_j over CV vectors of the head dim from c.
template <int RG, int CV, class TK>
HWY_INLINE void AccumulateValues(float* HWY_RESTRICT o, size_t dp, size_t c, const KeyRows<TK>& kr,
                                 size_t hoff, int64_t nk, const float* HWY_RESTRICT p,
                                 const float* alpha) {
  const DF d;
  const size_t N = hn::Lanes(d);
  VF acc[RG][CV];
  for (int i = 0; i < RG; ++i)
    for (int x = 0; x < CV; ++x)
      acc[i][x] = hn::Mul(hn::LoadU(d, o + size_t(i) * dp + c + x * N), hn::Set(d, alpha[i]));
  for (int64_t j = 0; j < nk; ++j) {
    const TK* v = kr.v[j] + hoff + c;
    const TK* va = kr.v[std::min<int64_t>(j + kValueAhead, nk - 1)] + hoff + c;
    for (size_t b = 0; b < CV * N * sizeof(TK); b += 64) {
      if (kr.v_next) PrefetchL2(reinterpret_cast<const char*>(kr.v_next[j] + hoff + c) + b);
      if (kr.request_l1) hwy::Prefetch(reinterpret_cast<const char*>(va) + b);
    }
    VF vv[CV];
    for (int x = 0; x < CV; ++x) vv[x] = LoadF32(d, v + x * N);
    for (int i = 0; i < RG; ++i) {
      const VF pv = hn::Set(d, p[i * kKeyBlock + j]);
      for (int x = 0; x < CV; ++x) acc[i][x] = hn::MulAdd(pv, vv[x], acc[i][x]);
    }
  }
  for (int i = 0; i < RG; ++i)
    for (int x = 0; x < CV; ++x) hn::StoreU(acc[i][x], d, o + size_t(i) * dp + c + x * N);
}

// Query rows r0 .. r0 + RG - 1 (one KV head) against keys [j0, j0 + nk) of
// the sequence, found through kr: one online-softmax step.
template <int RG, class TK>
HWY_INLINE void AttendRows(Unit& u, int64_t r0, int64_t j0, int64_t nk, const KeyRows<TK>& kr) {
  const DF d;
  const size_t N = hn::Lanes(d), dp = u.dp;
  int64_t lim[RG], max_lim = 0;
  for (int i = 0; i < RG; ++i) {
    lim[i] = std::clamp<int64_t>(u.visible[r0 + i] - j0, 0, nk);
    max_lim = std::max(max_lim, lim[i]);
  }
  if (max_lim == 0) return;
  const size_t hoff = size_t(r0 / u.rows_per_head) * kr.head_step;
  float* s = u.s;  // [RG][kKeyBlock]
  ScoreKeys<RG>(u.q + size_t(r0) * dp, dp, kr, hoff, max_lim, s);
  // Online softmax: the block max of each row, then every row's rescale
  // factor alpha = e^(m_old - m_new) in one vector, then the weights.
  float m_new[RG];
  alignas(64) float alpha[kMaxLanes * ((RG + kMaxLanes - 1) / kMaxLanes)] = {};
  for (int i = 0; i < RG; ++i) {
    const float* si = s + i * kKeyBlock;
    VF bmv = hn::Set(d, kNegInf);
    for (int64_t j = 0; j < lim[i]; j += int64_t(N)) {
      const auto valid = hn::FirstN(d, size_t(std::min<int64_t>(lim[i] - j, int64_t(N))));
      bmv = hn::Max(bmv, hn::IfThenElse(valid, hn::LoadU(d, si + j), hn::Set(d, kNegInf)));
    }
    // A row that sees no key of this block keeps its state (alpha 1).
    m_new[i] = std::max(u.m[r0 + i], hn::GetLane(hn::MaxOfLanes(d, bmv)));
    // m_old = -inf (no key seen yet: o and l are 0) gives e^-inf = 0.
    alpha[i] = m_new[i] == kNegInf ? 0.0f : u.m[r0 + i] - m_new[i];
  }
  for (int i = 0; i < RG; i += int(N)) hn::Store(ExpNonPositive(d, hn::Load(d, alpha + i)), d, alpha + i);
  for (int i = 0; i < RG; ++i) {
    const int64_t r = r0 + i;
    float* si = s + i * kKeyBlock;
    // p_j = e^(s_j - m_new); keys past the row's limit get exact zeros.
    const VF mv = hn::Set(d, m_new[i]);
    VF psum = hn::Zero(d);
    for (int64_t j = 0; j < max_lim; j += int64_t(N)) {
      const int64_t valid = std::clamp<int64_t>(lim[i] - j, 0, int64_t(N));
      VF p = ExpNonPositive(d, hn::Sub(hn::LoadU(d, si + j), mv));
      p = hn::IfThenElseZero(hn::FirstN(d, size_t(valid)), p);
      hn::StoreU(p, d, si + j);
      psum = hn::Add(psum, p);
    }
    u.l[r] = u.l[r] * alpha[i] + ReduceSum(d, psum);
    u.m[r] = m_new[i];
  }
  float* o = u.o + size_t(r0) * dp;
  size_t c = 0;
  for (; c + kValueStep * N <= dp; c += kValueStep * N)
    AccumulateValues<RG, kValueStep>(o, dp, c, kr, hoff, max_lim, s, alpha);
  for (; c < dp; c += N) AccumulateValues<RG, 1>(o, dp, c, kr, hoff, max_lim, s, alpha);
}

// Every query row of the unit against keys [j0, j0 + nk), in groups of up to
// kRowGroup rows that share a KV head: each key and value vector is loaded
// once for the whole group.
template <class TK>
void AttendRowGroups(Unit& u, int64_t j0, int64_t nk, const KeyRows<TK>& kr) {
  for (int64_t r = 0; r < u.rows;) {
    const int64_t in_head = u.rows_per_head - r % u.rows_per_head;
    const int rg = int(std::min<int64_t>({kRowGroup, u.rows - r, in_head}));
    switch (rg) {
      case 1: AttendRows<1>(u, r, j0, nk, kr); break;
      case 2: AttendRows<2>(u, r, j0, nk, kr); break;
      case 3: AttendRows<3>(u, r, j0, nk, kr); break;
      default: AttendRows<4>(u, r, j0, nk, kr); break;
    }
    r += rg;
  }
}

// kv(j, k, v) gives the rows of key j of the sequence: KV head h at k + h * dh.
// Rows [j0, j1) are requested ahead of use. A flash unit reads one KV head:
// 256 bytes per token, 2 KB apart in a [token, head, dim] cache, which the
// hardware prefetchers (trained within 4 KB pages) do not follow; without
// this the reads wait on DRAM one row at a time. A paged unit reads all
// `heads` of a token, which are contiguous, so one range covers them.
template <class T, class KV>
void PrefetchRows(int64_t j0, int64_t j1, int64_t dh, int64_t heads, const KV& kv) {
  const size_t bytes = size_t(dh * heads) * sizeof(T);
  for (int64_t j = j0; j < j1; ++j) {
    const T* krow;
    const T* vrow;
    kv(j, krow, vrow);
    for (size_t b = 0; b < bytes; b += 64) {
      hwy::Prefetch(reinterpret_cast<const char*>(krow) + b);
      hwy::Prefetch(reinterpret_cast<const char*>(vrow) + b);
    }
  }
}

// Rows of keys [j0, j0 + n) into k[0, nk), v[0, nk); a block shorter than nk
// repeats its first row (those entries are only ever prefetched).
template <class T, class KV>
void BlockRows(int64_t j0, int64_t n, int64_t nk, const KV& kv, const T** k, const T** v) {
  for (int64_t j = 0; j < n; ++j) kv(j0 + j, k[j], v[j]);
  for (int64_t j = std::max<int64_t>(n, 0); j < nk; ++j) {
    k[j] = k[0];
    v[j] = v[0];
  }
}

// Keys [j0, j0 + nk) (rows in krow, vrow) against every query row, staged as
// f32 once and shared by all row groups: one online-softmax step.
template <class T>
void AttendStaged(Unit& u, int64_t j0, int64_t nk, int64_t dh, const T* const* krow,
                  const T* const* vrow) {
  const size_t dp = u.dp;
  const size_t hd = size_t(u.heads) * dp;
  const float* kf[kKeyBlock];
  const float* vf[kKeyBlock];
  for (int64_t j = 0; j < nk; ++j) {
    float* kd = u.kf + size_t(j) * hd;
    float* vd = u.vf + size_t(j) * hd;
    kf[j] = kd;
    vf[j] = vd;
    for (int64_t h = 0; h < u.heads; ++h, kd += dp, vd += dp) {
      RowToF32(krow[j] + h * dh, kd, size_t(dh));
      RowToF32(vrow[j] + h * dh, vd, size_t(dh));
      for (size_t c = size_t(dh); c < dp; ++c) kd[c] = vd[c] = 0.0f;
    }
  }
  AttendRowGroups(u, j0, nk, KeyRows<float>{kf, vf, dp});
}

// All keys [j_begin, j_end) of the unit, in blocks. Directly (each K/V
// vector meets one row group, so staging it as f32 would only add a store and
// a load) when the head dim is whole vectors and a KV head has at most two
// row groups; else staged.
//
// Direct blocks request the next block into L2 while they are used. For the
// last block, next_rows(k, v, nk) may give the rows of the first block of the
// range this thread takes on next (another unit: it returns their count,
// padded to nk like BlockRows, or 0), so that a thread streams on from unit to
// unit instead of waiting on DRAM for each unit's first block; that unit then
// passes first_requested. Returns whether next_rows gave rows.
template <class T, class KV, class NextRows>
bool AttendRange(Unit& u, int64_t j_begin, int64_t j_end, int64_t dh, const KV& kv,
                 bool first_requested, const NextRows& next_rows) {
  const bool direct = size_t(dh) == u.dp && u.rows_per_head <= 2 * kRowGroup;
  const int64_t block = direct ? kDirectKeyBlock : KeyBlock(size_t(u.heads) * u.dp);
  // The first block is requested at once.
  if (!first_requested) PrefetchRows<T>(j_begin, std::min(j_end, j_begin + block), dh, u.heads, kv);
  const T* rows[2][2][kKeyBlock];  // [block parity][k, v][key]
  BlockRows(j_begin, std::min(block, j_end - j_begin), block, kv, rows[0][0], rows[0][1]);
  bool handed_on = false;
  for (int64_t j0 = j_begin, b = 0; j0 < j_end; j0 += block, b ^= 1) {
    const int64_t nk = std::min(block, j_end - j0);
    const int64_t n_next = std::min(block, j_end - (j0 + block));
    if (!direct) {
      // The next block is requested while this one is staged and used.
      if (n_next > 0) PrefetchRows<T>(j0 + block, j0 + block + n_next, dh, u.heads, kv);
      BlockRows(j0, nk, nk, kv, rows[b][0], rows[b][1]);
      AttendStaged<T>(u, j0, nk, dh, rows[b][0], rows[b][1]);
      continue;
    }
    bool more = n_next > 0;
    if (more) {
      BlockRows(j0 + block, n_next, nk, kv, rows[b ^ 1][0], rows[b ^ 1][1]);
    } else {
      more = handed_on = next_rows(rows[b ^ 1][0], rows[b ^ 1][1], nk) > 0;
    }
    AttendRowGroups(u, j0, nk, KeyRows<T>{rows[b][0], rows[b][1], size_t(dh),
                                          more ? rows[b ^ 1][0] : nullptr, more ? rows[b ^ 1][1] : nullptr,
                                          /*request_l1=*/false});
  }
  return handed_on;
}

// out = o / l (0 for a row that saw no key), lse = m + log l (-inf then).
template <class T>
void FinishRow(const Unit& u, int64_t r, T* out, int64_t dh, float* lse) {
  const DF d;
  const float l = u.l[r];
  const VF inv = hn::Set(d, l > 0.0f ? 1.0f / l : 0.0f);
  float* o = u.o + size_t(r) * u.dp;
  for (size_t c = 0; c < u.dp; c += hn::Lanes(d)) hn::StoreU(hn::Mul(hn::LoadU(d, o + c), inv), d, o + c);
  RowFromF32(o, out, size_t(dh));
  if (lse) *lse = l > 0.0f ? u.m[r] + std::log(l) : kNegInf;
}

template <class T>
T* HeadPtr(const void* base, int64_t token, int64_t token_stride, int64_t head, int64_t head_stride) {
  return const_cast<T*>(static_cast<const T*>(base)) + token * token_stride + head * head_stride;
}

}  // namespace

void FlashAttention(const tk_flash_attention_params& p, ThreadPool& pool) {
  const int64_t hkv = p.num_kv_heads, group = p.num_q_heads / hkv, dh = p.head_dim;
  // Units: (sequence, kv head, query tile), numbered through the prefix of tiles.
  int64_t* tile_start = scratch<int64_t>(kScratchShared0, size_t(p.batch + 1));
  tile_start[0] = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t lq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
    tile_start[b + 1] = tile_start[b] + (lq + kQueryTile - 1) / kQueryTile;
  }
  const int64_t units = tile_start[p.batch] * hkv;
  VisitDtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    pool.parallel_for(units, [&](int64_t unit, int) {
      const int64_t tile = unit / hkv, kvh = unit % hkv;
      const int64_t b = std::upper_bound(tile_start, tile_start + p.batch + 1, tile) - tile_start - 1;
      const int64_t q0 = p.cu_seqlens_q[b], lq = p.cu_seqlens_q[b + 1] - q0;
      const int64_t k0 = p.cu_seqlens_k[b], lk = p.cu_seqlens_k[b + 1] - k0;
      const int64_t i0 = (tile - tile_start[b]) * kQueryTile, i1 = std::min(lq, i0 + kQueryTile);
      Unit u = MakeUnit((i1 - i0) * group, dh);
      int64_t keys = 0;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (i - i0) * group + g, h = kvh * group + g;
          StageQuery(u, r, HeadPtr<T>(p.q, q0 + i, p.q_token_stride, h, p.q_head_stride), dh, p.scale);
          u.visible[r] = p.causal ? std::clamp<int64_t>(i + lk - lq + 1, 0, lk) : lk;
          keys = std::max(keys, u.visible[r]);
        }
      AttendRange<T>(
          u, 0, keys, dh,
          [&](int64_t j, const T*& kr, const T*& vr) {
            kr = HeadPtr<T>(p.k, k0 + j, p.k_token_stride, kvh, p.k_head_stride);
            vr = HeadPtr<T>(p.v, k0 + j, p.v_token_stride, kvh, p.v_head_stride);
          },
          false, [](const T**, const T**, int64_t) { return int64_t(0); });
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (i - i0) * group + g, h = kvh * group + g;
          FinishRow(u, r, HeadPtr<T>(p.out, q0 + i, p.out_token_stride, h, p.out_head_stride), dh,
                    p.lse ? &p.lse[h * p.total_q + q0 + i] : nullptr);
        }
    });
  });
}

void PagedAttention(const tk_paged_attention_params& p, ThreadPool& pool) {
  const tk_paged_kv_cache& c = p.cache;
  const int64_t hkv = c.num_kv_heads, group = p.num_q_heads / hkv, dh = c.head_dim;
  const int64_t seqs = c.num_seqs;
  // Page sizes are powers of two (validated): no division per key.
  int page_shift = 0;
  while ((int64_t(1) << page_shift) < c.page_size) ++page_shift;
  const int64_t page_mask = c.page_size - 1;
  auto q_start = [&](int64_t s) { return p.cu_seqlens_q ? int64_t(p.cu_seqlens_q[s]) : s; };
  auto q_len = [&](int64_t s) { return p.cu_seqlens_q ? p.cu_seqlens_q[s + 1] - q_start(s) : 1; };

  // Chunk length: enough units for every thread to get a few, never below kMinChunk.
  int64_t total_keys = 0, tiles = 0;
  for (int64_t s = 0; s < seqs; ++s) {
    total_keys += p.context_lens[s];
    tiles += (q_len(s) + kQueryTile - 1) / kQueryTile;
  }
  constexpr int64_t kWhole = std::numeric_limits<int64_t>::max();
  const int64_t want = 4 * int64_t(pool.size());
  int64_t chunk = kWhole;
  if (tiles < want && total_keys > 0) {
    chunk = std::max(kMinChunk, (total_keys + want - 1) / want);
    chunk = (chunk + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  }
  const bool split = chunk != kWhole;
  auto chunks_of = [&](int64_t s) {
    return split ? std::max<int64_t>(1, (int64_t(p.context_lens[s]) + chunk - 1) / chunk) : 1;
  };
  // Units: (sequence, query tile, chunk), numbered through a prefix sum.
  int64_t* unit_start = scratch<int64_t>(kScratchShared0, size_t(seqs + 1));
  unit_start[0] = 0;
  for (int64_t s = 0; s < seqs; ++s)
    unit_start[s + 1] = unit_start[s] + ((q_len(s) + kQueryTile - 1) / kQueryTile) * chunks_of(s);
  const int64_t units = unit_start[seqs];
  const size_t dp = Padded(dh), row_floats = dp + 2;
  const size_t unit_rows = size_t(kQueryTile * p.num_q_heads);
  // Partials of split contexts: per unit and query row, (m, l, o[dp]).
  float* partial = split ? scratch<float>(kScratchShared1, size_t(units) * unit_rows * row_floats) : nullptr;

  struct Where {
    int64_t s, len, q0, lq, chunk, chunks, i0, i1;
  };
  auto locate = [&](int64_t unit) {
    Where w;
    w.s = std::upper_bound(unit_start, unit_start + seqs + 1, unit) - unit_start - 1;
    w.len = p.context_lens[w.s];
    w.q0 = q_start(w.s);
    w.lq = q_len(w.s);
    w.chunks = chunks_of(w.s);
    const int64_t rest = unit - unit_start[w.s];
    w.chunk = rest % w.chunks;
    w.i0 = (rest / w.chunks) * kQueryTile;
    w.i1 = std::min(w.lq, w.i0 + kQueryTile);
    return w;
  };
  // Row r of a unit: kv head major, then token, then q head within the group.
  auto for_rows = [&](const Where& w, const auto& f) {
    const int64_t per_head = (w.i1 - w.i0) * group;
    for (int64_t kvh = 0; kvh < hkv; ++kvh)
      for (int64_t i = w.i0; i < w.i1; ++i)
        for (int64_t g = 0; g < group; ++g)
          f(kvh * per_head + (i - w.i0) * group + g, i, kvh * group + g);
  };

  VisitDtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto finish = [&](const Unit& u, const Where& w) {
      for_rows(w, [&](int64_t r, int64_t i, int64_t h) {
        FinishRow(u, r, HeadPtr<T>(p.out, w.q0 + i, p.out_token_stride, h, p.out_head_stride), dh,
                  p.lse ? &p.lse[h * p.total_q + w.q0 + i] : nullptr);
      });
    };
    // Keys [begin, end) of a unit, and its key -> cache rows map.
    auto key_range = [&](const Where& w, int64_t& begin, int64_t& end) {
      begin = split ? w.chunk * chunk : 0;
      end = std::min(split ? std::min(w.len, begin + chunk) : w.len, w.len - w.lq + w.i1);
    };
    const T* kc = static_cast<const T*>(c.k);
    const T* vc = static_cast<const T*>(c.v);
    auto rows_of = [&](const Where& w) {
      const int32_t* blocks = c.block_table + w.s * c.max_blocks_per_seq;
      return [=](int64_t j, const T*& kr, const T*& vr) {
        const int64_t slot = (int64_t(blocks[j >> page_shift]) << page_shift) + (j & page_mask);
        const int64_t off = slot * hkv * dh;
        kr = kc + off;
        vr = vc + off;
      };
    };
    // Each thread claims units one by one, the next one while it starts the
    // last block of the current one, whose first block it then requests
    // ahead (AttendRange): a unit of B1 decode is only 512 keys, and waiting
    // on DRAM for each unit's first block cost about 15 us per unit.
    std::atomic<int64_t> claimed{0};
    pool.parallel_for(pool.size(), [&](int64_t, int) {
      bool first_requested = false;
      for (int64_t unit = claimed.fetch_add(1, std::memory_order_relaxed); unit < units;) {
        const Where w = locate(unit);
        int64_t j_begin, j_end;
        key_range(w, j_begin, j_end);
        Unit u = MakeUnit((w.i1 - w.i0) * p.num_q_heads, dh, hkv);
        for_rows(w, [&](int64_t r, int64_t i, int64_t h) {
          StageQuery(u, r, HeadPtr<T>(p.q, w.q0 + i, p.q_token_stride, h, p.q_head_stride), dh, p.scale);
          u.visible[r] = w.len - w.lq + i + 1;
        });
        int64_t next = -1;
        first_requested = AttendRange<T>(u, j_begin, j_end, dh, rows_of(w), first_requested,
                                         [&](const T** k, const T** v, int64_t nk) -> int64_t {
                                           next = claimed.fetch_add(1, std::memory_order_relaxed);
                                           if (next >= units) return 0;
                                           const Where wn = locate(next);
                                           int64_t b, e;
                                           key_range(wn, b, e);
                                           const int64_t n = std::min(nk, e - b);
                                           if (n <= 0) return 0;
                                           BlockRows(b, n, nk, rows_of(wn), k, v);
                                           return n;
                                         });
        if (next < 0) next = claimed.fetch_add(1, std::memory_order_relaxed);
        if (!split) {
          finish(u, w);
        } else {
          for (int64_t r = 0; r < u.rows; ++r) {
            float* dst = partial + (size_t(unit) * unit_rows + size_t(r)) * row_floats;
            dst[0] = u.m[r];
            dst[1] = u.l[r];
            std::copy(u.o + size_t(r) * dp, u.o + size_t(r + 1) * dp, dst + 2);
          }
        }
        unit = next;
      }
    });
    if (!split) return;
    // Merge the chunks of each (sequence, query tile) by log-sum-exp; the
    // unit of chunk 0 does it.
    pool.parallel_for(units, [&](int64_t unit, int) {
      const Where w = locate(unit);
      if (w.chunk != 0) return;
      Unit u = MakeUnit((w.i1 - w.i0) * p.num_q_heads, dh, hkv);
      const DF d;
      for (int64_t r = 0; r < u.rows; ++r) {
        auto src_of = [&](int64_t ci) { return partial + (size_t(unit + ci) * unit_rows + size_t(r)) * row_floats; };
        float m = kNegInf;
        for (int64_t ci = 0; ci < w.chunks; ++ci) m = std::max(m, src_of(ci)[0]);
        float l = 0.0f;
        float* o = u.o + size_t(r) * dp;
        for (int64_t ci = 0; ci < w.chunks; ++ci) {
          const float* src = src_of(ci);
          if (src[1] == 0.0f) continue;  // a chunk past this row's last visible key
          const float wt = std::exp(src[0] - m);
          l += src[1] * wt;
          const VF wv = hn::Set(d, wt);
          for (size_t cc = 0; cc < dp; cc += hn::Lanes(d))
            hn::StoreU(hn::MulAdd(hn::LoadU(d, src + 2 + cc), wv, hn::LoadU(d, o + cc)), d, o + cc);
        }
        u.m[r] = m;
        u.l[r] = l;
      }
      finish(u, w);
    });
  });
}

}  // namespace tk::cpu::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace tk::cpu {
HWY_EXPORT(FlashAttention);
HWY_EXPORT(PagedAttention);
void flash_attention(const tk_flash_attention_params& p, ThreadPool& pool) {
  HWY_DYNAMIC_DISPATCH(FlashAttention)(p, pool);
}
void paged_attention(const tk_paged_attention_params& p, ThreadPool& pool) {
  HWY_DYNAMIC_DISPATCH(PagedAttention)(p, pool);
}
}  // namespace tk::cpu
#endif
