// The Llama/Qwen2 forward pass, written once against the backend ops.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "model/weights.h"

namespace kestrel {

// One forward call: tokens of one or more sequences (prefill chunks and decode steps alike).
struct Batch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<int32_t> seq_ids;
  std::vector<int32_t> logit_rows;  // indices into `tokens` whose logits are wanted

  void add(int32_t token, int32_t position, int32_t seq_id, bool want_logits) {
    if (want_logits) logit_rows.push_back(int32_t(tokens.size()));
    tokens.push_back(token);
    positions.push_back(position);
    seq_ids.push_back(seq_id);
  }
  int64_t size() const { return int64_t(tokens.size()); }
};

// Runs `batch` through the model; writes fp32 logits [logit_rows.size(), vocab] to `logits`.
Status forward(Backend& backend, const ModelWeights& weights, const Batch& batch,
               std::vector<float>* logits);

// As forward, but returns the index of the largest logit of each logit row (the lowest among
// ties, as argmax()) instead of the logits: a device backend copies back one int per row.
Status forward_argmax(Backend& backend, const ModelWeights& weights, const Batch& batch,
                      std::vector<int32_t>* tokens);

}  // namespace kestrel
