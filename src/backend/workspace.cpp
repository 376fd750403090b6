#include "backend/workspace.h"

#include <algorithm>

#include "backend/backend.h"

namespace kestrel {

namespace {
// Scratch tensors are rounded up to 16 elements (64 bytes of fp32); room for 64 tensors a call is
// far more than the dozen model/forward.cpp takes.
constexpr size_t kAlignmentSlackElements = 64 * 16;
}  // namespace

namespace forward_scratch {

int64_t width(const ModelConfig& c, Token tensor) {
  switch (tensor) {
    case residual:
    case normed:
    case proj:
      return c.hidden_size;
    case q:
    case attn:
      return c.q_dim();
    case k:
    case v:
      return c.kv_dim();
    case gate:
    case up:
      return c.intermediate_size;
    case kTokenTensors:
      break;
  }
  return 0;
}

int64_t width(const ModelConfig& c, Head tensor) {
  switch (tensor) {
    case last:
    case head_normed:
      return c.hidden_size;
    case logits:
      return c.vocab_size;
    case kHeadTensors:
      break;
  }
  return 0;
}

}  // namespace forward_scratch

WorkspaceLayout workspace_layout(const ModelConfig& config, const RunShape& shape,
                                 const WorkspaceTypes& types) {
  WorkspaceLayout layout;
  layout.types = types;
  layout.kv_cache_elements = size_t(config.n_layers) * size_t(shape.pool_blocks()) *
                             size_t(kKvBlockSize) * size_t(config.kv_dim());
  layout.kv_cache_rows =
      config.head_dim > 0 ? layout.kv_cache_elements / size_t(config.head_dim) : 0;
  int64_t per_token = 0, widest = 0, per_logit_row = 0;
  for (int i = 0; i < forward_scratch::kTokenTensors; ++i) {
    const int64_t width = forward_scratch::width(config, forward_scratch::Token(i));
    per_token += width;
    widest = std::max(widest, width);
  }
  for (int i = 0; i < forward_scratch::kHeadTensors; ++i) {
    per_logit_row += forward_scratch::width(config, forward_scratch::Head(i));
  }
  layout.activation_elements = size_t(shape.max_batch_tokens) * size_t(per_token + widest);
  layout.logits_elements = size_t(shape.max_logit_rows) * size_t(per_logit_row);
  layout.scratch_elements =
      layout.activation_elements + layout.logits_elements + kAlignmentSlackElements;
  layout.score_elements =
      size_t(std::max<int64_t>(types.score_rows, 0)) * size_t(shape.max_context);
  return layout;
}

}  // namespace kestrel
