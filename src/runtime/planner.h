// The memory plan: before a configuration runs, before its weights are even built, predict its
// peak memory and choose the prefill chunk, or fail at once with the numbers and what to change.
//
//   peak = weights                      exactly what the loader allocates (planned_weight_bytes)
//        + KV cache                     batch x beams x (in + out) x layers x 2 x kv_dim x bytes
//        + workspace of one chunk       the backend's scratch and attention rows for the chunk
//        + logits                       the final head's rows, and their host copy when the
//                                       device's memory is the host's (CPU)
//        + reserve                      what the process or device adds beyond those buffers
//
// The KV cache and workspace come from the backend's reserve_layout(), the function its
// reserve() allocates from, so the plan and the allocation cannot drift. The benchmark records
// the plan next to the measured peak of every configuration (bench/runner.h says how it
// measures).
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>

#include "backend/backend.h"
#include "core/status.h"
#include "io/config.h"
#include "kestrel/engine.h"
#include "quant/format.h"

namespace kestrel {

// What load_model() will build for a source: enough to count its bytes without building it.
struct WeightSpec {
  ModelConfig config;
  WeightFormat format = WeightFormat::sym_int4;
  int block = 32;  // weights per scale; ignored for fp32/fp16/bf16
};

// Reads the config (and, for a converted directory, its own format from the safetensors
// header) of `source`, as load_model(source, ...) will see it; which tensors exist, biases
// included, follows from the config through the tensor list (model/weights.h).
// `format`/`format_explicit`/`block` are the LoadOptions the load will get. Checks that every
// matrix can be stored in the format, with the loader's message when not.
Result<WeightSpec> weight_spec_of(const std::string& source, WeightFormat format,
                                  bool format_explicit, int block);

// Bytes of one [rows, cols] matrix in `format`: data, plus fp16 scales (and mins) per block.
size_t matrix_bytes(WeightFormat format, int64_t rows, int64_t cols, int block);
// What the loader allocates for `spec`: the tensor list of its config counted with
// matrix_bytes() and fp32 vectors (count_weight_bytes). Equal to ModelWeights::resident_bytes()
// of the loaded model.
size_t planned_weight_bytes(const WeightSpec& spec);
// Bytes one decode step streams: ModelWeights::decode_bytes() of the loaded model.
size_t planned_decode_bytes(const WeightSpec& spec);
// What each rank of `spec` split over `ranks` plans for: rank 0's shard (every rank holds its
// shapes), checked with check_tensor_parallel; `spec` itself for one rank.
Result<WeightSpec> rank_weight_spec(const WeightSpec& spec, int ranks);
// One rank's spec of `source` split `ranks` ways (weight_spec_of, then rank_weight_spec), for
// the checks made before a load; nothing when the source or the split cannot be read (the load
// then reports why).
std::optional<WeightSpec> rank_spec_before_load(const std::string& source, WeightFormat format,
                                                bool format_explicit, int block, int ranks);
// Multiply-accumulate weights of the layers and of the lm_head (for the compute estimates).
int64_t layer_matrix_params(const ModelConfig& config);

// The memory a run may use and where that limit comes from (named in failures).
struct MemoryBudget {
  size_t bytes = 0;
  std::string source;      // "--max-memory 4GiB", "MemAvailable", "free device memory"
  bool from_flag = false;  // the failure then says to raise --max-memory
};

struct PlanInputs {
  WeightSpec weights;
  int64_t batch_size = 1;
  int64_t num_beams = 1;
  int64_t in_len = 0;
  int64_t out_len = 0;
  int64_t prefill_chunk = 512;  // wanted; halved while the plan does not fit
  size_t reserve_bytes = 0;
  bool host_logits = true;  // the host copy of the logits lives in the planned memory (CPU)
};

struct MemoryPlan {
  RunShape shape;  // what reserve() gets; shape.max_batch_tokens bounds the prefill chunk
  int64_t prefill_chunk = 0;
  size_t weight_bytes = 0;
  size_t kv_cache_bytes = 0;
  size_t workspace_bytes = 0;
  size_t logits_bytes = 0;
  size_t reserve_bytes = 0;
  size_t budget_bytes = 0;

