// flash_attention on CUDA: the FlashAttention-2 algorithm on sm_80 tensor-core
// instructions (mma.sync m16n8k16, ldmatrix, cp.async), which run on Ampere, Ada
// and Hopper alike. On Hopper, calls the sm_90a kernel can take (head dim 64 /
// 128, 16-byte aligned layouts) go to flash_attention_sm90.cu instead; this one
// serves the rest and the TK_CUDA_PORTABLE path.
//
// One CTA owns kBlockM query rows of one (sequence, q head); each warp owns
// 16 * kMTiles of those rows, so the softmax statistics of a row never leave
// the 4 lanes (a quad) that hold it. Key/value tiles of kBlockN rows stream
// through shared memory: K(n+1) loads while P.V(n) runs and V(n) loads while
// Q.K(n)^T runs. Scores live in the log2 domain with the scale folded in
// (s * scale * log2 e), so each probability is one FFMA and one EX2.
#include "cuda/attention/flash_sm90.h"
#include "cuda/attention/primitives.cuh"
#include "cuda/ops.h"

namespace tk::cuda {
namespace {

using namespace attn;

struct FlashArgs {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;  // [Hq, total_q] or null
  int64_t q_tok, q_head, k_tok, k_head, v_tok, v_head, o_tok, o_head;
  const int32_t* cu_q;
  const int32_t* cu_k;
  int64_t total_q, total_k, max_q, max_k;
  int group;  // Hq / Hkv
  float scale_log2;
  int causal;
  bool in_vec16;   // q, k, v allow 16-byte loads
  bool out_vec16;  // out allows 16-byte stores
  unsigned int* error_flag;
};

// Tile shapes. Registers bind them: each thread holds kMTiles * kBlockN / 2
// score and kMTiles * D / 2 output accumulators, and 255 registers is the
// ceiling before spills (ptxas -v: D 128 with kBlockN 64 spills 124 bytes, with
// 32 none); D = 256 therefore gets one 16-row tile per warp.
// Shared memory holds the Q tile plus one K and one V tile.
template <int D, int kWarps_ = 4, int kMTiles_ = (D <= 128 ? 2 : 1), int kBlockN_ = (D <= 64 ? 64 : 32)>
struct FlashConfig {
  static constexpr int kWarps = kWarps_;
  static constexpr int kMTiles = kMTiles_;
  static constexpr int kBlockM = 16 * kMTiles * kWarps;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * D * 2;
  static_assert(D % 64 == 0, "the swizzle needs at least 8 chunks per row");
};

// Row r, 16-byte chunk c of a [rows, D] tile: XOR-swizzling the chunk with the
// row keeps the 8 rows an ldmatrix phase reads in 8 different bank groups
// (row strides of 128, 256 or 512 bytes would otherwise all hit the same banks).
template <int D>
__device__ __forceinline__ uint32_t tile_offset(int r, int c) {
  return uint32_t(r * D * 2 + ((c ^ (r & 7)) << 4));
}

// The ldmatrix addresses of one lane along a tile: chunk 2 * kk + chunk_sel of
// row `row` + 16 * i. Since row & 7 is fixed per lane, the swizzled chunk only
// depends on kk % 4, so four registers plus immediates cover the whole tile
// (unrolled loops would otherwise keep one address register per (row, kk)).
template <int D>
struct LaneAddr {
  uint32_t base[4];
  __device__ __forceinline__ LaneAddr(uint32_t tile, int row, int chunk_sel) {
#pragma unroll
    for (int j = 0; j < 4; ++j) base[j] = tile + tile_offset<D>(row, 2 * j + chunk_sel);
  }
  // rows + 16 * i, k step kk (chunks 2kk, 2kk + 1)
  __device__ __forceinline__ uint32_t at(int i, int kk) const {
    return base[kk % 4] + uint32_t(i * 16 * D * 2 + (kk / 4) * 128);
  }
};

// rows [row0, row0 + kRows) of one head of a [tokens, heads, D] tensor; rows at
// or past `row_end` are zero-filled.
template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_tile(uint32_t smem, const T* base, int64_t tok_stride,
                                          int row0, int row_end, bool vec16, int tid) {
  constexpr int kChunks = D / 8;
  static_assert(kRows * kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThreads; ++it) {
    const int i = tid + it * kThreads;
    const int r = i / kChunks, c = i % kChunks;
    const bool valid = row0 + r < row_end;
    const T* src = valid ? base + int64_t(row0 + r) * tok_stride + c * 8 : base;
    const uint32_t dst = smem + tile_offset<D>(r, c);
    if (vec16) {
      cp_async16(dst, src, valid);
    } else {
      st_shared16(dst, valid ? load8_unaligned(src) : make_uint4(0, 0, 0, 0));
    }
  }
}

template <typename T, int D, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads) flash_fwd_kernel(const FlashArgs a) {
  constexpr int kBM = Cfg::kBlockM, kBN = Cfg::kBlockN, kMT = Cfg::kMTiles;
  constexpr int kNT = kBN / 8;  // 8-wide score tiles per row tile
  constexpr int kDT = D / 8;    // 8-wide output tiles per row tile
  extern __shared__ __align__(128) unsigned char smem_raw[];

  const int b = blockIdx.z, h = blockIdx.y;
  // Heaviest causal blocks (the last rows) start first.
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;

  const int64_t q0 = a.cu_q[b], q1 = a.cu_q[b + 1];
  const int64_t k0 = a.cu_k[b], k1 = a.cu_k[b + 1];
  if (!(0 <= q0 && q0 <= q1 && q1 <= a.total_q && q1 - q0 <= a.max_q && 0 <= k0 && k0 <= k1 &&
        k1 <= a.total_k && k1 - k0 <= a.max_k)) {
    if (tid == 0 && blockIdx.x == 0 && h == 0) raise_index_error(a.error_flag);
    return;
  }
  const int len_q = int(q1 - q0), len_k = int(k1 - k0);
  const int m_begin = m_block * kBM;
  if (m_begin >= len_q) return;

  const int kvh = h / a.group;
  const T* q = static_cast<const T*>(a.q) + q0 * a.q_tok + h * a.q_head;
  const T* k = static_cast<const T*>(a.k) + k0 * a.k_tok + kvh * a.k_head;
  const T* v = static_cast<const T*>(a.v) + k0 * a.v_tok + kvh * a.v_head;

  // Keys this block can see: causal is aligned to the bottom right, so row i sees j <= i + diag.
  const int diag = len_k - len_q;
  const int n_end = a.causal ? max(0, min(len_k, m_begin + kBM + diag)) : len_k;
  const int n_tiles = (n_end + kBN - 1) / kBN;

  const uint32_t sQ = smem_addr(smem_raw);
  const uint32_t sK = sQ + kBM * D * 2;
  const uint32_t sV = sK + kBN * D * 2;

  load_tile<T, D, kBM, Cfg::kThreads>(sQ, q + int64_t(m_begin) * a.q_tok, a.q_tok, 0,
                                      len_q - m_begin, a.in_vec16, tid);
  if (n_tiles > 0)
    load_tile<T, D, kBN, Cfg::kThreads>(sK, k, a.k_tok, 0, len_k, a.in_vec16, tid);
  cp_async_commit();

  float o[kMT][kDT][4];
  float row_max[kMT][2], row_sum[kMT][2];
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int j = 0; j < kDT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][j][e] = 0.f;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      row_max[mt][hr] = -INFINITY;
      row_sum[mt][hr] = 0.f;
    }
  }

  const int g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * 16 * kMT;  // first row of this warp within the block
  // ldmatrix row/chunk selectors (see the fragment layouts of mma.m16n8k16):
  // the A operand (Q) and V (transposed) take rows 0-7 / 8-15 then the second
  // chunk; the B operand (K) takes the second chunk first.
  const int a_row = (lane % 8) + 8 * ((lane / 8) % 2), a_chunk = lane / 16;
  const int b_row = (lane % 8) + 8 * (lane / 16), b_chunk = (lane / 8) % 2;
  const LaneAddr<D> q_addr(sQ, warp_row0 + a_row, a_chunk);
  const LaneAddr<D> k_addr(sK, b_row, b_chunk);
  const LaneAddr<D> v_addr(sV, a_row, a_chunk);

  for (int nt = 0; nt < n_tiles; ++nt) {
    const int n0 = nt * kBN;
    cp_async_wait<0>();
    __syncthreads();  // K(nt) visible; every warp is done with V(nt-1)
    load_tile<T, D, kBN, Cfg::kThreads>(sV, v + int64_t(n0) * a.v_tok, a.v_tok, 0, len_k - n0,
                                        a.in_vec16, tid);
    cp_async_commit();

    // S = Q K^T for this warp's rows.
    float s[kMT][kNT][4];
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int j = 0; j < kNT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][j][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
        ldmatrix_x4(qa[mt], q_addr.at(mt, kk));
#pragma unroll
      for (int nn = 0; nn < kBN / 16; ++nn) {
        uint32_t kb[4];
        ldmatrix_x4(kb, k_addr.at(nn, kk));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(s[mt][2 * nn], qa[mt], kb[0], kb[1]);
          mma_16816<T>(s[mt][2 * nn + 1], qa[mt], kb[2], kb[3]);
        }
      }
    }

    // Mask only the tiles that cross the sequence end or the causal diagonal.
    const bool need_mask =
        n0 + kBN > len_k || (a.causal && n0 + kBN - 1 > m_begin + warp_row0 + diag);
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int row = m_begin + warp_row0 + mt * 16 + g + 8 * (e / 2);
            const int col = n0 + j * 8 + 2 * t + (e % 2);
            if (col >= len_k || (a.causal && col > row + diag)) s[mt][j][e] = -INFINITY;
          }
    }

    // Online softmax; each row lives in the 4 lanes of a quad.
