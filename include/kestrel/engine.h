// Kestrel's library API: load a model onto a backend and run it. Only include/ is needed to
// compile against it; link kestrel::kestrel (find_package(kestrel)).
//
//   kestrel::EngineOptions options;
//   options.model = "synthetic:qwen2-1.5b";
//   auto engine = kestrel::Engine::create(options);
//   if (!engine.is_ok()) { /* engine.status().message() says why */ }
//   auto result = (*engine)->generate_greedy({1, 2, 3}, 32);
//
// Thread safety: an Engine is used by one thread at a time. It owns one backend whose KV cache
// and scratch memory every call uses, so concurrent calls on the same Engine (even const ones
// during a generate) are not allowed; guard it with a mutex or give each thread its own Engine.
// Distinct Engines are independent and may run on different threads at once, and
// Engine::create may be called from several threads. Callbacks (on_token, StepHooks) run on the
// calling thread, inside the call.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "kestrel/sampling.h"
#include "kestrel/status.h"
#include "kestrel/types.h"

namespace kestrel {

// Defined in the library's internal headers; in-tree code (the CLI, benchmarks, tests) reaches
// them through Engine::config(), weights() and backend(). They are not part of the installed API.
class Backend;
class PagedKvCache;
class TensorParallel;
struct ModelConfig;
struct ModelWeights;

struct EngineOptions {
  std::string model;  // HF directory, converted directory, GGUF file, or synthetic:NAME
  // Unset: sym_int4, the format a converted directory holds, or the format a GGUF file's weights
  // copy into (Q4_0: sym_int4, Q8_0: sym_int8, Q4_K: asym_int4, ...). Set: that format; for a
  // converted directory it must be the one it holds.
  std::optional<WeightFormat> format;
  int block = 32;
  std::string device = "cpu";  // "cpu", "cuda", or "auto" (CUDA when there is a device)
  int threads = 0;             // 0: all hardware threads
  int64_t max_context = 0;     // 0: min(max_position_embeddings, 4096)
  int64_t max_seqs = 1;        // sequences decoded together
  // Prompt tokens per forward call. Where the reservation would not fit the memory (max_memory or
  // the free memory), Engine::create halves it, down to 16 (and never below max_seqs), takes the
  // largest that fits and says so among the weights' load warnings; it fails only when the smallest
  // does not fit. A caller's run_shape is reserved as given.
  int64_t prefill_chunk = 512;
  // The KV cache is a pool of blocks of kKvBlockSize positions that the sequences share.
  // kv_blocks: its size; 0: enough for every sequence's full context.
  int64_t kv_blocks = 0;
  // When above 0, the pool instead takes this fraction of the memory left after the weights
  // (free device memory, or the host's available memory on the CPU) beside the workspace; at
  // least one full context, or Engine::create fails.
  double kv_memory_fraction = 0;
  // The most memory this engine may plan for on its device, in bytes: its weights, KV cache and
  // workspace (split over CPU ranks, which share the host's memory, every rank's; split over
  // devices, each device's). Where it is below the free memory (the host's available memory on
  // the CPU) it is the limit instead: the planned weights and reservation are checked against it
  // before any weight is built or read, and every reservation, kv_memory_fraction's pool
  // included, then gets at most max_memory less the loaded weights. 0: only free memory limits.
  size_t max_memory = 0;
  // How messages name the cap, as its caller takes it: "--max-memory 24GB" from the CLI,
  // "max_memory 24GB" from the Python package; empty: "max_memory" and the bytes.
  std::string max_memory_text = {};
  // The KV cache's entries (types.h); automatic: fp32 for fp32 weights, else fp16. The CPU
  // backend keeps fp32 whatever is asked.
  KvCacheType kv_cache = KvCacheType::automatic;
  bool progress = true;
  // Ranks the model is split over (Megatron-style tensor parallelism, one thread a rank); 1: not
  // split. On "cpu" every rank is a CPU backend with threads / tensor_parallel threads and the
  // ranks sum their partial results in host memory (the stand-in for NCCL, used for testing).
  // The heads and intermediate size must divide among the ranks.
  int tensor_parallel = 1;
  // Decoding (generate_greedy, generate_batch without beams, generate_tokens and the server
  // while the device picks every token) queues each step before the tokens of the step before it
  // are back on the host: that step's tokens stay on the device for the next one's embed, so the
  // host's work for a step (and the copies to and from the device) overlaps the device's work for
  // the one before. The tokens are the same either way; a step queued past an end is computed
  // and dropped. Unset (the default): where that overlaps anything, a backend that leaves the
  // argmax on its device (CUDA; measured on the H200: the device's idle time between batch-1
  // steps 152-158 us step by step, 18 us run ahead; tg128 +2-3%); on the CPU and Vulkan a step
  // run ahead is computed before the one before it is used, so tokens only arrive a step later.
  // true or false: always or never (the CPU tests force it on). The environment's
  // KESTREL_RUN_AHEAD=0 or 1 overrides this. Not with tensor_parallel > 1.
  std::optional<bool> run_ahead;
  // A reservation decided beforehand (runtime/planner.h). When run_shape.max_batch_tokens > 0
  // the backend reserves exactly this shape, max_context, max_seqs and the KV pool settings
  // above are ignored, and
  // prefill chunks are at most run_shape.max_batch_tokens tokens.
  RunShape run_shape;
};

// The device EngineOptions::device "auto" loads on: the environment's KESTREL_DEVICE when set
// (and not "auto"), else "cuda" when this build has the CUDA backend and the machine an NVIDIA
// driver, else "cpu".
std::string default_device();

// EngineOptions::max_memory from text, as the CLI's --max-memory and the Python package's
// max_memory read it: "24GB", "512MiB", "1.5G" or a byte count (decimal units for kB/MB/GB/TB,
// binary for KiB/MiB/GiB/TiB and the bare K/M/G/T). Anything else is an error, and so is 0
// (max_memory's "no cap"); the message does not name the flag or argument, the caller does.
Result<size_t> parse_max_memory(const std::string& text);

struct GenerateResult {
  std::vector<int32_t> tokens;  // generated ids (not including the prompt)
  double prefill_seconds = 0;   // prompt through the first generated token's logits
  double decode_seconds = 0;    // the remaining steps
  int64_t decode_steps = 0;
};

// generate_batch: `batch_size` copies of one prompt, each its own sequence, decoded together.
struct BatchGenerateParams {
  int64_t batch_size = 1;
  int64_t num_beams = 1;  // > 1: beam search for each copy (sum of log-probabilities)
  int64_t n_new = 1;      // tokens per copy, exactly: eos is an ordinary token here
};

// One forward call of generate_batch, seen by its hooks.
struct StepInfo {
  bool prefill = false;  // a call of prompt tokens (the copies' prompts packed back to back, up
                         // to the prefill chunk); else a decode step of all sequences
  int64_t index = 0;     // prefill: call number (0-based); decode: 1-based step
  int64_t count = 0;     // prefill: calls in all; decode: decode steps in all (n_new - 1)
  int64_t n_tokens = 0;  // tokens in the call
  int64_t context = 0;   // positions each sequence of the call holds once it is done
  std::string describe() const;  // "prefill chunk 3 of 8 (512 tokens)", "decode step 7 of 127"
};

// Callbacks around every forward call (the benchmark arms its watchdog and checks for Ctrl-C
// here). An error from either stops generation and is returned.
struct StepHooks {
  std::function<Status(const StepInfo&)> before;
  std::function<Status(const StepInfo&, double seconds)> after;
};

struct BatchGenerateResult {
  std::vector<std::vector<int32_t>> tokens;  // [batch_size][n_new]: each copy's best beam
  std::vector<double> scores;                // [batch_size]: its sum of log-probabilities
  double first_token_seconds = 0;            // every copy's prefill through its first sampled token
  std::vector<double> step_seconds;          // [n_new - 1]: each later step (forward + sampling)
};

// What a loaded model is, in the user's terms.
struct ModelInfo {
  std::string architecture;  // "Qwen2ForCausalLM", "LlamaForCausalLM"
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  int64_t intermediate_size = 0;
  double rms_norm_eps = 0;
  double rope_theta = 0;
  bool tie_word_embeddings = false;
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;
  WeightFormat format = WeightFormat::sym_int4;
  size_t weight_bytes = 0;  // resident weight memory (every rank's, when split)
  size_t decode_bytes = 0;  // weight bytes one decode step streams (every rank's, when split)
  int tensor_parallel = 1;  // ranks the model is split over
  std::string backend;      // "cpu (avx2)", "cuda (NVIDIA H200)"
  // What the load went past or changed, one line each (the CLI prints them as warnings): a
  // config field it ignored, a prefill chunk shrunk to fit the memory.
  std::vector<std::string> warnings;
};

class Engine {
 public:
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  static Result<std::unique_ptr<Engine>> create(const EngineOptions& options);
  // The same, on a backend made beforehand (the planner asks it for free memory first).
  static Result<std::unique_ptr<Engine>> create(const EngineOptions& options,
                                                std::unique_ptr<Backend> backend);

