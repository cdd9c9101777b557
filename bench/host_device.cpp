// The host device of the bench (CPU and reference backends): steady_clock
// timing, a last-level-cache flush before each repeat, and the roofs measured
// here: a multi-threaded streaming read and copy over buffers far larger than
// the LLC, and a register-resident FMA loop for the compute roof.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "bench.h"

namespace tkb {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Runs fn(i) on n threads at once and joins them.
template <typename Fn>
void on_threads(int n, Fn fn) {
  std::vector<std::thread> pool;
  pool.reserve(size_t(n));
  for (int i = 0; i < n; ++i) pool.emplace_back(fn, i);
  for (auto& t : pool) t.join();
}

// Bytes of the last-level cache, from sysfs; 32 MiB when it cannot be read.
size_t llc_bytes() {
  size_t best = 0;
  for (int i = 0; i < 8; ++i) {
    std::ifstream f("/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size");
    std::string s;
    if (!(f >> s) || s.empty()) continue;
    size_t v = std::strtoull(s.c_str(), nullptr, 10);
    if (s.back() == 'K') v <<= 10;
    if (s.back() == 'M') v <<= 20;
    best = std::max(best, v);
  }
  return best ? best : size_t(32) << 20;
}

// Taken from the context (tk_malloc), so the roofs are measured on memory
// laid out exactly as the kernels' buffers are (huge pages included).
struct HostBuffer {
  HostBuffer(tk_context* ctx, size_t n) : ctx(ctx), bytes(n) {
    void* v = nullptr;
    if (tk_malloc(ctx, n, &v) != TK_OK) throw std::bad_alloc();
    p = static_cast<unsigned char*>(v);
    std::memset(p, 1, n);  // fault every page in before anything is timed
  }
  ~HostBuffer() { tk_free(ctx, p); }
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;
  tk_context* ctx;
  unsigned char* p;
  size_t bytes;
};

// Sum of 64-bit words: vectorises at -O3 and never is the bottleneck against DRAM.
uint64_t read_words(const unsigned char* p, size_t bytes) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(p);
  const size_t n = bytes / 8;
  uint64_t a = 0, b = 0, c = 0, d = 0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a += w[i];
    b += w[i + 1];
    c += w[i + 2];
    d += w[i + 3];
  }
  for (; i < n; ++i) a += w[i];
  return a + b + c + d;
}

volatile uint64_t g_sink;

// --- the compute roof: independent FMA chains held in registers -------------
// Ten chains cover FMA latency (4 cycles) times two pipes with room to spare.
// acc = acc * a + b converges to b / (1 - a): no overflow, no denormals.
constexpr int kChains = 10;
constexpr float kA = 0.999999f, kB = 1e-7f;

#if defined(__x86_64__)
__attribute__((target("avx512f"))) float fma_loop_avx512(int64_t iters) {
  __m512 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_ps(0.01f * float(j));
  const __m512 a = _mm512_set1_ps(kA), b = _mm512_set1_ps(kB);
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < kChains; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  __m512 s = acc[0];
  for (int j = 1; j < kChains; ++j) s = _mm512_add_ps(s, acc[j]);
  float out[16];
  _mm512_storeu_ps(out, s);
  return out[0] + out[15];
}
__attribute__((target("avx2,fma"))) float fma_loop_avx2(int64_t iters) {
  __m256 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = _mm256_set1_ps(0.01f * float(j));
  const __m256 a = _mm256_set1_ps(kA), b = _mm256_set1_ps(kB);
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < kChains; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
  float out[8];
  __m256 s = acc[0];
  for (int j = 1; j < kChains; ++j) s = _mm256_add_ps(s, acc[j]);
  _mm256_storeu_ps(out, s);
  return out[0] + out[7];
}
#endif

// --- the copy roof: a copy with non-temporal stores --------------------------
// The kernels write outputs far larger than the caches with non-temporal
// stores (no read of each line before it is overwritten), so the copy they
// are held to must do the same. glibc's memcpy only switches to such stores
// above its non-temporal threshold, which it derives from the cache size the
// machine reports (240 MB on the 2-core Zen 4 VM of CI: it copied the roof's
// 64 MB slices with ordinary stores, reading every destination line first,
// and gave 50-54 GB/s of counted read + write where this loop gives 77-80).
#if defined(__x86_64__)
__attribute__((target("avx2"))) void copy_stream_avx2(unsigned char* dst, const unsigned char* src,
                                                      size_t n) {
  size_t i = 0;
  for (; i + 128 <= n; i += 128) {  // dst is 32-byte aligned (tk_malloc)
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 64));
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i + 96), d);
  }
  _mm_sfence();
  std::memcpy(dst + i, src + i, n - i);
}
#endif

