// The CPU backend's rooflines: the host's read bandwidth (cpu::measure_read_bandwidth) and its
// int8 multiply-add rate (cpu::measure_int8_tops), measured with the backend's threads, where
// the bandwidth used to be a constant and the matrix rate was not known.
#include <gtest/gtest.h>

#include <string>

#include "backend/backend.h"
#include "backend/cpu/matmul.h"
#include "backend/cpu/read_bandwidth.h"
#include "core/thread_pool.h"

namespace kestrel {
namespace {

constexpr size_t kMiB = size_t(1) << 20;

TEST(ReadBandwidth, ReadsWholeMebibytesWithEveryThread) {
  ThreadPool pool(2);
  // 3.5 MiB reads 3 whole blocks; each pass's sum is checked inside against the fill's.
  auto r = cpu::measure_read_bandwidth(pool, 3 * kMiB + kMiB / 2, 3);
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ(r->bytes, 3 * kMiB);
  EXPECT_EQ(r->passes, 3);
  EXPECT_EQ(r->threads, 2);
  EXPECT_GT(r->gbs, 0.0);
  // Less than a block still reads one, and at least one pass runs.
  auto small = cpu::measure_read_bandwidth(pool, 1000, 0);
  ASSERT_TRUE(small.is_ok()) << small.status().message();
  EXPECT_EQ(small->bytes, kMiB);
  EXPECT_EQ(small->passes, 1);
  // One thread: the caller's own.
  ThreadPool one(1);
  auto single = cpu::measure_read_bandwidth(one, 2 * kMiB, 2);
  ASSERT_TRUE(single.is_ok()) << single.status().message();
  EXPECT_EQ(single->threads, 1);
}

TEST(ReadBandwidth, BufferGrowsWithTheThreadsUpToTwoGibibytes) {
  EXPECT_EQ(cpu::read_bandwidth_bytes(1, 128), 256 * kMiB);
  EXPECT_EQ(cpu::read_bandwidth_bytes(8, 128), 256 * kMiB);
  EXPECT_EQ(cpu::read_bandwidth_bytes(9, 128), 512 * kMiB);
  EXPECT_EQ(cpu::read_bandwidth_bytes(64, 128), 2048 * kMiB);
  EXPECT_EQ(cpu::read_bandwidth_bytes(1024, 128), 2048 * kMiB);
  EXPECT_EQ(cpu::read_bandwidth_bytes(0, 128), 256 * kMiB);
  // Threads past the machine's hardware threads add nothing: `-t 64` on two cores reads 256 MiB.
  EXPECT_EQ(cpu::read_bandwidth_bytes(64, 2), 256 * kMiB);
  EXPECT_EQ(cpu::read_bandwidth_bytes(64, 16), 512 * kMiB);
  EXPECT_EQ(cpu::read_bandwidth_bytes(64, 0), 2048 * kMiB);  // unknown: the threads decide
}

// The int8 multiply-add rate of both kernel families (AVX2 everywhere, AVX-512 VNNI where the
// CPU has it): every chain counted, the time its passes took.
TEST(ReadBandwidth, Int8RateOfEitherKernelFamily) {
  ThreadPool pool(2);
  cpu::set_force_avx2(true);
  const double avx2 = cpu::measure_int8_tops(pool, 2);
  cpu::set_force_avx2(false);
  const double native = cpu::measure_int8_tops(pool, 2);
  EXPECT_GT(avx2, 0.0);
  EXPECT_GT(native, 0.0);
  // Twice what a core can do (AVX2: two 32-MAC products a cycle at 6 GHz, 0.77 TOP/s; AVX-512:
  // two 64-MAC VPDPBUSD, 1.5), for each of the two threads: a chain the compiler hoisted or
  // dropped would count work that was never done (seen: a loop-invariant product).
  EXPECT_LT(avx2, 2 * 1.5);
  EXPECT_LT(native, 2 * 3.0);
}

// The backend measures once and says so; the benchmark prints that source beside the figure.
TEST(ReadBandwidth, CpuBackendRooflineIsMeasuredOnce) {
  auto backend = make_backend("cpu", 2);
  ASSERT_TRUE(backend.is_ok()) << backend.status().message();
  const Roofline first = (*backend)->roofline();
  EXPECT_GT(first.bandwidth_gbs, 0.0) << first.source;
  EXPECT_EQ(first.source, "measured: 256 MiB read by 2 threads, fastest of 7 passes");
  const Roofline again = (*backend)->roofline();
  EXPECT_EQ(again.bandwidth_gbs, first.bandwidth_gbs);
  EXPECT_EQ(again.source, first.source);
  const MatrixRate rate = (*backend)->matrix_rate();
  EXPECT_GT(rate.tflops, 0.0) << rate.source;
  EXPECT_EQ(rate.source, std::string("measured: ") + cpu::matmul_isa() +
                             " int8 multiply-adds on 2 threads, registers only, fastest of 7 "
                             "passes");
  EXPECT_EQ((*backend)->matrix_rate().tflops, rate.tflops);
}

}  // namespace
}  // namespace kestrel
