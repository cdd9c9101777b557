// qmatmul_int4 on CUDA: y[T, N] = x[T, K] . dequant(W)[N, K]^T with the packed
// int4 layout of tiny_kernel.h, dequantised in registers.
//   T > 8 with f16/bf16 activations, any group size: the GEMM-shaped kernel
//   of qgemm_int4.cu (128 rows x 64 tokens per block, K through a cp.async ring).
//   T <= 8, group size 128, f16/bf16 (decode): the persistent streaming kernel
//   (qstream_kernel, qstream.cuh) where its shared memory fits and the scales
//   are 16-byte aligned, else the short-block tensor-core kernel below (qmma.cuh,
//   16 rows x 8 tokens per mma; its kTT = 4 shape is no longer launched).
//   Otherwise (f32 activations, groups of 32/64, unaligned): the CUDA-core
//   loop of matvec.cuh, each lane streaming 16-byte chunks of four rows.
#include "cuda/attention/primitives.cuh"
#include "cuda/matvec.cuh"
#include "cuda/ops.h"
#include "cuda/qmma.cuh"
#include "cuda/qstream.cuh"

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
// T <= 8 where qstream_kernel does not fit. A warp owns 16 weight rows and
// the one tile of 8 tokens; the ksplit warps of a row tile split the K groups
// and add up through shared memory. A round issues kSteps groups' weight
// loads (2 x 16 bytes each per lane) before the first is used.
//   8 warps of 4 steps, <= 128 registers, 2 blocks per SM (21.0 us at T = 1
//   on the H100, against 16.8 for qstream_kernel). For K = 4096 (32 groups) each warp's share is one round, so a
//   block lives for one HBM round trip plus the dequantisation of 4 groups,
//   and the grid (896 blocks for N = 14336) is 3.4 waves of such short
//   blocks, 16 warps x 4 KB in flight per SM (Little's law asks about a
//   third of that of HBM). The previous shape (4 warps of 2 steps, 6 blocks
//   per SM) made each warp wait out 4 round trips back to back, and its 896
//   blocks were 1.1 waves on 132 SMs: 22.6 us on the H100 (f16).
constexpr int kQmmaWarps = 8, kQmmaSteps = 4;

