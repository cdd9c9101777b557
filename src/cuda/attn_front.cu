// attn_front on CUDA: rmsnorm -> QKV projection -> RoPE on q and k -> q to
// q_out, k and v into the paged cache, in one kernel and one pass over Wqkv.
// RoPE mixes two rows of the projection (i and i + rot_dim/2, or 2i and 2i+1),
// so a warp owns whole rotation pairs: "units" of one pair (or one row past
// rot_dim), two units (four W rows) per warp. The projection is decode-bound
// by reading Wqkv once (matvec.cuh); the epilogue rotates in registers and
// scatters to the cache after bounds-checking positions, seq_ids and the block
// table (device memory: out-of-range entries skip their writes and raise the
// sticky error flag).
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
  float inv_d;             // 1 / D
};

// Local rows (within a head) of unit u: b < 0 for a single row.
__device__ __forceinline__ void unit_rows(int64_t u, int64_t half, int64_t rot_dim, bool neox,
                                          int64_t* a, int64_t* b) {
  if (u < half) {
    *a = neox ? u : 2 * u;
    *b = neox ? u + half : 2 * u + 1;
  } else {
    *a = rot_dim + (u - half);
    *b = -1;
  }
}

// Per-block costs matter here as much as the weight stream: at T = 1 a block
// streams 4 rows x 8 KB in one round, and the grid is only ~4 waves of such
// blocks (1536 for 6144 rows). So a warp locates its units with one
// division, and everything the epilogue reads from memory (cos/sin of the
// position, the block-table entry) is loaded while the weight loads are in
// flight (mv_dot's `issued` hook), leaving the epilogue no round trip.
template <class T, int kW, int kT>
__global__ void __launch_bounds__(kMvWarps * 32, 3)  // <= 168 registers: 3 blocks per SM
    attn_front_kernel(tk_attn_front_params p, Geometry geo, unsigned t_tiles, int ksplit,
                      unsigned int* error_flag) {
  // acc[t][kRows]: sum of squares of x_t over this warp's share of D.
  __shared__ float red[kMvWarps * kT * (kRows + 1)];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = blockIdx.x % t_tiles, unit_block = blockIdx.x / t_tiles;  // 32-bit division
  const int groups = kMvWarps / ksplit, kpart = warp % ksplit;
  const int64_t u0 = (unit_block * groups + warp / ksplit) * kUnits;
  const int64_t dh = p.cache.head_dim, half = p.rot_dim / 2, n_rows = geo.heads * dh;
  const bool neox = p.rope_style == TK_ROPE_NEOX;

  // Head and in-head index of a unit (< head_dim < 2^31).
  const auto locate = [&](int64_t unit, int64_t& h, int32_t& u) {
    h = unit / geo.units_per_head;
    u = int32_t(unit - h * geo.units_per_head);
  };
  const T* w[kRows];
  {
    int64_t h;  // units u0, u0 + 1 (clamped to the last unit), with one division
    int32_t u;
    locate(std::min(u0, geo.units - 1), h, u);
#pragma unroll
    for (int j = 0; j < kUnits; ++j) {
      if (j > 0 && u0 + j < geo.units && ++u == int32_t(geo.units_per_head)) {
        u = 0;
        ++h;
      }
      int64_t a, b;
      unit_rows(u, half, p.rot_dim, neox, &a, &b);
      const int64_t ra = h * dh + a, rb = b < 0 ? ra : h * dh + b;
      w[2 * j] = static_cast<const T*>(p.w_qkv) + std::min(ra, n_rows - 1) * p.w_qkv_stride;
      w[2 * j + 1] = static_cast<const T*>(p.w_qkv) + std::min(rb, n_rows - 1) * p.w_qkv_stride;
    }
  }
  const int64_t t0 = tile * kT;
  const MvAct a{static_cast<const char*>(p.x) + t0 * p.x_stride * int64_t(sizeof(T)),
                p.x_stride * int64_t(sizeof(T)), int(std::min<int64_t>(kT, p.T - t0)), p.dtype,
                p.norm_weight};
  // Lane 2t + j finishes unit j of token t. Its position and sequence id are
  // loaded before the weight pass, the rows they index (below) during it.
  const int my_t = lane / kUnits, my_j = lane % kUnits;
  const int64_t tok = t0 + std::min(my_t, a.rows - 1);
  const int32_t pos = p.positions[tok];
  const int32_t seq = p.seq_ids[tok];
  const int64_t hq = p.num_q_heads, hkv = p.cache.num_kv_heads;
  const tk_paged_kv_cache& c = p.cache;
  int64_t h = 0;  // the lane's unit
  int32_t u = 0;
  // pos / page_size in 32 bits: pos is an int32 >= 0 there, page_size < 2^31 (validated).
  const auto pos_ok = [&] { return pos >= 0 && pos < p.max_pos; };
  const auto rotated = [&] { return h < hq + hkv && u < half; };
  const auto block_index = [&] { return uint32_t(pos) / uint32_t(c.page_size); };
  const auto table_ok = [&] {
    return seq >= 0 && seq < c.num_seqs && int64_t(block_index()) < c.max_blocks_per_seq;
  };
  float cs = 1.0f, sn = 0.0f;
  int32_t block = 0;
  const auto load_epilogue = [&] {
    if (kpart != 0) return;
    locate(std::min(u0 + my_j, geo.units - 1), h, u);
    if (!pos_ok()) return;
    if (rotated()) {
      cs = p.cos_table[int64_t(pos) * half + u];
      sn = p.sin_table[int64_t(pos) * half + u];
    }
    if (h >= hq && table_ok()) block = c.block_table[int64_t(seq) * c.max_blocks_per_seq + block_index()];
  };
  float acc[kT][kRows + 1] = {};
  constexpr int kU = mv_unroll<kW, kT>();
  // T = 1: the epilogue's loads go out during the weight pass. Larger tiles
  // keep them after it: there, the registers they would hold across the
  // pass cost a block per SM (kT = 8: 186 instead of 168 registers).
  if constexpr (kT == 1)
    mv_dot<T, kW, kT, kRows, true, kU>(w, a, int64_t(kpart) * 32 + lane, p.D / kW, 32 * ksplit, acc,
                                       load_epilogue);
  else
    mv_dot<T, kW, kT, kRows, true, kU>(w, a, int64_t(kpart) * 32 + lane, p.D / kW, 32 * ksplit, acc);
  mv_reduce<kT, kRows + 1>(acc, red, ksplit);
  if (kpart != 0) return;
  if constexpr (kT > 1) load_epilogue();

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
  if (my_t >= a.rows || u0 + my_j >= geo.units) return;
  if (!pos_ok()) {
    raise_index_error(error_flag);
    return;
  }
  const float inv = rsqrtf(ss * geo.inv_d + p.eps);
  va *= inv;
  vb *= inv;
  int64_t ra, rb;
  unit_rows(u, half, p.rot_dim, neox, &ra, &rb);
  if (rotated()) {
    const float x0 = va, x1 = vb;
    va = x0 * cs - x1 * sn;
    vb = x0 * sn + x1 * cs;
  }
  T* dst;
  if (h < hq) {
    dst = static_cast<T*>(p.q_out) + (tok * hq + h) * dh;
  } else {
    if (!table_ok() || block < 0 || block >= c.num_blocks) {
      raise_index_error(error_flag);
      return;
    }
    const uint32_t bi = block_index();
    const int64_t slot = int64_t(block) * c.page_size + (uint32_t(pos) - bi * uint32_t(c.page_size));
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
      p, geo, unsigned(t_tiles), ksplit, l.error_flag);
  return check_launch("attn_front");
}

template <class T>
tk_status launch(const tk_attn_front_params& p, const Launch& l) {
  Geometry geo;
  geo.heads = p.num_q_heads + 2 * p.cache.num_kv_heads;
  geo.units_per_head = p.rot_dim / 2 + (p.cache.head_dim - p.rot_dim);
  geo.units = geo.heads * geo.units_per_head;
  geo.inv_d = 1.0f / float(p.D);
  const bool vec = p.D % kPack<T> == 0 && rows_aligned16(p.x, p.x_stride, sizeof(T), p.T) &&
                   aligned16(p.norm_weight) &&
                   rows_aligned16(p.w_qkv, p.w_qkv_stride, sizeof(T), geo.heads * p.cache.head_dim);
  if (!vec) return launch_tiles<T, 1, 1>(p, l, geo);
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
