#include "core/progress.h"

#include <unistd.h>

#include <atomic>
#include <cstdio>

namespace kestrel {

namespace {
std::atomic<uint64_t> g_work_done{0};
}  // namespace

uint64_t work_done() {
  return g_work_done.load(std::memory_order_relaxed);
}

void note_work_done(int64_t units) {
  if (units > 0) g_work_done.fetch_add(uint64_t(units), std::memory_order_relaxed);
}

Progress::Progress(std::string label, int64_t total, bool enabled)
    : label_(std::move(label)),
      total_(total > 0 ? total : 1),
      enabled_(enabled),
      tty_(isatty(STDERR_FILENO) != 0),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_) {}

Progress::~Progress() {
  finish();
}

void Progress::advance(int64_t n) {
  note_work_done(n);
  if (!enabled_) return;
  std::lock_guard<std::mutex> lock(mutex_);
  done_ += n;
  draw(false);
}

void Progress::finish() {
  if (!enabled_) return;
  std::lock_guard<std::mutex> lock(mutex_);
  if (finished_) return;
  finished_ = true;
  const bool already_shown = !tty_ && last_percent_ == 100;
  done_ = total_;
  if (!already_shown) draw(true);
}

void Progress::draw(bool final_line) {
  const auto now = std::chrono::steady_clock::now();
  const double elapsed = std::chrono::duration<double>(now - start_).count();
  const int percent = int(100 * done_ / total_);
  if (!final_line) {
    // Terminals redraw ten times a second; logs get a line every 10%.
    if (tty_ && now - last_draw_ < std::chrono::milliseconds(100)) return;
    if (!tty_ && percent / 10 == last_percent_ / 10) return;
  }
  last_draw_ = now;
  last_percent_ = percent;
  const double eta = done_ > 0 ? elapsed * double(total_ - done_) / double(done_) : 0.0;
  if (tty_) {
    constexpr int kWidth = 30;
    const int filled = int(kWidth * done_ / total_);
    std::string bar(size_t(filled), '#');
    bar.resize(kWidth, '.');
    std::fprintf(stderr, "\r%s [%s] %3d%% %.1fs eta %.1fs%s", label_.c_str(), bar.c_str(), percent,
                 elapsed, eta, final_line ? "\n" : "");
  } else {
    std::fprintf(stderr, "%s: %d%% (%.1fs)\n", label_.c_str(), percent, elapsed);
  }
  std::fflush(stderr);
}

}  // namespace kestrel
