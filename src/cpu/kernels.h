// Entry points of the CPU kernels. Each one picks the best SIMD target of the
// running machine (Highway dynamic dispatch) and splits its work over the pool.
// Parameters are already validated by the C ABI (src/core/validate.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/thread_pool.h"
#include "tiny_kernel/tiny_kernel.h"

namespace tk::cpu {

void rmsnorm(const tk_rmsnorm_params& p, ThreadPool& pool);
void rope(const tk_rope_params& p, ThreadPool& pool);
void swiglu(const tk_swiglu_params& p, ThreadPool& pool);
void matmul(const tk_matmul_params& p, ThreadPool& pool);
void qmatmul_int4(const tk_qmatmul_int4_params& p, ThreadPool& pool);
void fused_ffn(const tk_fused_ffn_params& p, ThreadPool& pool);
void attn_front(const tk_attn_front_params& p, ThreadPool& pool);
void flash_attention(const tk_flash_attention_params& p, ThreadPool& pool);
void paged_attention(const tk_paged_attention_params& p, ThreadPool& pool);
// Name of the SIMD target the dispatcher picks on this machine, e.g. "AVX3_DL".
const char* simd_target_name();

// Below this many bytes touched, an op stays on the calling thread: waking a
// worker costs a few microseconds, about what 256 KB takes to stream from L2.
constexpr int64_t kParallelBytes = int64_t(256) << 10;

// How many tasks to cut `units` independent pieces of work into: one when the
// op is small, else a few per thread so uneven pieces balance.
inline int64_t task_count(const ThreadPool& pool, int64_t units, int64_t bytes) {
  if (units <= 0) return 0;
  if (units == 1 || bytes < kParallelBytes || pool.size() == 1) return 1;
  return std::min<int64_t>(units, int64_t(pool.size()) * 4);
}

// Splits [0, units) into `tasks` contiguous ranges and runs fn(begin, end, thread).
template <class F>
void parallel_ranges(ThreadPool& pool, int64_t units, int64_t tasks, const F& fn) {
  if (units <= 0) return;
  tasks = std::clamp<int64_t>(tasks, 1, units);
  pool.parallel_for(tasks, [&](int64_t task, int thread) {
    fn(units * task / tasks, units * (task + 1) / tasks, thread);
  });
}

}  // namespace tk::cpu
