// Dense matmul on CUDA: y[T, N] = x[T, K] . W[N, K]^T.
// Decode sizes (and every shape cuBLASLt does not take) run our weight-streaming
// kernels.
//   T <= 8, x and W both f16 or both bf16, x small enough to stage in shared
//   memory: the persistent streaming kernel (dstream.cuh: one block per SM,
//   per-warp cp.async rings, mma.sync). H100, N 14336 K 4096: 42-43 us at
//   every T = 1..8 (the kernels below: 43.7 at T = 1, 52-53 at T = 2..8).
//   Otherwise T is cut into tiles; the tiles that share a block of W rows are
//   adjacent in the grid, so W comes from HBM once and from L2 for the other
//   tiles:
//   T = 1, or mixed dtypes / f32 / unaligned: CUDA cores (matvec.cuh).
//   T >= 2, x and W both f16 or both bf16: tensor cores (mma.sync m16n8k16,
//   sm_80+), 16 W rows x 8 tokens per instruction; on CUDA cores these sizes
//   are bound by issuing FMAs, not by reading W.
// Prefill sizes (T >= 64) with one dtype go to cuBLASLt, whose tensor-core
// GEMMs win there.
#include "cuda/dstream.cuh"
#include "cuda/matvec.cuh"
#include "cuda/ops.h"
#include "cuda/qmma.cuh"

