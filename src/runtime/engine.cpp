#include "kestrel/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>

#include "backend/backend.h"
#include "backend/cuda_module.h"
#include "backend/host_communicator.h"
#include "core/argmax.h"
#include "core/thread_pool.h"
#include "io/config.h"
#include "model/forward.h"
#include "model/loader.h"
#include "model/shard.h"
#include "model/weights.h"
#include "runtime/kv_cache.h"
#include "runtime/planner.h"
#include "runtime/tensor_parallel.h"
#include "sample/beam.h"

namespace kestrel {

namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
// The memory a reservation on `backend` may take: its device's free memory, or the host's
// MemAvailable when it has none of its own, and at most what EngineOptions::max_memory leaves
// beside `weights` (the weight bytes in that memory: every rank's on the host). Unset when
// neither figure is known.
std::optional<MemoryBudget> memory_left(const Backend& backend, const EngineOptions& options,
                                        size_t weights) {
  std::optional<MemoryBudget> left;
  if (const size_t device_free = backend.free_memory(); device_free > 0) {
    left = MemoryBudget{device_free, "free device memory", false};
  } else if (Result<size_t> host = host_available_memory(); host.is_ok()) {
    left = MemoryBudget{*host, "MemAvailable of the host", false};
  }
  if (options.max_memory > 0) {
    const size_t capped = options.max_memory > weights ? options.max_memory - weights : 0;
    if (!left || capped < left->bytes) {
      left = MemoryBudget{
          capped, max_memory_name(options) + " less the weights' " + format_bytes(weights), true};
    }
  }
  return left;
}

// The weight bytes that share rank `rank`'s memory with its reservation, as memory_left() counts
// them: a split on the host shares one memory, so every rank's; a device holds its own shard's.
size_t weights_beside(const ModelWeights& weights, const TensorParallel* tp, int rank) {
  if (tp == nullptr) return weights.resident_bytes();
  return tp->backend(rank).free_memory() == 0 ? tp->resident_bytes()
                                              : tp->shard(rank).resident_bytes();
}

// Refuses a reservation larger than the memory it would come from, before allocating any of it:
// a huge context must fail with its numbers, not with std::bad_alloc or the OOM killer.
// `host_ranks` backends of this shape share the host's memory when the backend has none of its
// own (the ranks of a model split over CPU backends); `weights` as memory_left() counts them.
Status check_reservation_fits(const Backend& backend, const ModelConfig& config,
                              const RunShape& shape, const EngineOptions& options, size_t weights,
                              int host_ranks = 1) {
  Result<WorkspaceLayout> layout = backend.reserve_layout(config, shape);
  if (!layout.is_ok()) return Status::ok();  // a backend that cannot tell checks for itself
  const std::optional<MemoryBudget> left = memory_left(backend, options, weights);
  if (!left) return Status::ok();
  const size_t needed = layout->total_bytes() * size_t(backend.free_memory() == 0 ? host_ranks : 1);
  if (needed <= left->bytes) return Status::ok();
  const std::string change = (left->from_flag ? "raise the memory cap, or lower " : "lower ") +
                             what_to_lower(options, shape);
  return Status::error(
      "the KV cache (" + format_bytes(layout->kv_cache_bytes()) + " for " +
      std::to_string(shape.pool_blocks()) + " blocks of " + std::to_string(kKvBlockSize) +
      " positions; " + std::to_string(shape.max_seqs) + " sequences x " +
      std::to_string(shape.max_context) + " positions) and workspace (calls of " +
      std::to_string(shape.max_batch_tokens) + " tokens) need " + format_bytes(needed) +
      " but only " + format_bytes(left->bytes) + " is free (" + left->source + "); " + change);
}

// The limits of a reservation that memory has no say in.
Status check_run_shape(const RunShape& shape) {
  if (shape.max_seqs <= 0 || shape.max_context <= 0 || shape.max_batch_tokens <= 0 ||
      shape.max_logit_rows <= 0) {
    return Status::error(
        "run shape needs positive sequences, context, batch tokens and logit rows");
  }
  if (shape.kv_blocks < 0 || (shape.kv_blocks > 0 && shape.kv_blocks < shape.blocks_per_seq())) {
    return Status::error("a KV cache pool of " + std::to_string(shape.kv_blocks) +
                         " blocks cannot hold one full context (" +
                         std::to_string(shape.blocks_per_seq()) + " blocks of " +
                         std::to_string(kKvBlockSize) + " positions)");
  }
  if (shape.pool_blocks() > std::numeric_limits<int32_t>::max()) {
    return Status::error("a KV cache pool of " + std::to_string(shape.pool_blocks()) +
                         " blocks is past the limit of " +
                         std::to_string(std::numeric_limits<int32_t>::max()));
  }
  if (shape.max_context > std::numeric_limits<int32_t>::max()) {
    return Status::error("context length " + std::to_string(shape.max_context) +
                         " is past the limit of " +
                         std::to_string(std::numeric_limits<int32_t>::max()) + " positions");
  }
  return Status::ok();
}

// check_reservation_fits() for the reservation of `shape` on `backend`, or on every rank of `tp`
// when the model is split (`weights` then the whole model's).
Status check_ranks_fit(const Backend& backend, const TensorParallel* tp,
                       const ModelWeights& weights, const RunShape& shape,
                       const EngineOptions& options) {
  if (tp == nullptr) {
    return check_reservation_fits(backend, weights.config, shape, options,
                                  weights_beside(weights, nullptr, 0));
  }
  for (int r = 0; r < tp->world_size(); ++r) {
    KS_RETURN_IF_ERROR(check_reservation_fits(tp->backend(r), tp->shard(r).config, shape, options,
                                              weights_beside(weights, tp, r), tp->world_size()));
  }
  return Status::ok();
}

// A synthetic model is built in host memory before it is uploaded (split, each rank builds its
// own shard): refuse one that the host cannot hold, before building any of it, instead of
// meeting the OOM killer.
Status check_synthetic_fits_host(const std::string& source, const LoadOptions& load,
                                 int tensor_parallel) {
  if (!is_synthetic_source(source)) return Status::ok();
  const std::optional<WeightSpec> rank =
      rank_spec_before_load(source, load.format, load.format_explicit, load.block, tensor_parallel);
  if (!rank) return Status::ok();  // the load reports what is wrong with the source or split
  const size_t needed = size_t(tensor_parallel) * planned_weight_bytes(*rank);
  Result<size_t> available = host_available_memory();
  if (!available.is_ok() || needed <= *available) return Status::ok();
  return Status::error(
      source + " in " + format_name(rank->format) +
      " is built in host memory: " + format_bytes(needed) +
      (tensor_parallel > 1 ? " (its " + std::to_string(tensor_parallel) + " shards)" : "") +
      " but only " + format_bytes(*available) +
      " is available (MemAvailable of the host); choose a smaller model or a "
      "lower --low-bit");
}

}  // namespace

