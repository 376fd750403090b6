// The CUDA tests' helpers: the device backends' shared harness (unit/backend_test_util.h), with
// CUDA as the device (cuda_environment.cpp).
#pragma once

#include "../unit/backend_test_util.h"
#include "backend/cuda/cuda_backend.h"

namespace kestrel::cuda_test {
using namespace kestrel::backend_test;
}  // namespace kestrel::cuda_test
