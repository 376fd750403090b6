// A progress bar with rate and ETA on a terminal; occasional plain lines when stderr is not one.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>

namespace kestrel {

// Units of work every Progress in the process has counted so far, shown or not (and other long
// loops that note their work). A watchdog reads it to tell a stalled job, whose count stops,
// from a slow one.
uint64_t work_done();
void note_work_done(int64_t units);

class Progress {
 public:
  // `total` units of work labelled `label`; `enabled` false makes every call a no-op.
  Progress(std::string label, int64_t total, bool enabled = true);
  ~Progress();
  // Thread-safe: adds `n` completed units (to work_done() too).
  void advance(int64_t n);
  void finish();

 private:
  void draw(bool final_line);

  std::string label_;
  int64_t total_;
  int64_t done_ = 0;
  bool enabled_;
  bool tty_;
  bool finished_ = false;
  int last_percent_ = -1;
  std::chrono::steady_clock::time_point start_;
  std::chrono::steady_clock::time_point last_draw_;
  std::mutex mutex_;
};

}  // namespace kestrel
