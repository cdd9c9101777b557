// Scratch A/B timing of matmul.cu's decode kernels (not built by CMake):
//   nvcc -O3 -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -Iinclude -Isrc \
//     src/cuda/tune/mv_tune.cu -o /tmp/mv_tune -lcublasLt
// Times each variant after an L2 flush done two ways: a memset (leaves the L2
// full of dirty lines, as the bench does) and a read-only pass (leaves it clean).
#include <cstdio>
#include <vector>
#include <algorithm>
#include "../matmul.cu"
#include "timing.cuh"

using namespace tk::cuda;
tk_status tk::fail(tk_status s, const char*, ...) { return s; }

int main() {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int64_t N = 14336, K = 4096, Tmax = 8;
  __half *w, *x, *y;
  cudaMalloc(&w, N * K * 2);
  cudaMalloc(&x, Tmax * K * 2);
  cudaMalloc(&y, Tmax * N * 2);
  cudaMemset(w, 0x11, N * K * 2);
  cudaMemset(x, 0x22, Tmax * K * 2);
  Launch l{};
  l.stream = 0;
  l.num_sms = sms;
  const tk::tune::Timer timer(sms);
  auto time = [&](const char* name, int64_t T, auto&& fn) {
    for (int mode = 0; mode < 2; ++mode) {
      const std::vector<float> v = timer.time(fn, 40, mode == 0).us;
      const double bytes = double(N) * K * 2;
      std::printf("%-34s T=%lld %-11s median %7.1f us  %6.0f GB/s  (min %.1f)\n", name, (long long)T,
                  mode == 0 ? "memsetflush" : "readflush", v[v.size() / 2], bytes / v[v.size() / 2] / 1e3, v[0]);
    }
  };
  for (int64_t T : {int64_t(1), int64_t(8)}) {
    tk_matmul_params p{};
    p.dtype = p.weight_dtype = TK_F16;
    p.T = T; p.N = N; p.K = K;
    p.x = x; p.x_stride = K; p.w = w; p.w_stride = K; p.y = y; p.y_stride = N;
    if (T == 1) time("cuda-core kT1 U4 short blocks", T, [&] { launch_tiles<__half, 8, 1>(p, l); });
    else time("cuda-core kT8 U2", T, [&] { launch_tiles<__half, 8, 8>(p, l); });
    time("mma kTT1", T, [&] { launch_mma<__half, 1>(p, l); });
  }
  // the read roof of this harness: one pass over W's bytes
  time("read kernel over W bytes", 0, [&] { timer.read(w, size_t(N) * K * 2); });
  std::printf("tune rc=%d (%s)\n", int(cudaDeviceSynchronize()), cudaGetErrorString(cudaGetLastError()));
  return 0;
}
