// The shared-memory split rule of the CUDA backend's launches (backend/cuda/smem_split.h), a plain
// header, checked without a device: which launches carry the largest-split attribute in each mode.
#include <gtest/gtest.h>

#include "backend/cuda/smem_split.h"

namespace kestrel::cuda {
namespace {

TEST(SmemSplit, EachModeChoosesItsLaunches) {
  // Mode 0: the driver's split everywhere.
  EXPECT_FALSE(wants_max_shared(0, false));
  EXPECT_FALSE(wants_max_shared(0, true));
  // Mode 1: the largest split everywhere, L1 readers too.
  EXPECT_TRUE(wants_max_shared(1, false));
  EXPECT_TRUE(wants_max_shared(1, true));
  // Mode 2, the default: the largest split but for the kernels that read their input through L1.
  EXPECT_TRUE(wants_max_shared(2, false));
  EXPECT_FALSE(wants_max_shared(2, true));
  static_assert(wants_max_shared(2, false) && !wants_max_shared(2, true), "usable at compile time");
}

// An L1 reader's own carveout applies only where the mode leaves it the driver's split; the other
// launches never take it.
TEST(SmemSplit, TheL1ReadersCarveoutAppliesWhereTheModeLeavesThem) {
  EXPECT_EQ(launch_carveout(2, true, -1), -1);  // the default: the driver's split
  EXPECT_EQ(launch_carveout(2, true, 72), 72);
  EXPECT_EQ(launch_carveout(2, false, 72), 100);
  EXPECT_EQ(launch_carveout(0, true, 72), 72);
  EXPECT_EQ(launch_carveout(0, false, 72), -1);
  EXPECT_EQ(launch_carveout(1, true, 72), 100);  // mode 1: the largest split for all
  EXPECT_EQ(launch_carveout(1, false, -1), 100);
  EXPECT_EQ(valid_l1_reader_carveout(-1), -1);
  EXPECT_EQ(valid_l1_reader_carveout(0), 0);
  EXPECT_EQ(valid_l1_reader_carveout(100), 100);
  EXPECT_EQ(valid_l1_reader_carveout(101), -1);
  EXPECT_EQ(valid_l1_reader_carveout(-7), -1);
}

TEST(SmemSplit, OutOfRangeModesAreTheDefault) {
  EXPECT_EQ(valid_smem_split(0), 0);
  EXPECT_EQ(valid_smem_split(1), 1);
  EXPECT_EQ(valid_smem_split(2), 2);
  EXPECT_EQ(valid_smem_split(-1), 2);
  EXPECT_EQ(valid_smem_split(3), 2);
}

}  // namespace
}  // namespace kestrel::cuda