// Copies n bytes the way the kernels write large outputs: with non-temporal
// stores where the CPU has them (x86 with AVX2), else memcpy.
void copy_streaming(unsigned char* dst, const unsigned char* src, size_t n) {
#if defined(__x86_64__)
  static const bool avx2 = __builtin_cpu_supports("avx2");
  if (avx2 && reinterpret_cast<uintptr_t>(dst) % 32 == 0) return copy_stream_avx2(dst, src, n);
#endif
  std::memcpy(dst, src, n);
}

// Portable fallback: 4-wide vectors, multiply and add counted as two flops
// (compilers fuse them into FMA where the target has it, e.g. NEON).
typedef float f32x4 __attribute__((vector_size(16)));
float fma_loop_generic(int64_t iters) {
  f32x4 acc[kChains];
  for (int j = 0; j < kChains; ++j) acc[j] = f32x4{} + 0.01f * float(j);
  const f32x4 a = f32x4{} + kA, b = f32x4{} + kB;
  for (int64_t i = 0; i < iters; ++i)
    for (int j = 0; j < kChains; ++j) acc[j] = acc[j] * a + b;
  f32x4 s = acc[0];
  for (int j = 1; j < kChains; ++j) s += acc[j];
  return s[0] + s[3];
}

struct FmaKernel {
  float (*fn)(int64_t);
  int lanes;
  const char* isa;
};
FmaKernel best_fma_kernel() {
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return {fma_loop_avx512, 16, "avx512"};
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return {fma_loop_avx2, 8, "avx2"};
#endif
  return {fma_loop_generic, 4, "128-bit"};
}

class HostDevice final : public Device {
 public:
  HostDevice(tk_context* ctx, int threads) : ctx_(ctx) {
    threads_ = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
    llc_ = llc_bytes();
    // Twice the LLC plus every core's L2: a sweep evicts whatever the last repeat left.
    flush_ = std::make_unique<HostBuffer>(
        ctx_, std::max(2 * llc_bytes() + size_t(threads_) * (2 << 20), size_t(64) << 20));
  }

  const char* backend() const override {
    return tk_context_backend(ctx_) == TK_BACKEND_REFERENCE ? "reference" : "cpu";
  }

  Peaks measure_peaks() override {
    Peaks pk;
    const size_t llc = llc_bytes();
    const size_t bytes = std::max(size_t(256) << 20, 8 * llc) / (64 * size_t(threads_)) *
                         (64 * size_t(threads_));
    const size_t slice = bytes / size_t(threads_);
    {
      HostBuffer buf(ctx_, bytes);
      double best = 1e30;
      for (int r = 0; r < 6; ++r) {
        std::vector<uint64_t> sums(static_cast<size_t>(threads_));
        auto t0 = Clock::now();
        on_threads(threads_, [&](int i) { sums[size_t(i)] = read_words(buf.p + slice * size_t(i), slice); });
        best = std::min(best, seconds_since(t0));
        for (uint64_t s : sums) g_sink = g_sink + s;
      }
      pk.read_gbps = double(bytes) / best / 1e9;
    }
    {
      HostBuffer src(ctx_, bytes / 2), dst(ctx_, bytes / 2);
      const size_t half = bytes / 2 / size_t(threads_);
      double best = 1e30;
      for (int r = 0; r < 6; ++r) {
        auto t0 = Clock::now();
        on_threads(threads_, [&](int i) {
          copy_streaming(dst.p + half * size_t(i), src.p + half * size_t(i), half);
        });
        best = std::min(best, seconds_since(t0));
      }
      pk.copy_gbps = double(bytes) / best / 1e9;  // bytes/2 read + bytes/2 written
    }
    {
      // In place, as rope and the residual add work: write-backs of evicted
      // lines overlap the reads, which a core's miss buffers alone cannot match.
      HostBuffer buf(ctx_, bytes);
      double best = 1e30;
      for (int r = 0; r < 6; ++r) {
        auto t0 = Clock::now();
        on_threads(threads_, [&](int i) {
          uint64_t* w = reinterpret_cast<uint64_t*>(buf.p + slice * size_t(i));
          for (size_t j = 0; j < slice / 8; ++j) w[j] += 1;
        });
        best = std::min(best, seconds_since(t0));
      }
      pk.update_gbps = 2.0 * double(bytes) / best / 1e9;
    }
    pk.peak_gbps = std::max({pk.read_gbps, pk.copy_gbps, pk.update_gbps});

    const FmaKernel k = best_fma_kernel();
    const int64_t iters = 20'000'000;
    double best = 1e30;
    for (int r = 0; r < 3; ++r) {
      std::vector<float> out(static_cast<size_t>(threads_));
      auto t0 = Clock::now();
      on_threads(threads_, [&](int i) { out[size_t(i)] = k.fn(iters); });
      best = std::min(best, seconds_since(t0));
      for (float v : out) g_sink = g_sink + uint64_t(v);
    }
    pk.peak_tflops = double(threads_) * double(iters) * kChains * k.lanes * 2 / best / 1e12;

    char how[256];
    std::snprintf(how, sizeof how,
                  "%d threads; read, copy (non-temporal stores) and in-place update over %zu MiB "
                  "(LLC %zu MiB), best of 6; f32 FMA roof (%s, registers only)",
                  threads_, bytes >> 20, llc >> 20, k.isa);
    pk.how = how;
    return pk;
  }

