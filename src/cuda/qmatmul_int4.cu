// qmatmul_int4 on CUDA: y[T, N] = x[T, K] . dequant(W)[N, K]^T with the packed
// int4 layout of tiny_kernel.h, dequantised in registers (matvec.cuh). Bound by
// reading 0.5 byte per weight (+ scales): each lane streams 16-byte chunks of
// four rows (32 codes each), each chunk read once for all kT activation rows.
#include "cuda/matvec.cuh"
#include "cuda/ops.h"

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

}  // namespace

tk_status qmatmul_int4(const tk_qmatmul_int4_params& p, const Launch& l) {
  if (p.T == 0) return TK_OK;
  const size_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const bool aligned = aligned16(p.w.packed) && rows_aligned16(p.x, p.x_stride, xsz, p.T);
  if (!aligned) return launch_tiles<1, false>(p, l);
  if (p.T == 1) return launch_tiles<1, true>(p, l);
  if (p.T <= 4) return launch_tiles<4, true>(p, l);
  return launch_tiles<8, true>(p, l);
}

}  // namespace tk::cuda
