// A watchdog thread for the steps of a run. The owner arms it before a step with a deadline
// derived from the memory plan (step_deadline_seconds) and disarms it after.
//
// A step that outlives its deadline makes disarm() return an error naming the step, so a slow
// configuration becomes a failed row and the run goes on. A step that has not returned by
// deadline + grace is a hang: a stuck device call or a deadlock cannot be cancelled from another
// thread, so the hang handler runs on the watchdog thread. The benchmark's handler writes the
// row, naming the step, and ends the process with a non-zero status, keeping the rows before it.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

#include "core/status.h"

namespace kestrel {

// The deadline of a step expected to take `expected_s`: `factor` times that plus `floor_s`,
// generous enough that only a stall, never a slow machine, misses it.
double step_deadline_seconds(double expected_s, double factor, double floor_s);

class Watchdog {
 public:
  // `step` is the armed step's name, `deadline_s` its deadline and `elapsed_s` how long it has
  // been running.
  using HangHandler =
      std::function<void(const std::string& step, double deadline_s, double elapsed_s)>;

  // `grace_s`: how long past its deadline a step may run before it counts as a hang.
  Watchdog(HangHandler on_hang, double grace_s);
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Starts watching `step`; it must end (disarm) within `deadline_s` seconds.
  void arm(const std::string& step, double deadline_s);
  // Starts watching `step`, a long job that counts its work (work_done() of core/progress.h):
  // it fails only when the count stands still for `stall_s` seconds, however long the whole job
  // takes. Disks and networks vary by 10x, so a load's total time is no deadline.
  void arm_until_stall(const std::string& step, double stall_s);
  // Stops watching; an error naming the step and both times when it outlived its deadline.
  Status disarm();

 private:
  void watch();
  void start(const std::string& step, double deadline_s, bool stall_mode);

  using Clock = std::chrono::steady_clock;
  HangHandler on_hang_;
  double grace_s_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool stopping_ = false;
  bool armed_ = false;
  bool hang_reported_ = false;
  uint64_t generation_ = 0;  // counts arm() calls so the thread can tell steps apart
  std::string step_;
  double deadline_s_ = 0;  // until the end, or (stall mode) between two advances of the work
  Clock::time_point start_;
  bool stall_mode_ = false;
  uint64_t last_work_ = 0;           // work_done() when last seen to change
  Clock::time_point last_progress_;  // when that was
  double longest_stall_s_ = 0;       // longest time the work stood still in this step
  // Stall mode: samples work_done(); returns how long it has stood still.
  double sample_work(Clock::time_point now);
  std::thread thread_;
};

}  // namespace kestrel
