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
// qgemm_int4_kernel: sm_80 instructions only (cp.async, mma.sync), the portable
// path and T <= 32 everywhere. On Hopper (sm_90a builds, not TK_CUDA_PORTABLE)
// T > 32 takes qgemm_int4_sm90_kernel below: the same tiling on wgmma.
#include "cuda/attention/hopper.cuh"
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

// A block's group scales and zero codes (rows n0 .. n0 + 127, contiguous in
// both tables): prefetched into L2 at the start, so the per-stage loads hit
// L2. Per stage, entry e = tid + 256 j (quarter e / 128, row e % 128) is loaded
// ahead of the stage's compute and stored after it, as {f32 scale, zero code}
// at byte 8 e of the stage's table. The loaded values stay untouched until the
// store: an operation on them in the issuing block (packing scale and zero
// into one register, as the first version did) makes every warp wait there
// for the global load, between the barrier and the stage's mmas.
struct QgTables {
  const uint16_t* scales;
  const uint8_t* zeros;  // nullptr: symmetric (code 8)
  int64_t n0, N, ngroups;
  int gshift;  // log2 of the group size
  bool bf16s;
  struct Raw {
    uint32_t s[2], z[2];
  };
  __device__ __forceinline__ void prefetch_l2(int tid) const {
    const int64_t rows = std::min<int64_t>(kQgRows, N - n0);
    const char* sb = reinterpret_cast<const char*>(scales + n0 * ngroups);
    for (int64_t off = int64_t(tid) * 128; off < rows * ngroups * 2; off += kQgThreads * 128)
      asm volatile("prefetch.global.L2 [%0];" ::"l"(sb + off));
    if (zeros)
      for (int64_t off = int64_t(tid) * 128; off < rows * ngroups; off += kQgThreads * 128)
        asm volatile("prefetch.global.L2 [%0];" ::"l"(zeros + n0 * ngroups + off));
  }
  __device__ __forceinline__ void load(int chunk, int tid, Raw& raw) const {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int e = tid + kQgThreads * j, row = e & 127, q = e >> 7;
      const int64_t n = std::min(n0 + row, N - 1);
      const int64_t grp = std::min((int64_t(chunk) * kQgK + 32 * q) >> gshift, ngroups - 1);
      raw.z[j] = zeros ? uint32_t(__ldg(zeros + n * ngroups + grp)) : 8u;
      raw.s[j] = uint32_t(__ldg(scales + n * ngroups + grp));
    }
  }
  __device__ __forceinline__ void store(uint32_t table, int tid, const Raw& raw) const {
#pragma unroll
    for (int j = 0; j < 2; ++j)
      st_shared8(table + uint32_t(tid + kQgThreads * j) * 8, __float_as_uint(qmma_scale(uint16_t(raw.s[j]), bf16s)),
                 raw.z[j]);
  }
};