int32_t argmax(const float* values, int64_t n) {
  return row_argmax(values, n);
}

Engine::Engine() : weights_(std::make_unique<ModelWeights>()) {}
Engine::~Engine() = default;

const ModelConfig& Engine::config() const {
  return weights_->config;
}

ModelInfo Engine::info() const {
  const ModelConfig& c = weights_->config;
  ModelInfo info;
  info.architecture = architecture_name(c.arch);
  info.vocab_size = c.vocab_size;
  info.hidden_size = c.hidden_size;
  info.n_layers = c.n_layers;
  info.n_heads = c.n_heads;
  info.n_kv_heads = c.n_kv_heads;
  info.head_dim = c.head_dim;
  info.max_position_embeddings = c.max_position_embeddings;
  info.intermediate_size = c.intermediate_size;
  info.rms_norm_eps = c.rms_norm_eps;
  info.rope_theta = c.rope_theta;
  info.tie_word_embeddings = c.tie_word_embeddings;
  info.bos_token_id = c.bos_token_id;
  info.eos_token_ids = c.eos_token_ids;
  info.format = weights_->format;
  info.weight_bytes =
      tensor_parallel_ ? tensor_parallel_->resident_bytes() : weights_->resident_bytes();
  info.decode_bytes =
      tensor_parallel_ ? tensor_parallel_->decode_bytes() : weights_->decode_bytes();
  info.tensor_parallel = options_.tensor_parallel;
  info.backend = tensor_parallel_ ? tensor_parallel_->backend(0).name() : backend_->name();
  if (tensor_parallel_) info.backend += " x" + std::to_string(tensor_parallel_->world_size());
  info.warnings = weights_->warnings;
  return info;
}
namespace {
Status check_threads(int threads) {
  if (threads >= 0 && threads <= kMaxThreads) return Status::ok();
  return Status::error("threads must be between 0 (all) and " + std::to_string(kMaxThreads) +
                       ", got " + std::to_string(threads));
}

// Every draw names one of the batch's logit rows (`who`: the entry point, for the message).
Status check_draw_rows(const char* who, const Batch& batch, const std::vector<RowDraw>& draws) {
  for (const RowDraw& d : draws) {
    if (d.row < 0 || size_t(d.row) >= batch.logit_rows.size()) {
      return Status::error(std::string(who) + ": a draw from row " + std::to_string(d.row) +
                           " of " + std::to_string(batch.logit_rows.size()) + " logit rows");
    }
  }
  return Status::ok();
}
}  // namespace

Result<std::unique_ptr<Engine>> Engine::create(const EngineOptions& options) {
  KS_RETURN_IF_ERROR(check_threads(options.threads));
  KS_ASSIGN_OR_RETURN(
      std::unique_ptr<Backend> backend,
      make_backend(options.device, threads_per_rank(options.threads, options.tensor_parallel)));
  return create(options, std::move(backend));
}

Backend& Engine::backend() {
  return tensor_parallel_ ? tensor_parallel_->backend(0) : *backend_;
}

Status Engine::split(std::unique_ptr<Backend> rank0, std::vector<ModelWeights> shards) {
  const int ranks = options_.tensor_parallel;
  const std::string device = options_.device == "auto" ? default_device() : options_.device;
  DeviceGroup group;
  if (device == "cpu") {
    group.backends.push_back(std::move(rank0));
    for (int r = 1; r < ranks; ++r) {
      KS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> b,
                          make_backend("cpu", threads_per_rank(options_.threads, ranks)));
      group.backends.push_back(std::move(b));
    }
    group.comms = make_host_communicators(ranks);
  } else if (device == "cuda") {
    rank0.reset();  // the group makes every rank's backend on its own device
    KS_ASSIGN_OR_RETURN(group, load_cuda_group(ranks));
  } else {
    return Status::error("tensor parallelism: no communicator for device " + device);
  }
  KS_ASSIGN_OR_RETURN(tensor_parallel_,
                      TensorParallel::create(weights_->config, std::move(shards),
                                             std::move(group.backends), std::move(group.comms)));
  return Status::ok();
}

