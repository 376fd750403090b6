#include "runtime/watchdog.h"

#include <cstdio>

namespace kestrel {

double step_deadline_seconds(double expected_s, double factor, double floor_s) {
  return factor * expected_s + floor_s;
}

Watchdog::Watchdog(HangHandler on_hang, double grace_s)
    : on_hang_(std::move(on_hang)), grace_s_(grace_s), thread_([this] { watch(); }) {}

Watchdog::~Watchdog() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;
  }
  changed_.notify_all();
  thread_.join();
}

void Watchdog::arm(const std::string& step, double deadline_s) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = true;
    hang_reported_ = false;
    ++generation_;
    step_ = step;
    deadline_s_ = deadline_s;
    start_ = Clock::now();
  }
  changed_.notify_all();
}

Status Watchdog::disarm() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return Status::ok();
  armed_ = false;
  changed_.notify_all();
  const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
  if (elapsed <= deadline_s_) return Status::ok();
  char text[160];
  std::snprintf(text, sizeof(text), " ran %.2f s, past its deadline of %.2f s", elapsed,
                deadline_s_);
  return Status::error("watchdog: " + step_ + text);
}

void Watchdog::watch() {
  std::unique_lock<std::mutex> lock(mutex_);
  while (!stopping_) {
    if (!armed_ || hang_reported_) {
      changed_.wait(lock);
      continue;
    }
    const uint64_t generation = generation_;
    const auto hang_at = start_ + std::chrono::duration_cast<Clock::duration>(
                                      std::chrono::duration<double>(deadline_s_ + grace_s_));
    if (changed_.wait_until(lock, hang_at,
                            [&] { return stopping_ || !armed_ || generation_ != generation; })) {
      continue;
    }
    // Still the same step, past deadline + grace: a hang. The handler may end the process, so
    // it runs without the lock (disarm() from the stuck thread must not deadlock if it returns).
    hang_reported_ = true;
    const std::string step = step_;
    const double deadline = deadline_s_;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    lock.unlock();
    if (on_hang_) on_hang_(step, deadline, elapsed);
    lock.lock();
  }
}

}  // namespace kestrel
