// fused_ffn on CUDA: out[T, F] = silu(rmsnorm(x) . Wg^T) * (rmsnorm(x) . Wu^T)
// in one pass over the weights. A warp owns two output columns f: it streams
// rows f, f+1 of Wg and of Wu together (matvec.cuh), so the silu * up epilogue
// needs nothing from other warps and no [T, F] intermediate touches memory.
// The norm factors in as x * norm_weight along K and one 1/rms per token after
// the dot products (constant along K).
//   SPLIT: each block computes the 1/rms of its tokens once.
//   NAIVE: every warp (two outputs) recomputes them: the seed's lesson, for the bench.
//   T >= 2 with x and weights of one 16-bit dtype (SPLIT): tensor cores, below.
//   T <= 8 (SPLIT), dense weights of x's 16-bit dtype or int4 weights of group
//   128 with f16/bf16 x: first the persistent streaming kernel (dstream.cuh)
//   where x (and the int4 scale tables) fit its shared memory. H100, D 4096
//   F 14336 dense: 81-84 us at T = 1 and 8 (before: 83.6 CUDA cores at T = 1,
//   108 for the mma kernel below at T = 8).
#include "cuda/dstream.cuh"
#include "cuda/matvec.cuh"
#include "cuda/ops.h"
#include "cuda/qmma.cuh"

namespace tk::cuda {
namespace {

constexpr int kCols = 2;  // output columns per warp: 2 gate rows + 2 up rows
constexpr int kRows = 2 * kCols;

template <class T>
__device__ __forceinline__ float silu(float g) {
  return g / (1.0f + expf(-g));
}

// Weights: dense (kW elements of Tw per access) or int4 (Tw = void).
template <class Tw, int kW, int kT, bool kAligned>
__global__ void __launch_bounds__(kMvWarps * 32)
    ffn_kernel(tk_fused_ffn_params p, int64_t t_tiles, int ksplit, bool x_vec) {
  // acc[t][kRows]: sum of squares of x_t over this warp's share of D.
  __shared__ float red[kMvWarps * kT * (kRows + 1)];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = blockIdx.x % t_tiles, col_block = blockIdx.x / t_tiles;
  const int groups = kMvWarps / ksplit, kpart = warp % ksplit;
  const int64_t f0 = (col_block * groups + warp / ksplit) * kCols;
  const int64_t t0 = tile * kT;
  const int64_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const MvAct a{static_cast<const char*>(p.x) + t0 * p.x_stride * xsz, p.x_stride * xsz,
                int(std::min<int64_t>(kT, p.T - t0)), p.dtype, p.norm_weight};

  float acc[kT][kRows + 1] = {};
  if constexpr (std::is_void_v<Tw>) {
    QRow w[kRows];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t f = std::min<int64_t>(f0 + c, p.F - 1);
      w[c] = qrow(p.q_gate, f);
      w[kCols + c] = qrow(p.q_up, f);
    }
    mv_dot_int4<kT, kRows, true, kAligned>(w, a, int64_t(kpart) * 32 + lane, p.D / 32, 32 * ksplit, acc);
  } else {
    const Tw* w[kRows];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int64_t f = std::min<int64_t>(f0 + c, p.F - 1);
      w[c] = static_cast<const Tw*>(p.w_gate) + f * p.w_gate_stride;
      w[kCols + c] = static_cast<const Tw*>(p.w_up) + f * p.w_up_stride;
    }
    mv_dot<Tw, kW, kT, kRows, true, mv_unroll<kW, kT>()>(w, a, int64_t(kpart) * 32 + lane, p.D / kW, 32 * ksplit, acc);
  }
  mv_reduce<kT, kRows + 1>(acc, red, ksplit);
  // SPLIT: the statistic came with the weight pass (mv_dot's sum of squares).
  // NAIVE: every warp reads x again for it: the seed's lesson, for the bench.
  float inv[kT];
  if (p.algo == TK_FUSED_NAIVE) {
#pragma unroll
    for (int t = 0; t < kT; ++t)
      inv[t] = t < a.rows ? (x_vec ? mv_inv_rms<true>(p.dtype, a.x + t * a.stride_bytes, p.D, p.eps)
                                   : mv_inv_rms<false>(p.dtype, a.x + t * a.stride_bytes, p.D, p.eps))
                          : 0.0f;
  } else {
#pragma unroll
    for (int t = 0; t < kT; ++t) inv[t] = rsqrtf(acc[t][kRows] / float(p.D) + p.eps);
  }
  if (kpart != 0) return;
#pragma unroll
  for (int t = 0; t < kT; ++t)
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (lane == (t * kCols + c) % 32 && t < a.rows && f0 + c < p.F) {
        const float g = acc[t][c] * inv[t], u = acc[t][kCols + c] * inv[t];
        store_any(p.dtype, p.out, (t0 + t) * p.out_stride + f0 + c, silu<float>(g) * u);
      }
}