Result<std::unique_ptr<Engine>> Engine::create(const EngineOptions& options,
                                               std::unique_ptr<Backend> backend) {
  const auto start = std::chrono::steady_clock::now();
  std::unique_ptr<Engine> engine(new Engine());
  engine->options_ = options;
  KS_RETURN_IF_ERROR(check_threads(options.threads));
  if (options.max_seqs <= 0) return Status::error("max sequences must be positive");
  if (options.prefill_chunk <= 0) return Status::error("prefill chunk must be positive");
  if (backend == nullptr) return Status::error("engine needs a backend");
  if (options.tensor_parallel < 1) {
    return Status::error("tensor_parallel must be at least 1, got " +
                         std::to_string(options.tensor_parallel));
  }
  if (options.kv_memory_fraction > 1) {
    return Status::error("KV memory fraction must be in (0, 1], got " +
                         std::to_string(options.kv_memory_fraction));
  }
  // A cap the model cannot fit fails here, before a byte of its weights is read or built.
  KS_RETURN_IF_ERROR(check_max_memory(options, *backend));
  engine->backend_ = std::move(backend);
  std::vector<ModelWeights> shards;
  {
    ThreadPool load_pool(options.threads);
    LoadOptions load;
    load.format = options.format.value_or(WeightFormat::sym_int4);
    load.format_explicit = options.format.has_value();
    load.block = options.block;
    load.progress = options.progress;
    KS_RETURN_IF_ERROR(check_synthetic_fits_host(options.model, load, options.tensor_parallel));
    if (options.tensor_parallel > 1) {
      // Each rank's weights; the engine keeps the whole model's config, format and notes.
      KS_ASSIGN_OR_RETURN(ShardedModel sharded, load_model_shards(options.model, load, load_pool,
                                                                  options.tensor_parallel));
      *engine->weights_ = std::move(sharded.whole);
      shards = std::move(sharded.shards);
    } else {
      KS_ASSIGN_OR_RETURN(*engine->weights_, load_model(options.model, load, load_pool));
    }
  }
  if (options.tensor_parallel > 1) {
    KS_RETURN_IF_ERROR(engine->split(std::move(engine->backend_), std::move(shards)));
  } else {
    KS_RETURN_IF_ERROR(engine->backend_->upload(*engine->weights_));
  }
  // Split, every rank holds the same share of each block: rank 0's device sizes the pool.
  const Backend& rank0 = engine->backend();
  const TensorParallel* tp = engine->tensor_parallel_.get();
  const ModelConfig& rank_config = tp ? tp->shard(0).config : engine->weights_->config;
  const std::optional<MemoryBudget> left =
      memory_left(rank0, options, weights_beside(*engine->weights_, tp, /*rank=*/0));
  const bool pool_from_memory =
      options.run_shape.max_batch_tokens <= 0 && options.kv_memory_fraction > 0;
  if (pool_from_memory && !left) return host_available_memory().status();
  std::optional<MemoryBudget> share = left;
  if (share && rank0.free_memory() == 0 && options.tensor_parallel > 1) {
    share->bytes /= size_t(options.tensor_parallel);
    share->source += ", a rank's share";
  }
  // The largest prefill chunk whose reservation, the pool sized beside it, fits every rank.
  const FitShape fit = [&](RunShape shape) -> Result<RunShape> {
    if (pool_from_memory) {
      KS_ASSIGN_OR_RETURN(shape.kv_blocks, kv_blocks_that_fit(
                                               [&](const RunShape& s) {
                                                 return rank0.reserve_layout(rank_config, s);
                                               },
                                               shape, *share, options.kv_memory_fraction));
    }
    KS_RETURN_IF_ERROR(check_run_shape(shape));
    KS_RETURN_IF_ERROR(check_ranks_fit(rank0, tp, *engine->weights_, shape, options));
    return shape;
  };
  const ModelConfig& config = engine->weights_->config;
  const WeightFormat format = engine->weights_->format;
  KS_ASSIGN_OR_RETURN(const RunShape shape, fit_prefill_chunk(options, config, format, fit));
  const int64_t wanted = prefill_chunk_of(options, requested_shape(options, config, format));
  if (const int64_t chunk = prefill_chunk_of(options, shape); chunk < wanted) {
    // Said once, with the load's warnings (the CLI prints them).
    engine->weights_->warnings.push_back("prefill chunk " + std::to_string(wanted) + " -> " +
                                         std::to_string(chunk) + " tokens per call to fit " +
                                         (left ? left->source : std::string("the free memory")));
  }
  KS_RETURN_IF_ERROR(engine->reserve(shape));
  engine->load_seconds_ = seconds_since(start);
  return engine;
}

