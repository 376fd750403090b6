// Rotary position embedding frequencies, computed the way HF transformers computes them (fp32
// inverse frequencies, then llama3 scaling), so positions rotate identically.
#pragma once

#include <vector>

#include "io/config.h"

namespace kestrel {

// inv_freq[i] for i in [0, head_dim/2): 1 / theta^(2i/head_dim), llama3-scaled when configured.
std::vector<float> rope_inv_freq(const ModelConfig& config);

}  // namespace kestrel