template <class Ta>
__global__ void __launch_bounds__(kQmmaWarps * 32, 2)
    qmma_kernel(tk_qmatmul_int4_params p, int ksplit_log2) {
  constexpr int kTT = 1;  // token tiles per warp (qmma_group's shape)
  constexpr int kWarps = kQmmaWarps, kSteps = kQmmaSteps;
  __shared__ float red[kWarps][kTT * 4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const unsigned row_block = blockIdx.x;
  const int ksplit = 1 << ksplit_log2, kpart = warp & (ksplit - 1);
  const int64_t n0 = (int64_t(row_block) * (kWarps >> ksplit_log2) + (warp >> ksplit_log2)) * 16;
  const int64_t N = p.w.N, K = p.w.K;
  const int ngroups = int(K / 128);  // a row of 2^31 groups would be 128 GB
  const int64_t ra = std::min<int64_t>(n0 + g, N - 1), rb = std::min<int64_t>(n0 + g + 8, N - 1);
  const uint8_t* qa = p.w.packed + ra * (K / 2) + 16 * t4;
  const uint8_t* qb = p.w.packed + rb * (K / 2) + 16 * t4;
  const uint16_t* sa = static_cast<const uint16_t*>(p.w.scales) + ra * ngroups;
  const uint16_t* sb = static_cast<const uint16_t*>(p.w.scales) + rb * ngroups;
  const uint8_t* za = p.w.zeros ? p.w.zeros + ra * ngroups : nullptr;
  const uint8_t* zb = p.w.zeros ? p.w.zeros + rb * ngroups : nullptr;
  const bool bf16s = p.w.scale_dtype == TK_BF16;
  const int64_t t0 = 0;
  const char* xr[kTT];  // token g (rows past T repeat the last; results dropped)
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
  // Loads of groups past the end (a warp's last round only) are clamped to the
  // last group, so the loads have no branches between them; a full round's
  // groups are dequantised with none either (the compiler interleaves their
  // mma chains), a partial round's skip the missing groups.
  for (int s0 = kpart; s0 < ngroups; s0 += ksplit * kSteps) {
    uint4 wa[kSteps], wb[kSteps];
#pragma unroll
    for (int u = 0; u < kSteps; ++u) {
      const int gi = std::min(s0 + u * ksplit, ngroups - 1);
      wa[u] = ld16_stream(qa + int64_t(gi) * 64);
      wb[u] = ld16_stream(qb + int64_t(gi) * 64);
    }
    // The 4 lanes of a row pair (same g) need the same scales and zero codes:
    // lane t4 loads those of group t4 % kSteps, the others come by shuffle
    // (4 loads and 2 registers per lane a round instead of 4 kSteps of each).
    const int gm = std::min(s0 + (t4 % kSteps) * ksplit, ngroups - 1);
    const uint32_t scales = uint32_t(sa[gm]) | uint32_t(sb[gm]) << 16;  // raw bits, rows g | g + 8
    const uint32_t zeros = za ? uint32_t(za[gm]) | uint32_t(zb[gm]) << 16 : 0x00080008u;
    const auto group = [&](int u) {
      const int gi = s0 + u * ksplit;
      const int src = (lane & ~3) | u;
      const uint32_t sc = __shfl_sync(0xffffffffu, scales, src), zc = __shfl_sync(0xffffffffu, zeros, src);
      float c[kTT][4] = {};
      const int64_t xoff = int64_t(gi) * 128 * int64_t(sizeof(Ta));
      qmma_group<Ta, kTT>(wa[u], wb[u], zc & 0xFFFFu, zc >> 16,
                          [&xr, xoff](int tt, int w) { return ld16(xr[tt] + xoff + 16 * w); }, c);
      const float fa = qmma_scale(uint16_t(sc), bf16s), fb = qmma_scale(uint16_t(sc >> 16), bf16s);
#pragma unroll
      for (int tt = 0; tt < kTT; ++tt) {
        acc[tt][0] = fmaf(fa, c[tt][0], acc[tt][0]);
        acc[tt][1] = fmaf(fa, c[tt][1], acc[tt][1]);
        acc[tt][2] = fmaf(fb, c[tt][2], acc[tt][2]);
        acc[tt][3] = fmaf(fb, c[tt][3], acc[tt][3]);
      }
    };
    if (s0 + (kSteps - 1) * ksplit < ngroups) {
#pragma unroll
      for (int u = 0; u < kSteps; ++u) group(u);
    } else {
#pragma unroll
      for (int u = 0; u < kSteps; ++u)
        if (s0 + u * ksplit < ngroups) group(u);
    }
  }
  ksplit_sum(acc, red, ksplit, kpart);
  if (kpart != 0) return;
#pragma unroll
  for (int tt = 0; tt < kTT; ++tt)
    store_mma_tile(acc[tt], static_cast<Ta*>(p.y), p.y_stride, n0, t0 + tt * 8, N, p.T);
}

template <class Ta>
tk_status launch_qmma(const tk_qmatmul_int4_params& p, const Launch& l) {
  constexpr int kWarps = kQmmaWarps, kSteps = kQmmaSteps;
  const int64_t ngroups = p.w.K / 128;
  int ksplit = 1, ksplit_log2 = 0;  // each warp keeps at least kSteps groups
  while (ksplit < kWarps && ngroups >= int64_t(2) * kSteps * ksplit) ksplit *= 2, ++ksplit_log2;
  const int64_t tiles_per_block = kWarps / ksplit;
  const int64_t row_tiles = (p.w.N + 15) / 16;
  const int64_t blocks = (row_tiles + tiles_per_block - 1) / tiles_per_block;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "qmatmul_int4: T = %lld x N = %lld is too large for one launch",
                (long long)p.T, (long long)p.w.N);
  qmma_kernel<Ta><<<unsigned(blocks), kWarps * 32, 0, l.stream>>>(p, ksplit_log2);
  return check_launch("qmatmul_int4");
}

// T <= 8: the streaming kernel where its shared memory fits, else the short blocks.
template <class Ta>
tk_status launch_decode(const tk_qmatmul_int4_params& p, const Launch& l) {
  QsPlan pl;
  unsigned grid;
  size_t smem_bytes;
  if (qs_plan<kQsSteps, kQsWarps>(p, l, kQsStages, pl, grid, smem_bytes))
    return launch_qstream<Ta, kQsSteps, kQsWarps>(p, l, pl, grid, smem_bytes);
  return launch_qmma<Ta>(p, l);
}

}  // namespace

tk_status qgemm_int4(const tk_qmatmul_int4_params& p, const Launch& l);  // qgemm_int4.cu: T > 8, any group

tk_status qmatmul_int4(const tk_qmatmul_int4_params& p, const Launch& l) {
  if (p.T == 0) return TK_OK;
  const size_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const bool aligned = aligned16(p.w.packed) && rows_aligned16(p.x, p.x_stride, xsz, p.T);
  if (!aligned) return launch_tiles<1, false>(p, l);
  if (p.T > 8 && p.dtype != TK_F32) return qgemm_int4(p, l);
  // T <= 8 on tensor cores: 16-bit activations, one scale per 128 k (a K step
  // of the mma loop never straddles a group). x rows are 16-byte aligned (above).
  if (p.w.group_size == 128 && p.dtype == TK_F16) return launch_decode<__half>(p, l);
  if (p.w.group_size == 128 && p.dtype == TK_BF16) return launch_decode<__nv_bfloat16>(p, l);
  if (p.T == 1) return launch_tiles<1, true>(p, l);
  if (p.T <= 4) return launch_tiles<4, true>(p, l);
  return launch_tiles<8, true>(p, l);
}

}  // namespace tk::cuda
