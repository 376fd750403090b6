#include "backend/workspace.h"

#include <algorithm>

#include "backend/backend.h"

namespace kestrel {

namespace {
// Scratch tensors are rounded up to 16 elements (64 bytes of fp32); room for 64 tensors a call is
// far more than the dozen model/forward.cpp takes.
constexpr size_t kAlignmentSlackElements = 64 * 16;
}  // namespace

WorkspaceLayout workspace_layout(const ModelConfig& config, const RunShape& shape,
                                 const WorkspaceTypes& types) {
  WorkspaceLayout layout;
  layout.types = types;
  layout.kv_cache_elements = size_t(config.n_layers) * size_t(shape.pool_blocks()) *
                             size_t(kKvBlockSize) * size_t(config.kv_dim());
  const int64_t widest = std::max({config.hidden_size, config.q_dim(), config.intermediate_size});
  const int64_t per_token = 3 * config.hidden_size + 2 * config.q_dim() + 2 * config.kv_dim() +
                            2 * config.intermediate_size + widest;
  layout.activation_elements = size_t(shape.max_batch_tokens) * size_t(per_token);
  layout.logits_elements =
      size_t(shape.max_logit_rows) * size_t(config.vocab_size + 2 * config.hidden_size);
  layout.scratch_elements =
      layout.activation_elements + layout.logits_elements + kAlignmentSlackElements;
  layout.score_elements =
      size_t(std::max<int64_t>(types.score_rows, 0)) * size_t(shape.max_context);
  return layout;
}

}  // namespace kestrel
