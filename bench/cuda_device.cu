// The CUDA device of the bench: cudaEvent timing on the context's stream, an
// L2 flush (a large cudaMemsetAsync) before each repeat, the roofs measured
// here (device-to-device copy, a read-only reduction, a cuBLAS bf16 GEMM),
// cuBLAS as the dense-matmul baseline and CUDA graphs for the decode step.
// Compiled only when the CUDA backend is built.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "bench.h"

namespace tkb {
namespace {

bool cuda_ok(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return true;
  set_op_error(std::string(what) + ": " + cudaGetErrorString(e));
  return false;
}
#define TKB_CUDA(expr) cuda_ok((expr), #expr)

// Every thread keeps four independent 16-byte loads in flight: HBM needs
// megabytes in flight to reach its bandwidth.
__device__ __forceinline__ void read_all(const uint4* __restrict__ p, size_t n, unsigned* out) {
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  unsigned acc = 0;
  for (; i + 3 * stride < n; i += 4 * stride) {
    const uint4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
    acc ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^
           d.z ^ d.w;
  }
  for (; i < n; i += stride) {
    const uint4 a = p[i];
    acc ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  if (acc == 0x9e3779b9u) *out = acc;  // practically never; keeps the loads alive
}
// The roofs and the L2 flush.
__global__ void read_kernel(const uint4* __restrict__ p, size_t n, unsigned* out) { read_all(p, n, out); }
// The floors printed beside rows (Device::read_pass): the same code under its own
// name, so that a profiler can pick it out (tools/gpu_check.sh profile).
__global__ void floor_read_kernel(const uint4* __restrict__ p, size_t n, unsigned* out) {
  read_all(p, n, out);
}

__global__ void empty_kernel() {}

// Values in [-1, 1) from a hash of the index: zeros would flatter the GEMM
// (less switching, higher clocks).
__global__ void fill_bf16_kernel(__nv_bfloat16* p, size_t n, unsigned seed) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 15;
    h *= 2246822519u;
    h ^= h >> 13;
    p[i] = __float2bfloat16(float(h & 0xffff) / 32768.0f - 1.0f);
  }
}

const char* cublas_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "success";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "not initialized";
    case CUBLAS_STATUS_ALLOC_FAILED: return "alloc failed";
    case CUBLAS_STATUS_INVALID_VALUE: return "invalid value";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "arch mismatch";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "execution failed";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "not supported";
    default: return "error";
  }
}

