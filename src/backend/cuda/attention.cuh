// Attention over an fp16 KV cache: the cache write, split-context decode attention for any
// batch, and flash-style causal prefill on the tensor cores for a run of consecutive positions
// of one sequence. No kernel holds an n x n score matrix in memory.
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/common.cuh"
#include "core/status.h"
#include "kestrel/types.h"

namespace kestrel::cuda {

// Keys per split of the decode kernel: a 1024-token context is 32 splits per KV head.
constexpr int kDecodeSplit = 32;
// Query heads sharing one KV head that the decode kernel supports.
constexpr int kMaxHeadGroup = 16;

// K and V, each [layers, n_blocks, n_kv_heads, kKvBlockSize, head_dim] fp16: one head's 16
// positions of a block are one contiguous run. Position p of slot s lives in block
// block_tables[s * table_stride + p / kKvBlockSize], row p % kKvBlockSize.
struct KvCache {
  __half* k = nullptr;
  __half* v = nullptr;
  int64_t n_blocks = 0;
  const int32_t* block_tables = nullptr;  // device [max_seqs, table_stride], refreshed per batch
  int64_t table_stride = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
};

struct AttentionArgs {
  const float* q = nullptr;  // [n, n_heads * head_dim]
  const float* k = nullptr;  // [n, n_kv_heads * head_dim]
  const float* v = nullptr;  // [n, n_kv_heads * head_dim]
  float* out = nullptr;      // [n, n_heads * head_dim]
  ShadowOut shadow;          // fp16 copy of out for the next matmul
  int64_t n_tokens = 0;
  int n_heads = 0;
  int64_t layer = 0;
  const int32_t* positions = nullptr;  // device [n]
  const int32_t* seq_ids = nullptr;    // device [n]
};

// Per-split partial results of the decode kernel, for up to 16 tokens per launch.
struct DecodeWorkspace {
  float* o = nullptr;   // [16, n_heads, max_splits, head_dim]
  float* ml = nullptr;  // [16, n_heads, max_splits, 2]  running max and sum of exp
  int max_splits = 0;   // ceil(max_context / kDecodeSplit)
};

// Stores the batch's k and v rows in `layer` of the cache at their positions.
Status kv_cache_write(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream);

// rope() of q and k in place (rope.cuh) and kv_cache_write() of the rotated k and of v, in one
// launch: a decode step's rotation and cache write. q and k are args.q and args.k.
Status rope_kv_cache_write(float* q, float* k, const AttentionArgs& args, const KvCache& cache,
                           const float* inv_freq, cudaStream_t stream);

// Attention of each token over positions 0..pos of its sequence (any mix of sequences and
// positions). Launch shapes depend only on n_tokens, so one CUDA graph serves every position.
Status attention_decode(const AttentionArgs& args, const KvCache& cache, const DecodeWorkspace& ws,
                        cudaStream_t stream);

// Whether attention_prefill handles this head size.
bool prefill_supports(int head_dim);

// Causal attention for a batch that is one sequence at consecutive positions (position of token
// i = positions[0] + i), tiles of 64 queries x 64 keys on mma.sync.
Status attention_prefill(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream);

}  // namespace kestrel::cuda
