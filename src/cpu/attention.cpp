// CPU attention: flash attention (prefill, varlen) and paged attention
// (decode, chunked prefill), both built on one online-softmax block routine.
//
// A unit of work is one KV head with the query rows of all the q heads that
// share it (GQA) and a tile of query tokens: every key/value row is converted
// to f32 once per unit and used by all of those query rows. Long paged
// contexts are also cut into chunks whose partial (max, sum, output) triples
// are merged by log-sum-exp afterwards.
#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "cpu/attention.cpp"
#include "hwy/foreach_target.h"  // IWYU pragma: keep

#include <cmath>
#include <limits>

#include "cpu/kernels.h"
#include "cpu/simd-inl.h"
#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace tk::cpu::HWY_NAMESPACE {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// Keys per block (at most): the block's K and V rows, converted to f32, must
// stay in L1 (32 KB on Zen 4 and most x86 cores) while every query row of the
// unit walks over them: 16 KB of K and V together, 16 keys at head dim 128.
constexpr int64_t kKeyBlock = 64;
int64_t KeyBlock(size_t dp) { return std::clamp<int64_t>(int64_t(2048 / dp), 4, kKeyBlock); }
// Query tokens per unit: with 8 q heads per KV head that is 128 query rows.
constexpr int64_t kQueryTile = 16;
// Paged contexts are chunked no finer than this many keys: below it the
// merge costs more than the parallelism gains.
constexpr int64_t kMinChunk = 256;

size_t Padded(int64_t n) {
  const size_t N = hn::Lanes(DF());
  return (size_t(n) + N - 1) / N * N;
}

// The working set of one unit: rows query rows and one key block.
struct Unit {
  size_t dp;        // head dim padded to whole vectors (pad lanes are zero)
  int64_t rows;
  float* q;         // [rows][dp], pre-multiplied by the softmax scale
  float* o;         // [rows][dp], unnormalised output
  float* m;         // [rows] running max
  float* l;         // [rows] running sum of exp
  int64_t* visible; // [rows] keys [0, visible) of the sequence are visible
  float* kf;        // [kKeyBlock][dp]
  float* vf;        // [kKeyBlock][dp]
  float* s;         // [kKeyBlock] scores
};

