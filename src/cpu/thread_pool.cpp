#include "cpu/thread_pool.h"

#include <cstdlib>
#include <new>

namespace tk::cpu {

ThreadPool::ThreadPool(int threads) { resize(threads); }
ThreadPool::~ThreadPool() { stop(); }

void ThreadPool::resize(int threads) {
  if (threads <= 0) threads = int(std::thread::hardware_concurrency());
  if (threads <= 0) threads = 1;
  if (threads == size() && (threads == 1 || !workers_.empty())) return;
  stop();
  quit_ = false;
  // Workers start from the generation of now, so a job (or stop) published
  // before a worker thread gets scheduled is not missed.
  const uint32_t start = generation_.load(std::memory_order_acquire);
  for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t, start] { work(t, start); });
}

void ThreadPool::stop() {
  if (workers_.empty()) return;
  quit_ = true;
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  for (auto& w : workers_) w.join();
  workers_.clear();
}

void ThreadPool::drain(int thread) {
  for (;;) {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= tasks_) break;
    call_(fn_, i, thread);
  }
}

void ThreadPool::run(int64_t tasks, TaskFn call, const void* fn) {
  call_ = call;
  fn_ = fn;
  tasks_ = tasks;
  next_.store(0, std::memory_order_relaxed);
  busy_.store(int(workers_.size()), std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  drain(0);
  // The job is short (microseconds to milliseconds): spin for the stragglers.
  while (busy_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
}

void ThreadPool::work(int thread, uint32_t seen) {
  for (;;) {
    // Spin briefly before sleeping: back-to-back ops (a decode step) then skip
    // the futex wake-up latency.
    for (int spin = 0; spin < 256 && generation_.load(std::memory_order_acquire) == seen; ++spin)
      std::this_thread::yield();
    generation_.wait(seen, std::memory_order_acquire);
    seen = generation_.load(std::memory_order_acquire);
    if (quit_) return;
    drain(thread);
    busy_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

namespace {
struct Scratch {
  void* p = nullptr;
  size_t bytes = 0;
  ~Scratch() { std::free(p); }
};
thread_local Scratch g_scratch[kScratchSlots];
}  // namespace

void* thread_scratch(ScratchSlot slot, size_t bytes) {
  Scratch& s = g_scratch[slot];
  if (bytes > s.bytes) {
    std::free(s.p);
    // Rounded up (and padded by a vector) so that SIMD tails may over-read.
    const size_t n = (bytes + 64 + 127) / 64 * 64;
    s.p = std::aligned_alloc(64, n);
    if (s.p == nullptr) throw std::bad_alloc();
    s.bytes = n - 64;
  }
  return s.p;
}

}  // namespace tk::cpu
