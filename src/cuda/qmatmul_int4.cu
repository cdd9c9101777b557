// qmatmul_int4 on CUDA: y[T, N] = x[T, K] . dequant(W)[N, K]^T with the packed
// int4 layout of tiny_kernel.h, dequantised in registers.
//   Group size 128 with f16/bf16 activations (the common case): tensor cores
//   (qmma.cuh), 16 rows x 8 tokens per mma, for every T.
//   Otherwise (f32 activations, groups of 32/64, unaligned): the CUDA-core
//   loop of matvec.cuh, each lane streaming 16-byte chunks of four rows.
#include "cuda/matvec.cuh"
#include "cuda/ops.h"
#include "cuda/qmma.cuh"

namespace tk::cuda {
namespace {

constexpr int kRows = 4;  // W rows per warp

template <int kT, bool kAligned>
__global__ void __launch_bounds__(kMvWarps * 32)
    qmatmul_kernel(tk_qmatmul_int4_params p, int64_t t_tiles, int ksplit) {
  __shared__ float red[kMvWarps * kT * kRows];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = blockIdx.x % t_tiles, row_block = blockIdx.x / t_tiles;
  const int groups = kMvWarps / ksplit, kpart = warp % ksplit;
  const int64_t n0 = (row_block * groups + warp / ksplit) * kRows;
  QRow w[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) w[r] = qrow(p.w, std::min<int64_t>(n0 + r, p.w.N - 1));
  const int64_t t0 = tile * kT;
  const int64_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const MvAct a{static_cast<const char*>(p.x) + t0 * p.x_stride * xsz, p.x_stride * xsz,
                int(std::min<int64_t>(kT, p.T - t0)), p.dtype, nullptr};
  float acc[kT][kRows] = {};
  mv_dot_int4<kT, kRows, false, kAligned>(w, a, int64_t(kpart) * 32 + lane, p.w.K / 32,
                                          32 * ksplit, acc);
  mv_reduce<kT, kRows>(acc, red, ksplit);
  if (kpart != 0) return;
#pragma unroll
  for (int t = 0; t < kT; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (lane == (t * kRows + r) % 32 && t < a.rows && n0 + r < p.w.N)
        store_any(p.dtype, p.y, (t0 + t) * p.y_stride + n0 + r, acc[t][r]);
}

template <int kT, bool kAligned>
tk_status launch_tiles(const tk_qmatmul_int4_params& p, const Launch& l) {
  const int64_t t_tiles = (p.T + kT - 1) / kT;
  const int64_t row_warps = (p.w.N + kRows - 1) / kRows;
  const int ksplit = mv_ksplit(row_warps * t_tiles, p.w.K / 32, l.num_sms, 1);
  const int64_t rows_per_block = int64_t(kRows) * (kMvWarps / ksplit);
  const int64_t blocks = (p.w.N + rows_per_block - 1) / rows_per_block * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "qmatmul_int4: T = %lld x N = %lld is too large for one launch",
                (long long)p.T, (long long)p.w.N);
  qmatmul_kernel<kT, kAligned><<<unsigned(blocks), kMvWarps * 32, 0, l.stream>>>(p, t_tiles, ksplit);
  return check_launch("qmatmul_int4");
}

// ---- tensor-core path ----------------------------------------------------
// A warp owns 16 weight rows and kTT tiles of 8 tokens; the ksplit warps of a
// row tile split the K groups and add up through shared memory. kSteps
// groups' weight loads (2 x 16 bytes each per lane) are issued before the
// first is used. Two steps and <= 80 registers (6 blocks per SM) rather than
// more steps and fewer blocks: N = 14336 is 896 blocks of 16 rows, one wave at
// 6-7 blocks per SM, and 6 x 128 x 4 loads of 16 bytes in flight per SM are
// about three times what Little's law asks of HBM.
template <int kTT>
constexpr int qmma_steps() { return 2; }

template <class Ta, int kTT>
__global__ void __launch_bounds__(kMvWarps * 32, kTT == 1 ? 6 : 3)
    qmma_kernel(tk_qmatmul_int4_params p, int64_t t_tiles, int ksplit) {
  using Q = QmmaType<Ta>;
  constexpr int kSteps = qmma_steps<kTT>();
  __shared__ float red[kMvWarps][kTT * 4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t tile = blockIdx.x % t_tiles, row_block = blockIdx.x / t_tiles;
  const int kpart = warp % ksplit;
  const int64_t n0 = (row_block * (kMvWarps / ksplit) + warp / ksplit) * 16;
  const int64_t N = p.w.N, K = p.w.K, ngroups = K / 128;
  const int64_t ra = std::min<int64_t>(n0 + g, N - 1), rb = std::min<int64_t>(n0 + g + 8, N - 1);
  const uint8_t* qa = p.w.packed + ra * (K / 2) + 16 * t4;
  const uint8_t* qb = p.w.packed + rb * (K / 2) + 16 * t4;
  const uint16_t* sa = static_cast<const uint16_t*>(p.w.scales) + ra * ngroups;
  const uint16_t* sb = static_cast<const uint16_t*>(p.w.scales) + rb * ngroups;
  const uint8_t* za = p.w.zeros ? p.w.zeros + ra * ngroups : nullptr;
  const uint8_t* zb = p.w.zeros ? p.w.zeros + rb * ngroups : nullptr;
  const bool bf16s = p.w.scale_dtype == TK_BF16;
  const int64_t t0 = tile * kTT * 8;
  const char* xr[kTT];  // token t0 + 8 tt + g (rows past T repeat the last; results dropped)
#pragma unroll
  for (int tt = 0; tt < kTT; ++tt)
    xr[tt] = static_cast<const char*>(p.x) +
             std::min<int64_t>(t0 + tt * 8 + g, p.T - 1) * p.x_stride * int64_t(sizeof(Ta)) +
             32 * t4 * int64_t(sizeof(Ta));

  float acc[kTT][4] = {};
  // Warps interleave groups (warp kpart takes kpart, kpart + ksplit, ...), so
  // the block's warps read a row's consecutive 64-byte groups together. One
  // contiguous range per warp (as the dense mma kernels do) measured slower
  // here on the H100: 26.5 vs 23.8 us at T = 1, 32.4 vs 30.5 at T = 8.
  for (int64_t s0 = kpart; s0 < ngroups; s0 += int64_t(ksplit) * kSteps) {
    uint4 wa[kSteps], wb[kSteps];
    float sca[kSteps], scb[kSteps];
    uint32_t zza[kSteps], zzb[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int64_t gi = s0 + int64_t(u) * ksplit;
      if (gi < ngroups) {
        wa[u] = ld16_stream(qa + gi * 64);
        wb[u] = ld16_stream(qb + gi * 64);
        sca[u] = qmma_scale(sa, gi, bf16s);
        scb[u] = qmma_scale(sb, gi, bf16s);
        const uint32_t z0 = Q::kBias | (za ? za[gi] : 8u), z1 = Q::kBias | (zb ? zb[gi] : 8u);
        zza[u] = z0 | z0 << 16;
        zzb[u] = z1 | z1 << 16;
      }
    }
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int64_t gi = s0 + int64_t(u) * ksplit;
      if (gi >= ngroups) break;
      uint32_t a[8][4];
      const uint32_t wra[4] = {wa[u].x, wa[u].y, wa[u].z, wa[u].w};
      const uint32_t wrb[4] = {wb[u].x, wb[u].y, wb[u].z, wb[u].w};
#pragma unroll
      for (int w = 0; w < 4; ++w) {
        uint32_t pa[4], pb[4];
        qmma_dequant_word<Ta>(wra[w], zza[u], pa);
        qmma_dequant_word<Ta>(wrb[w], zzb[u], pb);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a[2 * w + h][0] = pa[2 * h];      // row g,     slots 2t4, 2t4 + 1
          a[2 * w + h][1] = pb[2 * h];      // row g + 8
          a[2 * w + h][2] = pa[2 * h + 1];  // row g,     slots 2t4 + 8, 2t4 + 9
          a[2 * w + h][3] = pb[2 * h + 1];  // row g + 8
        }
      }
#pragma unroll
      for (int tt = 0; tt < kTT; ++tt) {
        uint32_t X[16];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint4 v = ld16(xr[tt] + gi * 128 * int64_t(sizeof(Ta)) + 16 * i);
          X[4 * i] = v.x; X[4 * i + 1] = v.y; X[4 * i + 2] = v.z; X[4 * i + 3] = v.w;
        }
        uint32_t b[8][2];
        qmma_b_frags(X, b);
        float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
        for (int j = 0; j < 8; ++j) Q::mma(c, a[j], b[j][0], b[j][1]);
        acc[tt][0] = fmaf(sca[u], c[0], acc[tt][0]);
        acc[tt][1] = fmaf(sca[u], c[1], acc[tt][1]);
        acc[tt][2] = fmaf(scb[u], c[2], acc[tt][2]);
        acc[tt][3] = fmaf(scb[u], c[3], acc[tt][3]);
      }
    }
  }
  if (ksplit > 1) {  // uniform per block
#pragma unroll
    for (int tt = 0; tt < kTT; ++tt)
#pragma unroll
      for (int i = 0; i < 4; ++i) red[warp][tt * 4 + i][lane] = acc[tt][i];
    __syncthreads();
    if (kpart == 0)
      for (int j = 1; j < ksplit; ++j)
#pragma unroll
        for (int tt = 0; tt < kTT; ++tt)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[tt][i] += red[warp + j][tt * 4 + i][lane];
  }
  if (kpart != 0) return;
  // c0, c1: row g, tokens 2t4, 2t4 + 1; c2, c3: row g + 8.
#pragma unroll
  for (int tt = 0; tt < kTT; ++tt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = n0 + g + (i >= 2 ? 8 : 0), tok = t0 + tt * 8 + 2 * t4 + (i & 1);
      if (row < N && tok < p.T) static_cast<Ta*>(p.y)[tok * p.y_stride + row] = from_f32<Ta>(acc[tt][i]);
    }
}