#pragma unroll
    for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < kNT; ++j) mx = fmaxf(mx, fmaxf(s[mt][j][2 * hr], s[mt][j][2 * hr + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[mt][hr], mx * a.scale_log2);
        // A row with no visible key so far keeps max -inf; subtracting 0 keeps exp2 at 0, not NaN.
        const float m_use = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = fast_exp2(row_max[mt][hr] - m_use);
        row_max[mt][hr] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < kNT; ++j)
#pragma unroll
          for (int e = 2 * hr; e < 2 * hr + 2; ++e) {
            s[mt][j][e] = fast_exp2(s[mt][j][e] * a.scale_log2 - m_use);
            sum += s[mt][j][e];
          }
        row_sum[mt][hr] = row_sum[mt][hr] * alpha + sum;
#pragma unroll
        for (int j = 0; j < kDT; ++j) {
          o[mt][j][2 * hr] *= alpha;
          o[mt][j][2 * hr + 1] *= alpha;
        }
      }

    cp_async_wait<0>();
    __syncthreads();  // V(nt) visible; every warp is done with K(nt)
    if (nt + 1 < n_tiles) {
      load_tile<T, D, kBN, Cfg::kThreads>(sK, k + int64_t(n0 + kBN) * a.k_tok, a.k_tok, 0,
                                          len_k - n0 - kBN, a.in_vec16, tid);
    }
    cp_async_commit();

    // O += P V: the score accumulators of two adjacent 8-wide tiles are exactly
    // the A operand layout of one k16 step, so P never touches shared memory.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[kMT][4];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        pa[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        pa[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        pa[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        pa[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dn = 0; dn < D / 16; ++dn) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, v_addr.at(kk, dn));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) {
          mma_16816<T>(o[mt][2 * dn], pa[mt], vb[0], vb[1]);
          mma_16816<T>(o[mt][2 * dn + 1], pa[mt], vb[2], vb[3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // with no key tile, Q chunks copied by other warps may still be landing

  // Epilogue: normalise, write lse, stage O through this warp's own Q rows
  // (no other warp reads them) and store 16-byte chunks, one row per 8..32 lanes.
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      float l = row_sum[mt][hr];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
      for (int j = 0; j < kDT; ++j) {
        o[mt][j][2 * hr] *= inv;
        o[mt][j][2 * hr + 1] *= inv;
      }
      const int row = m_begin + warp_row0 + mt * 16 + g + 8 * hr;
      if (a.lse && t == 0 && row < len_q)
        a.lse[int64_t(h) * a.total_q + q0 + row] =
            l > 0.f ? (row_max[mt][hr] + __log2f(l)) * kLn2 : -INFINITY;
    }
  __syncwarp();
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
    for (int j = 0; j < kDT; ++j)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int r = warp_row0 + mt * 16 + g + 8 * hr;
        st_shared4(sQ + tile_offset<D>(r, j) + t * 4,
                   pack2<T>(o[mt][j][2 * hr], o[mt][j][2 * hr + 1]));
      }
  __syncwarp();
  T* out = static_cast<T*>(a.out) + q0 * a.o_tok + h * a.o_head;
  constexpr int kWarpRows = 16 * kMT;