// The prologue of both kernels: stages - 1 stages in flight, each its copies
// (issue(chunk, slot)) and its scale loads in one cp.async group; the scales
// are stored (store(slot, raw)) once every stage is issued (see QgTables).
template <int kMaxStages, class Issue, class Store>
__device__ __forceinline__ void qg_fill_ring(int stages, int chunks, int tid, const QgTables& tabs, const Issue& issue,
                                             const Store& store) {
  QgTables::Raw raw[kMaxStages - 1];
#pragma unroll
  for (int s = 0; s < kMaxStages - 1; ++s)
    if (s < stages - 1) {
      if (s < chunks) {
        issue(s, s);
        tabs.load(s, tid, raw[s]);
      }
      attn::cp_async_commit();
    }
#pragma unroll
  for (int s = 0; s < kMaxStages - 1; ++s)
    if (s < stages - 1 && s < chunks) store(s, raw[s]);
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

  const QgTables tabs{scales, zeros, n0, N, ngroups, gshift, bf16s};
  tabs.prefetch_l2(tid);

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
  using Raw = QgTables::Raw;
  const auto load_scales = [&](int chunk, Raw& raw) { tabs.load(chunk, tid, raw); };
  const auto store_scales = [&](int slot, const Raw& raw) {
    tabs.store(sbase + uint32_t(slot) * S::kStage + S::kW + S::kX, tid, raw);
  };

  qg_fill_ring<kQgMaxStages>(stages, chunks, tid, tabs, issue, store_scales);

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

#if defined(TK_CUDA_SM90A)  // builds with sm_90a code only (cmake/cuda.cmake)
// ---------------------------------------------------------------------------
// Hopper (sm_90a): the same tiling on wgmma. A block of 2 warpgroups owns 128
// weight rows x 64 tokens; warpgroup wg computes rows 64 wg .. 64 wg + 63 as
// one wgmma m64n64k16 per k16 step, A = the dequantised codes in registers
// (warp w of the warpgroup: rows 16 w + g, + 8, the mma.sync A fragment the
// decode kernels build, so qmma_dequant_word is reused as is), B = x from
// shared memory. Why: wgmma's tensor rate is the H100's full one (mma.sync's
// is lower), a warp dequantises only its own 16 rows (qgemm_int4_kernel: two
// warps per row, one per token half), and B is read from shared memory once
// per warpgroup (there: by 4 warps per token, 64 KB per stage). Measured at
// [64x4096] -> 14336 g128 (tune/qg_tune.cu, H100): 47.0 -> 36.9 us.
//
// B must hold, in k slot s of each k16 step, the x element that A's code in
// slot s multiplies: the qmma.cuh pairing permutes k inside each 32-k
// quarter (mma 2w + h, lane t4: slots 2 t4, 2 t4 + 1 <- k 8 t4 + 2 h, + 4;
// slots 2 t4 + 8, + 9 <- k 8 t4 + 2 h + 1, + 5). x lands in the 128-byte
// swizzled K-major layout wgmma reads (16-byte chunk c of token row r at
// chunk c ^ (r % 8); 64 k per 8 KB atom), and one stage ahead of its use the
// block rewrites each token's quarter in place: chunk 2h + hi, word t4 =
// qmma_b_frags(input chunk t4) word 2h + hi (a 4 x 4 transpose of 4-byte
// words). The stage's W and scales keep qgemm_int4_kernel's layout.
//
// Per stage c: barrier; dequantise and issue stage c's wgmmas (one group per
// commit); while they run, permute stage c + 1 and issue the copies of stage
// c + stages - 1; wait; apply the group scales in f32 (as above). Each
// stage's scale loads are stored to shared memory an iteration later, so no
// thread waits for a global load inside the iteration it was issued in.
// Groups of 32 / 64 serialise the later groups of a stage (wait per group).
constexpr int kQhTokens = 64;
constexpr int kQhMaxStages = 7;
constexpr int kQhStages = 7;  // the library's ring depth (tune/qg_tune.cu: 3 to 7 stages)

struct QhShape {
  static constexpr uint32_t kX = kQhTokens * kQgK * 2;  // two 8 KB atoms (k 0..63, 64..127)
  static constexpr uint32_t kW = kQgRows * kQgK / 2;
  static constexpr uint32_t kS = kQgRows * 4 * 8;
  static constexpr uint32_t kStage = kX + kW + kS;  // 28 KB: a multiple of the 1024-byte swizzle span
  static_assert(kStage % 1024 == 0, "stage alignment");
};

#if TK_SM90A
// d[64 rows x 64 tokens] (+)= A[64 x 16] . B[16 x 64]; A in registers, B K-major
// (128-byte swizzle) in shared memory; accumulate = 0 overwrites d.
template <class Ta>
__device__ __forceinline__ void qh_wgmma(float (&d)[32], const uint32_t (&a)[4], uint64_t b, int accumulate) {
#define QH_D_OPS                                                                                           \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), \
      "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),  \
      "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), \
      "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
#define QH_D_STR                                                                                 \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, " \
  "%20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
  if constexpr (std::is_same_v<Ta, __half>)
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"
                 " wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 " QH_D_STR
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : QH_D_OPS
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
  else
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %37, 0;\n"
                 " wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 " QH_D_STR
                 ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : QH_D_OPS
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
#undef QH_D_OPS
#undef QH_D_STR
}
#endif

