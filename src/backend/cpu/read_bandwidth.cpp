#include "backend/cpu/read_bandwidth.h"

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "core/stats.h"

namespace kestrel::cpu {
namespace {

constexpr size_t kBlockBytes = size_t(1) << 20;  // a pool task's share of a pass
constexpr size_t kBlockWords = kBlockBytes / sizeof(uint64_t);
constexpr uint64_t kStep = 0x9e3779b97f4a7c15ull;  // word i holds i * kStep (mod 2^64)

// The sum of one block's words, four 32-byte loads an iteration into independent adds.
uint64_t sum_block(const uint64_t* words) {
  const __m256i* p = reinterpret_cast<const __m256i*>(words);
  __m256i a = _mm256_setzero_si256(), b = a, c = a, d = a;
  for (size_t i = 0; i < kBlockBytes / 32; i += 4) {
    a = _mm256_add_epi64(a, _mm256_load_si256(p + i));
    b = _mm256_add_epi64(b, _mm256_load_si256(p + i + 1));
    c = _mm256_add_epi64(c, _mm256_load_si256(p + i + 2));
    d = _mm256_add_epi64(d, _mm256_load_si256(p + i + 3));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                     _mm256_add_epi64(_mm256_add_epi64(a, b), _mm256_add_epi64(c, d)));
  return lanes[0] + lanes[1] + lanes[2] + lanes[3];
}

// One thread's running sum, alone on its cache line.
struct alignas(64) Partial {
  uint64_t sum = 0;
};

}  // namespace

Result<ReadBandwidth> measure_read_bandwidth(ThreadPool& pool, size_t bytes, int passes) {
  const size_t blocks = std::max<size_t>(1, bytes / kBlockBytes);
  const size_t words = blocks * kBlockWords;
  passes = std::max(1, passes);
  struct Free {
    void operator()(uint64_t* p) const { ::operator delete[](p, std::align_val_t(64)); }
  };
  std::unique_ptr<uint64_t[], Free> buffer(static_cast<uint64_t*>(
      ::operator new[](words * sizeof(uint64_t), std::align_val_t(64), std::nothrow)));
  if (!buffer) {
    return Status::error("cannot allocate the " + std::to_string(blocks) +
                         " MiB read-bandwidth buffer");
  }
  uint64_t* data = buffer.get();
  pool.parallel_for(int64_t(blocks), 1, [&](int64_t begin, int64_t end, int) {
    for (size_t i = size_t(begin) * kBlockWords; i < size_t(end) * kBlockWords; ++i) {
      data[i] = uint64_t(i) * kStep;
    }
  });
  // The sum of i * kStep over i < words, mod 2^64: kStep times words * (words - 1) / 2, the
  // halving taken from the even factor so that no bit is lost before the wrap.
  const uint64_t n = words;
  const uint64_t expected = (n % 2 == 0 ? (n / 2) * (n - 1) : n * ((n - 1) / 2)) * kStep;
  std::vector<Partial> partials(size_t(pool.size()));
  int pass = 0;
  auto read = [&]() -> Status {
    ++pass;
    for (Partial& p : partials) p.sum = 0;
    pool.parallel_for(int64_t(blocks), 1, [&](int64_t begin, int64_t end, int thread) {
      uint64_t sum = 0;
      for (int64_t b = begin; b < end; ++b) sum += sum_block(data + size_t(b) * kBlockWords);
      partials[size_t(thread)].sum += sum;
    });
    uint64_t total = 0;
    for (const Partial& p : partials) total += p.sum;
    if (total != expected) {
      return Status::error("the read-bandwidth pass " + std::to_string(pass) +
                           " summed its buffer wrongly");
    }
    return Status::ok();
  };
  KS_ASSIGN_OR_RETURN(const double best_s, fastest_pass_seconds(passes, read));
  ReadBandwidth r;
  r.bytes = blocks * kBlockBytes;
  r.gbs = double(r.bytes) / best_s / 1e9;
  r.passes = passes;
  r.threads = pool.size();
  return r;
}

size_t read_bandwidth_bytes(int threads, int hardware_threads) {
  constexpr size_t kMiB = size_t(1) << 20;
  const int readers = hardware_threads > 0 ? std::min(threads, hardware_threads) : threads;
  return std::min(256 * kMiB * size_t(std::max(1, (readers + 7) / 8)), 2048 * kMiB);
}

size_t read_bandwidth_bytes(int threads) {
  return read_bandwidth_bytes(threads, int(std::thread::hardware_concurrency()));
}

}  // namespace kestrel::cpu