  void set_working_set(std::vector<Region> regions) override {
    working_set_ = std::move(regions);
    working_bytes_ = 0;
    for (const Region& r : working_set_) working_bytes_ += r.bytes;
  }

  // Sets of a few MB and up rotate until together they hold 3x the LLC;
  // smaller ones are latency-bound and get their lines evicted instead.
  size_t rotation_sets(size_t set_bytes) const override {
    if (set_bytes < llc_ / 8 || set_bytes >= 3 * llc_) return 1;
    return (3 * llc_ + set_bytes - 1) / set_bytes;
  }

  Measurement time(const Op& op, const TimingOptions& opt) override { return time_sets({op}, opt); }

  Measurement time_sets(const std::vector<Op>& sets, const TimingOptions& opt) override {
    Measurement m;
    set_op_error("");
    tk_status st = TK_OK;
    for (const Op& op : sets)  // the check, and the warm-up
      if ((st = op()) != TK_OK) {
        m.error = op_error();
        return m;
      }
    // A working set of 3 LLCs and more streams from DRAM by itself; below
    // that, each repeat starts with the set evicted from every cache.
    const bool evict = opt.flush && working_bytes_ < 3 * llc_;
    auto t0 = Clock::now();
    if (evict) flush();
    const double flush_s = seconds_since(t0);
    t0 = Clock::now();
    st = sets[0]();
    const double est = seconds_since(t0);
    if (st != TK_OK) {
      m.error = op_error();
      return m;
    }
    const int reps = std::clamp(int(opt.budget_s / (est + flush_s)), opt.min_reps, opt.max_reps);
    std::vector<double> us;
    us.reserve(size_t(reps));
    for (int r = 0; r < reps; ++r) {
      if (evict) flush();
      t0 = Clock::now();
      st = sets[size_t(r) % sets.size()]();
      const double t = seconds_since(t0);
      if (st != TK_OK) {
        m.error = op_error();
        return m;
      }
      us.push_back(t * 1e6);
    }
    std::nth_element(us.begin(), us.begin() + ptrdiff_t(us.size() / 2), us.end());
    m.ok = true;
    m.median_us = us[us.size() / 2];
    m.reps = reps;
    return m;
  }

 private:
  void flush() {
#if defined(__x86_64__)
    // clflush evicts the case's own lines from every level and every core:
    // exact, where sweeping a buffer leaves lines behind when the LLC's
    // replacement policy resists streaming data (AMD's victim L3 does).
    if (!working_set_.empty()) {
      size_t total = 0;
      for (const Region& r : working_set_) total += r.bytes;
      on_threads(threads_, [&](int i) {
        const size_t lo = total * size_t(i) / size_t(threads_);
        const size_t hi = total * size_t(i + 1) / size_t(threads_);
        size_t base = 0;
        for (const Region& r : working_set_) {
          const size_t a = std::max(lo, base), b = std::min(hi, base + r.bytes);
          const char* p = static_cast<const char*>(r.p);
          for (size_t off = a; off < b; off += 64) _mm_clflush(p + (off - base));
          base += r.bytes;
        }
        _mm_mfence();
      });
      return;
    }
#endif
    sweep();
  }

  // Every thread reads its own slice, so each core's L2 and the shared LLC
  // end up holding flush data; reading (not writing) keeps the evicted lines
  // clean, so no write-back lands inside the next timed repeat.
  void sweep() {
    const size_t slice = flush_->bytes / size_t(threads_) / 64 * 64;
    std::vector<uint64_t> sums(static_cast<size_t>(threads_));
    on_threads(threads_,
               [&](int i) { sums[size_t(i)] = read_words(flush_->p + slice * size_t(i), slice); });
    for (uint64_t s : sums) g_sink = g_sink + s;
  }

  tk_context* ctx_;
  int threads_ = 1;
  std::unique_ptr<HostBuffer> flush_;
  std::vector<Region> working_set_;
  size_t working_bytes_ = 0;
  size_t llc_ = 0;
};

}  // namespace

void Device::time_sequence(const std::vector<Op>& ops, const TimingOptions& opt,
                           Measurement* eager, Measurement* graph, int* graph_nodes) {
  *eager = time(
      [&ops]() {
        for (const Op& op : ops) {
          tk_status st = op();
          if (st != TK_OK) return st;
        }
        return TK_OK;
      },
      opt);
  *graph = Measurement{};
  graph->error = "graph capture is a CUDA feature";
  *graph_nodes = 0;
}

std::unique_ptr<Device> make_host_device(tk_context* ctx, int threads) {
  return std::make_unique<HostDevice>(ctx, threads);
}

}  // namespace tkb
