// qmatmul_int4 for T > 8 (prefill), f16/bf16 activations, every group size:
// a GEMM-shaped tensor-core kernel. y[T, N] = x[T, K] . dequant(W)[N, K]^T.
//
// Why not the decode kernels: they hold 8 (qstream) or 32 (qmma kTT = 4)
// tokens per warp, so at T = 64 every weight row is fetched, dequantised and
// its scales loaded T / 32 times by separate blocks that also re-read x from
// global memory per group: 86.5 us on the H100 for [64x4096]->14336, 8x its
// floor. Here a block owns a tile of 128 weight rows x 64 (or 32) tokens and
// streams K through a cp.async ring in shared memory: each weight byte comes
// from DRAM once per token tile and is dequantised twice (by the two warps
// that share its rows), x comes from L2 once per 128 rows.
//
// Block: 8 warps, 4 along N (32 rows = 2 m16 tiles each) x 2 along T (kNT
// n8 tiles each). Stage (128 k): W [128 rows][64 bytes], x [tokens][128 k]
// and per (32-k quarter, row) the scale in f32 and the zero code. An mma pair
// (two k16 steps) takes one 32-k quarter q of the stage: lane (g, t4) holds
// word t4 of that quarter (k 32 q + 8 t4 .. + 7) of rows g and g + 8, and
// the k order inside the word is the qmma.cuh pairing (one LOP3 per two
// codes). A quarter never straddles a group (groups are 32, 64 or 128), so
// every mma sums one group of each row: the group's f32 scale multiplies the
// f32 partial sums once per group, as in the decode kernels; the integer
// q - z is exact in f16 and bf16. (The first version scaled the codes in the
// activation type: in bf16 that rounds each scale and each weight to 8 bits,
// up to 0.9x the bf16 test tolerance in an error model of the test data, and
// one H100 run failed a case at 1.13x.)
// B fragments come from x permuted in place once per stage by the threads
// that copied it (qmma_b_frags): one 16-byte load per n8 tile and mma pair.
//
// Edges: rows past N and tokens past T read the last row/token (results
// dropped); the 32-k quarters past K (K a multiple of 32, not of 128) are
// zero-filled in both x and W, so they add 0 (the scale read for them is a
// real one, clamped to the last group).
// sm_80 instructions only (cp.async, mma.sync): also the portable path.
#include "cuda/attention/primitives.cuh"
#include "cuda/ops.h"
#include "cuda/qmma.cuh"

namespace tk::cuda {
namespace {

constexpr int kQgThreads = 256;
constexpr int kQgWarpsN = 4;     // warps along N, 32 rows each
constexpr int kQgRows = 128;     // weight rows per block
constexpr int kQgK = 128;        // k per stage
constexpr int kQgMaxStages = 4;  // 3 stages ahead: ~24 KB of weights in flight per SM

// kNT: n8 tiles per warp; the block covers 2 x 8 kNT tokens.
template <int kNT>
struct QgShape {
  static constexpr int kTokens = 2 * 8 * kNT;
  static constexpr uint32_t kW = kQgRows * kQgK / 2;  // packed codes
  static constexpr uint32_t kX = kTokens * kQgK * 2;  // f16/bf16
  static constexpr uint32_t kS = kQgRows * 4 * 8;     // {f32 scale, zero code} per quarter and row
  static constexpr uint32_t kStage = kW + kX + kS;
  static constexpr int kWCopies = kQgRows * 4 / kQgThreads;  // 16-byte copies per thread
  static constexpr int kXCopies = kTokens * 16 / kQgThreads;
  static_assert(kWCopies * kQgThreads == kQgRows * 4 && kXCopies * kQgThreads == kTokens * 16, "copy split");
};

// Position of 16-byte chunk c (k 8c .. 8c + 7 of a stage) in token row tok:
// a warp's B reads for quarter q touch chunks 4 q + t4 of tokens g; the xor
// puts tokens 2i and 2i + 1 (one quarter-warp with t4 0..3) in different
// halves of the 8 16-byte bank groups.
__device__ __forceinline__ uint32_t qg_xchunk(uint32_t c, uint32_t tok) { return c ^ ((tok & 1u) << 2); }
// Byte offset of quarter q of W row `row` in a stage: the lanes of a warp
// read word t4 of quarter q of 8 consecutive rows; the xor with row bits 1-2
// spreads them over all 32 banks.
__device__ __forceinline__ uint32_t qg_wchunk(uint32_t row, uint32_t q) {
  return row * 64 + ((q ^ ((row >> 1) & 3u)) * 16);
}

__device__ __forceinline__ uint32_t ld_shared4(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ uint2 ld_shared8(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.b32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}
__device__ __forceinline__ void st_shared8(uint32_t addr, uint32_t a, uint32_t b) {
  asm volatile("st.shared.v2.b32 [%0], {%1, %2};\n" ::"r"(addr), "r"(a), "r"(b));
}

// c = A B (no accumulator input: the first mma of a group).
template <class Ta>
__device__ __forceinline__ void qg_mma0(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  constexpr bool kF16 = std::is_same_v<Ta, __half>;
  const float z = 0.0f;
  if constexpr (kF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%10,%10,%10,%10};"
        : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(z));
}

// kQpg: quarters (32 k) per group, 1, 2 or 4: where a group's partial sums start and end.
template <class Ta, int kNT, int kQpg>
__global__ void __launch_bounds__(kQgThreads, 1)
    qgemm_int4_kernel(tk_qmatmul_int4_params p, int stages, unsigned t_tiles) {
  using S = QgShape<kNT>;
  using attn::cp_async16;
  using attn::ld_shared16;
  using attn::st_shared16;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t N = p.w.N, K = p.w.K, T = p.T;
  constexpr int gshift = kQpg == 1 ? 5 : kQpg == 2 ? 6 : 7;  // group size 32 kQpg (the launcher's choice)
  const int64_t ngroups = K >> gshift;
  const bool bf16s = p.w.scale_dtype == TK_BF16;
  const unsigned t_tile = blockIdx.x % t_tiles, n_tile = blockIdx.x / t_tiles;
  const int64_t n0 = int64_t(n_tile) * kQgRows, t0 = int64_t(t_tile) * S::kTokens;
  const int chunks = int((K + kQgK - 1) / kQgK);
  const uint32_t sbase = attn::smem_addr(smem);
  const uint16_t* scales = static_cast<const uint16_t*>(p.w.scales);
  const uint8_t* zeros = p.w.zeros;

  // The block's scales and zero codes (rows n0 .. n0 + 127 are contiguous in
  // both tables) into L2 now, so the per-stage loads below hit L2.
  {
    const int64_t rows = std::min<int64_t>(kQgRows, N - n0);
    const char* sb = reinterpret_cast<const char*>(scales + n0 * ngroups);
    for (int64_t off = int64_t(tid) * 128; off < rows * ngroups * 2; off += kQgThreads * 128)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(sb + off));
    if (zeros)
      for (int64_t off = int64_t(tid) * 128; off < rows * ngroups; off += kQgThreads * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(zeros + n0 * ngroups + off));
  }

