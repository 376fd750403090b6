#include "runtime/planner.h"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <tuple>

#include "bench/config.h"
#include "io/safetensors.h"
#include "model/gguf_model.h"
#include "model/loader.h"
#include "model/prequant.h"
#include "model/shard.h"

namespace kestrel {

namespace {

// Metadata keys of a converted model (model/loader.cpp writes them).
constexpr const char* kConvertedVersionKey = "kestrel.format_version";
constexpr const char* kConvertedFormatKey = "kestrel.low_bit";
constexpr const char* kConvertedBlockKey = "kestrel.block";

// Every matrix of the tensor list can be stored in the format (the loader's check and message).
Status check_matrix_shapes(const WeightSpec& spec) {
  const ModelWeights skeleton = weights_skeleton(spec.config);
  return for_each_tensor(skeleton, [&](const TensorInfo& t, const auto&) -> Status {
    if (!t.is_matrix() || t.tied) return Status::ok();
    return check_weight_shape(spec.format, t.rows, t.cols, spec.block, t.name);
  });
}

// The converted model's own format and block, or nothing for an HF directory.
Status read_converted_format(const TensorSource& source, WeightSpec& spec, bool* converted) {
  const auto& meta = source.metadata();
  *converted = meta.count(kConvertedVersionKey) != 0;
  if (!*converted) return Status::ok();
  const auto format_it = meta.find(kConvertedFormatKey);
  const auto block_it = meta.find(kConvertedBlockKey);
  if (format_it == meta.end() || block_it == meta.end()) {
    return Status::error(source.where() + ": converted model metadata lacks " +
                         kConvertedFormatKey + " or " + kConvertedBlockKey);
  }
  KS_ASSIGN_OR_RETURN(spec.format, parse_format(format_it->second));
  Result<int> block = parse_block(block_it->second, spec.format);
  if (!block.is_ok()) {
    return block.status().with_context(source.where() + ": metadata " + kConvertedBlockKey);
  }
  spec.block = *block;
  return Status::ok();
}

size_t fp32_bytes(int64_t n) {
  return size_t(n) * sizeof(float);
}

}  // namespace

Result<WeightSpec> weight_spec_of(const std::string& source, WeightFormat format,
                                  bool format_explicit, int block) {
  WeightSpec spec;
  spec.format = format;
  spec.block = block;
  KS_ASSIGN_OR_RETURN(spec.config, load_model_config_of(source));
  if (is_gguf_source(source)) {
    KS_ASSIGN_OR_RETURN(GgufModel model, GgufModel::open(source));
    std::tie(spec.format, spec.block) = model.load_format(format, format_explicit, block);
  } else if (spec.config.prequant.method != PrequantMethod::none) {
    std::tie(spec.format, spec.block) =
        prequant_load_format(spec.config.prequant, format, format_explicit, block);
  } else if (!is_synthetic_source(source)) {
    // Only the headers are parsed; the tensor data stays unread in the mapping.
    KS_ASSIGN_OR_RETURN(TensorSource tensors, TensorSource::open_dir(source));
    bool converted = false;
    KS_RETURN_IF_ERROR(read_converted_format(tensors, spec, &converted));
    if (converted && format_explicit && spec.format != format) {
      return Status::error(source + " is already converted to " + format_name(spec.format) +
                           "; converting to " + format_name(format) +
                           " needs the original HF model");
    }
  }
  KS_RETURN_IF_ERROR(check_matrix_shapes(spec));
  return spec;
}

size_t matrix_bytes(WeightFormat format, int64_t rows, int64_t cols, int block) {
  size_t bytes = size_t(rows) * size_t(double(cols) * data_bytes_per_weight(format));
  if (is_quantized(format)) {
    const size_t scale_bytes = size_t(rows) * size_t(cols / block) * sizeof(uint16_t);
    bytes += scale_bytes;
    if (format == WeightFormat::asym_int4) bytes += scale_bytes;  // mins
  }
  return bytes;
}

namespace {

// What the loader will build for `spec`, counted from the tensor list without building it.
WeightBytes planned_bytes(const WeightSpec& spec) {
  const ModelWeights skeleton = weights_skeleton(spec.config);
  return count_weight_bytes(skeleton, [&](const TensorInfo& t, const auto&) {
    if (!t.is_matrix()) return fp32_bytes(t.rows);
    return matrix_bytes(spec.format, t.rows, t.cols, spec.block) +
           (t.bias ? fp32_bytes(t.rows) : 0);
  });
}

}  // namespace

size_t planned_weight_bytes(const WeightSpec& spec) {
  return planned_bytes(spec).resident;
}

size_t planned_decode_bytes(const WeightSpec& spec) {
  return planned_bytes(spec).decode;
}

Result<WeightSpec> rank_weight_spec(const WeightSpec& spec, int ranks) {
  if (ranks <= 1) return spec;
  KS_RETURN_IF_ERROR(check_tensor_parallel(spec.config, ranks, spec.format, spec.block));
  WeightSpec rank = spec;
  rank.config = shard_config(spec.config, shard_plan(spec.config, 0, ranks));
  return rank;
}

int64_t layer_matrix_params(const ModelConfig& c) {
  return matrix_elements(c, false);
}

std::string format_bytes(size_t bytes) {
  char text[32];
  const double b = double(bytes);
  if (b >= 1e9) {
    std::snprintf(text, sizeof(text), "%.2f GB", b / 1e9);
  } else if (b >= 1e6) {
    std::snprintf(text, sizeof(text), "%.1f MB", b / 1e6);
  } else {
    std::snprintf(text, sizeof(text), "%.0f kB", b / 1e3);
  }
  return text;
}

std::string MemoryPlan::summary() const {
  return format_bytes(total_bytes()) + " (weights " + format_bytes(weight_bytes) + " + KV cache " +
         format_bytes(kv_cache_bytes) + " for " + std::to_string(shape.max_seqs) + " sequences x " +
         std::to_string(shape.max_context) + " positions + workspace " +
         format_bytes(workspace_bytes) + " at prefill chunk " + std::to_string(prefill_chunk) +
         " + logits " + format_bytes(logits_bytes) + " + reserve " + format_bytes(reserve_bytes) +
         ")";
}

Result<MemoryPlan> plan_memory(const PlanInputs& in, const MemoryBudget& budget,
                               const LayoutOf& layout_of) {
  if (in.batch_size <= 0 || in.num_beams <= 0) {
    return Status::error("batch_size and num_beams must be positive");
  }
  if (in.in_len <= 0 || in.out_len <= 0) {
    return Status::error("input and output lengths must be positive (in_out_pairs)");
  }
  if (in.prefill_chunk <= 0) return Status::error("prefill chunk must be positive");
  const ModelConfig& c = in.weights.config;
  const int64_t n_seqs = in.batch_size * in.num_beams;
  const int64_t context = in.in_len + in.out_len;
  if (c.max_position_embeddings > 0 && context > c.max_position_embeddings) {
    return Status::error("input + output = " + std::to_string(context) +
                         " tokens exceed the model's max_position_embeddings (" +
                         std::to_string(c.max_position_embeddings) + "); lower in_out_pairs");
  }
  const size_t weights = planned_weight_bytes(in.weights);

  auto plan_for = [&](int64_t chunk) -> Result<MemoryPlan> {
    MemoryPlan plan;
    plan.prefill_chunk = chunk;
    plan.shape.max_seqs = n_seqs;
    plan.shape.max_context = context;
    // A decode step carries every sequence in one call; a prefill chunk carries the prompts of
    // one or more sequences packed back to back (Engine::generate_batch).
    plan.shape.max_batch_tokens = std::max(chunk, n_seqs);
    plan.shape.max_logit_rows = n_seqs;
    KS_ASSIGN_OR_RETURN(WorkspaceLayout layout, layout_of(plan.shape));
    plan.weight_bytes = weights;
    plan.kv_cache_bytes = layout.kv_cache_bytes();
    plan.workspace_bytes = layout.workspace_bytes();
    plan.logits_bytes = layout.logits_bytes();
    if (in.host_logits) plan.logits_bytes += fp32_bytes(n_seqs * c.vocab_size);
    plan.reserve_bytes = in.reserve_bytes;
    plan.budget_bytes = budget.bytes;
    return plan;
  };

  int64_t chunk = std::min(in.prefill_chunk, in.in_len * in.batch_size);
  for (;;) {
    KS_ASSIGN_OR_RETURN(MemoryPlan plan, plan_for(chunk));
    if (plan.total_bytes() <= budget.bytes) return plan;
    if (chunk <= kMinPrefillChunk) {
      std::string message = "needs " + plan.summary() + " but ";
      if (budget.from_flag) {
        message += budget.source + " allows " + format_bytes(budget.bytes) +
                   "; raise --max-memory, or lower batch_size or in_out_pairs";
      } else {
        message += "only " + format_bytes(budget.bytes) + " is available (" + budget.source +
                   "); lower batch_size or in_out_pairs, or choose a smaller low_bit";
      }
      return Status::error(message);
    }
    chunk = std::max(chunk / 2, kMinPrefillChunk);
  }
}

Result<int64_t> kv_blocks_that_fit(const LayoutOf& layout_of, RunShape shape,
                                   const MemoryBudget& available, double fraction) {
  shape.kv_blocks = 1;
  KS_ASSIGN_OR_RETURN(const WorkspaceLayout one, layout_of(shape));
  shape.kv_blocks = 2;
  KS_ASSIGN_OR_RETURN(const WorkspaceLayout two, layout_of(shape));
  const size_t per_block = two.kv_cache_bytes() - one.kv_cache_bytes();
  const size_t fixed = one.total_bytes() - one.kv_cache_bytes();
  const size_t budget = size_t(double(available.bytes) * fraction);
  const int64_t blocks =
      budget > fixed && per_block > 0 ? int64_t((budget - fixed) / per_block) : 0;
  if (blocks < shape.blocks_per_seq()) {
    return Status::error(
        "the KV cache cannot hold one full context: " + format_bytes(budget) + " (" +
        std::to_string(int(fraction * 100)) + "% of the " + format_bytes(available.bytes) + " of " +
        available.source + ") less the workspace's " + format_bytes(fixed) + " leaves " +
        std::to_string(blocks) + " blocks of " + std::to_string(kKvBlockSize) + " positions, " +
        std::to_string(shape.blocks_per_seq()) + " needed; " +
        (available.from_flag ? "raise the memory cap, or " : "") +
        // The workspace alone taking the budget, a shorter context cannot help.
        (budget > fixed ? "lower the context length" : "lower the tokens per call"));
  }
  return blocks;
}

RunShape requested_shape(const EngineOptions& options, const ModelConfig& config,
                         WeightFormat format) {
  RunShape shape = options.run_shape;
  if (shape.kv_cache == KvCacheType::automatic) {
    shape.kv_cache = resolve_kv_cache(options.kv_cache, format);
  }
  if (shape.max_batch_tokens > 0) return shape;
  int64_t max_context = options.max_context;
  if (max_context <= 0) {
    max_context = config.max_position_embeddings > 0
                      ? std::min<int64_t>(config.max_position_embeddings, 4096)
                      : 4096;
  }
  shape.max_seqs = options.max_seqs;
  shape.max_context = max_context;
  // A call never holds more tokens than every slot's whole context (as llama.cpp clamps
  // n_batch to n_ctx): `-b 8192` with `-c 64` sized its logits for 8192 rows (4.2 GB).
  const int64_t every_position = max_context > 0 && options.max_seqs > INT64_MAX / max_context
                                     ? INT64_MAX
                                     : options.max_seqs * max_context;
  shape.max_batch_tokens =
      std::min(std::max(options.prefill_chunk, options.max_seqs), every_position);
  shape.max_logit_rows = shape.max_batch_tokens;
  shape.kv_blocks = options.kv_blocks;
  return shape;
}

Result<size_t> parse_max_memory(const std::string& text) {
  KS_ASSIGN_OR_RETURN(size_t bytes, bench::parse_size(text));
  if (bytes == 0) return Status::error("must be more than 0 bytes");
  return bytes;
}

std::optional<RunShape> smaller_chunk_shape(const EngineOptions& options, const ModelConfig& config,
                                            WeightFormat format, const RunShape& shape) {
  if (options.run_shape.max_batch_tokens > 0 ||
      shape.max_batch_tokens <= std::max(shape.max_seqs, kMinPrefillChunk)) {
    return std::nullopt;
  }
  EngineOptions smaller = options;
  smaller.prefill_chunk = std::max(shape.max_batch_tokens / 2, kMinPrefillChunk);
  return requested_shape(smaller, config, format);
}

Result<RunShape> fit_prefill_chunk(const EngineOptions& options, const ModelConfig& config,
                                   WeightFormat format, const FitShape& fit) {
  RunShape shape = requested_shape(options, config, format);
  for (;;) {
    Result<RunShape> fitted = fit(shape);
    if (fitted.is_ok()) return fitted;
    const std::optional<RunShape> smaller = smaller_chunk_shape(options, config, format, shape);
    if (!smaller) return fitted;
    shape = *smaller;
  }
}

std::string what_to_lower(const EngineOptions& options, const RunShape& shape) {
  std::vector<std::string> parts = {"the context length (max_context)"};
  // The engine halves the chunk no further than kMinPrefillChunk, but a caller may set it lower,
  // down to a decode step of max_seqs tokens: a call's logit rows can be most of a plan (16 rows
  // of a 151936-word vocabulary are 9.7 MB).
  if (options.run_shape.max_batch_tokens > 0 || shape.max_batch_tokens > shape.max_seqs) {
    parts.push_back("the tokens per call (prefill_chunk)");
  }
  if (shape.max_seqs > 1) parts.push_back("the sequences decoded together (max_seqs)");
  std::string text = parts[0];
  for (size_t i = 1; i < parts.size(); ++i) {
    text += (i + 1 == parts.size() ? " or " : ", ") + parts[i];
  }
  return text;
}

int64_t prefill_chunk_of(const EngineOptions& options, const RunShape& shape) {
  return std::min(options.prefill_chunk, shape.max_batch_tokens);
}

std::string max_memory_name(const EngineOptions& options) {
  return options.max_memory_text.empty() ? "max_memory " + format_bytes(options.max_memory)
                                         : options.max_memory_text;
}

std::optional<WeightSpec> rank_spec_before_load(const std::string& source, WeightFormat format,
                                                bool format_explicit, int block, int ranks) {
  Result<WeightSpec> spec = weight_spec_of(source, format, format_explicit, block);
  if (!spec.is_ok()) return std::nullopt;
  Result<WeightSpec> rank = rank_weight_spec(*spec, ranks);
  if (!rank.is_ok()) return std::nullopt;
  return *rank;
}

Status check_max_memory(const EngineOptions& options, const Backend& backend) {
  if (options.max_memory == 0) return Status::ok();
  const std::optional<WeightSpec> rank =
      rank_spec_before_load(options.model, options.format.value_or(WeightFormat::sym_int4),
                            options.format.has_value(), options.block, options.tensor_parallel);
  if (!rank) return Status::ok();
  // The ranks of a split on the CPU share the host's memory, and so the cap; a device's is its own.
  const size_t ranks =
      backend.free_memory() == 0 ? size_t(std::max(options.tensor_parallel, 1)) : 1;
  const size_t weights = ranks * planned_weight_bytes(*rank);
  const std::string cap = max_memory_name(options);
  const std::string shards = ranks > 1 ? " (its " + std::to_string(ranks) + " shards)" : "";
  if (weights > options.max_memory) {
    return Status::error(options.model + " in " + format_name(rank->format) + " needs " +
                         format_bytes(weights) + " of weights" + shards + " but " + cap +
                         " allows " + format_bytes(options.max_memory) +
                         "; raise the memory cap, or choose a smaller model or a lower-bit format");
  }
  const LayoutOf layout_of = [&](const RunShape& s) {
    return backend.reserve_layout(rank->config, s);
  };
  if (!layout_of(requested_shape(options, rank->config, rank->format)).is_ok()) {
    return Status::ok();  // a backend that cannot tell checks for itself
  }
  // With kv_memory_fraction the pool is sized once the weights are loaded; here it must at least
  // hold one context.
  const bool pool_from_memory =
      options.run_shape.max_batch_tokens <= 0 && options.kv_memory_fraction > 0;
  const MemoryBudget left{
      (options.max_memory - weights) / ranks,
      cap + " less the weights' " + format_bytes(weights) + (ranks > 1 ? ", a rank's share" : ""),
      true};
  const FitShape fit = [&](const RunShape& shape) -> Result<RunShape> {
    if (pool_from_memory) {
      KS_RETURN_IF_ERROR(
          kv_blocks_that_fit(layout_of, shape, left, options.kv_memory_fraction).status());
      return shape;
    }
    KS_ASSIGN_OR_RETURN(const WorkspaceLayout layout, layout_of(shape));
    const size_t needed = weights + ranks * layout.total_bytes();
    if (needed <= options.max_memory) return shape;
    return Status::error(
        options.model + " needs " + format_bytes(needed) + " (weights " + format_bytes(weights) +
        " + KV cache " + format_bytes(ranks * layout.kv_cache_bytes()) + " for " +
        std::to_string(shape.max_seqs) + " sequences x " + std::to_string(shape.max_context) +
        " positions + workspace " + format_bytes(ranks * layout.workspace_bytes()) +
        " for calls of " + std::to_string(shape.max_batch_tokens) + " tokens + logits " +
        format_bytes(ranks * layout.logits_bytes()) + ")" + shards + " but " + cap + " allows " +
        format_bytes(options.max_memory) + "; raise the memory cap, or lower " +
        what_to_lower(options, shape));
  };
  return fit_prefill_chunk(options, rank->config, rank->format, fit).status();
}

Result<size_t> host_available_memory() {
  std::ifstream file("/proc/meminfo");
  if (!file) return Status::error("/proc/meminfo: cannot read (needed for free host memory)");
  std::string line;
  while (std::getline(file, line)) {
    if (line.rfind("MemAvailable:", 0) != 0) continue;
    std::istringstream fields(line.substr(13));
    uint64_t kib = 0;
    std::string unit;
    if (!(fields >> kib >> unit) || unit != "kB") break;
    return size_t(kib) * 1024;
  }
  return Status::error("/proc/meminfo: no MemAvailable line (needed for free host memory)");
}

}  // namespace kestrel
