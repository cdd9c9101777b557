// The benchmark harness of `tiny-kernel bench`: what a case is, and what a
// device (CPU or CUDA) must offer to time one. Everything goes through the C
// ABI; only the CUDA device (cuda_device.cu) touches CUDA itself.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "tiny_kernel/tiny_kernel.h"

namespace tkb {

// One launch (or chain of launches) of the thing being timed. A failure
// returns its status; the reason is in op_error().
using Op = std::function<tk_status()>;

// Why the last Op failed: a bench-side message (cuBLAS, CUDA runtime) when one
// was set, else tk_last_error().
void set_op_error(std::string message);
std::string op_error();

struct Measurement {
  bool ok = false;
  std::string error;  // why not ok
  double median_us = 0;
  int reps = 0;
};

struct TimingOptions {
  double budget_s = 1.0;  // time to spend on the repeats of one op
  int min_reps = 5;
  int max_reps = 200;
  // Wait for the device before each repeat, so that host-side launch cost is
  // part of the time (graph vs eager launches); otherwise it hides behind the flush.
  bool sync_each = false;
  // GPU: flush L2 with a memset (Triton do_bench's way, which issue 3's and 4's
  // anchors used) instead of a read pass. A memset leaves L2 full of dirty
  // lines that are written back inside the timed kernel: ~10 us on an H100.
  bool memset_flush = false;
  // false: no flush at all, the repeats run back to back with the caches warm
  // (the CPU's in-cache baselines).
  bool flush = true;
};

// How a kernel moves its bytes, which picks the bandwidth it is held to: one
// that only reads (weights, a KV cache) cannot use write bandwidth, so its roof
// is the streaming read; one that writes a separate output may also reach the
// copy figure; one that updates in place may reach any of the three.
enum class Traffic { kRead, kReadWrite, kInPlace };

// What the machine can do, measured in the same run as the kernels.
struct Peaks {
  double read_gbps = 0;   // streaming read
  double copy_gbps = 0;   // copy, counting read + write
  double update_gbps = 0; // in-place read-modify-write, counting read + write (host only)
  double peak_gbps = 0;   // the best of them
  double peak_tflops = 0;
  double launch_us = 0;   // GPU: an empty kernel timed like every row (the floor under small ones)
  // The bandwidth roof of a kernel with this traffic (see Traffic).
  double gbps(Traffic t) const {
    double r = read_gbps;
    if (t != Traffic::kRead && copy_gbps > r) r = copy_gbps;
    if (t == Traffic::kInPlace && update_gbps > r) r = update_gbps;
    return r;
  }
  std::string how;        // one line: how the roofs were measured
};

class Device {
 public:
  virtual ~Device() = default;
  virtual const char* backend() const = 0;  // "cpu", "cuda", "reference"
  virtual Peaks measure_peaks() = 0;
  // Runs `op` once to check it (status and device errors), warms up, then
  // times repeats with the last-level cache (CPU) or L2 (GPU) flushed before
  // each, and returns the median.
  virtual Measurement time(const Op& op, const TimingOptions& opt) = 0;
  // The same op on `sets.size()` separate buffer sets, taken in turn; a host
  // device runs them back to back, so each call pays for the write-back of
  // the previous call's output as it would in a real pipeline.
  virtual Measurement time_sets(const std::vector<Op>& sets, const TimingOptions& opt) {
    return time(sets.at(0), opt);
  }
  // How many buffer sets of `set_bytes` each the device wants to rotate among.
  virtual size_t rotation_sets(size_t /*set_bytes*/) const { return 1; }
  // The buffers the next timed ops touch, so a host device can evict exactly
  // them from every cache level before each repeat.
  struct Region {
    const void* p;
    size_t bytes;
  };
  virtual void set_working_set(std::vector<Region> /*regions*/) {}

  // The vendor's dense matmul y[T, N] = x[T, K] . W[N, K]^T (cuBLAS), or an
  // empty Op when this device has none.
  virtual Op vendor_matmul(tk_dtype /*dtype*/, int64_t /*T*/, int64_t /*N*/, int64_t /*K*/,
                           const void* /*x*/, const void* /*w*/, void* /*y*/) {
    return {};
  }
  virtual const char* vendor_name() const { return nullptr; }

  // The floors under a row (GPU): one pass of the bench's own read kernel over
  // `bytes` at p, or a cudaMemcpy of them, timed as every row is; empty Ops
  // where the device has none. A kernel that must read (or read and write)
  // those bytes cannot beat them by much.
  virtual Op read_pass(const void* /*p*/, size_t /*bytes*/) { return {}; }
  virtual Op copy_pass(void* /*dst*/, const void* /*src*/, size_t /*bytes*/) { return {}; }

  // Times `ops` issued one by one and, where the device has graphs, captured
  // once and replayed. graph->error says why there is no graph figure.
  virtual void time_sequence(const std::vector<Op>& ops, const TimingOptions& opt,
                             Measurement* eager, Measurement* graph, int* graph_nodes);
};

std::unique_ptr<Device> make_host_device(tk_context* ctx, int threads);
#if defined(TK_HAVE_CUDA)
// nullptr with *error set when the CUDA runtime pieces cannot be set up.
std::unique_ptr<Device> make_cuda_device(tk_context* ctx, std::string* error);
#endif

}  // namespace tkb
