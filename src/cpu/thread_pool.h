// A small persistent thread pool for the CPU backend.
//
// Workers sleep on a futex (std::atomic::wait) between jobs, so an idle pool
// costs nothing; the calling thread always takes part in the job, so a pool of
// one thread runs everything inline with no hand-off at all.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <thread>
#include <vector>

namespace tk::cpu {

class ThreadPool {
 public:
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  // 0 = all hardware threads.
  void resize(int threads);
  int size() const { return int(workers_.size()) + 1; }

  // Runs fn(task, thread) for every task in [0, tasks), tasks handed out one at a
  // time from a shared counter (so uneven tasks balance), `thread` in [0, size()).
  // Returns when all tasks are done. Not re-entrant.
  template <class F>
  void parallel_for(int64_t tasks, const F& fn) {
    if (tasks <= 0) return;
    if (tasks == 1 || workers_.empty()) {
      for (int64_t i = 0; i < tasks; ++i) fn(i, 0);
      return;
    }
    run(tasks, [](const void* f, int64_t task, int thread) {
      (*static_cast<const F*>(f))(task, thread);
    }, &fn);
  }

 private:
  using TaskFn = void (*)(const void* fn, int64_t task, int thread);
  void run(int64_t tasks, TaskFn call, const void* fn);
  void work(int thread, uint32_t seen);
  void drain(int thread);
  void stop();

  std::vector<std::thread> workers_;
  // The current job. Written by the caller before `generation_` is bumped.
  TaskFn call_ = nullptr;
  const void* fn_ = nullptr;
  int64_t tasks_ = 0;
  alignas(64) std::atomic<int64_t> next_{0};
  alignas(64) std::atomic<uint32_t> generation_{0};
  alignas(64) std::atomic<int> busy_{0};
  bool quit_ = false;
};

// Per-thread scratch that grows on demand and is kept for later calls, so hot
// paths allocate only the first time they see a larger shape. Each slot is an
// independent buffer; 64-byte aligned, contents undefined.
enum ScratchSlot { kScratchShared0, kScratchShared1, kScratchShared2, kScratchLocal0,
                   kScratchLocal1, kScratchLocal2, kScratchLocal3, kScratchLocal4, kScratchSlots };
void* thread_scratch(ScratchSlot slot, size_t bytes);
template <class T>
T* scratch(ScratchSlot slot, size_t count) {
  return static_cast<T*>(thread_scratch(slot, count * sizeof(T)));
}

}  // namespace tk::cpu
