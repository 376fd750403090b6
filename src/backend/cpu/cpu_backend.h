// The CPU backend: fp32 activations, fp32 KV cache, weights used in place. It is the numerical
// reference the other backends are tested against.
#pragma once

#include <memory>
#include <vector>

#include "backend/backend.h"
#include "core/thread_pool.h"

namespace kestrel {

std::unique_ptr<Backend> make_cpu_backend(int threads);

}  // namespace kestrel