Status Engine::reserve(const RunShape& shape) {
  KS_RETURN_IF_ERROR(check_run_shape(shape));
  // Every check runs before anything is released: a shape refused here leaves the reservation
  // as it was (the Python package asks for a larger one per call, and its user may go on).
  KS_RETURN_IF_ERROR(
      check_ranks_fit(backend(), tensor_parallel_.get(), *weights_, shape, options_));
  const bool had_reservation = kv_cache_ != nullptr;
  const RunShape previous = run_shape_;
  kv_cache_.reset();
  max_context_ = 0;
  auto reserve_on_backend = [&](const RunShape& s) {
    return tensor_parallel_ ? tensor_parallel_->reserve(s) : backend_->reserve(config(), s);
  };
  // The host's block tables of a shape the backend now holds.
  auto take = [&](const RunShape& s) {
    kv_cache_ = std::make_unique<PagedKvCache>(s.pool_blocks(), s.max_seqs, s.blocks_per_seq());
    run_shape_ = s;
    max_context_ = s.max_context;
  };
  const Status reserved = reserve_on_backend(shape);
  if (!reserved.is_ok()) {
    // The backend may have freed the old buffers before it failed: the old shape is asked for
    // again, and failing that the engine has no reservation, which every call then names.
    if (had_reservation && reserve_on_backend(previous).is_ok()) take(previous);
    return reserved;
  }
  take(shape);
  return Status::ok();
}

Status Engine::check_reserved() const {
  if (kv_cache_) return Status::ok();
  return Status::error("the engine has no KV cache reservation (the last one failed)");
}

int64_t Engine::chunk_tokens() const {
  return prefill_chunk_of(options_, run_shape_);
}

Status Engine::prepare_kv_cache(const Batch& batch) {
  KS_RETURN_IF_ERROR(check_reserved());
  // The span of positions each slot writes; slots and positions out of range are left to the
  // backend's begin_batch, which names them.
  std::vector<std::pair<int32_t, int32_t>> span(size_t(run_shape_.max_seqs), {-1, -1});
  for (int64_t i = 0; i < batch.size(); ++i) {
    const int32_t seq = batch.seq_ids[size_t(i)];
    const int32_t pos = batch.positions[size_t(i)];
    if (seq < 0 || seq >= run_shape_.max_seqs || pos < 0 || pos >= run_shape_.max_context) continue;
    auto& [first, last] = span[size_t(seq)];
    first = first < 0 ? pos : std::min(first, pos);
    last = std::max(last, pos);
  }
  // Every block the call takes, new ones and private copies of shared ones, is counted first,
  // so a call the pool cannot serve fails with nothing taken.
  int64_t needed = 0;
  for (int32_t seq = 0; seq < int32_t(span.size()); ++seq) {
    const auto [first, last] = span[size_t(seq)];
    if (last < 0) continue;
    const int64_t held = int64_t(kv_cache_->table(seq).size());
    needed += kv_cache_->blocks_to_reserve(seq, int64_t(last) + 1);
    for (int64_t b = first / kKvBlockSize; b <= last / kKvBlockSize && b < held; ++b) {
      needed += kv_cache_->is_shared(seq, b) ? 1 : 0;
    }
  }
  if (needed > kv_cache_->available_blocks()) {
    return Status::error("the KV cache is full: the call needs " + std::to_string(needed) +
                         " more blocks of " + std::to_string(kKvBlockSize) +
                         " positions and only " + std::to_string(kv_cache_->available_blocks()) +
                         " of " + std::to_string(kv_cache_->n_blocks()) + " are free");
  }
  for (int32_t seq = 0; seq < int32_t(span.size()); ++seq) {
    const auto [first, last] = span[size_t(seq)];
    if (last < 0) continue;
    if (!kv_cache_->reserve(seq, int64_t(last) + 1)) {
      return Status::error("the KV cache could not give slot " + std::to_string(seq) +
                           " blocks up to position " + std::to_string(last));
    }
    for (int64_t b = first / kKvBlockSize; b <= last / kKvBlockSize; ++b) {
      KS_ASSIGN_OR_RETURN(auto copy, kv_cache_->make_writable(seq, b));
      if (copy) KS_RETURN_IF_ERROR(copy_kv_block(copy->first, copy->second));
    }
  }
  return Status::ok();
}

Status Engine::run(const Batch& batch, std::vector<float>* logits) {
  KS_RETURN_IF_ERROR(prepare_kv_cache(batch));
  const BlockTables tables{kv_cache_->tables(), kv_cache_->blocks_per_seq()};
  if (tensor_parallel_) return tensor_parallel_->forward(batch, tables, logits);
  return forward(*backend_, *weights_, batch, tables, logits);
}

Status Engine::run_argmax(const Batch& batch, std::vector<int32_t>* tokens) {
  KS_RETURN_IF_ERROR(prepare_kv_cache(batch));
  const BlockTables tables{kv_cache_->tables(), kv_cache_->blocks_per_seq()};
  if (tensor_parallel_) return tensor_parallel_->forward_argmax(batch, tables, tokens);
  return forward_argmax(*backend_, *weights_, batch, tables, tokens);
}

Status Engine::run_argmax(const Batch& batch, std::vector<int32_t>* tokens,
                          const std::vector<int32_t>& full_rows, std::vector<float>* logits) {
  return run_argmax(batch, tokens, full_rows, logits, {});
}

