// A fixed pool of worker threads for data-parallel loops (matmul rows, quantization, attention
// heads). Workers spin briefly before sleeping so that the hundreds of small loops in one decode
// step do not each pay a futex wake-up.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kestrel {

// The most threads a pool takes: far above the cores of any machine, small enough that a typo
// (-t 100000) cannot spend gigabytes on thread stacks.
constexpr int kMaxThreads = 1024;

class ThreadPool {
 public:
  // n_threads <= 0 means one per hardware thread; more than kMaxThreads means kMaxThreads.
  explicit ThreadPool(int n_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  // Calls fn(begin, end, thread_index) over [0, n) split into contiguous chunks whose starts are
  // multiples of `grain`; blocks until every chunk is done. The caller's thread does work too.
  void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t, int)>& fn);

  // The process-wide pool used by the engine; created on first use with `n_threads`.
  static ThreadPool& global(int n_threads = 0);

 private:
  void worker_loop(int index);
  void run_chunks(int thread_index);

  int n_threads_;
  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int64_t> next_chunk_{0};
  std::atomic<bool> stop_{false};
  const std::function<void(int64_t, int64_t, int)>* job_ = nullptr;
  int64_t job_n_ = 0;
  int64_t job_chunk_ = 0;
  int64_t job_chunks_ = 0;
};

}  // namespace kestrel
