// The C ABI: validate, then dispatch to the context's backend.
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/backend.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/validate.h"

namespace tk {
namespace {
thread_local std::string g_last_error;
}

tk_status fail(tk_status status, const char* fmt, ...) {
  char buf[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(buf, sizeof buf, fmt, args);
  va_end(args);
  g_last_error = buf;
  return status;
}

void clear_error() { g_last_error.clear(); }

tk_status Backend::unsupported(const char* op) const {
  return fail(TK_ERR_UNSUPPORTED, "%s: not implemented on the %s backend", op, name());
}
tk_status Backend::rmsnorm(const tk_rmsnorm_params&) { return unsupported("rmsnorm"); }
tk_status Backend::rope(const tk_rope_params&) { return unsupported("rope"); }
tk_status Backend::swiglu(const tk_swiglu_params&) { return unsupported("swiglu"); }
tk_status Backend::matmul(const tk_matmul_params&) { return unsupported("matmul"); }
tk_status Backend::qmatmul_int4(const tk_qmatmul_int4_params&) {
  return unsupported("qmatmul_int4");
}
tk_status Backend::fused_ffn(const tk_fused_ffn_params&) { return unsupported("fused_ffn"); }
tk_status Backend::attn_front(const tk_attn_front_params&) { return unsupported("attn_front"); }
tk_status Backend::flash_attention(const tk_flash_attention_params&) {
  return unsupported("flash_attention");
}
tk_status Backend::paged_attention(const tk_paged_attention_params&) {
  return unsupported("paged_attention");
}

tk_status HostBackend::malloc(size_t bytes, void** out) {
  // 64-byte alignment: a cache line, and enough for any SIMD width. Buffers of
  // kHugeBytes and more are aligned to a huge page and asked for as
  // transparent huge pages (Linux; Debian's default THP mode is "madvise"): a
  // weight or activation stream then takes one TLB miss per 2 MB instead of
  // per 4 KB, which on CI's 2-core Zen 4 VM (two-level page walks) lifted a
  // 2-thread streaming read over 256 MB from 46-51 to 60-62 GB/s. Where the
  // kernel has no huge page to give, it falls back to 4 KB pages by itself.
  const size_t align = bytes >= kHugeBytes ? kHugePage : 64;
  void* p = std::aligned_alloc(align, (bytes + align - 1) / align * align + (bytes == 0 ? 64 : 0));
  TK_REQUIRE(p != nullptr, TK_ERR_OUT_OF_MEMORY, "tk_malloc: %zu bytes of host memory failed",
             bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align == kHugePage) madvise(p, (bytes + align - 1) / align * align, MADV_HUGEPAGE);
#endif
  *out = p;
  return TK_OK;
}
tk_status HostBackend::free(void* ptr) {
  std::free(ptr);
  return TK_OK;
}
tk_status HostBackend::copy_to_device(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
  return TK_OK;
}
tk_status HostBackend::copy_to_host(void* dst, const void* src, size_t bytes) {
  if (bytes) std::memmove(dst, src, bytes);
  return TK_OK;
}

}  // namespace tk

using tk::fail;

#define TK_CHECK_CTX(ctx)                                                              \
  do {                                                                                 \
    if ((ctx) == nullptr || !(ctx)->backend)                                           \
      return fail(TK_ERR_NULL_POINTER, "%s: context is null", __func__);               \
  } while (0)
#define TK_CHECK_PARAMS(p)                                                             \
  do {                                                                                 \
    if ((p) == nullptr) return fail(TK_ERR_NULL_POINTER, "%s: params is null", __func__); \
  } while (0)

extern "C" {

const char* tk_last_error(void) { return tk::g_last_error.c_str(); }

const char* tk_status_string(tk_status status) {
  switch (status) {
    case TK_OK: return "ok";
    case TK_ERR_INVALID_ARGUMENT: return "invalid argument";
    case TK_ERR_UNSUPPORTED: return "unsupported";
    case TK_ERR_NULL_POINTER: return "null pointer";
    case TK_ERR_MISALIGNED: return "misaligned pointer";
    case TK_ERR_OUT_OF_RANGE: return "index out of range";
    case TK_ERR_BACKEND: return "backend error";
    case TK_ERR_OUT_OF_MEMORY: return "out of memory";
  }
  return "unknown status";
}

const char* tk_dtype_name(tk_dtype dtype) {
  switch (dtype) {
    case TK_F32: return "f32";
    case TK_F16: return "f16";
    case TK_BF16: return "bf16";
  }
  return "unknown";
}

size_t tk_dtype_size(tk_dtype dtype) { return tk::dtype_size(dtype); }

tk_status tk_context_create(tk_backend backend, int device, tk_context** out) {
  if (out == nullptr) return fail(TK_ERR_NULL_POINTER, "tk_context_create: out is null");
  *out = nullptr;
  std::unique_ptr<tk::Backend> b;
  switch (backend) {
    case TK_BACKEND_DEFAULT:
      if (tk::cuda_available()) b = tk::make_cuda_backend(device);
      if (!b) b = tk::make_cpu_backend();
      break;
    case TK_BACKEND_REFERENCE: b = tk::make_reference_backend(); break;
    case TK_BACKEND_CPU: b = tk::make_cpu_backend(); break;
    case TK_BACKEND_CUDA:
      b = tk::make_cuda_backend(device);
      if (!b) return TK_ERR_UNSUPPORTED;  // make_cuda_backend said why
      break;
    default:
      return fail(TK_ERR_INVALID_ARGUMENT, "tk_context_create: unknown backend %d", int(backend));
  }
  if (!b) return fail(TK_ERR_BACKEND, "tk_context_create: backend creation failed");
  *out = new (std::nothrow) tk_context{std::move(b)};
  if (*out == nullptr) return fail(TK_ERR_OUT_OF_MEMORY, "tk_context_create: out of memory");
  return TK_OK;
}

void tk_context_destroy(tk_context* ctx) { delete ctx; }

tk_backend tk_context_backend(const tk_context* ctx) {
  return ctx && ctx->backend ? ctx->backend->kind() : TK_BACKEND_DEFAULT;
}

const char* tk_context_device_name(const tk_context* ctx) {
  return ctx && ctx->backend ? ctx->backend->device_name() : "";
}

tk_status tk_context_set_stream(tk_context* ctx, void* stream) {
  TK_CHECK_CTX(ctx);
  return ctx->backend->set_stream(stream);
}

tk_status tk_context_set_threads(tk_context* ctx, int threads) {
  TK_CHECK_CTX(ctx);
  if (threads < 0) return fail(TK_ERR_INVALID_ARGUMENT, "tk_context_set_threads: %d < 0", threads);
  return ctx->backend->set_threads(threads);
}

tk_status tk_malloc(tk_context* ctx, size_t bytes, void** out) {
  TK_CHECK_CTX(ctx);
  if (out == nullptr) return fail(TK_ERR_NULL_POINTER, "tk_malloc: out is null");
  return ctx->backend->malloc(bytes, out);
}

tk_status tk_free(tk_context* ctx, void* ptr) {
  TK_CHECK_CTX(ctx);
  return ptr ? ctx->backend->free(ptr) : TK_OK;
}

tk_status tk_memcpy_to_device(tk_context* ctx, void* dst, const void* src, size_t bytes) {
  TK_CHECK_CTX(ctx);
  if (bytes && (dst == nullptr || src == nullptr))
    return fail(TK_ERR_NULL_POINTER, "tk_memcpy_to_device: null pointer");
  return ctx->backend->copy_to_device(dst, src, bytes);
}

tk_status tk_memcpy_to_host(tk_context* ctx, void* dst, const void* src, size_t bytes) {
  TK_CHECK_CTX(ctx);
  if (bytes && (dst == nullptr || src == nullptr))
    return fail(TK_ERR_NULL_POINTER, "tk_memcpy_to_host: null pointer");
  return ctx->backend->copy_to_host(dst, src, bytes);
}

tk_status tk_synchronize(tk_context* ctx) {
  TK_CHECK_CTX(ctx);
  return ctx->backend->synchronize();
}

tk_status tk_check_device_errors(tk_context* ctx) {
  TK_CHECK_CTX(ctx);
  return ctx->backend->check_device_errors();
}

// Validate, then run. Index arrays are validated on the host only where they are host memory.
#define TK_DISPATCH_OP(fn, method, params_type, ...)                         \
  tk_status fn(tk_context* ctx, const params_type* p) {                      \
    TK_CHECK_CTX(ctx);                                                       \
    TK_CHECK_PARAMS(p);                                                      \
    const bool host_indices = ctx->backend->is_host();                       \
    (void)host_indices;                                                      \
    TK_TRY(tk::validate(*p __VA_ARGS__));                                    \
    return ctx->backend->method(*p);                                         \
  }

TK_DISPATCH_OP(tk_rmsnorm, rmsnorm, tk_rmsnorm_params)
TK_DISPATCH_OP(tk_rope, rope, tk_rope_params, , host_indices)
TK_DISPATCH_OP(tk_swiglu, swiglu, tk_swiglu_params)
TK_DISPATCH_OP(tk_matmul, matmul, tk_matmul_params)
TK_DISPATCH_OP(tk_qmatmul_int4, qmatmul_int4, tk_qmatmul_int4_params)
TK_DISPATCH_OP(tk_fused_ffn, fused_ffn, tk_fused_ffn_params)
TK_DISPATCH_OP(tk_attn_front, attn_front, tk_attn_front_params, , host_indices)
TK_DISPATCH_OP(tk_flash_attention, flash_attention, tk_flash_attention_params, , host_indices)
TK_DISPATCH_OP(tk_paged_attention, paged_attention, tk_paged_attention_params, , host_indices)

tk_status tk_swiglu_concat(tk_context* ctx, tk_dtype dtype, int64_t rows, int64_t dim,
                           const void* gate_up, int64_t gate_up_stride, void* out,
                           int64_t out_stride) {
  if (gate_up == nullptr) return fail(TK_ERR_NULL_POINTER, "swiglu: gate_up is null");
  if (dtype != TK_F32 && dtype != TK_F16 && dtype != TK_BF16)
    return fail(TK_ERR_UNSUPPORTED, "swiglu: unsupported activation dtype %d", int(dtype));
  if (rows > 1 && gate_up_stride < 2 * dim)
    return fail(TK_ERR_INVALID_ARGUMENT,
                "swiglu: gate_up row stride %lld is smaller than 2 * dim = %lld",
                (long long)gate_up_stride, (long long)(2 * dim));
  tk_swiglu_params p{};
  p.dtype = dtype;
  p.rows = rows;
  p.dim = dim;
  p.gate = gate_up;
  p.gate_stride = gate_up_stride;
  p.up = static_cast<const char*>(gate_up) + dim * int64_t(tk::dtype_size(dtype));
  p.up_stride = gate_up_stride;
  p.out = out;
  p.out_stride = out_stride;
  return tk_swiglu(ctx, &p);
}

size_t tk_paged_attention_workspace_size(const tk_context* ctx, int64_t total_q,
                                         int64_t num_q_heads, int64_t head_dim,
                                         int64_t max_context_len) {
  if (ctx == nullptr || !ctx->backend || total_q < 0 || num_q_heads < 1 || head_dim < 1 ||
      max_context_len < 1)
    return 0;
  return ctx->backend->paged_attention_workspace_size(total_q, num_q_heads, head_dim,
                                                      max_context_len);
}

}  // extern "C"
