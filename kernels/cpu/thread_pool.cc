#include "kernels/cpu/thread_pool.h"

#include <immintrin.h>

#include <algorithm>

namespace moa {
namespace {

// Tens of microseconds to a millisecond of polling before a thread sleeps.
constexpr int kSpinIterations = 1 << 14;

// Chunks per thread in ParallelFor: a little slack for uneven progress.
constexpr int kChunksPerThread = 4;

}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  const int n = std::max(n_threads, 1);
  workers_.reserve(n - 1);
  for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_cv_.notify_all();
  for (std::thread& t : workers_) t.join();
}

void ThreadPool::Work(Job& job, int thread) {
  for (int64_t c = job.next.fetch_add(1); c < job.n_chunks; c = job.next.fetch_add(1)) {
    (*job.fn)(thread, c * job.grain, std::min(job.n, (c + 1) * job.grain));
  }
}

void ThreadPool::WorkerLoop(int index) {
  uint64_t seen = 0;
  while (true) {
    for (int spin = 0;
         generation_.load(std::memory_order_acquire) == seen && spin < kSpinIterations; ++spin) {
      _mm_pause();
    }
    Job* job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      seen = generation_.load(std::memory_order_acquire);
      if (stop_) return;
      job = job_;
      if (job == nullptr) continue;  // already finished by the others
      participants_.fetch_add(1, std::memory_order_relaxed);
    }
    Work(*job, index);
    std::lock_guard<std::mutex> lock(mu_);
    if (participants_.fetch_sub(1, std::memory_order_acq_rel) == 1) done_cv_.notify_one();
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int, int64_t, int64_t)>& fn) {
  const int64_t chunks = std::min<int64_t>(n, int64_t{size()} * kChunksPerThread);
  if (chunks <= 0) return;
  ParallelForGrain(n, (n + chunks - 1) / chunks, fn);
}

void ThreadPool::ParallelForGrain(int64_t n, int64_t grain,
                                  const std::function<void(int, int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  Job job;
  job.fn = &fn;
  job.n = n;
  job.grain = grain;
  job.n_chunks = (n + grain - 1) / grain;
  if (job.n_chunks == 1 || workers_.empty()) {
    Work(job, 0);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mu_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    job_ = &job;
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_cv_.notify_all();
  Work(job, 0);
  {
    // Close the job: workers that have not joined yet will not.
    std::lock_guard<std::mutex> lock(mu_);
    job_ = nullptr;
  }
  for (int spin = 0; participants_.load(std::memory_order_acquire) != 0 && spin < kSpinIterations;
       ++spin) {
    _mm_pause();
  }
  std::unique_lock<std::mutex> lock(mu_);
  done_cv_.wait(lock, [&] { return participants_.load(std::memory_order_acquire) == 0; });
}

}  // namespace moa
