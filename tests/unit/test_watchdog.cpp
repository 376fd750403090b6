// The step watchdog: a late step becomes an error naming it, a stuck one reaches the hang
// handler, and steps that end in time are left alone.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "core/progress.h"
#include "runtime/watchdog.h"

namespace kestrel {
namespace {

using std::chrono::milliseconds;

TEST(Watchdog, StepsWithinTheirDeadlinePass) {
  std::atomic<int> hangs{0};
  Watchdog watchdog([&](const std::string&, double, double) { ++hangs; }, 0.05);
  for (int i = 0; i < 20; ++i) {
    watchdog.arm("decode step " + std::to_string(i), 5.0);
    EXPECT_TRUE(watchdog.disarm().is_ok());
  }
  EXPECT_TRUE(watchdog.disarm().is_ok());  // disarming twice is harmless
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(hangs.load(), 0);
}

TEST(Watchdog, LateStepIsAnErrorNamingIt) {
  std::atomic<int> hangs{0};
  Watchdog watchdog([&](const std::string&, double, double) { ++hangs; }, 10.0);
  watchdog.arm("prefill chunk 2 of 3 (512 tokens)", 0.02);
  std::this_thread::sleep_for(milliseconds(60));
  const Status status = watchdog.disarm();
  ASSERT_FALSE(status.is_ok());
  EXPECT_NE(status.message().find("prefill chunk 2 of 3 (512 tokens)"), std::string::npos);
  EXPECT_NE(status.message().find("past its deadline of 0.02 s"), std::string::npos)
      << status.message();
  EXPECT_EQ(hangs.load(), 0);  // late, but within the grace period

  // The next step starts afresh.
  watchdog.arm("decode step 1 of 9", 5.0);
  EXPECT_TRUE(watchdog.disarm().is_ok());
}

TEST(Watchdog, StuckStepReachesTheHangHandlerOnce) {
  std::atomic<int> hangs{0};
  std::string hung_step;
  double hung_deadline = 0, hung_elapsed = 0;
  Watchdog watchdog(
      [&](const std::string& step, double deadline, double elapsed) {
        hung_step = step;
        hung_deadline = deadline;
        hung_elapsed = elapsed;
        ++hangs;
      },
      0.03);
  const auto start = std::chrono::steady_clock::now();
  watchdog.arm("decode step 37 of 511", 0.02);
  while (hangs.load() == 0 && std::chrono::steady_clock::now() - start < std::chrono::seconds(5)) {
    std::this_thread::sleep_for(milliseconds(5));
  }
  std::this_thread::sleep_for(milliseconds(100));  // no second report for the same step
  ASSERT_EQ(hangs.load(), 1);
  EXPECT_EQ(hung_step, "decode step 37 of 511");
  EXPECT_DOUBLE_EQ(hung_deadline, 0.02);
  EXPECT_GE(hung_elapsed, 0.05);
  EXPECT_FALSE(watchdog.disarm().is_ok());

  // A new step is watched again.
  watchdog.arm("decode step 38 of 511", 0.01);
  while (hangs.load() == 1 && std::chrono::steady_clock::now() - start < std::chrono::seconds(5)) {
    std::this_thread::sleep_for(milliseconds(5));
  }
  EXPECT_EQ(hangs.load(), 2);
  EXPECT_EQ(hung_step, "decode step 38 of 511");
}

// A load on a slow disk runs far past any estimate but keeps counting its work: no failure. Only
// a count that stands still is a stall.
TEST(Watchdog, SlowButProgressingJobIsNotAStall) {
  std::atomic<int> hangs{0};
  Watchdog watchdog([&](const std::string&, double, double) { ++hangs; }, 0.5);
  watchdog.arm_until_stall("building the weights of DIR", 0.5);
  // Runs 4x the stall limit, advancing every 10 ms.
  const auto start = std::chrono::steady_clock::now();
  while (std::chrono::steady_clock::now() - start < milliseconds(2000)) {
    note_work_done(1);
    std::this_thread::sleep_for(milliseconds(10));
  }
  EXPECT_TRUE(watchdog.disarm().is_ok());
  EXPECT_EQ(hangs.load(), 0);
}

TEST(Watchdog, JobWhoseWorkStandsStillIsAStall) {
  std::atomic<int> hangs{0};
  Watchdog watchdog([&](const std::string&, double, double) { ++hangs; }, 10.0);
  watchdog.arm_until_stall("building the weights of DIR", 0.05);
  note_work_done(1);
  std::this_thread::sleep_for(milliseconds(200));
  const Status status = watchdog.disarm();
  ASSERT_FALSE(status.is_ok());
  EXPECT_NE(status.message().find("building the weights of DIR made no progress"),
            std::string::npos)
      << status.message();
  EXPECT_EQ(hangs.load(), 0);  // within the grace period
}

TEST(Watchdog, DeadlinesScaleTheExpectedTime) {
  EXPECT_DOUBLE_EQ(step_deadline_seconds(0.5, 10, 30), 35.0);
  EXPECT_DOUBLE_EQ(step_deadline_seconds(0, 10, 5), 5.0);
}

}  // namespace
}  // namespace kestrel