template <class Tw, int kW, int kT, bool kAligned>
tk_status launch_tiles(const tk_fused_ffn_params& p, const Launch& l, int64_t accesses, bool x_vec) {
  const int64_t t_tiles = (p.T + kT - 1) / kT;
  const int64_t col_warps = (p.F + kCols - 1) / kCols;
  constexpr bool kDecode = !std::is_void_v<Tw> && mv_unroll<kW, kT>() == kMvDecodeUnroll;
  const int ksplit = kDecode ? mv_ksplit_short(accesses, kMvDecodeUnroll)
                             : mv_ksplit(col_warps * t_tiles, accesses, l.num_sms,
                                         std::is_void_v<Tw> ? 1 : kMvUnroll);
  const int64_t cols_per_block = int64_t(kCols) * (kMvWarps / ksplit);
  const int64_t blocks = (p.F + cols_per_block - 1) / cols_per_block * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "fused_ffn: T = %lld x F = %lld is too large for one launch",
                (long long)p.T, (long long)p.F);
  ffn_kernel<Tw, kW, kT, kAligned>
      <<<unsigned(blocks), kMvWarps * 32, 0, l.stream>>>(p, t_tiles, ksplit, x_vec);
  return check_launch("fused_ffn");
}


// ---- tensor-core path (T >= 2; x, norm weight and W of one 16-bit dtype) --
// As matmul's mma path (matmul.cu): 16-byte chunks of W rows are A fragments
// as they stand and the matching 16 bytes of activations the B fragments. A
// warp owns 8 output columns: A rows 0..7 are gate rows f0..f0+7 and rows
// 8..15 the up rows of the same columns, so a lane's accumulators c0, c1
// (gate) and c2, c3 (up) belong to the same column and tokens: silu(g) * u
// needs no other lane. B is x * norm_weight rounded to the activation dtype
// (the normalised row an unfused chain would store); 1/rms, constant along D,
// multiplies the dot products afterwards, its sum of squares accumulated in
// f32 from the x chunks the lane loads anyway.
template <class T, int kTT>
__global__ void __launch_bounds__(kMvWarps * 32, kTT == 1 ? 6 : 3)
    ffn_mma_kernel(tk_fused_ffn_params p, int64_t t_tiles, int ksplit) {
  using Q = QmmaType<T>;
  constexpr int kU = 4;  // quad steps in flight: 8 x 16-byte W loads per lane
  __shared__ float red[kMvWarps][kTT * 5][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t tile = blockIdx.x % t_tiles, col_block = blockIdx.x / t_tiles;
  const int kpart = warp % ksplit;
  const int64_t f0 = (col_block * (kMvWarps / ksplit) + warp / ksplit) * 8;
  const int64_t f = std::min<int64_t>(f0 + g, p.F - 1);
  const T* wg = static_cast<const T*>(p.w_gate) + f * p.w_gate_stride;
  const T* wu = static_cast<const T*>(p.w_up) + f * p.w_up_stride;
  const T* nw = static_cast<const T*>(p.norm_weight);
  const int64_t t0 = tile * kTT * 8;
  const T* xr[kTT];  // token t0 + 8 tt + g (rows past T repeat the last; results dropped)
#pragma unroll
  for (int tt = 0; tt < kTT; ++tt)
    xr[tt] = static_cast<const T*>(p.x) + std::min<int64_t>(t0 + tt * 8 + g, p.T - 1) * p.x_stride;
  const int64_t chunks = p.D / 8, quads = (chunks + 3) / 4;

  float acc[kTT][4] = {}, ss[kTT] = {};
  // Each warp takes one contiguous range of quad steps, so a round's kU
  // steps read kU x 64 contiguous bytes of each row back to back (the
  // ksplit warps' steps interleaved would read 64-byte pieces 256 bytes apart).
  const int64_t per_warp = (quads + ksplit - 1) / ksplit;
  const int64_t q_begin = kpart * per_warp, q_end = std::min(quads, q_begin + per_warp);
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kU) {
    uint4 ra[kU], rb[kU];
    mma_quad_loads(ra, rb, wg, wu, q0, q_end, chunks, t4);  // past D: zeros (and zero x below)
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t q = q0 + u;
      if (q >= q_end) break;  // warp-uniform
      const int64_t c = q * 4 + t4;
      const bool in = c < chunks;
      float nwf[8];
      unpack<T>(in ? ld16(nw + c * 8) : make_uint4(0, 0, 0, 0), nwf);
      const uint32_t a0[4] = {ra[u].x, rb[u].x, ra[u].y, rb[u].y};
      const uint32_t a1[4] = {ra[u].z, rb[u].z, ra[u].w, rb[u].w};
#pragma unroll
      for (int tt = 0; tt < kTT; ++tt) {
        float xf[8];
        unpack<T>(in ? ld16(xr[tt] + c * 8) : make_uint4(0, 0, 0, 0), xf);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          ss[tt] = fmaf(xf[e], xf[e], ss[tt]);
          xf[e] *= nwf[e];
        }
        const uint4 b = pack<T>(xf);
        Q::mma(acc[tt], a0, b.x, b.y);
        Q::mma(acc[tt], a1, b.z, b.w);
      }
    }
  }
