#include "core/thread_pool.h"

#include <algorithm>
#include <cstdio>
#include <system_error>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace kestrel {

namespace {
inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}
}  // namespace

ThreadPool::ThreadPool(int n_threads) {
  if (n_threads <= 0) n_threads = int(std::max(1u, std::thread::hardware_concurrency()));
  n_threads_ = std::min(n_threads, kMaxThreads);
  for (int i = 1; i < n_threads_; ++i) {
    try {
      workers_.emplace_back([this, i] { worker_loop(i); });
    } catch (const std::system_error& e) {
      // The system gave no more threads (a process limit, ulimit -u): the pool runs with the
      // ones it has. Unwinding here instead destroyed the condition variable the started
      // workers wait on, and the process hung (a review's `-t 300` under `ulimit -u 200`).
      std::fprintf(stderr, "kestrel: warning: started %d of %d threads (%s)\n", i, n_threads_,
                   e.what());
      n_threads_ = i;
      break;
    }
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::global(int n_threads) {
  static ThreadPool pool(n_threads);
  return pool;
}

void ThreadPool::run_chunks(int thread_index) {
  for (;;) {
    const int64_t chunk = next_chunk_.fetch_add(1);
    if (chunk >= job_chunks_) break;
    const int64_t begin = chunk * job_chunk_;
    const int64_t end = std::min(job_n_, begin + job_chunk_);
    (*job_)(begin, end, thread_index);
  }
}

void ThreadPool::worker_loop(int index) {
  uint64_t seen = 0;
  for (;;) {
    // Spin for a short while (a decode step issues loops back to back), then sleep.
    int spins = 0;
    while (generation_.load(std::memory_order_acquire) == seen && spins < 20000) {
      // Yield now and then so an oversubscribed machine's other threads get this core.
      if (spins % 256 == 255) {
        std::this_thread::yield();
      } else {
        cpu_relax();
      }
      ++spins;
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
    }
    seen = generation_.load(std::memory_order_acquire);
    if (stop_) return;
    run_chunks(index);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::parallel_for(int64_t n, int64_t grain,
                              const std::function<void(int64_t, int64_t, int)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t units = (n + grain - 1) / grain;
  if (n_threads_ == 1 || units == 1) {
    fn(0, n, 0);
    return;
  }
  // Several chunks per thread balance uneven work; each chunk is a whole number of grains.
  const int64_t chunks_wanted = std::min<int64_t>(units, int64_t(n_threads_) * 4);
  const int64_t units_per_chunk = (units + chunks_wanted - 1) / chunks_wanted;
  job_ = &fn;
  job_n_ = n;
  job_chunk_ = units_per_chunk * grain;
  job_chunks_ = (n + job_chunk_ - 1) / job_chunk_;
  next_chunk_.store(0);
  pending_.store(n_threads_ - 1);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1, std::memory_order_acq_rel);
  }
  wake_.notify_all();
  run_chunks(0);
  // Spin briefly for the workers' last chunks, then yield: when the machine is oversubscribed a
  // worker may be waiting for this very core, and spinning would starve it for a whole
  // scheduler slice (seen: 10x slower decode with one other busy process on 2 cores).
  for (int spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
    if (spins < 2000) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
  job_ = nullptr;
}

}  // namespace kestrel