// kExp (tune/qg_tune.cu only, else 0): bit 0 puts the next stage's copies and
// scale loads before the x permutation (the first version's order); the
// others drop work to attribute time (wrong results): 2 the x permutation,
// 4 the x copies, 8 the W copies, 16 the dequantisation and wgmmas.
template <class Ta, int kQpg, int kExp = 0>
__global__ void __launch_bounds__(kQgThreads, 1)
    qgemm_int4_sm90_kernel(tk_qmatmul_int4_params p, int stages, unsigned t_tiles) {
#if TK_SM90A
  using S = QhShape;
  using namespace attn::sm90;
  using attn::cp_async16;
  using attn::ld_shared16;
  using attn::st_shared16;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t4 = lane & 3;
  const int64_t N = p.w.N, K = p.w.K, T = p.T;
  constexpr int gshift = kQpg == 1 ? 5 : kQpg == 2 ? 6 : 7;
  constexpr int kGroups = 4 / kQpg;  // per stage
  const int64_t ngroups = K >> gshift;
  const bool bf16s = p.w.scale_dtype == TK_BF16;
  const unsigned t_tile = blockIdx.x % t_tiles, n_tile = blockIdx.x / t_tiles;
  const int64_t n0 = int64_t(n_tile) * kQgRows, t0 = int64_t(t_tile) * kQhTokens;
  const int chunks = int((K + kQgK - 1) / kQgK);
  const uint32_t sbase = (attn::smem_addr(smem) + 1023u) & ~1023u;  // the swizzle pattern repeats every 1024 B
  const uint16_t* scales = static_cast<const uint16_t*>(p.w.scales);
  const uint8_t* zeros = p.w.zeros;

  const QgTables tabs{scales, zeros, n0, N, ngroups, gshift, bf16s};
  tabs.prefetch_l2(tid);

  // Copies: W piece i = tid + 256 j: row i / 4, quarter i % 4 (qg_wchunk);
  // x piece i = tid + 256 j: token i / 16, chunk i % 16 (16 lanes per token row).
  const uint8_t* wsrc[2];
  uint32_t wdst[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int i = tid + kQgThreads * j, row = i >> 2, q = i & 3;
    wsrc[j] = p.w.packed + std::min(n0 + row, N - 1) * (K / 2) + 16 * q;
    wdst[j] = S::kX + qg_wchunk(uint32_t(row), uint32_t(q));
  }
  const char* xsrc[4];
  uint32_t xdst[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int i = tid + kQgThreads * j, tok = i >> 4, c = i & 15;
    xsrc[j] = static_cast<const char*>(p.x) +
              (std::min(t0 + tok, T - 1) * p.x_stride + 8 * c) * int64_t(sizeof(Ta));
    xdst[j] = uint32_t(c >> 3) * 8192 + uint32_t(tok) * 128 + ((uint32_t(c & 7) ^ uint32_t(tok & 7)) * 16);
  }
  const auto issue = [&](int chunk, int slot) {
    const int64_t k0 = int64_t(chunk) * kQgK;
    const uint32_t base = sbase + uint32_t(slot) * S::kStage;
    if constexpr (!(kExp & 8)) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool valid = k0 + 32 * ((tid + kQgThreads * j) & 3) < K;
        cp_async16(base + wdst[j], valid ? wsrc[j] + k0 / 2 : wsrc[j], valid);
      }
    }
    if constexpr (!(kExp & 4)) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const bool valid = k0 + 8 * ((tid + kQgThreads * j) & 15) < K;
        cp_async16(base + xdst[j], valid ? xsrc[j] + k0 * int64_t(sizeof(Ta)) : xsrc[j], valid);
      }
    }
  };
  using Raw = QgTables::Raw;
  const auto load_scales = [&](int chunk, Raw& raw) { tabs.load(chunk, tid, raw); };
  const auto store_scales = [&](int slot, const Raw& raw) {
    tabs.store(sbase + uint32_t(slot) * S::kStage + S::kX + S::kW, tid, raw);
  };
  // The permutation of one stage's x: this thread rewrites quarter pq of token
  // prow (a quarter-warp's 8 lanes are 8 tokens of one quarter: with the
  // swizzle, 8 different 16-byte bank groups).
  const int prow = 8 * warp + (lane & 7), pq = lane >> 3;
  uint32_t paddr[4];