bool Engine::draws_on_device() const {
  return !tensor_parallel_ && backend_->draws_on_device();
}

Status Engine::run_argmax(const Batch& batch, std::vector<int32_t>* tokens,
                          const std::vector<int32_t>& full_rows, std::vector<float>* logits,
                          const std::vector<RowDraw>& draws) {
  if (!draws.empty() && tensor_parallel_) {
    return Status::error("run_argmax: draws on a model split over ranks (draws_on_device)");
  }
  KS_RETURN_IF_ERROR(check_draw_rows("run_argmax", batch, draws));
  for (const int32_t row : full_rows) {
    if (row < 0 || size_t(row) >= batch.logit_rows.size()) {
      return Status::error("run_argmax: logits of row " + std::to_string(row) + " of " +
                           std::to_string(batch.logit_rows.size()) + " logit rows");
    }
  }
  KS_RETURN_IF_ERROR(prepare_kv_cache(batch));
  const BlockTables tables{kv_cache_->tables(), kv_cache_->blocks_per_seq()};
  if (tensor_parallel_) {
    return tensor_parallel_->forward_argmax(batch, tables, tokens, full_rows, logits);
  }
  return forward_argmax(*backend_, *weights_, batch, tables, tokens, full_rows, logits, draws);
}

bool Engine::runs_ahead() const {
  // KESTREL_RUN_AHEAD=0 or 1 (a same-build A/B) over EngineOptions::run_ahead.
  static const int from_environment = [] {
    const char* v = std::getenv("KESTREL_RUN_AHEAD");
    if (v == nullptr) return -1;
    return std::string(v) == "1" ? 1 : std::string(v) == "0" ? 0 : -1;
  }();
  if (tensor_parallel_) return false;
  return from_environment < 0 ? options_.run_ahead.value_or(argmax_on_device())
                              : from_environment == 1;
}

bool Engine::argmax_on_device() const {
  return !tensor_parallel_ && backend_->argmax_on_device();
}

Status Engine::start_argmax(const Batch& batch, bool tokens_from_argmax,
                            const std::vector<RowDraw>& draws) {
  if (tensor_parallel_) return Status::error("start_argmax: not on a model split over ranks");
  KS_RETURN_IF_ERROR(check_draw_rows("start_argmax", batch, draws));
  KS_RETURN_IF_ERROR(prepare_kv_cache(batch));
  const BlockTables tables{kv_cache_->tables(), kv_cache_->blocks_per_seq()};
  return forward_start_argmax(*backend_, *weights_, batch, tables, tokens_from_argmax, draws);
}

Status Engine::finish_argmax(std::vector<int32_t>* tokens) {
  if (tensor_parallel_) return Status::error("finish_argmax: not on a model split over ranks");
  return backend_->finish_argmax(tokens);
}

Status Engine::copy_sequence(int32_t src, int32_t dst, int64_t n_positions) {
  KS_RETURN_IF_ERROR(check_reserved());
  if (src < 0 || src >= run_shape_.max_seqs || dst < 0 || dst >= run_shape_.max_seqs) {
    return Status::error("copy_sequence: slots " + std::to_string(src) + " -> " +
                         std::to_string(dst) + " outside the " +
                         std::to_string(run_shape_.max_seqs) + " reserved");
  }
  if (n_positions < 0 || n_positions > max_context_) {
    return Status::error("copy_sequence of " + std::to_string(n_positions) +
                         " positions outside the context of " + std::to_string(max_context_));
  }
  const int64_t held = int64_t(kv_cache_->table(src).size()) * kKvBlockSize;
  if (n_positions > held) {
    return Status::error("copy_sequence: slot " + std::to_string(src) + " holds " +
                         std::to_string(held) + " positions, not " + std::to_string(n_positions));
  }
  if (src == dst) return Status::ok();
  const int64_t full = n_positions / kKvBlockSize;
  kv_cache_->share(src, dst, full);
  if (n_positions % kKvBlockSize == 0) return Status::ok();
  if (!kv_cache_->reserve(dst, n_positions)) {
    return Status::error("the KV cache is full: no block for a copy of slot " +
                         std::to_string(src) + "'s last " +
                         std::to_string(n_positions % kKvBlockSize) + " positions");
  }
  return copy_kv_block(kv_cache_->table(src)[size_t(full)], kv_cache_->table(dst)[size_t(full)]);
}

Status Engine::copy_kv_block(int32_t src, int32_t dst) {
  if (tensor_parallel_) return tensor_parallel_->copy_kv_block(src, dst);
  return backend_->copy_kv_block(src, dst);
}

void Engine::release_sequence(int32_t seq) {
  if (kv_cache_) kv_cache_->release(seq);
}

