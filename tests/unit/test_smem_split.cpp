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

TEST(SmemSplit, OutOfRangeModesAreTheDefault) {
  EXPECT_EQ(valid_smem_split(0), 0);
  EXPECT_EQ(valid_smem_split(1), 1);
  EXPECT_EQ(valid_smem_split(2), 2);
  EXPECT_EQ(valid_smem_split(-1), 2);
  EXPECT_EQ(valid_smem_split(3), 2);
}

}  // namespace
}  // namespace kestrel::cuda