  // This thread's copies: W piece i = tid + 256 j is row i / 4, 16 bytes i % 4
  // (32-k quarter i % 4); x piece i is token i / 16, chunk i % 16.
  const uint8_t* wsrc[S::kWCopies];
  uint32_t wdst[S::kWCopies];
#pragma unroll
  for (int j = 0; j < S::kWCopies; ++j) {
    const int i = tid + kQgThreads * j, row = i >> 2, q = i & 3;
    wsrc[j] = p.w.packed + std::min(n0 + row, N - 1) * (K / 2) + 16 * q;
    wdst[j] = qg_wchunk(uint32_t(row), uint32_t(q));
  }
  const char* xsrc[S::kXCopies];
  uint32_t xdst[S::kXCopies];
#pragma unroll
  for (int j = 0; j < S::kXCopies; ++j) {
    const int i = tid + kQgThreads * j, tok = i >> 4, c = i & 15;
    xsrc[j] = static_cast<const char*>(p.x) +
              (std::min(t0 + tok, T - 1) * p.x_stride + 8 * c) * int64_t(sizeof(Ta));
    xdst[j] = S::kW + uint32_t(tok * 256) + qg_xchunk(uint32_t(c), uint32_t(tok)) * 16;
  }
  const auto issue = [&](int chunk, int slot) {
    const int64_t k0 = int64_t(chunk) * kQgK;
    const uint32_t base = sbase + uint32_t(slot) * S::kStage;
#pragma unroll
    for (int j = 0; j < S::kWCopies; ++j) {
      const bool valid = k0 + 32 * ((tid + kQgThreads * j) & 3) < K;
      cp_async16(base + wdst[j], valid ? wsrc[j] + k0 / 2 : wsrc[j], valid);
    }
#pragma unroll
    for (int j = 0; j < S::kXCopies; ++j) {
      const bool valid = k0 + 8 * ((tid + kQgThreads * j) & 15) < K;
      cp_async16(base + xdst[j], valid ? xsrc[j] + k0 * int64_t(sizeof(Ta)) : xsrc[j], valid);
    }
  };
  // Scale/zero entries e = tid + 256 j: quarter e / 128, row e % 128. Loaded
  // ahead of the stage's compute, stored after it (at byte 8 e of the stage's
  // table). The loaded values stay untouched until the store: an operation on
  // them in the issuing block (packing scale and zero into one register, as
  // the first version did) makes every warp wait there for the global load,
  // between the barrier and the stage's mmas.
  struct Raw {
    uint32_t s[2], z[2];
  };
  const auto load_scales = [&](int chunk, Raw& raw) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int e = tid + kQgThreads * j, row = e & 127, q = e >> 7;
      const int64_t n = std::min(n0 + row, N - 1);
      const int64_t grp = std::min((int64_t(chunk) * kQgK + 32 * q) >> gshift, ngroups - 1);
      raw.z[j] = zeros ? uint32_t(__ldg(zeros + n * ngroups + grp)) : 8u;
      raw.s[j] = uint32_t(__ldg(scales + n * ngroups + grp));
    }
  };
  const auto store_scales = [&](int slot, const Raw& raw) {
    const uint32_t base = sbase + uint32_t(slot) * S::kStage + S::kW + S::kX;
#pragma unroll
    for (int j = 0; j < 2; ++j)
      st_shared8(base + uint32_t(tid + kQgThreads * j) * 8, __float_as_uint(qmma_scale(uint16_t(raw.s[j]), bf16s)),
                 raw.z[j]);
  };

  // Prologue: stages - 1 stages in flight.
  {
    Raw raw[kQgMaxStages - 1];
#pragma unroll
    for (int s = 0; s < kQgMaxStages - 1; ++s)
      if (s < stages - 1) {
        if (s < chunks) {
          issue(s, s);
          load_scales(s, raw[s]);
        }
        attn::cp_async_commit();
      }
#pragma unroll
    for (int s = 0; s < kQgMaxStages - 1; ++s)
      if (s < stages - 1 && s < chunks) store_scales(s, raw[s]);
  }

  // The warp's rows m0 .. m0 + 31 and tokens tb .. tb + 8 kNT - 1 of the block.
  const int m0 = (warp % kQgWarpsN) * 32, tb = (warp / kQgWarpsN) * 8 * kNT;
  // Rows m0 + 16 mt + 8 r + g: their bits 1-2 are those of g, so one swizzle for all four.
  const uint32_t wlane = uint32_t((m0 + g) * 64 + t4 * 4), wsw = uint32_t((g >> 1) & 3);
  const uint32_t slane = S::kW + S::kX + uint32_t(m0 + g) * 8;  // + 1024 q + 8 (16 mt + 8 r)
  uint32_t xoff[4];  // chunk 4 q + t4 of token tb + g (+ 8 nt: 2048 bytes on, same parity)
