// Scratch A/B timing of qmatmul_int4.cu's decode kernels (not built by CMake):
//   nvcc -O3 -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -Iinclude -Isrc \
//     src/cuda/tune/q4_tune.cu -o /tmp/q4_tune
// N 14336, K 4096, group 128, symmetric, f16 scales and x (the bench's rows).
// Each variant runs after a read-only L2 flush; medians of 40. First checks the
// streaming kernel against the short-block one (same arithmetic per group).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <type_traits>
#include <vector>

#include "../qmatmul_int4.cu"
#include "timing.cuh"

using namespace tk::cuda;
using tk::tune::b2f;
using tk::tune::h2f;
tk_status tk::fail(tk_status s, const char*, ...) { return s; }
// qmatmul_int4.cu sends T > 8 to qgemm_int4.cu, which this harness does not build.
tk_status tk::cuda::qgemm_int4(const tk_qmatmul_int4_params&, const Launch&) { return TK_ERR_UNSUPPORTED; }

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int64_t N = 14336, K = 4096, G = K / 128, Tmax = 8;
  std::mt19937 rng(5);
  std::vector<uint8_t> hq(size_t(N * K / 2));
  for (auto& b : hq) b = uint8_t(rng());
  std::vector<uint16_t> hs(size_t(N * G)), hx(size_t(Tmax * K));
  for (auto& v : hs) v = uint16_t(0x2000 + rng() % 0x800);  // ~0.008 .. 0.016
  for (auto& v : hx) v = uint16_t((rng() & 0x8000) | (0x3000 + rng() % 0xC00));
  uint8_t* q;
  uint16_t *s, *x, *y0, *y1;
  cudaMalloc(&q, hq.size());
  cudaMalloc(&s, hs.size() * 2);
  cudaMalloc(&x, hx.size() * 2);
  cudaMalloc(&y0, Tmax * N * 2);
  cudaMalloc(&y1, Tmax * N * 2);
  cudaMemcpy(q, hq.data(), hq.size(), cudaMemcpyHostToDevice);
  cudaMemcpy(s, hs.data(), hs.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice);
  Launch l{};
  l.stream = 0;
  l.num_sms = sms;
  cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  const tk::tune::Timer timer(sms);
  const double wbytes = double(N) * K / 2 + double(N) * G * 2;
  auto time = [&](const char* name, int64_t T, auto&& fn) {
    const std::vector<float> v = timer.time(fn, 40).us;
    std::printf("%-36s T=%lld  median %6.2f us  %5.0f GB/s  (min %.2f, max %.2f)\n", name, (long long)T,
                v[v.size() / 2], wbytes / v[v.size() / 2] / 1e3, v[0], v.back());
  };
  for (int64_t T : {int64_t(1), int64_t(8)}) {
    tk_qmatmul_int4_params p{};
    p.dtype = TK_F16;
    p.T = T;
    p.x = x;
    p.x_stride = K;
    p.w = tk_int4_weights{q, s, nullptr, TK_F16, N, K, 128};
    p.y = y0;
    p.y_stride = N;
    tk_qmatmul_int4_params p1 = p;
    p1.y = y1;
    // Check: streaming vs short blocks, and one row against a host dot product.
    launch_qmma<__half>(p, l);
    QsPlan pl;
    unsigned grid;
    size_t smem;
    if (!qs_plan<kQsSteps, kQsWarps>(p1, l, kQsStages, pl, grid, smem)) std::printf("no plan\n");
    cudaMemset(y1, 0xFF, Tmax * N * 2);
    launch_qstream<__half, kQsSteps, kQsWarps>(p1, l, pl, grid, smem);
    cudaDeviceSynchronize();
    std::vector<uint16_t> r0(size_t(T * N)), r1(size_t(T * N));
    cudaMemcpy(r0.data(), y0, r0.size() * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(r1.data(), y1, r1.size() * 2, cudaMemcpyDeviceToHost);
    double md = 0, mx = 0, hd = 0;
    for (size_t i = 0; i < r0.size(); ++i) {
      md = std::max(md, double(std::fabs(h2f(r0[i]) - h2f(r1[i]))));
      mx = std::max(mx, double(std::fabs(h2f(r0[i]))));
      if (std::isnan(h2f(r1[i]))) md = INFINITY;
    }
    for (int64_t t = 0; t < T; t += 7) {
      const int64_t n = 12345;
      double ref = 0;
      for (int64_t k = 0; k < K; ++k) {
        const uint8_t byte = hq[size_t(n * K / 2 + k / 2)];
        const int c = k % 2 ? byte >> 4 : byte & 15;
        ref += double(c - 8) * h2f(hs[size_t(n * G + k / 128)]) * h2f(hx[size_t(t * K + k)]);
      }
      hd = std::max(hd, std::fabs(ref - h2f(r1[size_t(t * N + n)])));
    }
    std::printf("T=%lld plan: grid %u smem %zu stages %d ksplit %d | max |stream - short| %.3g of max |y| %.3g; |host - stream| %.3g\n",
                (long long)T, grid, smem, pl.stages, 1 << pl.ksplit_log2, md, mx, hd);
    time("short blocks (launch_qmma)", T, [&] { launch_qmma<__half>(p, l); });
    const auto sweep = [&](auto steps, auto warps) {
      constexpr int kS = decltype(steps)::value, kW = decltype(warps)::value;
      for (int st : {2, 3})
        for (int il : {0, 1}) {
          QsPlan ps;
          if (!qs_plan<kS, kW>(p1, l, st, ps, grid, smem)) continue;
          ps.interleave = il;
          char name[80];
          std::snprintf(name, sizeof name, "stream %dw, %d groups x %d stages%s (%zu KB)", kW, kS, ps.stages,
                        il ? " interleaved" : "", smem / 1024);
          time(name, T, [&] { launch_qstream<__half, kS, kW>(p1, l, ps, grid, smem); });
        }
    };
    using I2 = std::integral_constant<int, 2>;
    using I16 = std::integral_constant<int, 16>;
    sweep(I2{}, I16{});
    for (int st : {2, 3, 4}) {  // the copies and shared-memory reads alone
      QsPlan ps;
      if (!qs_plan<2, 16>(p1, l, st, ps, grid, smem)) continue;
      char name[80];
      std::snprintf(name, sizeof name, "memory only 16w, 2 groups x %d stages", ps.stages);
      time(name, T, [&] { launch_qstream<__half, 2, 16, true>(p1, l, ps, grid, smem); });
    }
  }
  time("read kernel over the int4 bytes", 0, [&] {
    timer.read(q, size_t(N) * K / 2);
  });
  time("read kernel, 4 blocks/SM", 0, [&] {
    timer.read(q, size_t(N) * K / 2, 4, 512);
  });
  std::printf("tune rc=%d (%s)\n", int(cudaDeviceSynchronize()), cudaGetErrorString(cudaGetLastError()));
  return 0;
}
