// Scratch A/B timing of qgemm_int4.cu (qmatmul_int4, T > 8; not built by CMake):
//   nvcc -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DTK_CUDA_SM90A=1 \
//     --expt-relaxed-constexpr -Iinclude -Isrc src/cuda/tune/qg_tune.cu -o /tmp/qg_tune
// First checks the wgmma kernel against the mma.sync one and a host dot product
// (f16 and bf16 activations, every group size, zero points), then times both on
// the bench's row: [64x4096] -> 14336, group 128, symmetric, f16 scales and x.
// Each variant runs after a read-only L2 flush; medians of 40.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "../qgemm_int4.cu"
#include "timing.cuh"

using namespace tk::cuda;
using tk::tune::b2f;
using tk::tune::h2f;
tk_status tk::fail(tk_status s, const char*, ...) { return s; }

struct Problem {
  int64_t T, N, K, G;
  bool bf16x, bf16s, zp;
  std::vector<uint8_t> hq, hz;
  std::vector<uint16_t> hs, hx;
  uint8_t *q = nullptr, *z = nullptr;
  uint16_t *s = nullptr, *x = nullptr, *y0 = nullptr, *y1 = nullptr;
  tk_qmatmul_int4_params p{};

  Problem(int64_t T_, int64_t N_, int64_t K_, int64_t G_, bool bx, bool bs, bool zp_, unsigned seed)
      : T(T_), N(N_), K(K_), G(G_), bf16x(bx), bf16s(bs), zp(zp_) {
    std::mt19937 rng(seed);
    const int64_t ng = K / G;
    hq.resize(size_t(N * K / 2));
    for (auto& b : hq) b = uint8_t(rng());
    hs.resize(size_t(N * ng));
    for (auto& v : hs) v = bs ? uint16_t(0x3C00 + rng() % 0x100) : uint16_t(0x2000 + rng() % 0x800);  // bf16 ~0.008..0.016
    if (zp) {
      hz.resize(size_t(N * ng));
      for (auto& v : hz) v = uint8_t(rng() % 16);
    }
    hx.resize(size_t(T * K));
    for (auto& v : hx)
      v = bx ? uint16_t((rng() & 0x8000) | (0x3E00 + rng() % 0x180)) : uint16_t((rng() & 0x8000) | (0x3000 + rng() % 0xC00));
    cudaMalloc(&q, hq.size());
    cudaMalloc(&s, hs.size() * 2);
    cudaMalloc(&x, hx.size() * 2);
    cudaMalloc(&y0, size_t(T * N * 2));
    cudaMalloc(&y1, size_t(T * N * 2));
    cudaMemcpy(q, hq.data(), hq.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(s, hs.data(), hs.size() * 2, cudaMemcpyHostToDevice);
    cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice);
    if (zp) {
      cudaMalloc(&z, hz.size());
      cudaMemcpy(z, hz.data(), hz.size(), cudaMemcpyHostToDevice);
    }
    p.dtype = bx ? TK_BF16 : TK_F16;
    p.T = T;
    p.x = x;
    p.x_stride = K;
    p.w = tk_int4_weights{q, s, z, bs ? TK_BF16 : TK_F16, N, K, G};
    p.y_stride = N;
  }
  ~Problem() {
    cudaFree(q), cudaFree(s), cudaFree(x), cudaFree(y0), cudaFree(y1), cudaFree(z);
  }
  float act(uint16_t v) const { return bf16x ? b2f(v) : h2f(v); }
  double ref(int64_t t, int64_t n) const {
    const int64_t ng = K / G;
    double r = 0;
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t byte = hq[size_t(n * K / 2 + k / 2)];
      const int c = k % 2 ? byte >> 4 : byte & 15;
      const size_t gi = size_t(n * ng + k / G);
      const int zc = zp ? hz[gi] : 8;
      const double sc = bf16s ? b2f(hs[gi]) : h2f(hs[gi]);
      r += double(c - zc) * sc * act(hx[size_t(t * K + k)]);
    }
    return r;
  }
};

template <class Ta, int kQpg>
static void run_old(const tk_qmatmul_int4_params& p, const Launch& l) { launch_qgemm<Ta, 4, kQpg>(p, l); }
template <class Ta, int kQpg>
static void run_new(const tk_qmatmul_int4_params& p, const Launch& l, int st) { launch_qgemm_sm90<Ta, kQpg>(p, l, st); }