#pragma unroll
  for (int q = 0; q < 4; ++q)
    xoff[q] = S::kW + uint32_t((tb + g) * 256) + qg_xchunk(uint32_t(4 * q + t4), uint32_t(g)) * 16;

  float acc[2][kNT][4] = {};
  int slot = 0;
  for (int c = 0; c < chunks; ++c) {
    switch (stages) {  // this thread's copies of chunk c have landed
      case 2: attn::cp_async_wait<0>(); break;
      case 3: attn::cp_async_wait<1>(); break;
      default: attn::cp_async_wait<2>(); break;
    }
    const uint32_t base = sbase + uint32_t(slot) * S::kStage;
    {  // x chunks -> B fragment order, by the thread that copied them (loads first: one round trip)
      uint4 v[S::kXCopies];
#pragma unroll
      for (int j = 0; j < S::kXCopies; ++j) v[j] = ld_shared16(base + xdst[j]);
#pragma unroll
      for (int j = 0; j < S::kXCopies; ++j) st_shared16(base + xdst[j], qmma_b_frags(v[j]));
    }
    __syncthreads();  // stage c is complete, and every warp is done with stage c - 1
    const int cn = c + stages - 1;
    int nslot = slot + stages - 1;
    if (nslot >= stages) nslot -= stages;
    Raw raw;
    if (cn < chunks) {
      issue(cn, nslot);  // into the slot stage c - 1 used
      load_scales(cn, raw);
    }
    attn::cp_async_commit();

    uint32_t wq[2][2][4];  // [m tile][row g, g + 8][quarter]: word t4 of each quarter
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q)
          wq[mt][r][q] = ld_shared4(base + wlane + uint32_t(16 * mt + 8 * r) * 64 + ((uint32_t(q) ^ wsw) * 16));
    // The shared-memory loads and the mmas are volatile asm, kept in program
    // order: the B fragments of quarter q + 1 are loaded before the mmas of q.
    uint4 xb[kNT], xn[kNT];
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) xn[nt] = ld_shared16(base + xoff[0] + uint32_t(nt) * 2048);
    QZero zq[2][2];
    float sc[2][2];
    float part[2][kNT][4];  // this group's sums, unscaled
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // mma pair q: quarter q
      const bool first = q % kQpg == 0, last = (q + 1) % kQpg == 0;  // of its group (constants once unrolled)
      if (first) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int r = 0; r < 2; ++r) {
            const uint2 e = ld_shared8(base + slane + uint32_t(q) * 1024 + uint32_t(16 * mt + 8 * r) * 8);
            sc[mt][r] = __uint_as_float(e.x);
            zq[mt][r] = qmma_zero<Ta>(e.y);
          }
      }
