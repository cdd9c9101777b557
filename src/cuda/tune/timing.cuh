// What the tuning harnesses (tune/*.cu, attention/paged_tune.cu; none built by
// CMake) share: the bench's way of timing one launch. Before each repeat the
// L2 is flushed by a read pass over 256 MB (or, for comparison with the
// issues' anchors, a memset, which leaves dirty lines behind); the launch sits
// between two cudaEvents on the harness's stream.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tk::tune {

// f16 / bf16 bits -> float on the host, for the harnesses' checks.
inline float h2f(uint16_t h) {
  const uint32_t s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
  float v = e == 0 ? std::ldexp(float(m), -24) : std::ldexp(float(m | 1024), int(e) - 25);
  return s ? -v : v;
}
inline float b2f(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Reads n 16-byte words; the sink store practically never happens and keeps the loads alive.
__global__ void read_pass(const uint4* p, size_t n, unsigned* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x)
    acc ^= p[i].x;
  if (acc == 0x12345678u) *sink = acc;
}

struct Times {
  std::vector<float> us;  // sorted
  float median() const { return us[us.size() / 2]; }
  float min() const { return us.front(); }
  float max() const { return us.back(); }
  float p90() const { return us[us.size() * 9 / 10]; }
};

class Timer {
 public:
  explicit Timer(int sms, cudaStream_t stream = nullptr) : sms_(sms), stream_(stream) {
    cudaMalloc(&flush_, kFlushBytes);
    cudaMalloc(&sink_, sizeof(unsigned));
    cudaMemset(flush_, 1, kFlushBytes);
    cudaEventCreate(&start_);
    cudaEventCreate(&stop_);
  }
  ~Timer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
    cudaFree(flush_);
    cudaFree(sink_);
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;

  // One read pass over `bytes` at p: the read roof of the same bytes a kernel streams.
  void read(const void* p, size_t bytes, int blocks_per_sm = 8, int threads = 256) const {
    read_pass<<<sms_ * blocks_per_sm, threads, 0, stream_>>>(static_cast<const uint4*>(p),
                                                            bytes / 16, sink_);
  }

  // fn() timed `reps` times, each after a flush.
  template <class Fn>
  Times time(Fn&& fn, int reps, bool memset_flush = false) const {
    Times t;
    for (int r = 0; r < reps; ++r) {
      if (memset_flush) cudaMemsetAsync(flush_, r, kFlushBytes, stream_);
      else read(flush_, kFlushBytes);
      cudaEventRecord(start_, stream_);
      fn();
      cudaEventRecord(stop_, stream_);
      cudaEventSynchronize(stop_);
      float ms = 0;
      cudaEventElapsedTime(&ms, start_, stop_);
      t.us.push_back(ms * 1000);
    }
    std::sort(t.us.begin(), t.us.end());
    return t;
  }

 private:
  static constexpr size_t kFlushBytes = size_t(256) << 20;
  int sms_;
  cudaStream_t stream_;
  void* flush_ = nullptr;
  unsigned* sink_ = nullptr;
  cudaEvent_t start_, stop_;
};

}  // namespace tk::tune
