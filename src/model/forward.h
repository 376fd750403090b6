// The Llama/Qwen2 forward pass, written once against the backend ops.
#pragma once

#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "kestrel/types.h"
#include "model/weights.h"

namespace kestrel {

// The KV cache block tables a call reads and writes through (BatchView's).
struct BlockTables {
  const int32_t* data = nullptr;  // [max_seqs, stride]
  int64_t stride = 0;
};

// Runs `batch` through the model; writes fp32 logits [logit_rows.size(), vocab] to `logits`.
Status forward(Backend& backend, const ModelWeights& weights, const Batch& batch,
               const BlockTables& tables, std::vector<float>* logits);

// As forward, but returns the index of the largest logit of each logit row (the lowest among
// ties, as argmax()) instead of the logits: a device backend copies back one int per row.
Status forward_argmax(Backend& backend, const ModelWeights& weights, const Batch& batch,
                      const BlockTables& tables, std::vector<int32_t>* tokens);

}  // namespace kestrel
