// Rotary position embedding (HF rotate_half convention) at positions held in device memory, so a
// captured decode step serves every position. The inverse frequencies come from model/rope.h
// (plain or llama3-scaled), computed once on the host.
#pragma once

#include <cuda_runtime.h>

#include "core/status.h"

namespace kestrel::cuda {

// Rotates q [n, n_heads * head_dim] and k [n, n_kv_heads * head_dim] in place.
Status rope(float* q, float* k, int64_t n_tokens, int n_heads, int n_kv_heads, int head_dim,
            const int32_t* positions, const float* inv_freq, cudaStream_t stream);

}  // namespace kestrel::cuda