  ModelInfo info() const;
  const ModelConfig& config() const;
  // With tensor_parallel > 1, the whole model's config, format and notes, without tensors (each
  // rank holds its shard); backend() is rank 0's.
  const ModelWeights& weights() const { return *weights_; }
  Backend& backend();
  // Which KV cache blocks each sequence slot holds (runtime/kv_cache.h). run() gives a slot the
  // blocks its batch's positions need; a caller may reserve them beforehand (the server does).
  // Only while there is a reservation (check_reserved()).
  PagedKvCache& kv_cache() { return *kv_cache_; }
  const EngineOptions& options() const { return options_; }
  // Positions each sequence can hold (the KV cache's length).
  int64_t max_context() const { return max_context_; }
  double load_seconds() const { return load_seconds_; }
  const RunShape& run_shape() const { return run_shape_; }

  // Replaces the backend's reservation (KV cache and workspace) with one for `shape`; the
  // weights stay. Cached sequences are lost. A shape that does not fit free memory is refused
  // with the old reservation kept; if the backend itself then fails, the old shape is taken
  // again where it can be, else every later call fails until a reserve succeeds.
  Status reserve(const RunShape& shape);
  // An error when there is no reservation (a failed reserve() left none); every generator checks.
  Status check_reserved() const;

  // Logits of every position of `ids` ([ids.size(), vocab]), run from position 0 of `seq`.
  // `between_chunks`, if set, is called before each chunk after the first; a non-ok Status
  // stops the call and is returned (a caller's Ctrl-C check).
  Result<std::vector<float>> prompt_logits(const std::vector<int32_t>& ids, int32_t seq = 0,
                                           const std::function<Status()>& between_chunks = {});
  // Runs `ids` from position 0 of `seq` in chunks; returns the last position's logits.
  Result<std::vector<float>> prefill(const std::vector<int32_t>& ids, int32_t seq = 0);
  // Runs any batch (decode steps of several sequences, or a prefill chunk). Each slot first gets
  // KV cache blocks up to the positions its tokens write; fails, before running anything, when
  // the pool has too few blocks left.
  Status run(const Batch& batch, std::vector<float>* logits);
  // As run, but returns the argmax token of each logit row (computed on the backend's device).
  Status run_argmax(const Batch& batch, std::vector<int32_t>* tokens);
  // As run_argmax, and also the fp32 logits of the logit rows `full_rows` (indices into
  // batch.logit_rows) packed in that order into `logits` [full_rows.size(), vocab], and only
  // those cross from the device: a server step whose greedy requests need no more than their
  // argmax reads back whole rows only for the requests its host samplers serve.
  Status run_argmax(const Batch& batch, std::vector<int32_t>* tokens,
                    const std::vector<int32_t>& full_rows, std::vector<float>* logits);
  // As above, and the rows of `draws` take a token drawn on the device instead of their argmax
  // (RowDraw, kestrel/sampling.h): a server step's sampled requests need no row on the host.
  // Only where draws_on_device() says so.
  Status run_argmax(const Batch& batch, std::vector<int32_t>* tokens,
                    const std::vector<int32_t>& full_rows, std::vector<float>* logits,
                    const std::vector<RowDraw>& draws);
  // Whether run_argmax's draws run on the device (the CUDA backend; not a model split over
  // ranks). Elsewhere a caller samples whole rows on the host, as fast.
  bool draws_on_device() const;

