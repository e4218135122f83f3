// A small fixed-size thread pool for the CPU backend's data-parallel loops.
//
// A loop is cut into chunks that depend only on its length and the pool size; the calling thread
// and the workers claim chunks until none are left. The caller never waits for a worker that has
// not started: on a busy machine a descheduled worker costs its share of the loop, not a
// scheduler time slice. Workers spin briefly before sleeping because a decode step issues
// hundreds of short loops back to back, and waking a sleeping thread through the kernel for each
// would cost more than some of the loops themselves.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace moa {

class ThreadPool {
 public:
  // n_threads counts the calling thread; values < 1 mean 1.
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(thread_index, begin, end) over contiguous chunks covering [0, n), a few per thread;
  // returns when all are done. thread_index < size() identifies the running thread (for
  // per-thread scratch); which thread runs a chunk is not fixed, the chunk boundaries are.
  void ParallelFor(int64_t n, const std::function<void(int, int64_t, int64_t)>& fn);

  // The same with chunks of `grain` indices: for loops whose iterations cost very different
  // amounts (causal attention rows).
  void ParallelForGrain(int64_t n, int64_t grain,
                        const std::function<void(int, int64_t, int64_t)>& fn);

 private:
  struct Job {
    const std::function<void(int, int64_t, int64_t)>* fn;
    int64_t n;
    int64_t grain;
    int64_t n_chunks;
    std::atomic<int64_t> next{0};
  };

  static void Work(Job& job, int thread);
  void WorkerLoop(int index);

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one loop at a time

  std::mutex mu_;
  std::condition_variable wake_cv_;
  std::condition_variable done_cv_;
  std::atomic<uint64_t> generation_{0};
  Job* job_ = nullptr;                // open job; null once the caller has closed it
  std::atomic<int> participants_{0};  // workers inside the current job
  bool stop_ = false;
};

}  // namespace moa
