// Batch-1 decoder layers as one persistent kernel (Backend::decoder_layers, decoder_layer): for
// each layer q/k/v, rope and the KV cache write, attention, wo + residual, the MLP's gate/up +
// SwiGLU and down + residual, with grid-wide barriers between the phases and between the layers
// instead of kernel boundaries.
//
// Why: a batch-1 decode step was a chain of ~7 dependent kernels a layer, each paying a launch,
// a ramp-up to full bandwidth and a drain; the small weights (q/k/v, wo; every weight of a 1.5B
// model) ran at 12-53% of the copy bandwidth for that reason alone (docs/PERF.md). Here every warp
// streams the weights through one cp.async ring from the first layer's first q/k/v tile to the
// last layer's last down tile: weights depend on no activation, so the ring runs ahead across the
// barriers and the attention phase, and the next phase's first bytes are already in shared memory
// when its input is ready.
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/attention.cuh"
#include "backend/cuda/common.cuh"
#include "backend/cuda/cuda_backend.h"
#include "core/status.h"

namespace kestrel::cuda {

// One layer's own arrays: the seven weights (q, k, v, o, gate, up, down) of the shapes that
// DecodeLayerArgs' weights describe, and the two norms. Index order is LayerWeightIndex's.
enum LayerWeightIndex { kWq, kWk, kWv, kWo, kWGate, kWUp, kWDown, kLayerWeights };
struct LayerPointers {
  const uint8_t* data[kLayerWeights] = {};
  const __half* scales[kLayerWeights] = {};
  const __half* mins[kLayerWeights] = {};  // asym_int4
  const float* bias[kLayerWeights] = {};
  const float* attn_norm = nullptr;  // [hidden]
  const float* ffn_norm = nullptr;   // [hidden]
};

struct DecodeLayerArgs {
  // The shapes and format of every layer's weights (each the same: all sym_int4 or all
  // asym_int4, tiled; w_gate and w_up of equal rows). Their pointers are the first layer's; the
  // kernel reads each layer's from `layers`.
  DeviceWeight wq, wk, wv, wo, w_gate, w_up, w_down;
  float eps = 0.0f;
  float* x = nullptr;  // [hidden] the residual stream, updated in place
  // Scratch the phases hand each other through: q/k/v before rope, the attention output, the
  // MLP activation silu(gate) * up.
  float* q = nullptr;     // [n_heads * head_dim]
  float* k = nullptr;     // [n_kv_heads * head_dim]
  float* v = nullptr;     // [n_kv_heads * head_dim]
  float* attn = nullptr;  // [n_heads * head_dim]
  float* act = nullptr;   // [intermediate]
  // Attention's per-split partial sums ([n_heads, max_splits, head_dim]) and {max, sum}
  // ([n_heads, max_splits, 2]), and the kernel's counters (2 + n_kv_heads words, zeroed once:
  // each launch leaves the arrival and merge counters at zero and moves the barrier's
  // generation word on).
  float* split_o = nullptr;
  float* split_ml = nullptr;
  int max_splits = 0;
  unsigned* sync = nullptr;
  KvCache cache;  // fp16 entries
  int n_heads = 0;
  const int32_t* positions = nullptr;  // device [1]
  const int32_t* seq_ids = nullptr;    // device [1]
  const float* inv_freq = nullptr;     // [head_dim / 2]
  // The layers, in order: cache layers first_layer, first_layer + 1, ...
  int64_t first_layer = 0;
  int n_layers = 0;
  LayerPointers layers[kMaxLaunchLayers];
};

// Words of `sync` a launch uses for a model of `n_kv_heads` KV heads.
inline int decode_layer_sync_words(int n_kv_heads) {
  return 2 + n_kv_heads;
}

// Empty when the layer kernel can run `a` on a device of `sm_count` SMs whose blocks may have
// `shared_per_block` bytes of shared memory (cudaDeviceProp::sharedMemPerBlockOptin); otherwise
// why not (the caller then composes the plain fused ops).
std::string decode_layer_unsupported(const DecodeLayerArgs& a, int sm_count,
                                     size_t shared_per_block);

// a.n_layers batch-1 decoder layers (decode_layer_unsupported must be empty): one launch of
// sm_count blocks, launched with programmatic dependent launch so that its blocks stream their
// first weights while the kernel before it drains.
Status decode_layer(const DecodeLayerArgs& a, int sm_count, size_t shared_per_block,
                    cudaStream_t stream);

// The kernel's blocks wait for one another at grid barriers, so two of its grids on one device
// must never run at once (each could hold half the SMs, waiting for the rest). A backend
// claims a device before it uses the kernel and releases it when destroyed; a second backend on
// the same device in this process runs the fused ops instead. Other processes sharing the GPU
// (MPS) are not seen: a block that waits too long traps rather than hang.
bool claim_decode_layer(int device);
void release_decode_layer(int device);

}  // namespace kestrel::cuda