  // Decode run ahead (EngineOptions::run_ahead): whether this engine's generate calls do it, and
  // run_argmax in two halves (any engine of one backend). start_argmax runs `batch` (with
  // `tokens_from_argmax`, row i's token is row i of the step started just before it, which had as
  // many rows; batch.tokens are ignored) and queues its logit rows' argmax, the rows of `draws`
  // drawn instead as run_argmax draws them, at most two calls at once; finish_argmax waits for
  // the oldest queued and returns its rows. A run() or run_argmax() drops any never finished.
  bool runs_ahead() const;
  // Whether running ahead overlaps anything: the backend leaves a step's tokens on its device and
  // queues the next step without waiting (CUDA). Elsewhere a step run ahead is computed before
  // the tokens of the one before it are used, so they reach a caller a step later.
  bool argmax_on_device() const;
  Status start_argmax(const Batch& batch, bool tokens_from_argmax,
                      const std::vector<RowDraw>& draws = {});
  Status finish_argmax(std::vector<int32_t>* tokens);

  // Slot `dst` takes the cached positions [0, n_positions) of slot `src`: the full blocks are
  // shared, a partly filled last block is copied (beam search forks a sequence this way).
  Status copy_sequence(int32_t src, int32_t dst, int64_t n_positions);
  // Frees the KV cache blocks of a slot (blocks other slots share stay).
  void release_sequence(int32_t seq);

