// attn_front on CUDA: rmsnorm -> QKV projection -> RoPE on q and k -> q to
// q_out, k and v into the paged cache, in one kernel and one pass over Wqkv.
// RoPE mixes two rows of the projection (i and i + rot_dim/2, or 2i and 2i+1),
// so a warp owns whole rotation pairs: "units" of one pair (or one row past
// rot_dim), two units (four W rows) per warp. The projection is decode-bound
// by reading Wqkv once (matvec.cuh); the epilogue rotates in registers and
// scatters to the cache after bounds-checking positions, seq_ids and the block
// table (device memory: out-of-range entries skip their writes and raise the
// sticky error flag).
#include "cuda/dstream.cuh"
#include "cuda/matvec.cuh"
#include "cuda/ops.h"

namespace tk::cuda {
namespace {

constexpr int kUnits = 2;  // rotation units per warp
constexpr int kRows = 2 * kUnits;

struct Geometry {
  int64_t heads;           // Hq + 2 Hkv
  int64_t units_per_head;  // rot_dim/2 pairs + (Dh - rot_dim) single rows
  int64_t units;           // heads * units_per_head
};

template <class T, int kW, int kT>
__global__ void __launch_bounds__(kMvWarps * 32)
    attn_front_kernel(tk_attn_front_params p, Geometry geo, int64_t t_tiles, int ksplit,
                      unsigned int* error_flag) {
  // acc[t][kRows]: sum of squares of x_t over this warp's share of D.
  __shared__ float red[kMvWarps * kT * (kRows + 1)];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = blockIdx.x % t_tiles, unit_block = blockIdx.x / t_tiles;
  const int groups = kMvWarps / ksplit, kpart = warp % ksplit;
  const int64_t u0 = (unit_block * groups + warp / ksplit) * kUnits;
  const int64_t dh = p.cache.head_dim, half = p.rot_dim / 2, n_rows = geo.heads * dh;
  const bool neox = p.rope_style == TK_ROPE_NEOX;

  const T* w[kRows];
#pragma unroll
  for (int j = 0; j < kUnits; ++j) {
    const int64_t unit = std::min<int64_t>(u0 + j, geo.units - 1);
    const int64_t h = unit / geo.units_per_head;
    int64_t a, b;
    ds_unit_rows(unit - h * geo.units_per_head, half, p.rot_dim, neox, &a, &b);
    const int64_t ra = h * dh + a, rb = b < 0 ? ra : h * dh + b;
    w[2 * j] = static_cast<const T*>(p.w_qkv) + std::min(ra, n_rows - 1) * p.w_qkv_stride;
    w[2 * j + 1] = static_cast<const T*>(p.w_qkv) + std::min(rb, n_rows - 1) * p.w_qkv_stride;
  }
  const int64_t t0 = tile * kT;
  const MvAct a{static_cast<const char*>(p.x) + t0 * p.x_stride * int64_t(sizeof(T)),
                p.x_stride * int64_t(sizeof(T)), int(std::min<int64_t>(kT, p.T - t0)), p.dtype,
                p.norm_weight};
  // The epilogue's position and sequence id, loaded before the weight pass:
  // otherwise they start a chain of dependent round trips (position -> table
  // row and block table -> store) after it, in every block.
  const int my_t = lane / kUnits, my_j = lane % kUnits;  // lane 2t + j finishes unit j of token t
  const int64_t tok = t0 + std::min(my_t, a.rows - 1);
  const int32_t pos = p.positions[tok];
  const int32_t seq = p.seq_ids[tok];
  float acc[kT][kRows + 1] = {};
  mv_dot<T, kW, kT, kRows, true, mv_unroll<kW, kT>()>(w, a, int64_t(kpart) * 32 + lane, p.D / kW, 32 * ksplit, acc);
  mv_reduce<kT, kRows + 1>(acc, red, ksplit);
  if (kpart != 0) return;

  float va = 0.0f, vb = 0.0f, ss = 0.0f;
#pragma unroll
  for (int t = 0; t < kT; ++t)
#pragma unroll
    for (int j = 0; j < kUnits; ++j)
      if (t == my_t && j == my_j) {
        va = acc[t][2 * j];
        vb = acc[t][2 * j + 1];
        ss = acc[t][kRows];
      }
  const int64_t unit = u0 + my_j;
  if (my_t >= a.rows || unit >= geo.units) return;
  const float inv = rsqrtf(ss / float(p.D) + p.eps);
  va *= inv;
  vb *= inv;
  const int64_t h = unit / geo.units_per_head, u = unit - h * geo.units_per_head;
  const int64_t hq = p.num_q_heads, hkv = p.cache.num_kv_heads;
  if (pos < 0 || pos >= p.max_pos) {
    raise_index_error(error_flag);
    return;
  }
  int64_t ra, rb;
  ds_unit_rows(u, half, p.rot_dim, neox, &ra, &rb);
  if (h < hq + hkv && u < half) {
    const float c = p.cos_table[int64_t(pos) * half + u], s = p.sin_table[int64_t(pos) * half + u];
    const float x0 = va, x1 = vb;
    va = x0 * c - x1 * s;
    vb = x0 * s + x1 * c;
  }
  T* dst;
  if (h < hq) {
    dst = static_cast<T*>(p.q_out) + (tok * hq + h) * dh;
  } else {
    const tk_paged_kv_cache& c = p.cache;
    const int64_t bi = pos / c.page_size;
    if (seq < 0 || seq >= c.num_seqs || bi >= c.max_blocks_per_seq) {
      raise_index_error(error_flag);
      return;
    }
    const int32_t block = c.block_table[int64_t(seq) * c.max_blocks_per_seq + bi];
    if (block < 0 || block >= c.num_blocks) {
      raise_index_error(error_flag);
      return;
    }
    const int64_t slot = int64_t(block) * c.page_size + pos % c.page_size;
    const bool is_k = h < hq + hkv;
    dst = static_cast<T*>(is_k ? c.k : c.v) + (slot * hkv + (h - hq - (is_k ? 0 : hkv))) * dh;
  }
  dst[ra] = from_f32<T>(va);
  if (rb >= 0) dst[rb] = from_f32<T>(vb);
}

template <class T, int kW, int kT>
tk_status launch_tiles(const tk_attn_front_params& p, const Launch& l, const Geometry& geo) {
  const int64_t t_tiles = (p.T + kT - 1) / kT;
  const int64_t unit_warps = (geo.units + kUnits - 1) / kUnits;
  constexpr int kU = mv_unroll<kW, kT>();
  const int ksplit = kU == kMvDecodeUnroll ? mv_ksplit_short(p.D / kW, kU)
                                           : mv_ksplit(unit_warps * t_tiles, p.D / kW, l.num_sms);
  const int64_t units_per_block = int64_t(kUnits) * (kMvWarps / ksplit);
  const int64_t blocks = (geo.units + units_per_block - 1) / units_per_block * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "attn_front: T = %lld is too large for one launch",
                (long long)p.T);
  attn_front_kernel<T, kW, kT><<<unsigned(blocks), kMvWarps * 32, 0, l.stream>>>(
      p, geo, t_tiles, ksplit, l.error_flag);
  return check_launch("attn_front");
}

template <class T>
tk_status launch(const tk_attn_front_params& p, const Launch& l) {
  Geometry geo;
  geo.heads = p.num_q_heads + 2 * p.cache.num_kv_heads;
  geo.units_per_head = p.rot_dim / 2 + (p.cache.head_dim - p.rot_dim);
  geo.units = geo.heads * geo.units_per_head;
  const bool vec = p.D % kPack<T> == 0 && rows_aligned16(p.x, p.x_stride, sizeof(T), p.T) &&
                   aligned16(p.norm_weight) &&
                   rows_aligned16(p.w_qkv, p.w_qkv_stride, sizeof(T), geo.heads * p.cache.head_dim);
  if (!vec) return launch_tiles<T, 1, 1>(p, l, geo);
  // T <= 8: the persistent streaming kernel (dstream.cuh) where x fits its
  // shared memory: a tile is 8 units, A rows 0..7 their first rows and 8..15
  // their partners, so RoPE runs on one lane's sums, as here.
  if constexpr (!std::is_same_v<T, float>) {
    if (p.T <= kDsMaxT) {
      tk_status s = TK_OK;
      if (try_dstream_attn<T>(p, geo.units_per_head, l, &s)) return s;
    }
  }
  if (p.T == 1) return launch_tiles<T, kPack<T>, 1>(p, l, geo);
  if (p.T <= 4) return launch_tiles<T, kPack<T>, 4>(p, l, geo);
  return launch_tiles<T, kPack<T>, 8>(p, l, geo);
}

}  // namespace

tk_status attn_front(const tk_attn_front_params& p, const Launch& l) {
  if (p.T == 0) return TK_OK;
  TK_DISPATCH_DTYPE(p.dtype, T, return launch<T>(p, l);)
  return fail(TK_ERR_UNSUPPORTED, "attn_front: unsupported dtype %d", int(p.dtype));
}

}  // namespace tk::cuda
