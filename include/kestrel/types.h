// Plain types of the public API: weight formats, a run's reservation and a forward call's batch.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kestrel/status.h"

namespace kestrel {

// How weights are stored (the packed layouts are in src/quant/format.h).
enum class WeightFormat : uint8_t { fp32, fp16, bf16, sym_int8, sym_int4, asym_int4 };

// "fp32", "fp16", "bf16", "sym_int8", "sym_int4", "asym_int4".
const char* format_name(WeightFormat format);
// Accepts the names format_name() gives.
Result<WeightFormat> parse_format(const std::string& name);

// What a KV cache entry is. The CPU backend always keeps fp32. On CUDA, `automatic` is fp16,
// or fp32 when the weights are fp32 (fp32 math end to end); fp8 is e4m3 with one fp32 scale per
// (position, KV head) row.
enum class KvCacheType : uint8_t { automatic, fp16, fp8, fp32 };

// "auto", "fp16", "fp8", "fp32".
const char* kv_cache_name(KvCacheType type);
// Accepts the names kv_cache_name() gives.
Result<KvCacheType> parse_kv_cache(const std::string& name);
// What `automatic` means for weights of `format`: fp32 for fp32, else fp16.
KvCacheType resolve_kv_cache(KvCacheType asked, WeightFormat format);

// Positions per block of the KV cache: the cache is a pool of such blocks, and each sequence
// slot's block table says which block holds its positions [16 b, 16 b + 16).
constexpr int64_t kKvBlockSize = 16;

// What a backend holds for a run (KV cache blocks, sequence slots and lengths, workspace),
// decided before the first step.
struct RunShape {
  int64_t max_seqs = 1;          // sequence slots (block tables)
  int64_t max_context = 0;       // positions per slot
  int64_t max_batch_tokens = 0;  // tokens per forward call (prefill chunk or decode batch)
  int64_t max_logit_rows = 0;    // rows of logits per forward call
  int64_t kv_blocks = 0;         // blocks of the KV cache pool; 0: every slot's full context
  KvCacheType kv_cache = KvCacheType::automatic;  // entry type, where the backend has a choice

  // Entries of one slot's block table.
  int64_t blocks_per_seq() const { return (max_context + kKvBlockSize - 1) / kKvBlockSize; }
  int64_t pool_blocks() const { return kv_blocks > 0 ? kv_blocks : max_seqs * blocks_per_seq(); }
};

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

}  // namespace kestrel