  // Greedy continuation of `prompt`: exactly `n_new` tokens unless `stop_at_eos` and an eos id
  // from generation_config.json comes first. `on_token` sees each token as it is produced.
  Result<GenerateResult> generate_greedy(const std::vector<int32_t>& prompt, int64_t n_new,
                                         bool stop_at_eos = false,
                                         const std::function<void(int32_t)>& on_token = {});

  // Greedy (num_beams 1) or beam search continuation of `batch_size` copies of `prompt`: each
  // copy is prefilled on its own, then one decode step carries every sequence. Needs
  // batch_size * num_beams sequence slots and decode batches of that many tokens.
  Result<BatchGenerateResult> generate_batch(const std::vector<int32_t>& prompt,
                                             const BatchGenerateParams& params,
                                             const StepHooks& hooks = {});

 private:
  Engine();
  EngineOptions options_;
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<Backend> backend_;
  std::unique_ptr<PagedKvCache> kv_cache_;
  std::unique_ptr<TensorParallel> tensor_parallel_;  // set instead of backend_ when split
  // Runs `shards` (rank i's weights at i) on options_.tensor_parallel ranks, rank 0 on `rank0`.
  Status split(std::unique_ptr<Backend> rank0, std::vector<ModelWeights> shards);
  // Copies a KV cache block on the backend, or on every rank.
  Status copy_kv_block(int32_t src, int32_t dst);
  // Gives the batch's slots the blocks it writes (copying shared ones first).
  Status prepare_kv_cache(const Batch& batch);

  // Prompt tokens per forward call: the wanted chunk within what was reserved.
  int64_t chunk_tokens() const;

  int64_t max_context_ = 0;
  RunShape run_shape_;
  double load_seconds_ = 0;
};

// Index of the largest value, the lowest among ties (as torch.argmax); NaN never wins (torch's
// would pick it), and a row of nothing but NaN gives 0.
int32_t argmax(const float* values, int64_t n);

}  // namespace kestrel