#pragma unroll
      for (int nt = 0; nt < kNT; ++nt) {
        xb[nt] = xn[nt];
        if (q < 3) xn[nt] = ld_shared16(base + xoff[q + 1] + uint32_t(nt) * 2048);
      }
      uint32_t a[2][2][4];  // [m tile][row g, g + 8][pairs]
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) qmma_dequant_word<Ta>(wq[mt][r][q], zq[mt][r], a[mt][r]);
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) {
          const uint32_t af[4] = {a[mt][0][2 * h], a[mt][1][2 * h], a[mt][0][2 * h + 1], a[mt][1][2 * h + 1]};
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            const uint32_t b0 = h ? xb[nt].z : xb[nt].x, b1 = h ? xb[nt].w : xb[nt].y;
            if (h == 0 && first)
              qg_mma0<Ta>(part[mt][nt], af, b0, b1);
            else
              QmmaType<Ta>::mma(part[mt][nt], af, b0, b1);
          }
        }
      if (last) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < kNT; ++nt) {
            acc[mt][nt][0] = fmaf(sc[mt][0], part[mt][nt][0], acc[mt][nt][0]);
            acc[mt][nt][1] = fmaf(sc[mt][0], part[mt][nt][1], acc[mt][nt][1]);
            acc[mt][nt][2] = fmaf(sc[mt][1], part[mt][nt][2], acc[mt][nt][2]);
            acc[mt][nt][3] = fmaf(sc[mt][1], part[mt][nt][3], acc[mt][nt][3]);
          }
      }
    }
    if (cn < chunks) store_scales(nslot, raw);
    if (++slot == stages) slot = 0;
  }

#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt)
      store_mma_tile(acc[mt][nt], static_cast<Ta*>(p.y), p.y_stride, n0 + m0 + 16 * mt,
                     t0 + tb + 8 * nt, N, T);
}

template <class Ta, int kNT, int kQpg>
tk_status launch_qgemm(const tk_qmatmul_int4_params& p, const Launch& l) {
  using S = QgShape<kNT>;
  const int stages = int(std::min<int64_t>(kQgMaxStages, int64_t(l.smem_optin) / S::kStage));
  if (stages < 2)
    return fail(TK_ERR_UNSUPPORTED, "qmatmul_int4: %u bytes of shared memory per block needed, the device has %d",
                2 * S::kStage, l.smem_optin);
  // Raised once per kernel to the device's opt-in limit, which every launch fits.
  static const cudaError_t attr = cudaFuncSetAttribute(
      qgemm_int4_kernel<Ta, kNT, kQpg>, cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem_optin);
  if (attr != cudaSuccess)
    return fail(TK_ERR_BACKEND, "qmatmul_int4: cannot reserve shared memory: %s", cudaGetErrorString(attr));
  const int64_t t_tiles = (p.T + S::kTokens - 1) / S::kTokens;
  const int64_t blocks = (p.w.N + kQgRows - 1) / kQgRows * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "qmatmul_int4: T = %lld x N = %lld is too large for one launch",
                (long long)p.T, (long long)p.w.N);
  qgemm_int4_kernel<Ta, kNT, kQpg>
      <<<unsigned(blocks), kQgThreads, size_t(stages) * S::kStage, l.stream>>>(p, stages, unsigned(t_tiles));
  return check_launch("qmatmul_int4");
}

template <class Ta, int kQpg>
tk_status launch_qgemm_t(const tk_qmatmul_int4_params& p, const Launch& l) {
  // 32 tokens per block up to T = 32 (less padding at T 9..32), else 64.
  return p.T <= 32 ? launch_qgemm<Ta, 2, kQpg>(p, l) : launch_qgemm<Ta, 4, kQpg>(p, l);
}

template <class Ta>
tk_status launch_qgemm_g(const tk_qmatmul_int4_params& p, const Launch& l) {
  if (p.w.group_size == 32) return launch_qgemm_t<Ta, 1>(p, l);
  if (p.w.group_size == 64) return launch_qgemm_t<Ta, 2>(p, l);
  return launch_qgemm_t<Ta, 4>(p, l);  // 128 (validated)
}

}  // namespace

// Requires f16/bf16 activations, 16-byte aligned packed weights and x rows
// (the caller checks; K is a multiple of 32, so every packed row is too).
tk_status qgemm_int4(const tk_qmatmul_int4_params& p, const Launch& l) {
  return p.dtype == TK_F16 ? launch_qgemm_g<__half>(p, l) : launch_qgemm_g<__nv_bfloat16>(p, l);
}

}  // namespace tk::cuda
