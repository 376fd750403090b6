// The benchmark runner: one configuration at a time, each planned before its weights are built,
// watched step by step, measured, and turned into one result that becomes one CSV row.
//
// A model's weights are built once and kept for its following configurations (the all-in-one
// benchmark loads a model once too); each configuration re-reserves the KV cache and workspace
// its plan chose.
//
// Measured peak memory:
//   cpu     the growth of the process's peak resident set (VmHWM of /proc/self/status) over its
//           resident set just before the model was built. The peak is reset (clear_refs) after
//           the model is built and the configuration's reservation made, so it covers that point
//           and every step after it, not the transient of an earlier configuration. The benchmark
//           CLI makes allocations of 1 MiB and more come straight from mmap so that freed
//           reservations leave the resident set at once.
//   device  free device memory just before the model was built minus the least free memory seen
//           after the reservation and during the steps (Backend::free_memory); a backend that
//           cannot tell free memory reports its own peak_memory() instead.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "bench/config.h"
#include "bench/profile.h"
#include "bench/prompt.h"
#include "kestrel/engine.h"
#include "runtime/planner.h"
#include "runtime/watchdog.h"

namespace kestrel::bench {

struct CaseResult {
  BenchCase bench_case;
  bool ok = false;
  bool interrupted = false;  // stopped by Ctrl-C
  std::string status;        // "ok" or "error: ..."
  std::string device;        // the backend's name
  std::string commit;
  bool has_timings = false;     // the trials completed
  bool has_next_token = false;  // out_len > 1: there are later steps
  double first_token_ms = 0;    // median over trials: every copy's prefill through its first token
  double next_token_ms = 0;     // median over trials of the mean later step
  std::vector<double> trial_first_token_s;
  std::vector<double> trial_next_token_s;
  int64_t actual_in = 0;
  int64_t actual_out = 0;
  double load_seconds = 0;
  int64_t prefill_chunk = 0;
  size_t planned_bytes = 0;  // 0 when no plan could be made
  size_t peak_bytes = 0;     // measured, 0 when the configuration did not run
  size_t weight_bytes = 0;
  size_t decode_bytes = 0;  // weights streamed by one decode step
  double step_bytes = 0;    // bytes of a mean decode step: weights + KV cache read
  double decode_tps = 0;    // tokens of all copies per second in the later steps
  double achieved_gbs = 0;
  double roofline_pct = 0;
};

struct RunnerOptions {
  std::string device = "cpu";
  int threads = 0;              // CPU workers, 0: all
  size_t max_memory = 0;        // --max-memory in bytes; 0: only free memory limits
  std::string max_memory_text;  // as given, for messages
  double roofline_gbs = 0;      // 0: the backend's own (measured on CUDA)
  // Wanted; the planner may shrink it. 0: 512 tokens on the CPU, 4096 on a GPU, where a call of
  // several prompts shares one dequantization of every weight (bench rows of batch > 1).
  int64_t prefill_chunk = 0;
  int block = 32;
  KvCacheType kv_cache = KvCacheType::automatic;  // resolved per case from its weight format
  // Ranks each model is split over (EngineOptions::tensor_parallel). Each rank plans for its
  // shard: on a GPU within its device's memory, on the CPU within MemAvailable / ranks; weight
  // and decode bytes, and the planned peak on the CPU (the process's), count every rank.
  int tensor_parallel = 1;
  double deadline_factor = 10;  // step deadline = factor x expected time + the device's floor
  double step_timeout_s = 0;    // > 0: this deadline for every step instead
  double hang_grace_s = 30;     // past the deadline by this much, a step counts as a hang
  std::string commit;
  std::string prompt_text;
  // The tokenizer of a model source, or an empty Tokenize for stand-in ids (bench/prompt.h); an
  // error fails that source's configurations. Unset: stand-in ids for every model.
  std::function<Result<Tokenize>(const std::string& source)> tokenizer_for;
  const std::atomic<bool>* stop = nullptr;  // set by Ctrl-C: stop before the next step
  // Work done, in expected seconds of the device profile (a progress bar's units).
  std::function<void(double expected_seconds)> on_progress;
  // A step hung (see runtime/watchdog.h): the result to record for the running configuration.
  // Runs on the watchdog thread; it is expected to write the row and end the process.
  std::function<void(const CaseResult& result)> on_hang;
};

// What one configuration is expected to take at `profile`'s rates over all its runs (warm-ups
// and trials): each copy's prompt in chunks of `prefill_chunk` tokens, then out_len - 1 decode
// steps. A step's cost is affine in its context and its time the larger of a memory and a
// compute time, so the sum over a run of steps is taken in closed form, not step by step
// (2^31 decode steps once took minutes before a configuration's first check).
double expected_case_seconds(const WeightSpec& spec, const DeviceProfile& profile,
                             double kv_entry_bytes, int64_t prefill_chunk, const BenchCase& c);

class Runner {
 public:
  static Result<std::unique_ptr<Runner>> create(RunnerOptions options);
  ~Runner();

  // Runs one configuration. Failures are results with an error status, never exceptions.
  CaseResult run(const BenchCase& bench_case);

  // What running `bench_case` is expected to take at the profile's rates (progress units);
  // 0 when its model's config cannot be read.
  double expected_seconds(const BenchCase& bench_case);

  const DeviceProfile& profile() const { return profile_; }
  // The bandwidth the decode rows are compared with, and where that figure comes from.
  double roofline_gbs() const { return roofline_.bandwidth_gbs; }
  const Roofline& roofline() const { return roofline_; }
  // The matrix rate the prompt rows of integer formats are compared with (MatrixRate).
  const MatrixRate& matrix_rate() const { return matrix_rate_; }
  // The loaded engine (quick mode reports its model); null before the first configuration.
  const Engine* engine() const { return engine_.get(); }

 private:
  explicit Runner(RunnerOptions options) : options_(std::move(options)) {}
  Status run_case(const BenchCase& c, CaseResult& result);
  Result<std::vector<int32_t>> prompt_for(const std::string& source, int64_t n_tokens,
                                          int64_t vocab_size);
  Result<MemoryBudget> budget_for(const std::string& engine_key);
  Status ensure_backend();
  void on_hang(const std::string& step, double deadline_s, double elapsed_s);
  // `first_call`: the first forward call of its shape on this engine, which gets the profile's
  // first_call_s on top (graph capture, library autotuning).
  double step_deadline(double expected_s, bool first_call) const;

  RunnerOptions options_;
  DeviceProfile profile_;
  Roofline roofline_;
  MatrixRate matrix_rate_;
  std::unique_ptr<Watchdog> watchdog_;
  std::unique_ptr<Backend> spare_backend_;  // made for planning, handed to the next engine
  std::unique_ptr<Engine> engine_;
  std::string engine_key_;                            // source and format of engine_'s weights
  std::set<std::pair<bool, int64_t>> called_shapes_;  // (prefill?, tokens) run on engine_
  size_t baseline_rss_ = 0;                           // process RSS before engine_ was built
  size_t baseline_free_ = 0;                          // free device memory before engine_ was built
  size_t min_free_ = 0;           // least free device memory seen in the running configuration
  double progress_reported_ = 0;  // progress units reported for the running configuration

  // The prompt text tokenized by each source's tokenizer (absent: stand-in ids).
  std::map<std::string, std::vector<int32_t>> tokenized_text_;

  mutable std::mutex current_mutex_;  // guards current_ (read by the watchdog thread)
  CaseResult current_;
};

}  // namespace kestrel::bench