class CudaDevice final : public Device {
 public:
  static std::unique_ptr<Device> create(tk_context* ctx, std::string* error) {
    auto d = std::unique_ptr<CudaDevice>(new CudaDevice(ctx));
    set_op_error("");
    int l2 = 0;
    cublasStatus_t bs = CUBLAS_STATUS_SUCCESS;
    if (!TKB_CUDA(cudaGetDevice(&d->device_)) ||
        !TKB_CUDA(cudaDeviceGetAttribute(&d->sms_, cudaDevAttrMultiProcessorCount, d->device_)) ||
        !TKB_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, d->device_)) ||
        !TKB_CUDA(cudaStreamCreateWithFlags(&d->stream_, cudaStreamNonBlocking))) {
      *error = op_error();
      return nullptr;
    }
    if (tk_context_set_stream(ctx, d->stream_) != TK_OK) {
      *error = tk_last_error();
      return nullptr;
    }
    // Read 256 MB (at least 4x L2) before each repeat. A read, not a memset as
    // Triton's do_bench does: a memset leaves L2 full of dirty lines whose
    // write-back then lands inside the timed kernel (measured on an H100: one
    // 117 MB read pass took 51.7 us after a memset, 41.5 us after a read).
    d->flush_bytes_ = std::max(size_t(256) << 20, 4 * size_t(l2));
    if (!TKB_CUDA(cudaMalloc(&d->flush_, d->flush_bytes_ + 256)) ||
        !TKB_CUDA(cudaMemset(d->flush_, 0, d->flush_bytes_ + 256))) {
      *error = op_error();
      return nullptr;
    }
    if ((bs = cublasCreate(&d->blas_)) != CUBLAS_STATUS_SUCCESS ||
        (bs = cublasSetStream(d->blas_, d->stream_)) != CUBLAS_STATUS_SUCCESS) {
      *error = std::string("cuBLAS initialisation: ") + cublas_name(bs);
      return nullptr;
    }
    d->ensure_events(8);
    // What one flush costs, so the repeat count fits the time budget.
    cudaEventRecord(d->start_[0], d->stream_);
    d->flush_l2();
    cudaEventRecord(d->stop_[0], d->stream_);
    if (!TKB_CUDA(cudaStreamSynchronize(d->stream_))) {
      *error = op_error();
      return nullptr;
    }
    float ms = 0;
    cudaEventElapsedTime(&ms, d->start_[0], d->stop_[0]);
    d->flush_s_ = ms * 1e-3;
    return d;
  }

  ~CudaDevice() override {
    if (stream_) cudaStreamSynchronize(stream_);
    for (cudaEvent_t e : start_) cudaEventDestroy(e);
    for (cudaEvent_t e : stop_) cudaEventDestroy(e);
    if (blas_) cublasDestroy(blas_);
    if (flush_) cudaFree(flush_);
    if (stream_) {
      tk_context_set_stream(ctx_, nullptr);
      cudaStreamDestroy(stream_);
    }
  }

  const char* backend() const override { return "cuda"; }

  Peaks measure_peaks() override {
    Peaks pk;
    set_op_error("");
    const size_t bytes = size_t(1) << 30;
    void *a = nullptr, *b = nullptr;
    unsigned* sink = nullptr;
    if (TKB_CUDA(cudaMalloc(&a, bytes)) && TKB_CUDA(cudaMalloc(&b, bytes)) &&
        TKB_CUDA(cudaMalloc(&sink, sizeof(unsigned)))) {
      cudaMemsetAsync(a, 1, bytes, stream_);
      const double copy_s = best_of(10, [&] {
        cudaMemcpyAsync(b, a, bytes, cudaMemcpyDeviceToDevice, stream_);
      });
      pk.copy_gbps = 2.0 * double(bytes) / copy_s / 1e9;
      const double read_s = best_of(10, [&] {
        read_kernel<<<sms_ * 8, 256, 0, stream_>>>(static_cast<const uint4*>(a), bytes / 16, sink);
      });
      pk.read_gbps = double(bytes) / read_s / 1e9;
    }
    cudaFree(a);
    cudaFree(b);
    cudaFree(sink);
    pk.peak_gbps = std::max(pk.read_gbps, pk.copy_gbps);

    // The compute roof: cuBLAS bf16 GEMM, 8192^3, f32 accumulation.
    const int n = 8192;
    const size_t elems = size_t(n) * n;
    __nv_bfloat16 *x = nullptr, *w = nullptr, *y = nullptr;
    if (TKB_CUDA(cudaMalloc(&x, elems * 2)) && TKB_CUDA(cudaMalloc(&w, elems * 2)) &&
        TKB_CUDA(cudaMalloc(&y, elems * 2))) {
      fill_bf16_kernel<<<sms_ * 4, 256, 0, stream_>>>(x, elems, 1u);
      fill_bf16_kernel<<<sms_ * 4, 256, 0, stream_>>>(w, elems, 2u);
      Op gemm = vendor_matmul(TK_BF16, n, n, n, x, w, y);
      bool ok = true;
      const double s = best_of(10, [&] { ok = gemm() == TK_OK && ok; });
      if (ok) pk.peak_tflops = 2.0 * double(n) * n * n / s / 1e12;
    }
    cudaFree(x);
    cudaFree(w);
    cudaFree(y);

    // The floor under every small row: an empty kernel, launched and timed
    // (events, flush) exactly as the cases are.
    TimingOptions quick;
    quick.budget_s = 0.2;
    const Measurement empty = time(
        [this] {
          empty_kernel<<<1, 32, 0, stream_>>>();
          return cuda_ok(cudaGetLastError(), "empty kernel") ? TK_OK : TK_ERR_BACKEND;
        },
        quick);
    if (empty.ok) pk.launch_us = empty.median_us;

    char how[256];
    std::snprintf(how, sizeof how,
                  "cudaMemcpy D2D and a read-only reduction over 1 GiB, best of 10; cuBLAS bf16 "
                  "GEMM 8192^3%s; cudaEvent timing",
                  pk.peak_tflops > 0 ? "" : " failed");
    pk.how = how;
    if (pk.peak_tflops == 0 || pk.peak_gbps == 0)
      std::fprintf(stderr, "bench: a roof could not be measured: %s\n", op_error().c_str());
    return pk;
  }

  Measurement time(const Op& op, const TimingOptions& opt) override {
    Measurement m;
    set_op_error("");
    auto failed = [&](const std::string& why) {
      cudaStreamSynchronize(stream_);
      m.ok = false;
      m.error = why;
      return m;
    };
    if (op() != TK_OK) return failed(op_error());
    if (tk_check_device_errors(ctx_) != TK_OK) return failed(tk_last_error());
    if (!TKB_CUDA(cudaGetLastError())) return failed(op_error());

    ensure_events(size_t(opt.max_reps));
    cudaEventRecord(start_[0], stream_);
    tk_status st = op();
    cudaEventRecord(stop_[0], stream_);
    if (st != TK_OK || !TKB_CUDA(cudaStreamSynchronize(stream_))) return failed(op_error());
    float est_ms = 0;
    cudaEventElapsedTime(&est_ms, start_[0], stop_[0]);
    const int reps = std::clamp(int(opt.budget_s / (est_ms * 1e-3 + flush_s_ + 5e-6)),
                                opt.min_reps, opt.max_reps);
    for (int r = 0; r < reps; ++r) {
      if (opt.memset_flush)
        cudaMemsetAsync(flush_, r & 0xff, flush_bytes_, stream_);
      else
        flush_l2();
      if (opt.sync_each) cudaStreamSynchronize(stream_);
      cudaEventRecord(start_[size_t(r)], stream_);
      st = op();
      cudaEventRecord(stop_[size_t(r)], stream_);
      if (st != TK_OK) return failed(op_error());
    }
    if (!TKB_CUDA(cudaStreamSynchronize(stream_))) return failed(op_error());
    if (tk_check_device_errors(ctx_) != TK_OK) return failed(tk_last_error());
    std::vector<double> us(static_cast<size_t>(reps));
    for (int r = 0; r < reps; ++r) {
      float ms = 0;
      cudaEventElapsedTime(&ms, start_[size_t(r)], stop_[size_t(r)]);
      us[size_t(r)] = double(ms) * 1e3;
    }
    std::nth_element(us.begin(), us.begin() + ptrdiff_t(us.size() / 2), us.end());
    m.ok = true;
    m.median_us = us[us.size() / 2];
    m.reps = reps;
    return m;
  }

  // y[T, N] = x[T, K] W[N, K]^T row-major is, column-major, y^T = W x^T: the
  // "TN" GEMM with m = N, n = T, k = K.
  Op vendor_matmul(tk_dtype dtype, int64_t T, int64_t N, int64_t K, const void* x, const void* w,
                   void* y) override {
    if (dtype == TK_F32) return {};
    const cudaDataType_t t = dtype == TK_F16 ? CUDA_R_16F : CUDA_R_16BF;
    cublasHandle_t h = blas_;
    return [h, t, T, N, K, x, w, y]() {
      const float alpha = 1.0f, beta = 0.0f;
      const cublasStatus_t s =
          cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, int(N), int(T), int(K), &alpha, w, t, int(K),
                       x, t, int(K), &beta, y, t, int(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      if (s == CUBLAS_STATUS_SUCCESS) return TK_OK;
      set_op_error(std::string("cublasGemmEx: ") + cublas_name(s));
      return TK_ERR_BACKEND;
    };
  }
  const char* vendor_name() const override { return "cuBLAS"; }

  void time_sequence(const std::vector<Op>& ops, const TimingOptions& opt, Measurement* eager,
                     Measurement* graph, int* graph_nodes) override {
    auto chain = [&ops]() {
      for (const Op& op : ops) {
        const tk_status st = op();
        if (st != TK_OK) return st;
      }
      return TK_OK;
    };
    *eager = time(chain, opt);
    *graph = Measurement{};
    *graph_nodes = 0;
    if (!eager->ok) {
      graph->error = "the calls fail one by one";
      return;
    }
    // Thread-local capture: a launcher that synchronises or allocates fails here.
    set_op_error("");
    cudaGraph_t g = nullptr;
    cudaGraphExec_t exec = nullptr;
    if (!TKB_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal))) {
      graph->error = op_error();
      return;
    }
    const tk_status st = chain();
    const std::string call_error = st != TK_OK ? op_error() : "";
    const bool ended = TKB_CUDA(cudaStreamEndCapture(stream_, &g));
    if (st != TK_OK || !ended) {
      graph->error = "capture failed: " + (st != TK_OK ? call_error : op_error());
      if (g) cudaGraphDestroy(g);
      cudaGetLastError();
      return;
    }
    size_t nodes = 0;
    cudaGraphGetNodes(g, nullptr, &nodes);
    *graph_nodes = int(nodes);
    if (!TKB_CUDA(cudaGraphInstantiate(&exec, g, 0))) {
      graph->error = op_error();
      cudaGraphDestroy(g);
      return;
    }
    *graph = time(
        [this, exec]() {
          return TKB_CUDA(cudaGraphLaunch(exec, stream_)) ? TK_OK : TK_ERR_BACKEND;
        },
        opt);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(g);
  }

 private:
  explicit CudaDevice(tk_context* ctx) : ctx_(ctx) {}

  void ensure_events(size_t n) {
    while (start_.size() < n) {
      cudaEvent_t a, b;
      cudaEventCreate(&a);
      cudaEventCreate(&b);
      start_.push_back(a);
      stop_.push_back(b);
    }
  }

  // Seconds of the fastest of `reps` event-timed runs of fn (after two warm-ups).
  template <typename Fn>
  double best_of(int reps, Fn fn) {
    ensure_events(size_t(reps));
    fn();
    fn();
    for (int r = 0; r < reps; ++r) {
      cudaEventRecord(start_[size_t(r)], stream_);
      fn();
      cudaEventRecord(stop_[size_t(r)], stream_);
    }
    cudaStreamSynchronize(stream_);
    float best = 1e30f;
    for (int r = 0; r < reps; ++r) {
      float ms = 0;
      if (cudaEventElapsedTime(&ms, start_[size_t(r)], stop_[size_t(r)]) == cudaSuccess)
        best = std::min(best, ms);
    }
    return double(best) * 1e-3;
  }

  Op read_pass(const void* p, size_t bytes) override {
    if (bytes % 16 != 0 || reinterpret_cast<uintptr_t>(p) % 16 != 0) return {};
    unsigned* sink = reinterpret_cast<unsigned*>(static_cast<char*>(flush_) + flush_bytes_);
    const int blocks = int(std::min<size_t>(size_t(sms_) * 8, (bytes / 16 + 255) / 256));
    return [this, p, bytes, sink, blocks] {
      floor_read_kernel<<<blocks, 256, 0, stream_>>>(static_cast<const uint4*>(p), bytes / 16, sink);
      return cuda_ok(cudaGetLastError(), "read pass") ? TK_OK : TK_ERR_BACKEND;
    };
  }
  Op copy_pass(void* dst, const void* src, size_t bytes) override {
    return [this, dst, src, bytes] {
      return cuda_ok(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy pass")
                 ? TK_OK
                 : TK_ERR_BACKEND;
    };
  }

  // Evicts everything from L2 and leaves only clean lines behind.
  void flush_l2() {
    read_kernel<<<sms_ * 8, 256, 0, stream_>>>(
        static_cast<const uint4*>(flush_), flush_bytes_ / 16,
        reinterpret_cast<unsigned*>(static_cast<char*>(flush_) + flush_bytes_));
  }

  tk_context* ctx_;
  int device_ = 0, sms_ = 1;
  cudaStream_t stream_ = nullptr;
  void* flush_ = nullptr;
  size_t flush_bytes_ = 0;
  double flush_s_ = 0;
  cublasHandle_t blas_ = nullptr;
  std::vector<cudaEvent_t> start_, stop_;
};

}  // namespace

std::unique_ptr<Device> make_cuda_device(tk_context* ctx, std::string* error) {
  return CudaDevice::create(ctx, error);
}

}  // namespace tkb