#pragma unroll
  for (int tt = 0; tt < kTT; ++tt) {  // the 4 lanes of token g split its chunks
    ss[tt] += __shfl_xor_sync(0xffffffffu, ss[tt], 1);
    ss[tt] += __shfl_xor_sync(0xffffffffu, ss[tt], 2);
  }
  if (ksplit > 1) {  // uniform per block: the products and the sums of squares together
    float v[kTT][5];
#pragma unroll
    for (int tt = 0; tt < kTT; ++tt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) v[tt][i] = acc[tt][i];
      v[tt][4] = ss[tt];
    }
    ksplit_sum(v, red, ksplit, kpart);
#pragma unroll
    for (int tt = 0; tt < kTT; ++tt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[tt][i] = v[tt][i];
      ss[tt] = v[tt][4];
    }
  }
  if (kpart != 0) return;
#pragma unroll
  for (int tt = 0; tt < kTT; ++tt) {
    const float inv_g = rsqrtf(ss[tt] / float(p.D) + p.eps);  // of token 8 tt + g
    // c0, c2: token 2t4 (held by lanes 8 t4 ..); c1, c3: token 2t4 + 1.
    const float inv[2] = {__shfl_sync(0xffffffffu, inv_g, 8 * t4),
                          __shfl_sync(0xffffffffu, inv_g, 8 * t4 + 4)};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t tok = t0 + tt * 8 + 2 * t4 + i;
      if (tok < p.T && f0 + g < p.F) {
        const float gate = acc[tt][i] * inv[i], up = acc[tt][2 + i] * inv[i];
        static_cast<T*>(p.out)[tok * p.out_stride + f0 + g] = from_f32<T>(silu<float>(gate) * up);
      }
    }
  }
}

template <class T, int kTT>
tk_status launch_mma(const tk_fused_ffn_params& p, const Launch& l) {
  const int64_t t_tiles = (p.T + kTT * 8 - 1) / (kTT * 8);
  const int64_t quads = (p.D / 8 + 3) / 4;
  int ksplit = 1;  // each warp keeps at least two rounds of quad steps
  while (ksplit < kMvWarps && quads >= int64_t(16) * ksplit) ksplit *= 2;
  const int64_t tiles_per_block = kMvWarps / ksplit;
  const int64_t col_tiles = (p.F + 7) / 8;
  const int64_t blocks = (col_tiles + tiles_per_block - 1) / tiles_per_block * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "fused_ffn: T = %lld x F = %lld is too large for one launch",
                (long long)p.T, (long long)p.F);
  ffn_mma_kernel<T, kTT><<<unsigned(blocks), kMvWarps * 32, 0, l.stream>>>(p, t_tiles, ksplit);
  return check_launch("fused_ffn");
}