Result<std::vector<float>> Engine::prompt_logits(const std::vector<int32_t>& ids, int32_t seq,
                                                 const std::function<Status()>& between_chunks) {
  KS_RETURN_IF_ERROR(check_reserved());
  if (ids.empty()) return Status::error("prompt is empty");
  if (int64_t(ids.size()) > max_context_) {
    return Status::error("prompt of " + std::to_string(ids.size()) +
                         " tokens exceeds the context of " + std::to_string(max_context_) +
                         " positions (EngineOptions::max_context)");
  }
  release_sequence(seq);
  std::vector<float> all;
  all.reserve(ids.size() * size_t(config().vocab_size));
  std::vector<float> chunk_logits;
  // Every position wants logits here, so a chunk is also bounded by the reserved logit rows.
  const size_t chunk = size_t(std::min(chunk_tokens(), run_shape_.max_logit_rows));
  for (size_t begin = 0; begin < ids.size(); begin += chunk) {
    if (begin > 0 && between_chunks) KS_RETURN_IF_ERROR(between_chunks());
    const size_t end = std::min(ids.size(), begin + chunk);
    Batch batch;
    for (size_t i = begin; i < end; ++i) batch.add(ids[i], int32_t(i), seq, true);
    KS_RETURN_IF_ERROR(run(batch, &chunk_logits));
    all.insert(all.end(), chunk_logits.begin(), chunk_logits.end());
  }
  return all;
}

Result<std::vector<float>> Engine::prefill(const std::vector<int32_t>& ids, int32_t seq) {
  KS_RETURN_IF_ERROR(check_reserved());
  if (ids.empty()) return Status::error("prompt is empty");
  if (int64_t(ids.size()) > max_context_) {
    return Status::error("prompt of " + std::to_string(ids.size()) +
                         " tokens exceeds the context of " + std::to_string(max_context_) +
                         " positions (EngineOptions::max_context)");
  }
  release_sequence(seq);
  std::vector<float> logits;
  const size_t chunk = size_t(chunk_tokens());
  for (size_t begin = 0; begin < ids.size(); begin += chunk) {
    const size_t end = std::min(ids.size(), begin + chunk);
    Batch batch;
    // Only the prompt's last position needs logits.
    for (size_t i = begin; i < end; ++i) batch.add(ids[i], int32_t(i), seq, i + 1 == ids.size());
    KS_RETURN_IF_ERROR(run(batch, &logits));
  }
  return logits;
}

Result<GenerateResult> Engine::generate_greedy(const std::vector<int32_t>& prompt, int64_t n_new,
                                               bool stop_at_eos,
                                               const std::function<void(int32_t)>& on_token) {
  KS_RETURN_IF_ERROR(check_reserved());
  GenerateResult result;
  if (n_new <= 0) return result;
  if (n_new > max_context_ - int64_t(prompt.size())) {  // a sum could overflow
    return Status::error("prompt (" + std::to_string(prompt.size()) + ") + new tokens (" +
                         std::to_string(n_new) + ") exceed the context of " +
                         std::to_string(max_context_) +
                         " positions (raise EngineOptions::max_context or generate fewer tokens)");
  }
  const auto& eos = config().eos_token_ids;
  auto start = std::chrono::steady_clock::now();
  if (prompt.empty()) return Status::error("prompt is empty");
  release_sequence(0);
  // The prompt in chunks; the last one yields the first token (chosen on the backend's device).
  std::vector<int32_t> next;
  const size_t chunk = size_t(chunk_tokens());
  for (size_t begin = 0; begin < prompt.size(); begin += chunk) {
    const size_t end = std::min(prompt.size(), begin + chunk);
    Batch batch;
    for (size_t i = begin; i < end; ++i)
      batch.add(prompt[i], int32_t(i), 0, i + 1 == prompt.size());
    KS_RETURN_IF_ERROR(run_argmax(batch, &next));
  }
  int32_t token = next.at(0);
  result.prefill_seconds = seconds_since(start);
  start = std::chrono::steady_clock::now();
  auto done = [&] {
    const bool is_eos = std::find(eos.begin(), eos.end(), int64_t(token)) != eos.end();
    return int64_t(result.tokens.size()) == n_new || (stop_at_eos && is_eos);
  };
  if (runs_ahead()) {
    // Run ahead: while step k's token is on its way back, step k + 1 (fed that token on the
    // device) is already queued, unless n_new tokens need no more steps. A step queued past an
    // eos is waited for and dropped.
    int64_t started = 0;    // steps queued so far; step k feeds token k at prompt.size() + k
    int64_t in_flight = 0;  // of those, not yet waited for
    auto queue_step = [&](bool from_argmax) {
      Batch batch;
      batch.add(from_argmax ? 0 : token, int32_t(prompt.size() + size_t(started)), 0, true);
      KS_RETURN_IF_ERROR(start_argmax(batch, from_argmax));
      ++started;
      ++in_flight;
      return Status::ok();
    };
    // A step ahead takes a new KV block only while the pool could still give the sequence every
    // block up to n_new tokens (the token before the last is fed at prompt + n_new - 2): a step
    // dropped past an eos may take a block step by step would not have, but never one the pool
    // then lacks.
    auto may_run_ahead = [&] {
      const int64_t position = int64_t(prompt.size()) + started;
      const int64_t last = int64_t(prompt.size()) + n_new - 2;
      return kv_cache_->blocks_to_reserve(0, position + 1) == 0 ||
             kv_cache_->blocks_to_reserve(0, last + 1) <= kv_cache_->available_blocks();
    };
    result.tokens.push_back(token);
    if (on_token) on_token(token);
    while (!done()) {
      if (in_flight == 0) KS_RETURN_IF_ERROR(queue_step(false));
      if (int64_t(result.tokens.size()) + in_flight < n_new && may_run_ahead()) {
        KS_RETURN_IF_ERROR(queue_step(true));
      }
      KS_RETURN_IF_ERROR(finish_argmax(&next));
      --in_flight;
      token = next.at(0);
      ++result.decode_steps;
      result.tokens.push_back(token);
      if (on_token) on_token(token);
    }
    result.decode_seconds = seconds_since(start);
    for (; in_flight > 0; --in_flight) KS_RETURN_IF_ERROR(finish_argmax(&next));
    return result;
  }
  for (int64_t step = 0;; ++step) {
    result.tokens.push_back(token);
    if (on_token) on_token(token);
    const bool is_eos = std::find(eos.begin(), eos.end(), int64_t(token)) != eos.end();
    if (int64_t(result.tokens.size()) == n_new || (stop_at_eos && is_eos)) break;
    Batch batch;
    batch.add(token, int32_t(prompt.size() + size_t(step)), 0, true);
    KS_RETURN_IF_ERROR(run_argmax(batch, &next));
    token = next[0];
    ++result.decode_steps;
  }
  result.decode_seconds = seconds_since(start);
  return result;
}

