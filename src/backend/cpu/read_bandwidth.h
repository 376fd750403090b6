// The host's memory read bandwidth as a decode step's matmuls meet it: a buffer far larger than
// the caches, read by every thread of the backend's pool at once, as they stream the weights.
// The CPU backend's decode roofline (issue 10's honest rooflines): measured once per backend,
// where it used to be a constant from the development machine, which read 28-69 GB/s with the
// same two threads from one minute to the next (a shared virtual machine).
#pragma once

#include <cstddef>

#include "core/status.h"
#include "core/thread_pool.h"

namespace kestrel::cpu {

struct ReadBandwidth {
  double gbs = 0;    // bytes read per second of the fastest pass, in GB/s (1e9)
  size_t bytes = 0;  // the buffer each pass reads whole
  int passes = 0;
  int threads = 0;
};

// Fills a buffer of `bytes` (rounded down to whole MiB, at least one) with the pool's threads,
// so that its pages are placed as the readers touch them, then reads it `passes` times with
// every thread of `pool` and returns the fastest pass. Each pass's sum of the buffer's words is
// checked against the one the fill implies, so no pass can skip a part. Fails, naming why, when
// the buffer cannot be allocated or a sum is wrong.
Result<ReadBandwidth> measure_read_bandwidth(ThreadPool& pool, size_t bytes, int passes);

// The buffer for `threads` readers on this machine: 256 MiB for every 8 of them that have a
// hardware thread of their own (threads past std::thread::hardware_concurrency() add no cache and
// no bandwidth, and `-t 64` on two cores would have filled 2 GiB), at most 2 GiB. At least 8
// times the last-level cache a group of 8 cores shares on current x86 servers (32 MiB; 96 MiB
// with stacked cache), so the passes read memory, not cache.
size_t read_bandwidth_bytes(int threads);
// The same for a machine of `hardware_threads` (tests).
size_t read_bandwidth_bytes(int threads, int hardware_threads);

}  // namespace kestrel::cpu