template <class Tw>
tk_status launch_dense(const tk_fused_ffn_params& p, const Launch& l) {
  const size_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const bool x_vec = p.D % 8 == 0 && rows_aligned16(p.x, p.x_stride, xsz, p.T) &&
                     aligned16(p.norm_weight);
  const bool vec = x_vec && p.D % kPack<Tw> == 0 &&
                   rows_aligned16(p.w_gate, p.w_gate_stride, sizeof(Tw), p.F) &&
                   rows_aligned16(p.w_up, p.w_up_stride, sizeof(Tw), p.F);
  if (!vec) return launch_tiles<Tw, 1, 1, false>(p, l, p.D, x_vec);
  const int64_t acc = p.D / kPack<Tw>;
  if constexpr (!std::is_same_v<Tw, float>) {
    // T <= 8, one 16-bit dtype: the persistent streaming kernel (dstream.cuh)
    // where x fits its shared memory.
    if (p.dtype == p.weight_dtype && p.algo != TK_FUSED_NAIVE && p.T <= kDsMaxT) {
      const DsArgs a = ds_args(p.w_gate, p.w_gate_stride, p.w_up, p.w_up_stride, p.x, p.x_stride, p.T, p.norm_weight,
                     p.eps, p.out, p.out_stride, p.F, p.D);
      tk_status s = TK_OK;
      if (try_dstream<Tw, true>(a, l, &s, "fused_ffn")) return s;
    }
  }
  if (p.T == 1) return launch_tiles<Tw, kPack<Tw>, 1, true>(p, l, acc, x_vec);
  if constexpr (!std::is_same_v<Tw, float>) {
    if (p.dtype == p.weight_dtype && p.algo != TK_FUSED_NAIVE)
      return p.T <= 8 ? launch_mma<Tw, 1>(p, l) : launch_mma<Tw, 4>(p, l);
  }
  if (p.T <= 4) return launch_tiles<Tw, kPack<Tw>, 4, true>(p, l, acc, x_vec);
  return launch_tiles<Tw, kPack<Tw>, 8, true>(p, l, acc, x_vec);
}

tk_status launch_int4(const tk_fused_ffn_params& p, const Launch& l) {
  const size_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const bool x_vec = rows_aligned16(p.x, p.x_stride, xsz, p.T) && aligned16(p.norm_weight);
  const bool aligned = x_vec && aligned16(p.q_gate.packed) && aligned16(p.q_up.packed);
  const int64_t acc = p.D / 32;
  if (!aligned) return launch_tiles<void, 32, 1, false>(p, l, acc, x_vec);
  // T <= 8, group 128, f16/bf16 x, both matrices' scales (and zero codes)
  // alike and 16-byte aligned: the persistent streaming kernel (dstream.cuh,
  // kInt4), where x and the block's scale tables fit its shared memory.
  const tk_int4_weights &qg = p.q_gate, &qu = p.q_up;
  if (p.T <= kDsMaxT && p.algo != TK_FUSED_NAIVE && (p.dtype == TK_F16 || p.dtype == TK_BF16) && qg.group_size == 128 &&
      qu.group_size == 128 && qg.scale_dtype == qu.scale_dtype && !qg.zeros == !qu.zeros &&
      aligned16(qg.scales) && aligned16(qu.scales) && (!qg.zeros || (aligned16(qg.zeros) && aligned16(qu.zeros)))) {
    DsArgs a = ds_args(qg.packed, 0, qu.packed, 0, p.x, p.x_stride, p.T, p.norm_weight, p.eps, p.out,
                       p.out_stride, p.F, p.D);
    a.s0 = static_cast<const uint16_t*>(qg.scales), a.s1 = static_cast<const uint16_t*>(qu.scales);
    a.z0 = qg.zeros, a.z1 = qu.zeros, a.bf16_scales = qg.scale_dtype == TK_BF16;
    tk_status s = TK_OK;
    if (p.dtype == TK_F16 ? try_dstream_int4<__half>(a, l, &s, "fused_ffn")
                          : try_dstream_int4<__nv_bfloat16>(a, l, &s, "fused_ffn"))
      return s;
  }
  if (p.T == 1) return launch_tiles<void, 32, 1, true>(p, l, acc, x_vec);
  if (p.T <= 4) return launch_tiles<void, 32, 4, true>(p, l, acc, x_vec);
  return launch_tiles<void, 32, 8, true>(p, l, acc, x_vec);
}

}  // namespace

tk_status fused_ffn(const tk_fused_ffn_params& p, const Launch& l) {
  if (p.T == 0) return TK_OK;
  if (p.format == TK_WEIGHTS_INT4) return launch_int4(p, l);
  TK_DISPATCH_DTYPE(p.weight_dtype, Tw, return launch_dense<Tw>(p, l);)
  return fail(TK_ERR_UNSUPPORTED, "fused_ffn: unsupported weight dtype %d", int(p.weight_dtype));
}

}  // namespace tk::cuda
