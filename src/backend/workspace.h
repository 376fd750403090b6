// What a backend's reserve() allocates for a RunShape, computed without allocating anything.
// Backends size their buffers from workspace_layout() and the memory planner
// (runtime/planner.h) predicts a run's peak from the same function, so the plan and the
// allocation cannot drift apart.
#pragma once

#include <cstddef>
#include <cstdint>

#include "io/config.h"

namespace kestrel {

struct RunShape;

// The scratch tensors of one forward call, in one list: model/forward.cpp takes exactly these
// from the backend and workspace_layout() sizes the scratch arena from the same widths.
namespace forward_scratch {
// Per token of the call ([tokens, width]).
enum Token : int { residual, normed, q, k, v, attn, proj, gate, up, kTokenTensors };
// Per row whose logits are wanted ([logit rows, width]): the final norm and the lm_head.
enum Head : int { last, head_normed, logits, kHeadTensors };
int64_t width(const ModelConfig& config, Token tensor);
int64_t width(const ModelConfig& config, Head tensor);
}  // namespace forward_scratch

// The element sizes and per-backend extras that turn a shape into bytes.
struct WorkspaceTypes {
  size_t kv_element_bytes = 4;          // KV cache entries (CPU fp32, CUDA fp16, fp8 or fp32)
  size_t kv_row_bytes = 0;              // per (position, KV head) row beside them (fp8 scales)
  size_t activation_element_bytes = 4;  // scratch activations
  int64_t score_rows = 1;               // attention score rows of max_context (CPU: one a thread)
  size_t fixed_bytes = 0;  // what the backend holds whatever the shape (handles, pools)
};

struct WorkspaceLayout {
  size_t kv_cache_elements = 0;    // elements of the K cache, and as many of the V cache
  size_t kv_cache_rows = 0;        // its (position, KV head) rows: elements / head_dim
  size_t activation_elements = 0;  // scratch for the per-token tensors of one forward call
  size_t logits_elements = 0;      // scratch for the rows of final norm and lm_head
  size_t scratch_elements = 0;     // activation + logits + alignment slack: one scratch arena
  size_t score_elements = 0;       // attention score rows
  // Bytes the backend's kernels hold outside reserve() for calls of this shape (the CPU matmul's
  // activation buffer); set by the backend's reserve_layout().
  size_t kernel_scratch_bytes = 0;
  WorkspaceTypes types;

  size_t kv_cache_bytes() const {
    return 2 * (kv_cache_elements * types.kv_element_bytes + kv_cache_rows * types.kv_row_bytes);
  }
  size_t scratch_bytes() const { return scratch_elements * types.activation_element_bytes; }
  size_t logits_bytes() const { return logits_elements * types.activation_element_bytes; }
  // Scratch and scores that are not logits: the "workspace of one prefill chunk".
  size_t workspace_bytes() const {
    return scratch_bytes() - logits_bytes() + score_elements * types.activation_element_bytes +
           kernel_scratch_bytes + types.fixed_bytes;
  }
  size_t total_bytes() const { return kv_cache_bytes() + workspace_bytes() + logits_bytes(); }
};

// The buffers of one reservation:
//   K and V caches   [n_layers, pool_blocks, n_kv_heads, kKvBlockSize, head_dim] each
//   scratch          max_batch_tokens x (the forward_scratch::Token widths + the widest of
//                    them, a spare row for a backend's temporaries)
//                    + max_logit_rows x (the forward_scratch::Head widths)
//                    + 16 elements of alignment a tensor
//   scores           score_rows x max_context
WorkspaceLayout workspace_layout(const ModelConfig& config, const RunShape& shape,
                                 const WorkspaceTypes& types);

}  // namespace kestrel
