// The CUDA tests' helpers: the device backends' shared harness (unit/backend_test_util.h), with
// CUDA as the device (cuda_environment.cpp).
#pragma once

#include "../unit/backend_test_util.h"
#include "backend/cuda/cuda_backend.h"

namespace kestrel::cuda_test {
using namespace kestrel::backend_test;

// Holds one of the CUDA backend's process-wide switches (a `bool set_x(bool on)` that returns
// the setting before, cuda_backend.h) at `on` for a scope, and restores the setting it found
// however the scope ends. A test may still set the switch inside the scope.
class ScopedSwitch {
 public:
  ScopedSwitch(bool (*set)(bool), bool on) : set_(set), before_(set(on)) {}
  ~ScopedSwitch() { set_(before_); }
  ScopedSwitch(const ScopedSwitch&) = delete;
  ScopedSwitch& operator=(const ScopedSwitch&) = delete;

 private:
  bool (*set_)(bool);
  bool before_;
};
}  // namespace kestrel::cuda_test
