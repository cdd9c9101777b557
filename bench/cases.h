// The cases of `tiny-kernel bench`: Llama-3-8B shapes, the seed's rows and
// the rows of issues 3 and 4. Each case states the bytes and flops of its own
// description (every input read once, every output written once) and builds
// its buffers only when it runs.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "bench.h"

namespace tkb {

// The buffers of one case, in the context's memory space, freed together.
class Arena {
 public:
  explicit Arena(tk_context* ctx) : ctx_(ctx) {}
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  std::vector<Device::Region> regions() const { return regions_; }
  void* alloc(size_t bytes);                               // throws std::runtime_error
  void* random(tk_dtype dtype, int64_t count, float scale); // uniform in [-scale, scale]
  void* random_bytes(size_t bytes);
  void* upload(const void* host, size_t bytes);
  template <typename T>
  T* upload(const std::vector<T>& v) {
    return static_cast<T*>(upload(v.data(), v.size() * sizeof(T)));
  }

 private:
  tk_context* ctx_;
  std::vector<Device::Region> regions_;
};

struct Baseline {
  std::string name;
  Op op;
  bool in_cache = false;  // timed with the caches warm, from the first buffer set only
};

// A case set up and ready to time.
struct Instance {
  std::unique_ptr<Arena> arena;
  Op op;
  std::vector<Baseline> baselines;
};

struct Case {
  std::string kernel;  // one of the JSON kernel names
  std::string shape;
  std::string dtype;
  double bytes = 0;    // 0: no meaning
  double flops = 0;    // 0: no meaning (element-wise ops)
  Traffic traffic = Traffic::kRead;  // picks the bandwidth roof (set before the target)
  // A target for this row (issue 3/4 on CUDA, 80 % of bandwidth or the
  // llama.cpp figure on CPU), or empty.
  std::function<double(const Peaks&)> target_us;
  std::string target_note;
  std::string skip;    // non-empty: why this case does not run here
  std::function<void(Instance&)> setup;  // throws std::runtime_error on failure
};

struct CaseOptions {
  tk_context* ctx = nullptr;
  Device* device = nullptr;
  bool cuda = false;
  bool full = false;   // run the giant prefill rows on the CPU too
};

std::vector<Case> make_cases(const CaseOptions& opt);

// One decoder layer at T = 1 (Llama-3-8B, context 4096): the fused paths in
// the order a decode step calls them.
struct Sequence {
  std::unique_ptr<Arena> arena;
  std::vector<std::pair<std::string, Op>> ops;
  std::string shape;
};
std::unique_ptr<Sequence> make_decode_step(const CaseOptions& opt);

}  // namespace tkb
