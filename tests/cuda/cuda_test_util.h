// The CUDA tests' helpers: the device backends' shared harness (unit/backend_test_util.h), with
// CUDA as the device (cuda_environment.cpp).
#pragma once

#include "../unit/backend_test_util.h"
#include "backend/cuda/cuda_backend.h"

namespace kestrel::cuda_test {
using namespace kestrel::backend_test;

// Holds one of the CUDA backend's process-wide switches (a `T set_x(T value)` that returns the
// setting before, cuda_backend.h: a bool, or a count such as set_attention_quarters') at `value`
// for a scope, and restores the setting it found however the scope ends. A test may still set
// the switch inside the scope.
template <typename T>
class ScopedSwitch {
 public:
  ScopedSwitch(T (*set)(T), T value) : set_(set), before_(set(value)) {}
  ~ScopedSwitch() { set_(before_); }
  ScopedSwitch(const ScopedSwitch&) = delete;
  ScopedSwitch& operator=(const ScopedSwitch&) = delete;

 private:
  T (*set_)(T);
  T before_;
};
}  // namespace kestrel::cuda_test
