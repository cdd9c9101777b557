// The backend interface: what every backend (reference, CPU, CUDA) implements.
//
// The C ABI (src/core/api.cpp) validates every argument (src/core/validate.cpp)
// and only then calls the backend, so a backend method may assume its
// parameters are well-formed: shapes, strides, dtypes, alignment, and — on
// host backends — every index array (positions, block tables, lengths).
// A backend that lacks an op inherits the default, which reports
// TK_ERR_UNSUPPORTED naming the op and the backend.
#pragma once

#include <memory>

#include "tiny_kernel/tiny_kernel.h"

namespace tk {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual tk_backend kind() const = 0;
  virtual const char* name() const = 0;         // "reference", "cpu", "cuda"
  virtual const char* device_name() const = 0;
  bool is_host() const { return kind() != TK_BACKEND_CUDA; }

  virtual tk_status set_stream(void* /*stream*/) { return TK_OK; }
  virtual tk_status set_threads(int /*threads*/) { return TK_OK; }

  virtual tk_status malloc(size_t bytes, void** out) = 0;
  virtual tk_status free(void* ptr) = 0;
  virtual tk_status copy_to_device(void* dst, const void* src, size_t bytes) = 0;
  virtual tk_status copy_to_host(void* dst, const void* src, size_t bytes) = 0;
  virtual tk_status synchronize() { return TK_OK; }
  virtual tk_status check_device_errors() { return TK_OK; }

  virtual tk_status rmsnorm(const tk_rmsnorm_params& p);
  virtual tk_status rope(const tk_rope_params& p);
  virtual tk_status swiglu(const tk_swiglu_params& p);
  virtual tk_status matmul(const tk_matmul_params& p);
  virtual tk_status qmatmul_int4(const tk_qmatmul_int4_params& p);
  virtual tk_status fused_ffn(const tk_fused_ffn_params& p);
  virtual tk_status attn_front(const tk_attn_front_params& p);
  virtual tk_status flash_attention(const tk_flash_attention_params& p);
  virtual tk_status paged_attention(const tk_paged_attention_params& p);
  virtual size_t paged_attention_workspace_size(int64_t /*total_q*/, int64_t /*num_q_heads*/,
                                                int64_t /*head_dim*/,
                                                int64_t /*max_context_len*/) const {
    return 0;
  }

 protected:
  tk_status unsupported(const char* op) const;
};

// Host memory for the reference and CPU backends.
class HostBackend : public Backend {
 public:
  // Allocations of at least kHugeBytes start on a 2 MB boundary and are
  // marked for transparent huge pages (see malloc in api.cpp).
  static constexpr size_t kHugePage = size_t(2) << 20;
  static constexpr size_t kHugeBytes = size_t(4) << 20;
  tk_status malloc(size_t bytes, void** out) override;
  tk_status free(void* ptr) override;
  tk_status copy_to_device(void* dst, const void* src, size_t bytes) override;
  tk_status copy_to_host(void* dst, const void* src, size_t bytes) override;
};

std::unique_ptr<Backend> make_reference_backend();
std::unique_ptr<Backend> make_cpu_backend();
// nullptr (with tk_last_error set) when CUDA is not built in or no GPU exists.
std::unique_ptr<Backend> make_cuda_backend(int device);
bool cuda_available();

}  // namespace tk

struct tk_context {
  std::unique_ptr<tk::Backend> backend;
};
