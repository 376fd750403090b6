// Attention over a paged KV cache of fp16, fp8 (e4m3, a scale per row) or fp32 entries: the
// cache write, split-context decode attention for any batch, and flash-style causal prefill on
// the tensor cores for a run of consecutive positions of one sequence (fp16 and fp8 caches).
// No kernel holds an n x n score matrix in memory.
#pragma once

#include <cuda_runtime.h>

#include "backend/cuda/common.cuh"
#include "core/status.h"
#include "kestrel/types.h"

namespace kestrel::cuda {

// Keys per chunk of the decode kernel: a split walks whole chunks, one staged while the one
// before is used.
constexpr int kDecodeSplit = 32;
// Query heads sharing one KV head that the decode kernel supports.
constexpr int kMaxHeadGroup = 16;

enum class KvType : uint8_t { f16, f8, f32 };

inline size_t kv_type_bytes(KvType type) {
  return type == KvType::f8 ? 1 : type == KvType::f16 ? 2 : 4;
}

// K and V, each [layers, n_blocks, n_kv_heads, kKvBlockSize, head_dim] entries of `type`: one
// head's 16 positions of a block are one contiguous run. Position p of slot s lives in block
// block_tables[s * table_stride + p / kKvBlockSize], row p % kKvBlockSize. An fp8 cache keeps
// one fp32 scale per row (k_scale, v_scale: [layers, n_blocks, n_kv_heads, kKvBlockSize]): the
// row's largest magnitude maps to e4m3's largest finite value, 448.
struct KvCache {
  void* k = nullptr;
  void* v = nullptr;
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  KvType type = KvType::f16;
  int64_t n_blocks = 0;
  const int32_t* block_tables = nullptr;  // device [max_seqs, table_stride], refreshed per batch
  int64_t table_stride = 0;
  int n_kv_heads = 0;
  int head_dim = 0;
};

// Row of (layer, slot, KV head, position) in K or V, through the slot's block table: entries
// start at row * head_dim, an fp8 row's scale is scale[row].
__device__ inline int64_t cache_row(const KvCache& c, int64_t layer, int64_t seq, int64_t kvh,
                                    int64_t pos) {
  const int64_t block = c.block_tables[seq * c.table_stride + pos / kKvBlockSize];
  return ((layer * c.n_blocks + block) * c.n_kv_heads + kvh) * kKvBlockSize + pos % kKvBlockSize;
}

__device__ inline int64_t cache_offset(const KvCache& c, int64_t layer, int64_t seq, int64_t kvh,
                                       int64_t pos) {
  return cache_row(c, layer, seq, kvh, pos) * c.head_dim;
}

// Tokens from which rope_kv_cache_write takes a block per token rather than per (token, head)
// (and may add q/k/v biases): a decode step's few tokens keep the wider grid, whose one round of
// loads ends sooner.
constexpr int64_t kRopeTokensThreshold = 64;

struct AttentionArgs {
  float* q = nullptr;        // [n, n_heads * head_dim]; rotated in place by a rope launch
  float* k = nullptr;        // [n, n_kv_heads * head_dim]; rotated in place by a rope launch
  const float* v = nullptr;  // [n, n_kv_heads * head_dim]
  float* out = nullptr;      // [n, n_heads * head_dim]
  ShadowOut shadow;          // fp16 copy of out for the next matmul; its half groups too when
                             // attention_writes_halves holds (else shadow.halves is null)
  int64_t n_tokens = 0;
  int n_heads = 0;
  int64_t layer = 0;
  const int32_t* positions = nullptr;  // device [n]
  const int32_t* seq_ids = nullptr;    // device [n]
  // Set (rope mode): attention_decode rotates q and k itself (tensor_core_attention), reading
  // them as the projection wrote them, writes the batch's K and V rows to the cache, and leaves
  // q and k rotated in place. Null: q and k are rotated already, and the K and V rows are in the
  // cache.
  const float* inv_freq = nullptr;
  // Rope mode: whether the merging split (or a solo split) writes the rotated q and k back. False
  // where nothing reads them again (a decoder layer's scratch, Backend::decoder_layer): the write-
  // back's loads, registers and stores leave the step's chain. (The combine kernel, a
  // measurement aid, writes them back regardless.)
  bool keep_rotated = true;
  // Set (a prefill call over an fp16 or fp32 cache, the CUDA prefill layer): the q, k and v
  // projections came without their biases, and the rope launch adds them (q and k before the
  // rotation; v before the cache write, and back into v). Each may be null.
  const float* q_bias = nullptr;
  const float* k_bias = nullptr;
  const float* v_bias = nullptr;
  // Set (the same calls): the rope launch reads q, k and v from this one product [n, qkv_stride]
  // (q in columns [0, q_dim), k then v after it) and writes the rotated q and k to q and k; v is
  // not written (the cache holds it).
  const float* qkv = nullptr;
  int64_t qkv_stride = 0;
};

// Per-split partial results of the decode kernel, for up to 16 tokens per launch. A launch of
// n tokens splits each (token, KV head)'s context into decode_splits() parts, so the grid fills
// the GPU whatever the batch, and its size does not depend on the context.
struct DecodeWorkspace {
  float* o = nullptr;   // [16, n_heads, max_splits, head_dim]
  float* ml = nullptr;  // [16, n_heads, max_splits, 2]  running max and sum of exp
  // [16, n_kv_heads] splits of each (token, KV head) done so far in a tensor-core launch
  // (tensor_core_attention): zero between launches, which leave it zero.
  unsigned* arrivals = nullptr;
  int max_splits = 0;  // decode_splits(sm_count, n_kv_heads, 1, max_context)
  int sm_count = 1;
  // KESTREL_CUDA_ATTENTION_PROFILE=N (a measurement aid): the tensor-core decode kernel's merging
  // block (or a solo split) prints its phase times (layer 1, the first token's first KV head,
  // every N positions, or every 256 for N = 1). 0: off.
  int profile = 0;
  // At head_dim 128, a tensor-core decode group whose context is at most `solo` 64-key tiles
  // takes one split, and a group of one split writes its output itself, without the partial
  // results, count and merge round trips (0: off; cuda::set_decode_solo, a test aid, sets
  // others). One tile: two tiles walked by one block lost to two splits and a merge (PERF.md,
  // twenty-second session).
  int solo = 1;
  // The fp16 decode tiles' copies a cache block at a time (cuda::set_decode_block_copy; on by
  // default since the thirty-seventh session, KESTREL_CUDA_ATTENTION_BLOCK_COPY=0 at start-up
  // turns it off): warp w copies the tile's cache blocks w, w + 4, ... from one block-table
  // lookup each, instead of every thread looking up each of its eight rows. The same bytes in the
  // same places.
  bool block_copy = true;
  // A group of at most 8 query heads skips the mma fragments' rows 8-15, which hold no query:
  // their queries' loads and rotations (zeros instead) and their partial sums' stores
  // (cuda::set_decode_lower_rows; on by default since the thirty-seventh session,
  // KESTREL_CUDA_ATTENTION_LOWER_ROWS=0 at start-up turns it off). The same bits: those rows'
  // scores and sums are never read.
  bool lower_rows = true;
};

// Splits per (token, KV head) of a decode launch of `tokens` tokens: about four blocks per SM
// in all, never more than the context has chunks.
int decode_splits(int sm_count, int n_kv_heads, int64_t tokens, int64_t max_context);

// Row limits the cache write imposes: fp8 rows are reduced by one block of head_dim / 2 threads.
Status check_kv_cache(KvType type, int head_dim);

// Stores the batch's k and v rows in `layer` of the cache at their positions.
Status kv_cache_write(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream);

// rope() of args.q and args.k in place (rope.cuh) and kv_cache_write() of the rotated k and of
// v, in one launch: the rotation and cache write of a batch that attention_decode's rope mode
// does not take (prefill, or two tokens of one sequence).
Status rope_kv_cache_write(const AttentionArgs& args, const KvCache& cache, const float* inv_freq,
                           cudaStream_t stream);

// Whether the tensor-core attention kernels take this head size and cache: the flash prefill
// kernel, and the decode split kernel, which can then also rotate q and k and write the cache
// itself (args.inv_freq; the caller must also know that no two tokens of the batch belong to one
// sequence, or a token would read another's new row). Other sizes, and an fp32 cache (the fp32
// mode, fp32 arithmetic throughout), take the CUDA-core decode kernel for every batch.
constexpr bool tensor_core_attention(int head_dim, KvType type) {
  return (head_dim == 64 || head_dim == 128) && type != KvType::f32;
}

// Attention of each token over positions 0..pos of its sequence (any mix of sequences and
// positions; in rope mode, args.inv_freq, each token of its own sequence, and the call also
// writes the K and V rows and leaves q and k rotated). Launch shapes depend only on n_tokens,
// so one CUDA graph serves every position.
Status attention_decode(const AttentionArgs& args, const KvCache& cache, const DecodeWorkspace& ws,
                        cudaStream_t stream);

// Whether attention_decode of n_tokens can write its output's half-group quantization beside
// the shadow (AttentionArgs::shadow.halves, for wo's dp4a GEMV): one token, and the tensor-core
// decode kernel merging its own splits (not the CUDA-core kernel, nor the combine kernel of
// KESTREL_CUDA_ATTENTION_COMBINE=1).
bool attention_writes_halves(int head_dim, KvType type, int64_t n_tokens);

// Causal attention for a batch that is one sequence at consecutive positions (position of token
// i = positions[0] + i), tiles of 64 queries x 64 keys on mma.sync.
Status attention_prefill(const AttentionArgs& args, const KvCache& cache, cudaStream_t stream);

}  // namespace kestrel::cuda