#pragma unroll
  for (int it = 0; it < kWarpRows * Cfg::kChunks / 32; ++it) {
    const int i = lane + it * 32;
    const int r = warp_row0 + i / Cfg::kChunks, c = i % Cfg::kChunks;
    const int row = m_begin + r;
    if (row < len_q)
      store8(out + int64_t(row) * a.o_tok + c * 8, ld_shared16(sQ + tile_offset<D>(r, c)),
             a.out_vec16);
  }
}

template <typename T, int D, typename Cfg = FlashConfig<D>>
tk_status launch_flash(const FlashArgs& a, int64_t batch, int64_t heads, int64_t max_q,
                       const Launch& l) {
  auto kernel = flash_fwd_kernel<T, D, Cfg>;
  // Above 48 KB a kernel must opt in to dynamic shared memory; once per
  // instantiation (and device: the backend serves one device).
  static const cudaError_t attr = cudaFuncSetAttribute(
      kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
  if (attr != cudaSuccess)
    return fail(TK_ERR_BACKEND, "flash_attention: cannot reserve %d bytes of shared memory: %s",
                Cfg::kSmemBytes, cudaGetErrorString(attr));
  const dim3 grid(unsigned((max_q + Cfg::kBlockM - 1) / Cfg::kBlockM), unsigned(heads),
                  unsigned(batch));
  kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, l.stream>>>(a);
  return check_launch("flash_attention");
}

template <typename T>
tk_status dispatch_head_dim(const FlashArgs& a, int64_t head_dim, int64_t batch, int64_t heads,
                            int64_t max_q, const Launch& l) {
  switch (head_dim) {
    case 64: return launch_flash<T, 64>(a, batch, heads, max_q, l);
    case 128: {
      // A grid under two CTAs per SM leaves SMs idle: halve the row tile to
      // double the CTAs (H100, B1 H32 S512 causal: 62 -> 81 TFLOP/s). Large
      // grids keep the 128-row tile, whose K/V reuse is worth more (279 vs 235).
      using Small = FlashConfig<128, 4, 1, 64>;
      const int64_t ctas = (max_q + FlashConfig<128>::kBlockM - 1) / FlashConfig<128>::kBlockM *
                           heads * batch;
      if (ctas < 2 * int64_t(l.num_sms)) return launch_flash<T, 128, Small>(a, batch, heads, max_q, l);
      return launch_flash<T, 128>(a, batch, heads, max_q, l);
    }
    case 256: return launch_flash<T, 256>(a, batch, heads, max_q, l);
    default:
      return fail(TK_ERR_UNSUPPORTED,
                  "flash_attention: head_dim %lld is not supported on the cuda backend (64, 128, "
                  "256 are)",
                  (long long)head_dim);
  }
}

}  // namespace

