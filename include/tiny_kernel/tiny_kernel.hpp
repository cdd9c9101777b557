// tiny-kernel: the C++ API. A thin layer over the C ABI (tiny_kernel.h): an
// owning Context, errors as exceptions, and the same params structs.
//
//   tk::Context ctx;                       // CUDA if present, else CPU
//   tk_rmsnorm_params p{...};
//   ctx.rmsnorm(p);                        // throws tk::Error naming the problem
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include "tiny_kernel/tiny_kernel.h"

namespace tk {

class Error : public std::runtime_error {
 public:
  Error(tk_status status, const std::string& message)
      : std::runtime_error(message), status_(status) {}
  tk_status status() const { return status_; }

 private:
  tk_status status_;
};

inline void check(tk_status status) {
  if (status != TK_OK)
    throw Error(status, std::string(tk_status_string(status)) + ": " + tk_last_error());
}

class Context {
 public:
  explicit Context(tk_backend backend = TK_BACKEND_DEFAULT, int device = 0) {
    check(tk_context_create(backend, device, &ctx_));
  }
  ~Context() { tk_context_destroy(ctx_); }
  Context(const Context&) = delete;
  Context& operator=(const Context&) = delete;
  Context(Context&& o) noexcept : ctx_(std::exchange(o.ctx_, nullptr)) {}
  Context& operator=(Context&& o) noexcept {
    std::swap(ctx_, o.ctx_);
    return *this;
  }

  tk_context* get() const { return ctx_; }
  tk_backend backend() const { return tk_context_backend(ctx_); }
  std::string device_name() const { return tk_context_device_name(ctx_); }
  void set_stream(void* stream) { check(tk_context_set_stream(ctx_, stream)); }
  void set_threads(int threads) { check(tk_context_set_threads(ctx_, threads)); }
  void synchronize() { check(tk_synchronize(ctx_)); }
  void check_device_errors() { check(tk_check_device_errors(ctx_)); }

  void rmsnorm(const tk_rmsnorm_params& p) { check(tk_rmsnorm(ctx_, &p)); }
  void rope(const tk_rope_params& p) { check(tk_rope(ctx_, &p)); }
  void swiglu(const tk_swiglu_params& p) { check(tk_swiglu(ctx_, &p)); }
  void matmul(const tk_matmul_params& p) { check(tk_matmul(ctx_, &p)); }
  void qmatmul_int4(const tk_qmatmul_int4_params& p) { check(tk_qmatmul_int4(ctx_, &p)); }
  void fused_ffn(const tk_fused_ffn_params& p) { check(tk_fused_ffn(ctx_, &p)); }
  void attn_front(const tk_attn_front_params& p) { check(tk_attn_front(ctx_, &p)); }
  void flash_attention(const tk_flash_attention_params& p) { check(tk_flash_attention(ctx_, &p)); }
  void paged_attention(const tk_paged_attention_params& p) { check(tk_paged_attention(ctx_, &p)); }

 private:
  tk_context* ctx_ = nullptr;
};

// Device (or host, on host backends) memory owned by a context.
class Buffer {
 public:
  Buffer(Context& ctx, size_t bytes) : ctx_(ctx.get()), bytes_(bytes) {
    check(tk_malloc(ctx_, bytes, &ptr_));
  }
  ~Buffer() { tk_free(ctx_, ptr_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  void upload(const void* host, size_t bytes) {
    fits(bytes);
    check(tk_memcpy_to_device(ctx_, ptr_, host, bytes));
  }
  void download(void* host, size_t bytes) const {
    fits(bytes);
    check(tk_memcpy_to_host(ctx_, host, ptr_, bytes));
  }

 private:
  void fits(size_t bytes) const {
    if (bytes > bytes_)
      throw Error(TK_ERR_INVALID_ARGUMENT, "Buffer: copy of " + std::to_string(bytes) +
                                               " bytes into a buffer of " + std::to_string(bytes_));
  }
  tk_context* ctx_;
  size_t bytes_;
  void* ptr_ = nullptr;
};

}  // namespace tk