  size_t total_bytes() const {
    return weight_bytes + kv_cache_bytes + workspace_bytes + logits_bytes + reserve_bytes;
  }
  // "1.23 GB (weights 980.0 MB + KV cache 200.0 MB + workspace 30.0 MB at prefill chunk 512 +
  // logits 10.0 MB + reserve 8.0 MB)"
  std::string summary() const;
};

// Prefill chunks are not shrunk below this: smaller chunks make prefill a series of
// decode-sized calls while saving almost nothing once the chunk's workspace is small.
constexpr int64_t kMinPrefillChunk = 16;

// The reservation of `shape` in the backend that will run it.
using LayoutOf = std::function<Result<WorkspaceLayout>(const RunShape& shape)>;

// The plan with the largest prefill chunk (the wanted one, halved down to kMinPrefillChunk) whose
// peak fits `budget`. When none fits, the error names the smallest peak, its parts, the budget
// and the setting to change.
Result<MemoryPlan> plan_memory(const PlanInputs& inputs, const MemoryBudget& budget,
                               const LayoutOf& layout_of);

// The KV cache pool for `shape` (its kv_blocks ignored): the most blocks whose reservation, with
// the shape's workspace, takes at most `fraction` of `available.bytes` (its source names that
// memory in the error, which says to raise --max-memory when that is the limit). Fails when that
// is less than one full context.
Result<int64_t> kv_blocks_that_fit(const LayoutOf& layout_of, RunShape shape,
                                   const MemoryBudget& available, double fraction);

// The reservation `options` ask Engine::create for on a model of `config` loaded as `format`:
// options.run_shape when its max_batch_tokens is set; else max_seqs slots of max_context positions
// (0: min(max_position_embeddings, 4096)), calls of up to prefill_chunk tokens and a pool of
// kv_blocks, which kv_memory_fraction replaces once the weights are loaded.
RunShape requested_shape(const EngineOptions& options, const ModelConfig& config,
                         WeightFormat format);

// The next smaller reservation to try when `shape` (requested_shape() of `options`, or one this
// gave before) does not fit its memory: requested_shape() with the prefill chunk halved, never
// below kMinPrefillChunk nor a decode step of max_seqs. Nothing when `shape` is the smallest,
// or when it is options.run_shape, which the caller decided beforehand (the benchmark, from its
// own plan) and is reserved as it is.
std::optional<RunShape> smaller_chunk_shape(const EngineOptions& options, const ModelConfig& config,
                                            WeightFormat format, const RunShape& shape);

// A reservation made to fit its memory: the shape to reserve (kv_memory_fraction's pool sized
// in it), or why it does not fit.
using FitShape = std::function<Result<RunShape>(const RunShape& shape)>;

// What DESIGN.md's memory plan does before a run, for the engine: requested_shape() of
// `options` as `fit` makes it, and while `fit` refuses, smaller_chunk_shape()'s, so the largest
// prefill chunk that fits. When none does, `fit`'s error for the smallest.
Result<RunShape> fit_prefill_chunk(const EngineOptions& options, const ModelConfig& config,
                                   WeightFormat format, const FitShape& fit);

// What an error about a reservation of `shape` that does not fit says to lower: the context
// length; the tokens per call while a call carries more than a decode step of max_seqs (below
// kMinPrefillChunk too, where the engine stops halving but a caller may not), or the shape is the
// caller's own; and the sequences, when there are several.
std::string what_to_lower(const EngineOptions& options, const RunShape& shape);

// The prefill chunk the engine runs `shape` with: options.prefill_chunk within the shape's
// tokens per call (Engine::chunk_tokens).
int64_t prefill_chunk_of(const EngineOptions& options, const RunShape& shape);

// EngineOptions::max_memory as errors name it: max_memory_text, or "max_memory" and its bytes.
std::string max_memory_name(const EngineOptions& options);

// EngineOptions::max_memory against the plan, before any weight is read or built: the weights
// options.model loads into (planned_weight_bytes; every rank's when `backend` has no memory of its
// own, as the ranks then share the host's) and a reservation on `backend` that
// fit_prefill_chunk() gives, or with kv_memory_fraction a pool of one full context beside it,
// must fit the cap. Ok without a cap, and when the source, the split or the backend's layout
// cannot be read (the load then says why).
Status check_max_memory(const EngineOptions& options, const Backend& backend);

// Bytes of memory the host could give this process now (MemAvailable of /proc/meminfo): the
// engine checks host reservations against it, the benchmark plans with it.
Result<size_t> host_available_memory();

// "1.50 GB", "12.3 MB", "512 kB" (decimal units, as the benchmark's columns).
std::string format_bytes(size_t bytes);

}  // namespace kestrel
