// Scratch A/B timing of the dense decode kernels (not built by CMake):
//   nvcc -O3 -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -Iinclude -Isrc \
//     src/cuda/tune/ds_tune.cu src/cuda/tune/ds_tune_ffn.cu -o /tmp/ds_tune -lcublasLt
// matmul N 14336 K 4096 and fused_ffn D 4096 F 14336, f16, random data; each
// variant runs after a read-only L2 flush (the bench's default), median of 60.
// Every streaming variant is first checked against the kernel before.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../matmul.cu"
#include "ds_variant.cuh"
#include "timing.cuh"

using namespace tk::cuda;
using tk::tune::b2f;
using tk::tune::h2f;
tk_status tk::fail(tk_status s, const char*, ...) { return s; }
int ffn_variant(const tk_fused_ffn_params& p, const Launch& l, int v, char* name, size_t name_len);
int ffn4_variant(const tk_fused_ffn_params& p, const Launch& l, int v, char* name, size_t name_len);

// matmul variant -1: the kernel before; 0..: streaming shapes.
static int mm_variant(const tk_matmul_params& p, const Launch& l, int v, char* name, size_t name_len) {
  if (v < 0) {
    std::snprintf(name, name_len, "matmul before (%s)", p.T == 1 ? "CUDA cores" : "mma short blocks");
    if (p.T == 1) return int(launch_tiles<__half, 8, 1>(p, l));
    return int(launch_mma<__half, 1>(p, l));
  }
  const DsArgs a = ds_args(p.w, p.w_stride, nullptr, 0, p.x, p.x_stride, p.T, nullptr, 0.0f, p.y, p.y_stride, p.N, p.K);
  return tk::tune::ds_dense_variant<false>(a, l, v, "matmul", name, name_len);
}

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int64_t N = 14336, K = 4096, Tmax = 8;
  std::mt19937 rng(7);
  std::vector<uint16_t> hw(size_t(N * K)), hu(size_t(N * K)), hx(size_t(Tmax * K)), hn(static_cast<size_t>(K));
  for (auto& v : hw) v = uint16_t((rng() & 0x8000) | (0x1C00 + rng() % 0x1000));  // ~ +-0.004 .. 0.03
  for (auto& v : hu) v = uint16_t((rng() & 0x8000) | (0x1C00 + rng() % 0x1000));
  for (auto& v : hx) v = uint16_t((rng() & 0x8000) | (0x3000 + rng() % 0xC00));   // ~ +-0.125 .. 1
  for (auto& v : hn) v = uint16_t(0x3800 + rng() % 0x800);                        // 0.5 .. 1
  uint16_t *w, *u, *x, *nw, *y0, *y1;
  cudaMalloc(&w, hw.size() * 2);
  cudaMalloc(&u, hu.size() * 2);
  cudaMalloc(&x, hx.size() * 2);
  cudaMalloc(&nw, hn.size() * 2);
  cudaMalloc(&y0, Tmax * N * 2);
  cudaMalloc(&y1, Tmax * N * 2);
  cudaMemcpy(w, hw.data(), hw.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(u, hu.data(), hu.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(x, hx.data(), hx.size() * 2, cudaMemcpyHostToDevice);
  cudaMemcpy(nw, hn.data(), hn.size() * 2, cudaMemcpyHostToDevice);
  Launch l{};
  l.stream = 0;
  l.num_sms = sms;
  cudaDeviceGetAttribute(&l.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
  cublasLtCreate(&l.blas);
  l.blas_workspace_bytes = size_t(32) << 20;
  cudaMalloc(&l.blas_workspace, l.blas_workspace_bytes);
  const tk::tune::Timer timer(sms);
  auto time = [&](const char* name, int64_t T, double bytes, auto&& fn) {
    const std::vector<float> v = timer.time(fn, 60).us;
    std::printf("%-50s T=%lld  median %6.2f us  %5.0f GB/s  (min %.2f, max %.2f)\n", name, (long long)T,
                v[v.size() / 2], bytes / v[v.size() / 2] / 1e3, v[0], v.back());
  };
  // max |a - b| over T x N outputs (NaN: inf), and max |a|
  auto diff = [&](int64_t T, double& md, double& mx) {
    std::vector<uint16_t> r0(size_t(T * N)), r1(size_t(T * N));
    cudaMemcpy(r0.data(), y0, r0.size() * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(r1.data(), y1, r1.size() * 2, cudaMemcpyDeviceToHost);
    md = 0, mx = 0;
    for (size_t i = 0; i < r0.size(); ++i) {
      const double d = std::fabs(double(h2f(r0[i])) - double(h2f(r1[i])));
      md = std::isnan(d) ? INFINITY : std::max(md, d);
      mx = std::max(mx, double(std::fabs(h2f(r0[i]))));
    }
  };
  char name[96];
  // The kernel before (variant -1, writing p's output y0), then each streaming
  // variant (writing p1's, y1, poisoned first) checked against it and timed.
  auto sweep = [&](auto&& variant, const auto& p, const auto& p1, int64_t T, double bytes, const char* out) {
    variant(p, l, -1, name, sizeof name);
    time(name, T, bytes, [&] { variant(p, l, -1, name, sizeof name); });
    for (int v = 0;; ++v) {
      cudaMemset(y1, 0xFF, Tmax * N * 2);
      const int rc = variant(p1, l, v, name, sizeof name);
      if (rc == -1) break;
      if (rc == -2) continue;
      cudaDeviceSynchronize();
      double md, mx;
      diff(T, md, mx);
      std::printf("  check: max |stream - before| %.3g of max |%s| %.3g\n", md, out, mx);
      time(name, T, bytes, [&] { variant(p1, l, v, name, sizeof name); });
    }
  };
  const double mm_bytes = double(N) * K * 2;
  for (int64_t T : {int64_t(1), int64_t(2), int64_t(4), int64_t(8)}) {
    tk_matmul_params p{};
    p.dtype = p.weight_dtype = TK_F16;
    p.T = T, p.N = N, p.K = K;
    p.x = x, p.x_stride = K, p.w = w, p.w_stride = K, p.y = y0, p.y_stride = N;
    tk_matmul_params p1 = p;
    p1.y = y1;
    if (T == 8) {  // before the sweep: it writes y0
      tk_status st;
      time("matmul cuBLASLt", T, mm_bytes, [&] { try_blas(p, l, &st); });
    }
    sweep(mm_variant, p, p1, T, mm_bytes, "y");
  }
  const double ffn_bytes = 2.0 * double(N) * K * 2;
  for (int64_t T : {int64_t(1), int64_t(8)}) {
    tk_fused_ffn_params p{};
    p.dtype = p.weight_dtype = TK_F16;
    p.format = TK_WEIGHTS_DENSE;
    p.algo = TK_FUSED_SPLIT;
    p.T = T, p.D = K, p.F = N;
    p.x = x, p.x_stride = K, p.norm_weight = nw, p.eps = 1e-5f;
    p.w_gate = w, p.w_gate_stride = K, p.w_up = u, p.w_up_stride = K;
    p.out = y0, p.out_stride = N;
    tk_fused_ffn_params p1 = p;
    p1.out = y1;
    sweep(ffn_variant, p, p1, T, ffn_bytes, "out");
  }
  {  // fused_ffn, int4 weights g128 (f16 scales, symmetric): D 4096, F 14336
    const int64_t G = K / 128;
    std::vector<uint8_t> hq(size_t(N * K / 2));
    std::vector<uint16_t> hs(size_t(N * G));
    uint8_t *qg, *qu;
    uint16_t *sg, *su;
    cudaMalloc(&qg, hq.size());
    cudaMalloc(&qu, hq.size());
    cudaMalloc(&sg, hs.size() * 2);
    cudaMalloc(&su, hs.size() * 2);
    for (uint8_t* d : {qg, qu}) {
      for (auto& b : hq) b = uint8_t(rng());
      cudaMemcpy(d, hq.data(), hq.size(), cudaMemcpyHostToDevice);
    }
    for (uint16_t* d : {sg, su}) {
      for (auto& v : hs) v = uint16_t(0x2000 + rng() % 0x800);
      cudaMemcpy(d, hs.data(), hs.size() * 2, cudaMemcpyHostToDevice);
    }
    const double bytes4 = 2.0 * (double(N) * K / 2 + double(N) * G * 2);
    for (int64_t T : {int64_t(1), int64_t(8)}) {
      tk_fused_ffn_params p{};
      p.dtype = TK_F16;
      p.format = TK_WEIGHTS_INT4;
      p.algo = TK_FUSED_SPLIT;
      p.T = T, p.D = K, p.F = N;
      p.x = x, p.x_stride = K, p.norm_weight = nw, p.eps = 1e-5f;
      p.q_gate = tk_int4_weights{qg, sg, nullptr, TK_F16, N, K, 128};
      p.q_up = tk_int4_weights{qu, su, nullptr, TK_F16, N, K, 128};
      p.out = y0, p.out_stride = N;
      tk_fused_ffn_params p1 = p;
      p1.out = y1;
      sweep(ffn4_variant, p, p1, T, bytes4, "out");
    }
  }
  time("read kernel over W bytes", 0, mm_bytes, [&] {
    timer.read(w, size_t(N) * K * 2);
  });
  std::printf("tune rc=%d (%s)\n", int(cudaDeviceSynchronize()), cudaGetErrorString(cudaGetLastError()));
  return 0;
}