template <class Ta, int kTT>
tk_status launch_qmma(const tk_qmatmul_int4_params& p, const Launch& l) {
  const int64_t t_tiles = (p.T + kTT * 8 - 1) / (kTT * 8);
  const int64_t ngroups = p.w.K / 128;
  int ksplit = 1;  // each warp keeps at least two groups
  while (ksplit < kMvWarps && ngroups >= int64_t(4) * ksplit) ksplit *= 2;
  const int64_t tiles_per_block = kMvWarps / ksplit;
  const int64_t row_tiles = (p.w.N + 15) / 16;
  const int64_t blocks = (row_tiles + tiles_per_block - 1) / tiles_per_block * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "qmatmul_int4: T = %lld x N = %lld is too large for one launch",
                (long long)p.T, (long long)p.w.N);
  qmma_kernel<Ta, kTT><<<unsigned(blocks), kMvWarps * 32, 0, l.stream>>>(p, t_tiles, ksplit);
  return check_launch("qmatmul_int4");
}

template <class Ta>
tk_status launch_qmma_t(const tk_qmatmul_int4_params& p, const Launch& l) {
  return p.T <= 8 ? launch_qmma<Ta, 1>(p, l) : launch_qmma<Ta, 4>(p, l);
}

}  // namespace

tk_status qmatmul_int4(const tk_qmatmul_int4_params& p, const Launch& l) {
  if (p.T == 0) return TK_OK;
  const size_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const bool aligned = aligned16(p.w.packed) && rows_aligned16(p.x, p.x_stride, xsz, p.T);
  if (!aligned) return launch_tiles<1, false>(p, l);
  // Tensor cores: 16-bit activations, one scale per 128 k (a K step of the
  // mma loop never straddles a group). x rows are 16-byte aligned (above).
  if (p.w.group_size == 128 && p.dtype == TK_F16) return launch_qmma_t<__half>(p, l);
  if (p.w.group_size == 128 && p.dtype == TK_BF16) return launch_qmma_t<__nv_bfloat16>(p, l);
  if (p.T == 1) return launch_tiles<1, true>(p, l);
  if (p.T <= 4) return launch_tiles<4, true>(p, l);
  return launch_tiles<8, true>(p, l);
}

}  // namespace tk::cuda