std::string StepInfo::describe() const {
  if (prefill) {
    return "prefill chunk " + std::to_string(index + 1) + " of " + std::to_string(count) + " (" +
           std::to_string(n_tokens) + " tokens)";
  }
  return "decode step " + std::to_string(index) + " of " + std::to_string(count) + " (" +
         std::to_string(n_tokens) + " sequences at context " + std::to_string(context) + ")";
}

Result<BatchGenerateResult> Engine::generate_batch(const std::vector<int32_t>& prompt,
                                                   const BatchGenerateParams& params,
                                                   const StepHooks& hooks) {
  KS_RETURN_IF_ERROR(check_reserved());
  const int64_t copies = params.batch_size;
  const int64_t n_beams = params.num_beams;
  const int64_t n_new = params.n_new;
  if (prompt.empty()) return Status::error("prompt is empty");
  if (copies <= 0 || n_beams <= 0 || n_new <= 0) {
    return Status::error("batch size, beams and new tokens must be positive");
  }
  const int64_t vocab = config().vocab_size;
  if (n_beams > vocab) return Status::error("more beams than vocabulary entries");
  const int64_t n_seqs = copies * n_beams;
  if (n_seqs > run_shape_.max_seqs || n_seqs > run_shape_.max_batch_tokens ||
      n_seqs > run_shape_.max_logit_rows) {
    return Status::error(
        "batch_size x num_beams = " + std::to_string(n_seqs) +
        " sequences exceed the reservation (" + std::to_string(run_shape_.max_seqs) +
        " slots, decode batches of " +
        std::to_string(std::min(run_shape_.max_batch_tokens, run_shape_.max_logit_rows)) + ")");
  }
  const int64_t prompt_len = int64_t(prompt.size());
  if (n_new > max_context_ - prompt_len) {  // a sum could overflow
    return Status::error("prompt (" + std::to_string(prompt_len) + ") + new tokens (" +
                         std::to_string(n_new) + ") exceed the context of " +
                         std::to_string(max_context_));
  }

  auto before = [&](const StepInfo& info) {
    return hooks.before ? hooks.before(info) : Status::ok();
  };
  auto after = [&](const StepInfo& info, double seconds) {
    return hooks.after ? hooks.after(info, seconds) : Status::ok();
  };

  // A beam forked into a new slot takes the cache of its parent's first `n_positions`.
  auto copy_slot = [this](int64_t n_positions) {
    return [this, n_positions](int32_t src, int32_t dst) {
      return copy_sequence(src, dst, n_positions);
    };
  };
  for (int64_t s = 0; s < n_seqs; ++s) release_sequence(int32_t(s));

  BatchGenerateResult result;
  std::vector<std::vector<Beam>> beams(static_cast<size_t>(copies));
  std::vector<float> logits;
  std::vector<int32_t> next_tokens;
  const int64_t chunk = chunk_tokens();
  const int64_t n_calls = (copies * prompt_len + chunk - 1) / chunk;

  // Prefill: the copies' prompts are packed back to back into calls of up to `chunk` tokens,
  // so a call can hold several prompts and their matrix products share one pass over the
  // weights (one dequantization of each on a GPU). Each copy's last prompt token asks for
  // its logits; the copies whose prompts end in a call pick their first token(s) from it.
  int64_t next_copy = 0;
  int64_t next_pos = 0;
  for (int64_t call = 0; next_copy < copies; ++call) {
    Batch batch;
    std::vector<int64_t> finished;  // copies whose last prompt token is in this call
    int64_t context = 0;
    while (batch.size() < chunk && next_copy < copies) {
      const int64_t take = std::min(chunk - batch.size(), prompt_len - next_pos);
      const int32_t slot = int32_t(next_copy * n_beams);
      for (int64_t i = next_pos; i < next_pos + take; ++i) {
        batch.add(prompt[size_t(i)], int32_t(i), slot, i + 1 == prompt_len);
      }
      next_pos += take;
      context = std::max(context, next_pos);
      if (next_pos == prompt_len) {
        finished.push_back(next_copy);
        ++next_copy;
        next_pos = 0;
      }
    }
    StepInfo info;
    info.prefill = true;
    info.index = call;
    info.count = n_calls;
    info.n_tokens = batch.size();
    info.context = context;
    KS_RETURN_IF_ERROR(before(info));
    const auto start = std::chrono::steady_clock::now();
    if (finished.empty()) {
      KS_RETURN_IF_ERROR(run(batch, &logits));  // no logit rows: nothing comes back
    } else if (n_beams == 1) {
      // Greedy needs only the argmax, which a device backend computes in place.
      KS_RETURN_IF_ERROR(run_argmax(batch, &next_tokens));
      for (size_t j = 0; j < finished.size(); ++j) {
        const int32_t slot = int32_t(finished[j] * n_beams);
        beams[size_t(finished[j])].assign(1, Beam{slot, 0.0, {next_tokens.at(j)}});
      }
    } else {
      KS_RETURN_IF_ERROR(run(batch, &logits));
      for (size_t j = 0; j < finished.size(); ++j) {
        const int32_t slot = int32_t(finished[j] * n_beams);
        std::vector<Beam>& live = beams[size_t(finished[j])];
        live.assign(1, Beam{slot, 0.0, {}});
        KS_RETURN_IF_ERROR(advance_beams(live, logits.data() + j * size_t(vocab), vocab, n_beams,
                                         slot, copy_slot(prompt_len)));
      }
    }
    const double seconds = seconds_since(start);
    result.first_token_seconds += seconds;
    KS_RETURN_IF_ERROR(after(info, seconds));
  }

  // Decode: step s feeds each sequence's token s - 1 at position prompt_len + s - 1.
  auto decode_info = [&](int64_t s) {
    StepInfo info;
    info.index = s;
    info.count = n_new - 1;
    info.n_tokens = n_seqs;
    info.context = prompt_len + s;
    return info;
  };
  const bool run_ahead = n_beams == 1 && runs_ahead();
  if (run_ahead) {
    // Run ahead: step s + 1 is queued, its tokens step s's argmax on the device, before step s's
    // tokens are waited for. The hooks still see each step's before and after in turn: step s +
    // 1's before comes after step s's after (the watchdog watches one step at a time), and a
    // step's seconds run from the previous step's tokens to its own.
    auto decode_batch = [&](int64_t s, bool from_argmax) {
      Batch batch;
      for (int64_t c = 0; c < copies; ++c) {
        const int32_t token = from_argmax ? 0 : beams[size_t(c)][0].tokens.back();
        batch.add(token, int32_t(prompt_len + s - 1), int32_t(c), true);
      }
      return batch;
    };
    if (n_new > 1) {
      KS_RETURN_IF_ERROR(before(decode_info(1)));
      auto start = std::chrono::steady_clock::now();
      KS_RETURN_IF_ERROR(start_argmax(decode_batch(1, false), false));
      for (int64_t s = 1; s < n_new; ++s) {
        if (s + 1 < n_new) KS_RETURN_IF_ERROR(start_argmax(decode_batch(s + 1, true), true));
        KS_RETURN_IF_ERROR(finish_argmax(&next_tokens));
        for (int64_t c = 0; c < copies; ++c) {
          beams[size_t(c)][0].tokens.push_back(next_tokens.at(size_t(c)));
        }
        const double seconds = seconds_since(start);
        start = std::chrono::steady_clock::now();
        result.step_seconds.push_back(seconds);
        KS_RETURN_IF_ERROR(after(decode_info(s), seconds));
        if (s + 1 < n_new) KS_RETURN_IF_ERROR(before(decode_info(s + 1)));
      }
    }
  }
  for (int64_t s = 1; !run_ahead && s < n_new; ++s) {
    const StepInfo info = decode_info(s);
    KS_RETURN_IF_ERROR(before(info));
    const auto start = std::chrono::steady_clock::now();
    Batch batch;
    for (const std::vector<Beam>& live : beams) {
      for (const Beam& beam : live) {
        batch.add(beam.tokens.back(), int32_t(prompt_len + s - 1), beam.slot, true);
      }
    }
    if (n_beams == 1) {
      KS_RETURN_IF_ERROR(run_argmax(batch, &next_tokens));
      for (int64_t c = 0; c < copies; ++c) {
        beams[size_t(c)][0].tokens.push_back(next_tokens[size_t(c)]);
      }
    } else {
      KS_RETURN_IF_ERROR(run(batch, &logits));
      const float* rows = logits.data();
      for (int64_t c = 0; c < copies; ++c) {
        std::vector<Beam>& live = beams[size_t(c)];
        const int64_t n_rows = int64_t(live.size());
        KS_RETURN_IF_ERROR(advance_beams(live, rows, vocab, n_beams, int32_t(c * n_beams),
                                         copy_slot(prompt_len + s)));
        rows += n_rows * vocab;
      }
    }
    const double seconds = seconds_since(start);
    result.step_seconds.push_back(seconds);
    KS_RETURN_IF_ERROR(after(info, seconds));
  }

  for (const std::vector<Beam>& live : beams) {
    result.tokens.push_back(live[0].tokens);
    result.scores.push_back(live[0].score);
  }
  return result;
}

}  // namespace kestrel