#pragma unroll
  for (int j = 0; j < 4; ++j)
    paddr[j] = uint32_t(pq >> 1) * 8192 + uint32_t(prow) * 128 +
               ((uint32_t(4 * (pq & 1) + j) ^ uint32_t(prow & 7)) * 16);
  const auto permute = [&](int slot) {
    if constexpr ((kExp & 2) != 0) return;
    const uint32_t base = sbase + uint32_t(slot) * S::kStage;
    uint4 r[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) r[j] = ld_shared16(base + paddr[j]);
#pragma unroll
    for (int j = 0; j < 4; ++j) r[j] = qmma_b_frags(r[j]);
    st_shared16(base + paddr[0], make_uint4(r[0].x, r[1].x, r[2].x, r[3].x));
    st_shared16(base + paddr[1], make_uint4(r[0].y, r[1].y, r[2].y, r[3].y));
    st_shared16(base + paddr[2], make_uint4(r[0].z, r[1].z, r[2].z, r[3].z));
    st_shared16(base + paddr[3], make_uint4(r[0].w, r[1].w, r[2].w, r[3].w));
    fence_proxy_async();  // generic-proxy writes that wgmma (async proxy) reads after the next barrier
  };

  // Prologue: stages - 1 stages in flight, stage 0 permuted.
  {
    qg_fill_ring<kQhMaxStages>(stages, chunks, tid, tabs, issue, store_scales);
    switch (stages) {  // this thread's copies of stage 0
      case 3: attn::cp_async_wait<1>(); break;
      case 4: attn::cp_async_wait<2>(); break;
      case 5: attn::cp_async_wait<3>(); break;
      case 6: attn::cp_async_wait<4>(); break;
      default: attn::cp_async_wait<5>(); break;
    }
    __syncthreads();
    permute(0);
  }

  const int wg = warp >> 2, m0 = 64 * wg + 16 * (warp & 3);  // the warp's rows m0 + g, m0 + g + 8
  const uint32_t wlane = S::kX + uint32_t((m0 + g) * 64 + t4 * 4), wsw = uint32_t((g >> 1) & 3);
  const uint32_t slane = S::kX + S::kW + uint32_t(m0 + g) * 8;  // + 1024 q (+ 64: row g + 8)
  const uint32_t xwg = 0;  // both warpgroups multiply the same 64 tokens

  float acc[32] = {};
  float part[32] = {};
  Raw raw{};  // scales of stage c + stages - 1, stored (to its slot) in the next iteration
  int slot = 0;
  for (int c = 0; c < chunks; ++c) {
    // Each wait is a switch of its own over the kernel's stage range, not
    // attn::cp_async_wait_upto: through that shared switch the kernel measured
    // 36.2-36.7 -> 38.2 us (H100, tune/qg_tune.cu, T 64), the mma.sync one
    // 46.2-46.6 -> 46.8-46.9.
    switch (stages) {  // this thread's copies of stage c + 1
      case 3: attn::cp_async_wait<0>(); break;
      case 4: attn::cp_async_wait<1>(); break;
      case 5: attn::cp_async_wait<2>(); break;
      case 6: attn::cp_async_wait<3>(); break;
      default: attn::cp_async_wait<4>(); break;
    }
    __syncthreads();  // stage c + 1 landed, stage c permuted, every wgmma of stage c - 1 done
    const uint32_t base = sbase + uint32_t(slot) * S::kStage;
    const int cn = c + stages - 1;
    int nslot = slot + stages - 1;
    if (nslot >= stages) nslot -= stages;
    int pslot = slot + 1;
    if (pslot == stages) pslot = 0;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      const int q0 = gi * kQpg;  // the group's first quarter
      const uint2 e0 = ld_shared8(base + slane + uint32_t(q0) * 1024);
      const uint2 e1 = ld_shared8(base + slane + uint32_t(q0) * 1024 + 64);
      const QZero z0 = qmma_zero<Ta>(e0.y), z1 = qmma_zero<Ta>(e1.y);
      uint32_t a[2 * kQpg][4];  // per k16 step of the group
#pragma unroll
      for (int qq = 0; qq < kQpg; ++qq) {
        const uint32_t q = uint32_t(q0 + qq);
        const uint32_t w0 = ld_shared4(base + wlane + ((q ^ wsw) * 16));
        const uint32_t w1 = ld_shared4(base + wlane + 512 + ((q ^ wsw) * 16));
        uint32_t pa[4], pb[4];
        qmma_dequant_word<Ta>(w0, z0, pa);
        qmma_dequant_word<Ta>(w1, z1, pb);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          a[2 * qq + h][0] = pa[2 * h];
          a[2 * qq + h][1] = pb[2 * h];
          a[2 * qq + h][2] = pa[2 * h + 1];
          a[2 * qq + h][3] = pb[2 * h + 1];
        }
      }
      reg_fence(part);
      wgmma_fence();
      if constexpr (!(kExp & 16)) {
#pragma unroll
        for (int s = 0; s < 2 * kQpg; ++s) {
          const int kk = 2 * q0 + s;  // k16 step of the stage
          qh_wgmma<Ta>(part, a[s],
                       smem_desc(base + xwg + uint32_t(kk >> 2) * 8192 + uint32_t(kk & 3) * 32, 16, 1024), s);
        }
      } else {
#pragma unroll
        for (int s = 0; s < 2 * kQpg; ++s) part[s] += __uint_as_float(a[s][0] ^ a[s][1] ^ a[s][2] ^ a[s][3]);
      }
      wgmma_commit();
      if (gi == 0) {  // under the first group's wgmmas: stage c + 1's permutation and the next copies
        if (c > 0 && cn - 1 < chunks) store_scales(nslot == 0 ? stages - 1 : nslot - 1, raw);  // loaded an iteration ago
        // The permutation ends in a proxy fence; it comes before this
        // iteration's scale loads (the last ones were consumed just above).
        // After them (kExp & 1, as first written) the kernel took 39.9 us
        // instead of 36.9 at T 64: the fence seems to wait for the loads.
        if (!(kExp & 1) && c + 1 < chunks) permute(pslot);
        if (cn < chunks) {
          issue(cn, nslot);  // into the slot stage c - 1 used
          load_scales(cn, raw);
        }
        attn::cp_async_commit();
        if ((kExp & 1) && c + 1 < chunks) permute(pslot);
      }
      wgmma_wait<0>();
      reg_fence(part);
      const float s0 = __uint_as_float(e0.x), s1 = __uint_as_float(e1.x);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        acc[4 * j + 0] = fmaf(s0, part[4 * j + 0], acc[4 * j + 0]);
        acc[4 * j + 1] = fmaf(s0, part[4 * j + 1], acc[4 * j + 1]);
        acc[4 * j + 2] = fmaf(s1, part[4 * j + 2], acc[4 * j + 2]);
        acc[4 * j + 3] = fmaf(s1, part[4 * j + 3], acc[4 * j + 3]);
      }
    }
    slot = pslot;
  }

