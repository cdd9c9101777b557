// See flush_shim.h.
#include <cuda_runtime.h>
#include <cstdint>

__global__ void tk_tune_read(const uint4* p, size_t n, unsigned* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    acc ^= p[i].x;
  if (acc == 0x12345678u) *sink = acc;
}

cudaError_t tk_tune_memset_async(void* p, int v, size_t n, cudaStream_t s) {
  const cudaError_t e = cudaMemsetAsync(p, v, n, s);
  if (n >= (size_t(64) << 20)) {
    static unsigned* sink = nullptr;
    if (!sink) cudaMalloc(&sink, sizeof(unsigned));
    tk_tune_read<<<132 * 8, 256, 0, s>>>(static_cast<const uint4*>(p), n / 16, sink);
  }
  return e;
}
