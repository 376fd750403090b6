#include "runtime/watchdog.h"

#include <algorithm>
#include <cstdio>

#include "core/progress.h"

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
  start(step, deadline_s, /*stall_mode=*/false);
}

void Watchdog::arm_until_stall(const std::string& step, double stall_s) {
  start(step, stall_s, /*stall_mode=*/true);
}

void Watchdog::start(const std::string& step, double deadline_s, bool stall_mode) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = true;
    hang_reported_ = false;
    stall_mode_ = stall_mode;
    ++generation_;
    step_ = step;
    deadline_s_ = deadline_s;
    start_ = Clock::now();
    last_work_ = work_done();
    last_progress_ = start_;
    longest_stall_s_ = 0;
  }
  changed_.notify_all();
}

double Watchdog::sample_work(Clock::time_point now) {
  const uint64_t work = work_done();
  if (work != last_work_) {
    last_work_ = work;
    last_progress_ = now;
  }
  const double still = std::chrono::duration<double>(now - last_progress_).count();
  longest_stall_s_ = std::max(longest_stall_s_, still);
  return still;
}

Status Watchdog::disarm() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!armed_) return Status::ok();
  armed_ = false;
  changed_.notify_all();
  const auto now = Clock::now();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  char text[160];
  if (stall_mode_) {
    sample_work(now);
    if (longest_stall_s_ <= deadline_s_) return Status::ok();
    std::snprintf(text, sizeof(text),
                  " made no progress for %.2f s (a stall: the limit is %.2f s without progress)",
                  longest_stall_s_, deadline_s_);
    return Status::error("watchdog: " + step_ + text);
  }
  if (elapsed <= deadline_s_) return Status::ok();
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
    const auto limit = std::chrono::duration_cast<Clock::duration>(
        std::chrono::duration<double>(deadline_s_ + grace_s_));
    if (stall_mode_) {
      // Look at the work count a few times per stall period; a hang is a stall past the grace.
      const auto poll = std::chrono::duration_cast<Clock::duration>(
          std::chrono::duration<double>(std::clamp(deadline_s_ / 4, 0.001, 0.5)));
      if (changed_.wait_for(lock, poll,
                            [&] { return stopping_ || !armed_ || generation_ != generation; })) {
        continue;
      }
      if (sample_work(Clock::now()) <= deadline_s_ + grace_s_) continue;
    } else if (changed_.wait_until(lock, start_ + limit, [&] {
                 return stopping_ || !armed_ || generation_ != generation;
               })) {
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
