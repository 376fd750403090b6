// Megatron-style tensor parallelism: how one model splits over `world` ranks, and each rank's
// weights (docs/ARCHITECTURE.md, "Tensor parallelism").
//
//   column-parallel (rows split): wq by query heads, wk/wv by KV heads (or the one KV head a
//                                 rank's query heads share, replicated), w_gate/w_up by the
//                                 intermediate size; biases with their rows
//   row-parallel (columns split): wo by query heads, w_down by the intermediate size; each
//                                 rank's output is a partial sum, all-reduced; wo's bias only
//                                 on rank 0 (zeros elsewhere), so it is added once
//   vocabulary-parallel:          tok_embd and lm_head hold rows [first, first + per_rank) of
//                                 the vocabulary plus one zero row; a token outside a rank's
//                                 range looks up the zero row, so the all-reduce of the
//                                 embeddings gives each token its row, and the logits of the
//                                 ranks' real rows side by side are the model's
//   replicated:                   the norms
//
// A rank's weights form an ordinary ModelWeights of a smaller config (shard_config), so every
// backend runs a shard unchanged; only the forward pass adds the collectives.
#pragma once

#include <cstdint>
#include <vector>

#include "model/weights.h"

namespace kestrel {

// The most ranks a model splits over (NCCL's single-host groups are at most 8 GPUs; the CPU
// stand-in has no reason to go further than a few).
constexpr int kMaxTensorParallel = 64;

struct ShardPlan {
  int rank = 0;
  int world = 1;
  int64_t heads = 0;           // query heads of each rank: [rank * heads, (rank + 1) * heads)
  int64_t kv_heads = 0;        // KV heads each rank holds
  int64_t first_kv_head = 0;   // the first of them
  bool kv_replicated = false;  // world > n_kv_heads: each KV head sits on world / n_kv_heads ranks
  int64_t intermediate = 0;    // intermediate size of each rank
  int64_t vocab = 0;           // vocabulary rows of each rank (the last rank's may pass the end)
  int64_t first_token = 0;     // rank * vocab
  // Real vocabulary rows of this rank: [first_token, first_token + real_vocab).
  int64_t real_vocab = 0;
};

// Whether `config` splits over `world` ranks in `format` with `block`: query heads and the
// intermediate size divisible by world, KV heads divisible by world or dividing it, and every
// split width of a quantized matrix a multiple of the block. The error says which number fails.
Status check_tensor_parallel(const ModelConfig& config, int world, WeightFormat format, int block);

// Rank `rank`'s part (config checked by check_tensor_parallel).
ShardPlan shard_plan(const ModelConfig& config, int rank, int world);

// The config a rank's weights and backend reservation are shaped by: its heads, KV heads,
// intermediate size, and plan.vocab + 1 vocabulary rows (the last one zero).
ModelConfig shard_config(const ModelConfig& config, const ShardPlan& plan);

// The token a rank looks up for `token` of the model's vocabulary: its row, or the zero row.
inline int32_t shard_token(const ShardPlan& plan, int32_t token) {
  const int64_t local = int64_t(token) - plan.first_token;
  return local >= 0 && local < plan.real_vocab ? int32_t(local) : int32_t(plan.vocab);
}

// Which rows of the whole model's tensor a rank's tensor `t` (of shard_config) holds, -1 for a
// zero row, and which window of its columns: the one table every way of cutting a shard reads.
struct ShardSlice {
  std::vector<int64_t> rows;
  int64_t first_col = 0;
  int64_t cols = 0;  // 0 for vectors
};
ShardSlice shard_slice(const TensorInfo& t, const ModelConfig& full, const ShardPlan& plan);

// A rank's fp32 vector `t` (a norm or a bias, of shard_config) from the whole model's values:
// its rows, or zeros for a row-parallel bias (wo's) on ranks other than 0, which add it once.
Blob shard_vector(const TensorInfo& t, const float* full_values, const ModelConfig& full,
                  const ShardPlan& plan);

// Rank plan.rank's weights, copied out of the whole model's: the same quantized blocks, bit for
// bit (splits fall on block boundaries), so a split model computes with the unsplit one's
// weights.
Result<ModelWeights> shard_weights(const ModelWeights& full, const ShardPlan& plan);

}  // namespace kestrel