namespace tk::cuda {
namespace {

constexpr int kRows = 4;            // W rows per warp
constexpr int64_t kBlasMinT = 64;   // from here on a GEMM is compute-bound: cuBLASLt

template <class Tw, int kW, int kT>
__global__ void __launch_bounds__(kMvWarps * 32)
    matmul_kernel(tk_matmul_params p, int64_t t_tiles, int ksplit) {
  __shared__ float red[kMvWarps * kT * kRows];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t tile = blockIdx.x % t_tiles, row_block = blockIdx.x / t_tiles;
  const int groups = kMvWarps / ksplit, kpart = warp % ksplit;
  const int64_t n0 = (row_block * groups + warp / ksplit) * kRows;
  const Tw* w[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
    w[r] = static_cast<const Tw*>(p.w) + std::min<int64_t>(n0 + r, p.N - 1) * p.w_stride;
  const int64_t t0 = tile * kT;
  const int64_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const MvAct a{static_cast<const char*>(p.x) + t0 * p.x_stride * xsz, p.x_stride * xsz,
                int(std::min<int64_t>(kT, p.T - t0)), p.dtype, nullptr};
  float acc[kT][kRows] = {};
  mv_dot<Tw, kW, kT, kRows, false, mv_unroll<kW, kT>()>(w, a, int64_t(kpart) * 32 + lane, p.K / kW, 32 * ksplit, acc);
  mv_reduce<kT, kRows>(acc, red, ksplit);
  if (kpart != 0) return;
#pragma unroll
  for (int t = 0; t < kT; ++t)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (lane == (t * kRows + r) % 32 && t < a.rows && n0 + r < p.N)
        store_any(p.dtype, p.y, (t0 + t) * p.y_stride + n0 + r, acc[t][r]);
}

template <class Tw, int kW, int kT>
tk_status launch_tiles(const tk_matmul_params& p, const Launch& l) {
  const int64_t t_tiles = (p.T + kT - 1) / kT;
  const int64_t row_warps = (p.N + kRows - 1) / kRows;
  constexpr int kU = mv_unroll<kW, kT>();
  const int ksplit = kU == kMvDecodeUnroll ? mv_ksplit_short(p.K / kW, kU)
                                         : mv_ksplit(row_warps * t_tiles, p.K / kW, l.num_sms);
  const int64_t rows_per_block = int64_t(kRows) * (kMvWarps / ksplit);
  const int64_t blocks = (p.N + rows_per_block - 1) / rows_per_block * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "matmul: T = %lld x N = %lld is too large for one launch",
                (long long)p.T, (long long)p.N);
  matmul_kernel<Tw, kW, kT><<<unsigned(blocks), kMvWarps * 32, 0, l.stream>>>(p, t_tiles, ksplit);
  return check_launch("matmul");
}


// ---- tensor-core path ----------------------------------------------------
// A warp owns 16 W rows and kTT tiles of 8 tokens. Lane (g, t4) streams
// 16-byte chunks (8 k) of rows g and g + 8: a "quad step" q is chunks
// 4q .. 4q + 3 of a row, lane t4 taking chunk 4q + t4 (64 contiguous bytes per
// row). A chunk's four 32-bit words are the A fragments of two mmas as they
// stand (words 0, 1: slots 2t4.. and 2t4 + 8..; words 2, 3: the next mma), and
// the same 16 bytes of x are their B fragments: the mma only needs A and B to
// agree on which k sits in each slot. The ksplit warps of a row tile split the
// quad steps and add up through shared memory.
// Quad steps per lane in flight: 2 x 4 16-byte W loads. Few registers matter
// more than more loads per lane: at <= 80 registers 6+ blocks fit an SM, so a
// decode-sized grid (896 blocks of 16 rows for N = 14336) runs as one wave,
// with 6 x 128 x 8 loads of 16 bytes in flight per SM (Little's law needs
// about a sixth of that). At 1.7 waves the last ones would run on 70% of the SMs.
template <int kTT>
constexpr int mma_unroll() { return 4; }

template <class T, int kTT>
__global__ void __launch_bounds__(kMvWarps * 32, kTT == 1 ? 6 : 3)
    matmul_mma_kernel(tk_matmul_params p, int64_t t_tiles, int ksplit) {
  using Q = QmmaType<T>;
  constexpr int kMmaUnroll = mma_unroll<kTT>();
  __shared__ float red[kMvWarps][kTT * 4][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t tile = blockIdx.x % t_tiles, row_block = blockIdx.x / t_tiles;
  const int kpart = warp % ksplit;
  const int64_t n0 = (row_block * (kMvWarps / ksplit) + warp / ksplit) * 16;
  const T* wa = static_cast<const T*>(p.w) + std::min<int64_t>(n0 + g, p.N - 1) * p.w_stride;
  const T* wb = static_cast<const T*>(p.w) + std::min<int64_t>(n0 + g + 8, p.N - 1) * p.w_stride;
  const int64_t t0 = tile * kTT * 8;
  const T* xr[kTT];  // token t0 + 8 tt + g (rows past T repeat the last; results dropped)
#pragma unroll
  for (int tt = 0; tt < kTT; ++tt)
    xr[tt] = static_cast<const T*>(p.x) + std::min<int64_t>(t0 + tt * 8 + g, p.T - 1) * p.x_stride;
  const int64_t chunks = p.K / 8, quads = (chunks + 3) / 4;

  float acc[kTT][4] = {};
  // Each warp takes one contiguous range of quad steps, so a round's kMmaUnroll
  // steps read kMmaUnroll x 64 contiguous bytes of each row back to back (the
  // ksplit warps' steps interleaved would read 64-byte pieces 256 bytes apart).
  const int64_t per_warp = (quads + ksplit - 1) / ksplit;
  const int64_t q_begin = kpart * per_warp, q_end = std::min(quads, q_begin + per_warp);
  for (int64_t q0 = q_begin; q0 < q_end; q0 += kMmaUnroll) {
    uint4 ra[kMmaUnroll], rb[kMmaUnroll];
    mma_quad_loads(ra, rb, wa, wb, q0, q_end, chunks, t4);  // past K: zeros (and zero x below)
#pragma unroll
    for (int u = 0; u < kMmaUnroll; ++u) {
      const int64_t q = q0 + u;
      if (q >= q_end) break;  // warp-uniform
      const int64_t c = q * 4 + t4;
      const uint32_t a0[4] = {ra[u].x, rb[u].x, ra[u].y, rb[u].y};
      const uint32_t a1[4] = {ra[u].z, rb[u].z, ra[u].w, rb[u].w};
#pragma unroll
      for (int tt = 0; tt < kTT; ++tt) {
        const uint4 xv = c < chunks ? ld16(xr[tt] + c * 8) : make_uint4(0, 0, 0, 0);
        Q::mma(acc[tt], a0, xv.x, xv.y);
        Q::mma(acc[tt], a1, xv.z, xv.w);
      }
    }
  }
  ksplit_sum(acc, red, ksplit, kpart);
  if (kpart != 0) return;
#pragma unroll
  for (int tt = 0; tt < kTT; ++tt)
    store_mma_tile(acc[tt], static_cast<T*>(p.y), p.y_stride, n0, t0 + tt * 8, p.N, p.T);
}

template <class T, int kTT>
tk_status launch_mma(const tk_matmul_params& p, const Launch& l) {
  const int64_t t_tiles = (p.T + kTT * 8 - 1) / (kTT * 8);
  const int64_t quads = (p.K / 8 + 3) / 4;
  int ksplit = 1;  // each warp keeps at least two rounds of quad steps
  while (ksplit < kMvWarps && quads >= int64_t(4) * mma_unroll<kTT>() * ksplit) ksplit *= 2;
  const int64_t tiles_per_block = kMvWarps / ksplit;
  const int64_t row_tiles = (p.N + 15) / 16;
  const int64_t blocks = (row_tiles + tiles_per_block - 1) / tiles_per_block * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "matmul: T = %lld x N = %lld is too large for one launch",
                (long long)p.T, (long long)p.N);
  matmul_mma_kernel<T, kTT><<<unsigned(blocks), kMvWarps * 32, 0, l.stream>>>(p, t_tiles, ksplit);
  return check_launch("matmul");
}

template <class Tw>
tk_status launch_ours(const tk_matmul_params& p, const Launch& l) {
  const size_t xsz = p.dtype == TK_F32 ? 4 : 2;
  const bool vec = p.K % kPack<Tw> == 0 && rows_aligned16(p.w, p.w_stride, sizeof(Tw), p.N) &&
                   rows_aligned16(p.x, p.x_stride, xsz, p.T);
  if (!vec) return launch_tiles<Tw, 1, 1>(p, l);  // odd sizes or unaligned: correct, not fast
  if constexpr (!std::is_same_v<Tw, float>) {
    // T <= 8, one 16-bit dtype: the persistent streaming kernel (dstream.cuh)
    // where x fits its shared memory.
    if (p.dtype == p.weight_dtype && p.T <= kDsMaxT) {
      const DsArgs a = ds_args(p.w, p.w_stride, nullptr, 0, p.x, p.x_stride, p.T, nullptr, 0.0f, p.y, p.y_stride, p.N, p.K);
      tk_status s = TK_OK;
      if (try_dstream<Tw, false>(a, l, &s, "matmul")) return s;
    }
  }
  if (p.T == 1) return launch_tiles<Tw, kPack<Tw>, 1>(p, l);
  if constexpr (!std::is_same_v<Tw, float>) {
    if (p.dtype == p.weight_dtype)
      return p.T <= 8 ? launch_mma<Tw, 1>(p, l) : launch_mma<Tw, 4>(p, l);
  }
  if (p.T <= 4) return launch_tiles<Tw, kPack<Tw>, 4>(p, l);
  return launch_tiles<Tw, kPack<Tw>, 8>(p, l);
}

// Largest power of two (<= 256) dividing the address: cuBLASLt assumes 256-byte
// aligned buffers unless told, and would pick kernels that fault on less.
uint32_t alignment_of(const void* p) {
  uint32_t a = 256;
  while (a > 1 && reinterpret_cast<uintptr_t>(p) % a) a >>= 1;
  return a;
}

cudaDataType_t blas_type(tk_dtype d) {
  return d == TK_F32 ? CUDA_R_32F : d == TK_F16 ? CUDA_R_16F : CUDA_R_16BF;
}

constexpr uint32_t kNoReduction = CUBLASLT_REDUCTION_SCHEME_NONE;

bool set_alignment(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr,
                   const void* ptr) {
  const uint32_t a = alignment_of(ptr);
  return cublasLtMatmulPreferenceSetAttribute(pref, attr, &a, sizeof a) == CUBLAS_STATUS_SUCCESS;
}

// y^T[N, T] = W[N, K] . x^T[K, T] in cuBLASLt's column-major terms: W is a
// column-major [K, N] matrix used transposed, x a column-major [K, T] one.
// Returns false (nothing launched) when cuBLASLt offers no algorithm, e.g. for
// strides it cannot take. f32 computes in full f32 (no TF32).
bool try_blas(const tk_matmul_params& p, const Launch& l, tk_status* status) {
  if (!l.blas) return false;
  const cudaDataType_t dt = blas_type(p.dtype);
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t la = nullptr, lb = nullptr, lc = nullptr;
  cublasLtMatmulPreference_t pref = nullptr;
  bool ok = false;
  const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
  if (cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&la, dt, uint64_t(p.K), uint64_t(p.N), p.w_stride) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&lb, dt, uint64_t(p.K), uint64_t(p.T), p.x_stride) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatrixLayoutCreate(&lc, dt, uint64_t(p.N), uint64_t(p.T), p.y_stride) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS &&
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                           &l.blas_workspace_bytes,
                                           sizeof l.blas_workspace_bytes) == CUBLAS_STATUS_SUCCESS &&
      set_alignment(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, p.w) &&
      set_alignment(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, p.x) &&
      set_alignment(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, p.y) &&
      set_alignment(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, p.y) &&
      // No split-K: its reductions are the only hazards compute-sanitizer's
      // racecheck reported over our tests, and T >= 64 x N has tiles enough.
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                                           &kNoReduction, sizeof kNoReduction) ==
          CUBLAS_STATUS_SUCCESS) {
    cublasLtMatmulHeuristicResult_t heur{};
    int found = 0;
    if (cublasLtMatmulAlgoGetHeuristic(l.blas, op, la, lb, lc, lc, pref, 1, &heur, &found) ==
            CUBLAS_STATUS_SUCCESS &&
        found > 0) {
      const float alpha = 1.0f, beta = 0.0f;
      const cublasStatus_t s = cublasLtMatmul(l.blas, op, &alpha, p.w, la, p.x, lb, &beta, p.y, lc,
                                              p.y, lc, &heur.algo, l.blas_workspace,
                                              l.blas_workspace_bytes, l.stream);
      ok = true;
      *status = s == CUBLAS_STATUS_SUCCESS
                    ? check_launch("matmul (cuBLASLt)")
                    : fail(TK_ERR_BACKEND, "matmul: cublasLtMatmul failed (status %d)", int(s));
    }
  }
  if (pref) cublasLtMatmulPreferenceDestroy(pref);
  if (lc) cublasLtMatrixLayoutDestroy(lc);
  if (lb) cublasLtMatrixLayoutDestroy(lb);
  if (la) cublasLtMatrixLayoutDestroy(la);
  if (op) cublasLtMatmulDescDestroy(op);
  return ok;
}

}  // namespace

// Our kernel alone, whatever T is (the bench shows it beside cuBLASLt).
tk_status matmul_ours(const tk_matmul_params& p, const Launch& l) {
  if (p.T == 0) return TK_OK;
  TK_DISPATCH_DTYPE(p.weight_dtype, Tw, return launch_ours<Tw>(p, l);)
  return fail(TK_ERR_UNSUPPORTED, "matmul: unsupported weight dtype %d", int(p.weight_dtype));
}

tk_status matmul(const tk_matmul_params& p, const Launch& l) {
  if (p.T == 0) return TK_OK;
  tk_status status = TK_OK;
  if (p.T >= kBlasMinT && p.dtype == p.weight_dtype && try_blas(p, l, &status)) return status;
  return matmul_ours(p, l);
}

}  // namespace tk::cuda
