// The Llama/Qwen2 forward pass, written once against the backend ops.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "backend/backend.h"
#include "kestrel/types.h"
#include "model/weights.h"

namespace kestrel {

class Communicator;

// The KV cache block tables a call reads and writes through (BatchView's).
struct BlockTables {
  const int32_t* data = nullptr;  // [max_seqs, stride]
  int64_t stride = 0;
};

// What the backend's begin_batch is given for `batch` (pointers into it and into `tables`).
BatchView batch_view(const Batch& batch, const BlockTables& tables);

// The forward pass up to the lm_head's output tensor [batch.logit_rows.size(), vocab] (no rows
// when none are wanted), valid until the backend's next begin_batch. With `comm`, `weights` are
// rank comm->rank()'s shard (model/shard.h) and batch.tokens its shard_token() ids; the output
// holds that rank's vocabulary rows.
// With `tokens_from_argmax`, batch.tokens are placeholders: the backend takes each token from
// the argmax it started last (BatchView::tokens_from_argmax).
Result<Tensor> forward_logits(Backend& backend, const ModelWeights& weights, const Batch& batch,
                              const BlockTables& tables, Communicator* comm,
                              bool tokens_from_argmax = false);

// Runs `batch` through the model; writes fp32 logits [logit_rows.size(), vocab] to `logits`.
Status forward(Backend& backend, const ModelWeights& weights, const Batch& batch,
               const BlockTables& tables, std::vector<float>* logits);

// As forward, but returns the index of the largest logit of each logit row (the lowest among
// ties, as argmax()) instead of the logits: a device backend copies back one int per row.
// With `logits`, also copies back the fp32 logits of the logit rows `full_rows` (indices into
// batch.logit_rows) packed in that order [full_rows.size(), vocab], and only those. The rows of
// `draws` take a drawn token instead of their argmax (Backend::pick_rows).
Status forward_argmax(Backend& backend, const ModelWeights& weights, const Batch& batch,
                      const BlockTables& tables, std::vector<int32_t>* tokens,
                      std::span<const int32_t> full_rows = {}, std::vector<float>* logits = nullptr,
                      std::span<const RowDraw> draws = {});

// forward_argmax's first half for decode run ahead: runs `batch` (its tokens from the argmax
// before it when `tokens_from_argmax`) and queues the argmax of its logit rows, the rows of
// `draws` drawn instead (Backend::start_argmax); Backend::finish_argmax returns them.
Status forward_start_argmax(Backend& backend, const ModelWeights& weights, const Batch& batch,
                            const BlockTables& tables, bool tokens_from_argmax,
                            std::span<const RowDraw> draws = {});

}  // namespace kestrel
