// Building ModelWeights from a Hugging Face directory, a Kestrel-converted directory or a
// synthetic preset, and saving converted models.
#pragma once

#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "model/weights.h"

namespace kestrel {

struct LoadOptions {
  WeightFormat format = WeightFormat::sym_int4;
  int block = 32;
  // False when the caller did not ask for a format: a converted model then keeps its own.
  bool format_explicit = false;
  bool progress = true;
};

// `source` is a model directory (HF or converted) or "synthetic:NAME".
Result<ModelWeights> load_model(const std::string& source, const LoadOptions& options,
                                ThreadPool& pool);

// A model split over `world` ranks (model/shard.h): the whole model's config, format, block,
// warnings and notes without tensors, and rank i's weights at shards[i].
struct ShardedModel {
  ModelWeights whole;
  std::vector<ModelWeights> shards;
};
// An HF checkpoint is read straight into the shards: each rank's rows and columns of the mapped
// file are converted, and nothing else. Other sources load whole and each rank copies its
// blocks out (shard_weights). Fails, naming the number, when the model does not split `world`
// ways in the format (check_tensor_parallel).
Result<ShardedModel> load_model_shards(const std::string& source, const LoadOptions& options,
                                       ThreadPool& pool, int world);

// Just the config of `source`, without touching weights (the memory planner uses this).
Result<ModelConfig> load_model_config_of(const std::string& source);

// Writes `weights` to OUT_DIR: model.safetensors (Kestrel layout plus metadata), config.json,
// generation_config.json, and the tokenizer files of `source_dir` when it has them. Everything is
// written into a temporary sibling directory renamed to OUT_DIR at the end, so an interrupted
// conversion never leaves a half-written model there. OUT_DIR must not be `source_dir`; an
// OUT_DIR with files in it is replaced only when `replace_existing`.
// The checks save_converted makes before writing, to run before a long conversion.
Status check_convert_target(const std::string& source_dir, const std::string& out_dir,
                            bool replace_existing);
Status save_converted(const ModelWeights& weights, const std::string& source_dir,
                      const std::string& out_dir, bool replace_existing = false);

// Synthetic presets: real architecture configs, seeded random weights.
std::vector<std::string> synthetic_names();
// Whether `source` names a synthetic preset ("synthetic:NAME").
bool is_synthetic_source(const std::string& source);
Result<ModelConfig> synthetic_config(const std::string& name);

}  // namespace kestrel