tk_status flash_attention(const tk_flash_attention_params& p, const Launch& l) {
  if (p.dtype == TK_F32)
    return fail(TK_ERR_UNSUPPORTED,
                "flash_attention: f32 is not supported on the cuda backend (its tensor-core path "
                "takes f16 or bf16)");
  if (p.head_dim != 64 && p.head_dim != 128 && p.head_dim != 256)
    return fail(TK_ERR_UNSUPPORTED,
                "flash_attention: head_dim %lld is not supported on the cuda backend (64, 128, "
                "256 are)",
                (long long)p.head_dim);
  if (p.num_q_heads > 65535 || p.batch > 65535)
    return fail(TK_ERR_UNSUPPORTED,
                "flash_attention: %lld heads x %lld sequences exceed the cuda grid (65535 each)",
                (long long)p.num_q_heads, (long long)p.batch);
  if (p.total_q == 0 || p.max_seqlen_q == 0) return TK_OK;
  // Hopper: the wgmma / TMA kernel (flash_attention_sm90.cu) when device and layout allow.
  tk_status sm90_status;
  if (flash_attention_sm90(p, l, &sm90_status)) return sm90_status;
  FlashArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.out = p.out;
  a.lse = p.lse;
  a.q_tok = p.q_token_stride;
  a.q_head = p.q_head_stride;
  a.k_tok = p.k_token_stride;
  a.k_head = p.k_head_stride;
  a.v_tok = p.v_token_stride;
  a.v_head = p.v_head_stride;
  a.o_tok = p.out_token_stride;
  a.o_head = p.out_head_stride;
  a.cu_q = p.cu_seqlens_q;
  a.cu_k = p.cu_seqlens_k;
  a.total_q = p.total_q;
  a.total_k = p.total_k;
  a.max_q = p.max_seqlen_q;
  a.max_k = p.max_seqlen_k;
  a.group = int(p.num_q_heads / p.num_kv_heads);
  a.scale_log2 = p.scale * attn::kLog2e;
  a.causal = p.causal != 0;
  a.in_vec16 = attn::heads_aligned16(p.q, p.q_token_stride, p.q_head_stride) &&
               attn::heads_aligned16(p.k, p.k_token_stride, p.k_head_stride) &&
               attn::heads_aligned16(p.v, p.v_token_stride, p.v_head_stride);
  a.out_vec16 = attn::heads_aligned16(p.out, p.out_token_stride, p.out_head_stride);
  a.error_flag = l.error_flag;
  if (p.dtype == TK_F16)
    return dispatch_head_dim<__half>(a, p.head_dim, p.batch, p.num_q_heads, p.max_seqlen_q, l);
  return dispatch_head_dim<__nv_bfloat16>(a, p.head_dim, p.batch, p.num_q_heads, p.max_seqlen_q,
                                          l);
}

}  // namespace tk::cuda