Unit MakeUnit(int64_t rows, int64_t dh) {
  Unit u;
  u.dp = Padded(dh);
  u.rows = rows;
  const size_t r = size_t(rows), kb = size_t(kKeyBlock);
  float* f = scratch<float>(kScratchLocal0, 2 * r * u.dp + 2 * r + 2 * kb * u.dp + kb);
  u.q = f;
  u.o = u.q + r * u.dp;
  u.m = u.o + r * u.dp;
  u.l = u.m + r;
  u.kf = u.l + r;
  u.vf = u.kf + kb * u.dp;
  u.s = u.vf + kb * u.dp;
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

// Keys [j0, j0 + nk) of the sequence (row pointers from kv(j)) against every
// query row: one online-softmax step.
template <class T, class KV>
void AttendBlock(Unit& u, int64_t j0, int64_t nk, int64_t dh, const KV& kv) {
  const DF d;
  const size_t N = hn::Lanes(d), dp = u.dp;
  for (int64_t j = 0; j < nk; ++j) {
    const T* krow;
    const T* vrow;
    kv(j0 + j, krow, vrow);
    float* kd = u.kf + size_t(j) * dp;
    float* vd = u.vf + size_t(j) * dp;
    RowToF32(krow, kd, size_t(dh));
    RowToF32(vrow, vd, size_t(dh));
    for (size_t c = size_t(dh); c < dp; ++c) kd[c] = vd[c] = 0.0f;
  }
  for (int64_t r = 0; r < u.rows; ++r) {
    const int64_t lim = std::min(nk, u.visible[r] - j0);
    if (lim <= 0) continue;
    const float* q = u.q + size_t(r) * dp;
    float bm = kNegInf;
    for (int64_t j = 0; j < lim; ++j) {
      const float* k = u.kf + size_t(j) * dp;
      VF acc0 = hn::Zero(d), acc1 = hn::Zero(d);
      size_t c = 0;
      for (; c + 2 * N <= dp; c += 2 * N) {
        acc0 = hn::MulAdd(hn::LoadU(d, q + c), hn::LoadU(d, k + c), acc0);
        acc1 = hn::MulAdd(hn::LoadU(d, q + c + N), hn::LoadU(d, k + c + N), acc1);
      }
      if (c < dp) acc0 = hn::MulAdd(hn::LoadU(d, q + c), hn::LoadU(d, k + c), acc0);
      u.s[j] = ReduceSum(d, hn::Add(acc0, acc1));
      bm = std::max(bm, u.s[j]);
    }
    const float m_new = std::max(u.m[r], bm);
    const float alpha = u.m[r] == kNegInf ? 0.0f : std::exp(u.m[r] - m_new);
    // p_j = e^(s_j - m_new); lanes past lim are masked to exact zeros.
    const VF mv = hn::Set(d, m_new);
    VF psum = hn::Zero(d);
    for (int64_t j = 0; j < lim; j += int64_t(N)) {
      const size_t n = size_t(std::min<int64_t>(int64_t(N), lim - j));
      VF p = ExpClamped(d, hn::Sub(hn::LoadU(d, u.s + j), mv));
      p = hn::IfThenElseZero(hn::FirstN(d, n), p);
      hn::StoreU(p, d, u.s + j);
      psum = hn::Add(psum, p);
    }
    u.l[r] = u.l[r] * alpha + ReduceSum(d, psum);
    u.m[r] = m_new;
    float* o = u.o + size_t(r) * dp;
    const VF av = hn::Set(d, alpha);
    for (size_t c = 0; c < dp; c += N) {
      VF acc = hn::Mul(hn::LoadU(d, o + c), av);
      for (int64_t j = 0; j < lim; ++j)
        acc = hn::MulAdd(hn::Set(d, u.s[j]), hn::LoadU(d, u.vf + size_t(j) * dp + c), acc);
      hn::StoreU(acc, d, o + c);
    }
  }
}

// All keys [j_begin, j_end) of the unit, in blocks.
template <class T, class KV>
void AttendRange(Unit& u, int64_t j_begin, int64_t j_end, int64_t dh, const KV& kv) {
  const int64_t block = KeyBlock(u.dp);
  for (int64_t j0 = j_begin; j0 < j_end; j0 += block)
    AttendBlock<T>(u, j0, std::min(block, j_end - j0), dh, kv);
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
      AttendRange<T>(u, 0, keys, dh, [&](int64_t j, const T*& kr, const T*& vr) {
        kr = HeadPtr<T>(p.k, k0 + j, p.k_token_stride, kvh, p.k_head_stride);
        vr = HeadPtr<T>(p.v, k0 + j, p.v_token_stride, kvh, p.v_head_stride);
      });
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
  auto q_start = [&](int64_t s) { return p.cu_seqlens_q ? int64_t(p.cu_seqlens_q[s]) : s; };
  auto q_len = [&](int64_t s) { return p.cu_seqlens_q ? p.cu_seqlens_q[s + 1] - q_start(s) : 1; };

  // Chunk length: enough units for every thread to get a few, never below kMinChunk.
  int64_t total_keys = 0, tiles = 0;
  for (int64_t s = 0; s < seqs; ++s) {
    total_keys += p.context_lens[s];
    tiles += (q_len(s) + kQueryTile - 1) / kQueryTile;
  }
  const int64_t want = 4 * int64_t(pool.size());
  int64_t chunk = std::numeric_limits<int64_t>::max();
  if (tiles * hkv < want && total_keys > 0) {
    chunk = std::max(kMinChunk, (total_keys * hkv + want - 1) / want);
    chunk = (chunk + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
  }
  // Units per sequence: tiles x kv heads x chunks, numbered through a prefix sum.
  int64_t* unit_start = scratch<int64_t>(kScratchShared0, size_t(seqs + 1));
  unit_start[0] = 0;
  for (int64_t s = 0; s < seqs; ++s) {
    const int64_t chunks = chunk == std::numeric_limits<int64_t>::max()
                               ? 1 : std::max<int64_t>(1, (p.context_lens[s] + chunk - 1) / chunk);
    unit_start[s + 1] = unit_start[s] + ((q_len(s) + kQueryTile - 1) / kQueryTile) * hkv * chunks;
  }
  const int64_t units = unit_start[seqs];
  const size_t dp = Padded(dh);
  const bool split = chunk != std::numeric_limits<int64_t>::max();
  // Partials of split contexts: per unit and query row, (m, l, o[dp]).
  const size_t row_floats = dp + 2;
  float* partial = split ? scratch<float>(kScratchShared1, size_t(units) * size_t(kQueryTile * group) * row_floats)
                         : nullptr;

  VisitDtype(p.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    pool.parallel_for(units, [&](int64_t unit, int) {
      const int64_t s = std::upper_bound(unit_start, unit_start + seqs + 1, unit) - unit_start - 1;
      const int64_t len = p.context_lens[s], q0 = q_start(s), lq = q_len(s);
      const int64_t chunks = split ? std::max<int64_t>(1, (len + chunk - 1) / chunk) : 1;
      int64_t rest = unit - unit_start[s];
      const int64_t ci = rest % chunks;
      rest /= chunks;
      const int64_t kvh = rest % hkv, tile = rest / hkv;
      const int64_t i0 = tile * kQueryTile, i1 = std::min(lq, i0 + kQueryTile);
      const int64_t j_begin = split ? ci * chunk : 0, j_end = split ? std::min(len, j_begin + chunk) : len;
      Unit u = MakeUnit((i1 - i0) * group, dh);
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (i - i0) * group + g, h = kvh * group + g;
          StageQuery(u, r, HeadPtr<T>(p.q, q0 + i, p.q_token_stride, h, p.q_head_stride), dh, p.scale);
          u.visible[r] = len - lq + i + 1;
        }
      const int32_t* blocks = c.block_table + s * c.max_blocks_per_seq;
      const T* kc = static_cast<const T*>(c.k);
      const T* vc = static_cast<const T*>(c.v);
      AttendRange<T>(u, j_begin, std::min(j_end, len - lq + i1), dh,
                     [&](int64_t j, const T*& kr, const T*& vr) {
                       const int64_t slot = int64_t(blocks[j / c.page_size]) * c.page_size + j % c.page_size;
                       const int64_t off = (slot * hkv + kvh) * dh;
                       kr = kc + off;
                       vr = vc + off;
                     });
      if (!split) {
        for (int64_t i = i0; i < i1; ++i)
          for (int64_t g = 0; g < group; ++g) {
            const int64_t r = (i - i0) * group + g, h = kvh * group + g;
            FinishRow(u, r, HeadPtr<T>(p.out, q0 + i, p.out_token_stride, h, p.out_head_stride), dh,
                      p.lse ? &p.lse[h * p.total_q + q0 + i] : nullptr);
          }
        return;
      }
      for (int64_t r = 0; r < u.rows; ++r) {
        float* dst = partial + (size_t(unit) * size_t(kQueryTile * group) + size_t(r)) * row_floats;
        dst[0] = u.m[r];
        dst[1] = u.l[r];
        std::copy(u.o + size_t(r) * dp, u.o + size_t(r + 1) * dp, dst + 2);
      }
    });
    if (!split) return;
    // Merge: per (sequence, query tile, kv head, row), the chunks by log-sum-exp.
    const int64_t merges = unit_start[seqs];  // one per unit; chunk 0's unit does the work
    pool.parallel_for(merges, [&](int64_t unit, int) {
      const int64_t s = std::upper_bound(unit_start, unit_start + seqs + 1, unit) - unit_start - 1;
      const int64_t len = p.context_lens[s], q0 = q_start(s), lq = q_len(s);
      const int64_t chunks = std::max<int64_t>(1, (len + chunk - 1) / chunk);
      int64_t rest = unit - unit_start[s];
      if (rest % chunks != 0) return;
      rest /= chunks;
      const int64_t kvh = rest % hkv, tile = rest / hkv;
      const int64_t i0 = tile * kQueryTile, i1 = std::min(lq, i0 + kQueryTile);
      Unit u = MakeUnit((i1 - i0) * group, dh);
      const DF d;
      for (int64_t r = 0; r < u.rows; ++r) {
        float m = kNegInf;
        for (int64_t ci = 0; ci < chunks; ++ci)
          m = std::max(m, partial[(size_t(unit + ci) * size_t(kQueryTile * group) + size_t(r)) * row_floats]);
        float l = 0.0f;
        float* o = u.o + size_t(r) * dp;
        for (int64_t ci = 0; ci < chunks; ++ci) {
          const float* src = partial + (size_t(unit + ci) * size_t(kQueryTile * group) + size_t(r)) * row_floats;
          if (src[1] == 0.0f) continue;  // a chunk past this row's last visible key
          const float w = std::exp(src[0] - m);
          l += src[1] * w;
          const VF wv = hn::Set(d, w);
          for (size_t cc = 0; cc < dp; cc += hn::Lanes(d))
            hn::StoreU(hn::MulAdd(hn::LoadU(d, src + 2 + cc), wv, hn::LoadU(d, o + cc)), d, o + cc);
        }
        u.m[r] = m;
        u.l[r] = l;
      }
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t r = (i - i0) * group + g, h = kvh * group + g;
          FinishRow(u, r, HeadPtr<T>(p.out, q0 + i, p.out_token_stride, h, p.out_head_stride), dh,
                    p.lse ? &p.lse[h * p.total_q + q0 + i] : nullptr);
        }
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