template <class Ta, int kQpg>
static bool check(Problem& pr, const Launch& l, int st) {
  tk_qmatmul_int4_params p0 = pr.p, p1 = pr.p;
  p0.y = pr.y0;
  p1.y = pr.y1;
  cudaMemset(pr.y0, 0xFF, size_t(pr.T * pr.N * 2));
  cudaMemset(pr.y1, 0xFF, size_t(pr.T * pr.N * 2));
  run_old<Ta, kQpg>(p0, l);
  run_new<Ta, kQpg>(p1, l, st);
  const cudaError_t e = cudaDeviceSynchronize();
  std::vector<uint16_t> r0(size_t(pr.T * pr.N)), r1(r0.size());
  cudaMemcpy(r0.data(), pr.y0, r0.size() * 2, cudaMemcpyDeviceToHost);
  cudaMemcpy(r1.data(), pr.y1, r1.size() * 2, cudaMemcpyDeviceToHost);
  double md = 0, mx = 0, hd_new = 0, hd_old = 0;
  size_t nan = 0;
  for (size_t i = 0; i < r0.size(); ++i) {
    const float a = pr.act(r0[i]), b = pr.act(r1[i]);
    if (std::isnan(b) || std::isnan(a)) ++nan;
    md = std::max(md, double(std::fabs(a - b)));
    mx = std::max(mx, double(std::fabs(a)));
  }
  for (int64_t t = 0; t < pr.T; t += std::max<int64_t>(1, pr.T / 7))
    for (int64_t n : {int64_t(0), pr.N / 3, pr.N - 1, int64_t(129) % pr.N}) {
      const double r = pr.ref(t, n);
      hd_new = std::max(hd_new, std::fabs(r - pr.act(r1[size_t(t * pr.N + n)])));
      hd_old = std::max(hd_old, std::fabs(r - pr.act(r0[size_t(t * pr.N + n)])));
    }
  const bool ok = e == cudaSuccess && nan == 0 && md <= 0.01 * mx + 1e-3;
  std::printf("check %s T=%lld N=%lld K=%lld g%lld %s scales%s st=%d: %s | max|new-old| %.3g of max|y| %.3g, NaN %zu; |host-new| %.3g |host-old| %.3g (%s)\n",
              pr.bf16x ? "bf16" : "f16", (long long)pr.T, (long long)pr.N, (long long)pr.K, (long long)pr.G,
              pr.bf16s ? "bf16" : "f16", pr.zp ? " zp" : "", st, ok ? "OK" : "FAIL", md, mx, nan, hd_new, hd_old,
              cudaGetErrorString(e));
  return ok;
}

int main() {
  int sms = 0, dev = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  Launch l{};
  l.stream = 0;
  l.num_sms = sms;
  cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  cudaDeviceGetAttribute(&l.sm_major, cudaDevAttrComputeCapabilityMajor, dev);
  cudaDeviceGetAttribute(&l.sm_minor, cudaDevAttrComputeCapabilityMinor, dev);
  bool all = true;
  {  // correctness first
    Problem a(64, 14336, 4096, 128, false, false, false, 5);
    all &= check<__half, 4>(a, l, kQhStages);
    Problem b(100, 1000, 2080, 32, true, true, true, 6);
    for (int st : {3, 5, 7}) all &= check<__nv_bfloat16, 1>(b, l, st);
    Problem c(130, 383, 1024, 64, false, true, true, 7);
    all &= check<__half, 2>(c, l, 4);
    Problem d(33, 257, 4224, 128, true, false, true, 8);
    all &= check<__nv_bfloat16, 4>(d, l, 6);
    Problem e(64, 200, 96, 32, false, false, false, 9);
    all &= check<__half, 1>(e, l, 5);
  }
  std::printf("checks: %s\n", all ? "all OK" : "FAILED");

  const tk::tune::Timer timer(sms);
  Problem pr(64, 14336, 4096, 128, false, false, false, 5);
  tk_qmatmul_int4_params p = pr.p;
  p.y = pr.y0;
  const double wbytes = double(pr.N) * pr.K / 2 + double(pr.N) * (pr.K / 128) * 2;
  const double flops = 2.0 * pr.T * pr.N * pr.K;
  auto time = [&](const char* name, auto&& fn) {
    const tk::tune::Times t = timer.time(fn, 40);
    std::printf("%-40s median %6.2f us  %5.0f GB/s  %4.0f TFLOP/s  (min %.2f, p90 %.2f)\n", name, t.median(),
                wbytes / t.median() / 1e3, flops / t.median() / 1e6, t.min(), t.p90());
  };
  time("mma.sync qgemm_int4_kernel", [&] { launch_qgemm<__half, 4, 4>(p, l); });
  for (int st : {5, 7}) {
    char name[64];
    std::snprintf(name, sizeof name, "wgmma, loads before the fence, %d st", st);
    time(name, [&] { launch_qgemm_sm90<__half, 4, 1>(p, l, st); });
  }
  for (int st = 3; st <= kQhMaxStages; ++st) {
    char name[64];
    std::snprintf(name, sizeof name, "wgmma, %d stages", st);
    time(name, [&] { launch_qgemm_sm90<__half, 4, 0>(p, l, st); });
  }
  const auto skel = [&](const char* name, auto exp) {
    constexpr int kE = decltype(exp)::value;
    time(name, [&] { launch_qgemm_sm90<__half, 4, kE>(p, l, kQhStages); });
  };
  skel("  skeleton: no x permutation", std::integral_constant<int, 2>{});
  skel("  skeleton: no x copies", std::integral_constant<int, 4>{});
  skel("  skeleton: no W copies", std::integral_constant<int, 8>{});
  skel("  skeleton: no dequant/wgmma", std::integral_constant<int, 16>{});
  skel("  skeleton: no copies at all", std::integral_constant<int, 4 | 8>{});
  skel("  skeleton: copies only", std::integral_constant<int, 2 | 16>{});
  time("mma.sync qgemm_int4_kernel (again)", [&] { launch_qgemm<__half, 4, 4>(p, l); });
  time("wgmma, library (again)", [&] { run_new<__half, 4>(p, l, kQhStages); });
  time("read kernel over the int4 bytes", [&] { timer.read(pr.q, size_t(pr.N) * pr.K / 2); });
  std::printf("tune rc=%d (%s)\n", int(cudaDeviceSynchronize()), cudaGetErrorString(cudaGetLastError()));
  return all ? 0 : 1;
}
