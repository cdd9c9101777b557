// The CUDA backend: device memory, the stream, the device error flag, and
// dispatch to the per-op launchers of src/cuda/*.cu.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "cuda/ops.h"

namespace tk {
namespace {

tk_status cuda_fail(const char* what, cudaError_t e) {
  return fail(e == cudaErrorMemoryAllocation ? TK_ERR_OUT_OF_MEMORY : TK_ERR_BACKEND, "%s: %s",
              what, cudaGetErrorString(e));
}

// cuBLASLt's recommended workspace for Hopper; allocated once per context so
// that matmul launches allocate nothing and stay graph-capturable.
constexpr size_t kBlasWorkspaceBytes = size_t(32) << 20;

class CudaBackend final : public Backend {
 public:
  static std::unique_ptr<Backend> create(int device) {
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess || count == 0) {
      fail(TK_ERR_UNSUPPORTED, "no CUDA device is available (%s)",
           e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
      return nullptr;
    }
    if (device < 0 || device >= count) {
      fail(TK_ERR_INVALID_ARGUMENT, "CUDA device %d does not exist (%d devices)", device, count);
      return nullptr;
    }
    auto b = std::unique_ptr<CudaBackend>(new CudaBackend);
    b->device_ = device;
    cudaDeviceProp prop{};
    if ((e = cudaSetDevice(device)) != cudaSuccess ||
        (e = cudaGetDeviceProperties(&prop, device)) != cudaSuccess ||
        (e = cudaMalloc(&b->launch_.error_flag, sizeof(unsigned int))) != cudaSuccess ||
        (e = cudaMemset(b->launch_.error_flag, 0, sizeof(unsigned int))) != cudaSuccess ||
        (e = cudaMalloc(&b->launch_.blas_workspace, kBlasWorkspaceBytes)) != cudaSuccess) {
      cuda_fail("CUDA backend initialisation", e);
      return nullptr;
    }
    b->launch_.blas_workspace_bytes = kBlasWorkspaceBytes;
    if (cublasLtCreate(&b->launch_.blas) != CUBLAS_STATUS_SUCCESS) {
      fail(TK_ERR_BACKEND, "CUDA backend initialisation: cublasLtCreate failed");
      return nullptr;
    }
    const char* portable = std::getenv("TK_CUDA_PORTABLE");
    b->launch_.portable = portable && *portable && std::strcmp(portable, "0") != 0;
    b->name_ = prop.name;
    b->launch_.stream = nullptr;
    b->launch_.num_sms = prop.multiProcessorCount;
    b->launch_.sm_major = prop.major;
    b->launch_.smem_optin = int(prop.sharedMemPerBlockOptin);
    b->launch_.sm_minor = prop.minor;
    return b;
  }
  ~CudaBackend() override {
    if (launch_.blas) cublasLtDestroy(launch_.blas);
    if (launch_.blas_workspace) cudaFree(launch_.blas_workspace);
    if (launch_.error_flag) cudaFree(launch_.error_flag);
  }

  tk_backend kind() const override { return TK_BACKEND_CUDA; }
  const char* name() const override { return "cuda"; }
  const char* device_name() const override { return name_.c_str(); }

  tk_status set_stream(void* stream) override {
    launch_.stream = static_cast<cudaStream_t>(stream);
    return TK_OK;
  }
  tk_status malloc(size_t bytes, void** out) override {
    cudaError_t e = cudaMalloc(out, bytes ? bytes : 1);
    return e == cudaSuccess ? TK_OK : cuda_fail("tk_malloc", e);
  }
  tk_status free(void* ptr) override {
    cudaError_t e = cudaFree(ptr);
    return e == cudaSuccess ? TK_OK : cuda_fail("tk_free", e);
  }
  tk_status copy_to_device(void* dst, const void* src, size_t bytes) override {
    cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? TK_OK : cuda_fail("tk_memcpy_to_device", e);
  }
  tk_status copy_to_host(void* dst, const void* src, size_t bytes) override {
    cudaError_t e = cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? TK_OK : cuda_fail("tk_memcpy_to_host", e);
  }
  tk_status synchronize() override {
    cudaError_t e = cudaStreamSynchronize(launch_.stream);
    return e == cudaSuccess ? TK_OK : cuda_fail("tk_synchronize", e);
  }
  tk_status check_device_errors() override {
    TK_TRY(synchronize());
    unsigned int flag = 0;
    cudaError_t e = cudaMemcpy(&flag, launch_.error_flag, sizeof flag, cudaMemcpyDeviceToHost);
    if (e != cudaSuccess) return cuda_fail("tk_check_device_errors", e);
    if (flag == 0) return TK_OK;
    cudaMemset(launch_.error_flag, 0, sizeof flag);
    return fail(TK_ERR_OUT_OF_RANGE,
                "a kernel met an out-of-range index (position, block-table entry, sequence "
                "length or offset) and skipped that work");
  }

  tk_status rmsnorm(const tk_rmsnorm_params& p) override { return cuda::rmsnorm(p, launch_); }
  tk_status rope(const tk_rope_params& p) override { return cuda::rope(p, launch_); }
  tk_status swiglu(const tk_swiglu_params& p) override { return cuda::swiglu(p, launch_); }
  tk_status matmul(const tk_matmul_params& p) override { return cuda::matmul(p, launch_); }
  tk_status qmatmul_int4(const tk_qmatmul_int4_params& p) override {
    return cuda::qmatmul_int4(p, launch_);
  }
  tk_status fused_ffn(const tk_fused_ffn_params& p) override { return cuda::fused_ffn(p, launch_); }
  tk_status attn_front(const tk_attn_front_params& p) override {
    return cuda::attn_front(p, launch_);
  }
  tk_status flash_attention(const tk_flash_attention_params& p) override {
    return cuda::flash_attention(p, launch_);
  }
  tk_status paged_attention(const tk_paged_attention_params& p) override {
    return cuda::paged_attention(p, launch_);
  }
  size_t paged_attention_workspace_size(int64_t total_q, int64_t num_q_heads, int64_t head_dim,
                                        int64_t max_context_len) const override {
    return cuda::paged_attention_workspace_size(total_q, num_q_heads, head_dim, max_context_len,
                                                launch_.num_sms);
  }

 private:
  CudaBackend() = default;
  int device_ = 0;
  std::string name_;
  cuda::Launch launch_{};
};

}  // namespace

bool cuda_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

std::unique_ptr<Backend> make_cuda_backend(int device) { return CudaBackend::create(device); }

}  // namespace tk