#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float c4[4] = {acc[4 * j], acc[4 * j + 1], acc[4 * j + 2], acc[4 * j + 3]};
    store_mma_tile(c4, static_cast<Ta*>(p.y), p.y_stride, n0 + m0, t0 + 8 * j, N, T);
  }
#endif
}

#endif  // TK_CUDA_SM90A

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

#if defined(TK_CUDA_SM90A)
template <class Ta, int kQpg, int kExp = 0>
tk_status launch_qgemm_sm90(const tk_qmatmul_int4_params& p, const Launch& l, int stages = kQhStages) {
  using S = QhShape;
  stages = int(std::min<int64_t>(std::min(stages, kQhMaxStages), (int64_t(l.smem_optin) - 1024) / S::kStage));
  if (stages < 3) return launch_qgemm<Ta, 4, kQpg>(p, l);
  static const cudaError_t attr = cudaFuncSetAttribute(
      qgemm_int4_sm90_kernel<Ta, kQpg, kExp>, cudaFuncAttributeMaxDynamicSharedMemorySize, l.smem_optin);
  if (attr != cudaSuccess)
    return fail(TK_ERR_BACKEND, "qmatmul_int4: cannot reserve shared memory: %s", cudaGetErrorString(attr));
  const int64_t t_tiles = (p.T + kQhTokens - 1) / kQhTokens;
  const int64_t blocks = (p.w.N + kQgRows - 1) / kQgRows * t_tiles;
  if (blocks >= (int64_t(1) << 31))
    return fail(TK_ERR_UNSUPPORTED, "qmatmul_int4: T = %lld x N = %lld is too large for one launch",
                (long long)p.T, (long long)p.w.N);
  qgemm_int4_sm90_kernel<Ta, kQpg, kExp><<<unsigned(blocks), kQgThreads, 1024 + size_t(stages) * S::kStage, l.stream>>>(
      p, stages, unsigned(t_tiles));
  return check_launch("qmatmul_int4");
}
#endif

template <class Ta, int kQpg>
tk_status launch_qgemm_t(const tk_qmatmul_int4_params& p, const Launch& l) {
  // 32 tokens per block up to T = 32 (less padding at T 9..32), else 64;
  // T > 32 on Hopper: the wgmma kernel (sm_90a builds, not TK_CUDA_PORTABLE).
  if (p.T <= 32) return launch_qgemm<Ta, 2, kQpg>(p, l);
#if defined(TK_CUDA_SM90A)
  if (!l.portable && l.sm_major == 9 && l.sm_minor == 0) return launch_qgemm_sm90<Ta, kQpg>(p, l);
#endif
  return launch_qgemm<Ta, 4, kQpg>(p, l);
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
