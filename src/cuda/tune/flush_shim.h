// Scratch (not built by CMake): force-included into a copy-build of
// bench/cuda_device.cu so that every large cudaMemsetAsync (the bench's L2
// flush) is followed by a read pass over the same buffer. The memset leaves
// the L2 full of dirty lines, whose write-back then lands inside the next timed
// kernel; after the read pass the L2 holds clean lines only.
#pragma once
#include <cuda_runtime.h>
cudaError_t tk_tune_memset_async(void* p, int v, size_t n, cudaStream_t s = 0);
#define cudaMemsetAsync tk_tune_memset_async
