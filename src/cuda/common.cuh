// Shared pieces of the CUDA backend: error checks, the device error flag.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include "core/backend.h"
#include "core/error.h"

namespace tk::cuda {

// Sticky device-side error flag: kernels that meet an out-of-range index (a
// device-resident position, block-table entry or length) skip the work and
// set bit 0 here; tk_check_device_errors() reads and clears it.
struct DeviceErrors {
  unsigned int* flag = nullptr;  // device memory, one word
};

__device__ inline void raise_index_error(unsigned int* flag) {
  if (flag) atomicOr(flag, 1u);
}

// Everything a launcher needs besides its params: stream and error flag.
struct Launch {
  cudaStream_t stream;
  unsigned int* error_flag;
  int num_sms;
  int sm_major, sm_minor;
  int smem_optin;  // the most dynamic shared memory one block may opt in to (bytes)
  // TK_CUDA_PORTABLE=1 at context creation: every op takes its path with no
  // Hopper-only instruction (the sm_80 kernels), so that path is testable on H100.
  bool portable;
  // cuBLASLt for prefill-sized dense matmuls; created once with the context.
  cublasLtHandle_t blas;
  void* blas_workspace;          // device memory, blas_workspace_bytes
  size_t blas_workspace_bytes;
};

inline tk_status check_launch(const char* op) {
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return fail(TK_ERR_BACKEND, "%s: CUDA launch failed: %s", op, cudaGetErrorString(e));
  return TK_OK;
}

}  // namespace tk::cuda
