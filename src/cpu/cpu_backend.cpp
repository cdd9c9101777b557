// The CPU backend: SIMD kernels (Highway, target chosen at run time) spread
// over a small persistent thread pool. The kernels live in elementwise.cpp,
// matmul.cpp and attention.cpp; this file owns the pool and the CPU feature
// flags that the kernels read.
#include <cstdio>
#include <mutex>
#include <new>
#include <string>
#include <thread>

#include "core/backend.h"
#include "core/error.h"
#include "cpu/kernels.h"

namespace tk {

namespace cpu {
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
extern const bool kCpuHasAvx512Bf16 = [] {
  __builtin_cpu_init();  // in case a constructor of another file asks first
  return __builtin_cpu_supports("avx512bf16") != 0;
}();
#else
extern const bool kCpuHasAvx512Bf16 = false;
#endif
}  // namespace cpu

namespace {

class CpuBackend final : public HostBackend {
 public:
  CpuBackend() { update_name(); }

  tk_backend kind() const override { return TK_BACKEND_CPU; }
  const char* name() const override { return "cpu"; }
  const char* device_name() const override { return device_name_.c_str(); }

  tk_status set_threads(int threads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    pool_.resize(threads);
    update_name();
    return TK_OK;
  }

  tk_status rmsnorm(const tk_rmsnorm_params& p) override { return run([&] { cpu::rmsnorm(p, pool_); }); }
  tk_status rope(const tk_rope_params& p) override { return run([&] { cpu::rope(p, pool_); }); }
  tk_status swiglu(const tk_swiglu_params& p) override { return run([&] { cpu::swiglu(p, pool_); }); }
  tk_status matmul(const tk_matmul_params& p) override { return run([&] { cpu::matmul(p, pool_); }); }
  tk_status qmatmul_int4(const tk_qmatmul_int4_params& p) override {
    return run([&] { cpu::qmatmul_int4(p, pool_); });
  }
  tk_status fused_ffn(const tk_fused_ffn_params& p) override {
    return run([&] { cpu::fused_ffn(p, pool_); });
  }
  tk_status attn_front(const tk_attn_front_params& p) override {
    return run([&] { cpu::attn_front(p, pool_); });
  }
  tk_status flash_attention(const tk_flash_attention_params& p) override {
    return run([&] { cpu::flash_attention(p, pool_); });
  }
  tk_status paged_attention(const tk_paged_attention_params& p) override {
    return run([&] { cpu::paged_attention(p, pool_); });
  }

 private:
  // Scratch buffers grow on first use of a larger shape; that is the only way a
  // kernel can fail, and it must come back as a status, not an exception.
  // The pool runs one op at a time, so calls on one context from several
  // threads take turns (an uncontended lock costs tens of nanoseconds).
  template <class F>
  tk_status run(const F& f) {
    std::lock_guard<std::mutex> lock(mutex_);
    try {
      f();
    } catch (const std::bad_alloc&) {
      return fail(TK_ERR_OUT_OF_MEMORY, "cpu backend: out of memory for scratch buffers");
    }
    return TK_OK;
  }

  void update_name() {
    char buf[128];
    std::snprintf(buf, sizeof buf, "cpu (%s, %d thread%s)", cpu::simd_target_name(), pool_.size(),
                  pool_.size() == 1 ? "" : "s");
    device_name_ = buf;
  }

  std::mutex mutex_;
  cpu::ThreadPool pool_;
  std::string device_name_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<CpuBackend>(); }

}  // namespace tk
