#include "bench/runner.h"

#include <malloc.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <sstream>

#include "core/stats.h"
#include "model/loader.h"
#include "model/shard.h"
#include "runtime/tensor_parallel.h"

namespace kestrel::bench {

namespace {

// A field of /proc/self/status in bytes ("VmRSS", "VmHWM").
Result<size_t> process_status_bytes(const std::string& key) {
  std::ifstream file("/proc/self/status");
  std::string line;
  while (std::getline(file, line)) {
    if (line.rfind(key + ":", 0) != 0) continue;
    std::istringstream fields(line.substr(key.size() + 1));
    uint64_t kib = 0;
    if (fields >> kib) return size_t(kib) * 1024;
  }
  return Status::error("/proc/self/status: no " + key + " line");
}

// Sets the process's peak resident set (VmHWM) to its current resident set.
bool reset_peak_rss() {
  std::ofstream file("/proc/self/clear_refs");
  file << "5";
  file.close();
  return bool(file);
}

double mean(const std::vector<double>& values) {
  double sum = 0;
  for (double v : values) sum += v;
  return values.empty() ? 0.0 : sum / double(values.size());
}

std::string engine_key(const BenchCase& c) {
  return c.source + "|" + format_name(c.format) + (c.format_explicit ? "|explicit" : "");
}

std::string seconds_text(double seconds) {
  char text[32];
  std::snprintf(text, sizeof(text), "%.2f s", seconds);
  return text;
}

// Bytes a KV cache entry of `backend` takes, its row's scale shared out (fp8), from the
// backend's own reservation layout.
double kv_entry_bytes(const Backend& backend, const ModelConfig& config, KvCacheType kv_cache) {
  RunShape one;
  one.max_seqs = one.max_context = one.max_batch_tokens = one.max_logit_rows = 1;
  one.kv_cache = kv_cache;
  auto layout = backend.reserve_layout(config, one);
  if (!layout.is_ok()) return double(sizeof(uint16_t));
  return double(layout->types.kv_element_bytes) +
         double(layout->types.kv_row_bytes) / double(std::max<int64_t>(1, config.head_dim));
}

// The sum of expected_seconds(cost_of(k)) over k = first .. last, for a cost whose bytes and
// flops are affine in k (prefill_cost and decode_cost along a run of steps). The memory time and
// the compute time are each affine, so their difference changes sign at most once: on each side
// of that point the larger is one affine function, whose sum is the count times the mean of its
// end values.
template <typename CostOf>
double sum_step_seconds(int64_t first, int64_t last, const CostOf& cost_of,
                        const DeviceProfile& profile) {
  if (last < first) return 0;
  struct Times {
    double memory, compute;
    double step() const { return std::max(memory, compute); }
    double lead() const { return memory - compute; }
  };
  const auto times_at = [&](int64_t k) {
    const StepCost cost = cost_of(k);
    return Times{kestrel::expected_seconds(StepCost{cost.bytes, 0}, profile),
                 kestrel::expected_seconds(StepCost{0, cost.flops}, profile)};
  };
  const auto sum = [](int64_t from, int64_t to, const Times& a, const Times& b) {
    return double(to - from + 1) * (a.step() + b.step()) / 2.0;
  };
  const Times low = times_at(first);
  const Times high = times_at(last);
  if (first == last || (low.lead() >= 0) == (high.lead() >= 0)) {
    return sum(first, last, low, high);
  }
  // The last k on `low`'s side; a rounding error here moves a step whose two times are equal.
  const double cross =
      double(first) + low.lead() / (low.lead() - high.lead()) * double(last - first);
  const int64_t split = std::clamp(int64_t(std::floor(cross)), first, last - 1);
  return sum(first, split, low, times_at(split)) + sum(split + 1, last, times_at(split + 1), high);
}

}  // namespace

double expected_case_seconds(const WeightSpec& spec, const DeviceProfile& profile,
                             double kv_entry_bytes, int64_t prefill_chunk, const BenchCase& c) {
  const int64_t chunk = std::max<int64_t>(1, std::min(prefill_chunk, c.in_len));
  // Whole chunks end at k * chunk; a shorter last one ends at in_len.
  const int64_t whole = c.in_len / chunk;
  double prompt = sum_step_seconds(
      1, whole, [&](int64_t k) { return prefill_cost(spec, chunk, k * chunk, kv_entry_bytes); },
      profile);
  if (c.in_len % chunk != 0) {
    prompt += kestrel::expected_seconds(
        prefill_cost(spec, c.in_len % chunk, c.in_len, kv_entry_bytes), profile);
  }
  // Decode step s (1 .. out_len - 1) leaves in_len + s positions in every sequence's cache.
  const double decode = sum_step_seconds(
      1, c.out_len - 1,
      [&](int64_t s) {
        return decode_cost(spec, c.batch_size * c.num_beams, c.in_len + s, kv_entry_bytes);
      },
      profile);
  return (prompt * double(c.batch_size) + decode) * double(c.warm_up + c.num_trials);
}

Result<std::unique_ptr<Runner>> Runner::create(RunnerOptions options) {
  if (options.prompt_text.empty()) return Status::error("the benchmark needs a prompt text");
  std::unique_ptr<Runner> runner(new Runner(std::move(options)));
  if (runner->options_.prefill_chunk <= 0) {
    // CUDA: one call for a whole batch of prompts where memory allows (the planner shrinks the
    // chunk otherwise), so every weight is dequantized once per batch; on the H200 16 x 1024
    // 8B prompts took 463.5 ms in one call, 483.9 ms in four of 4096 tokens.
    // Vulkan: 512, as the CPU, since its activation arena is one allocation (2 GiB at most).
    runner->options_.prefill_chunk = runner->options_.device == "cuda" ? 16384 : 512;
  }
  const RunnerOptions& o = runner->options_;
  KS_ASSIGN_OR_RETURN(runner->profile_, device_profile(o.device, o.threads));
  Runner* self = runner.get();
  runner->watchdog_ = std::make_unique<Watchdog>(
      [self](const std::string& step, double deadline_s, double elapsed_s) {
        self->on_hang(step, deadline_s, elapsed_s);
      },
      o.hang_grace_s);
  // A device this build lacks fails here, once, rather than on every row.
  KS_RETURN_IF_ERROR(runner->ensure_backend());
  // A split over CPU ranks reads the host's memory, and multiplies, with every rank's threads at
  // once, and its rates count every rank's work: its rooflines are all the threads' (the spare
  // backend has one rank's), still one device's.
  std::unique_ptr<Backend> whole;
  if (runner->profile_.host_memory && o.tensor_parallel > 1) {
    KS_ASSIGN_OR_RETURN(whole, make_backend(o.device, o.threads));
  }
  Backend& measured = whole ? *whole : *runner->spare_backend_;
  Roofline& r = runner->roofline_;
  if (o.roofline_gbs > 0) {
    r = Roofline{o.roofline_gbs, "given"};
  } else {
    r = measured.roofline();
    if (r.bandwidth_gbs <= 0) {  // the measurement failed
      r = Roofline{runner->profile_.bandwidth_gbs, "device profile (" + r.source + ")"};
    }
  }
  runner->matrix_rate_ = measured.matrix_rate();
  return runner;
}

Runner::~Runner() {
  // The engine goes before the watchdog thread stops, so a hang during teardown is still seen.
  engine_.reset();
  spare_backend_.reset();
}

Status Runner::ensure_backend() {
  if (engine_ || spare_backend_) return Status::ok();
  // Rank 0's backend when the model is split (the Engine makes the others).
  KS_ASSIGN_OR_RETURN(
      spare_backend_,
      make_backend(options_.device, threads_per_rank(options_.threads, options_.tensor_parallel)));
  return Status::ok();
}

double Runner::step_deadline(double expected_s, bool first_call) const {
  if (options_.step_timeout_s > 0) return options_.step_timeout_s;
  return step_deadline_seconds(expected_s, options_.deadline_factor, profile_.deadline_floor_s) +
         (first_call ? profile_.first_call_s : 0.0);
}

void Runner::on_hang(const std::string& step, double deadline_s, double elapsed_s) {
  CaseResult result;
  {
    std::lock_guard<std::mutex> lock(current_mutex_);
    result = current_;
  }
  result.ok = false;
  result.status = "error: watchdog: " + step + " still running after " + seconds_text(elapsed_s) +
                  " (deadline " + seconds_text(deadline_s) + "); the run was stopped";
  if (options_.on_hang) options_.on_hang(result);
}

Result<MemoryBudget> Runner::budget_for(const std::string& key) {
  MemoryBudget budget;
  budget.bytes = std::numeric_limits<size_t>::max();
  budget.source = "free memory unknown";
  const bool reuse = engine_ != nullptr && engine_key_ == key;
  if (profile_.host_memory) {
    auto available = host_available_memory();
    if (available.is_ok()) {
      size_t held = 0;  // the loaded model and reservation this configuration takes over
      if (reuse) {
        auto rss = process_status_bytes("VmRSS");
        if (rss.is_ok() && *rss > baseline_rss_) held = *rss - baseline_rss_;
      }
      budget.bytes = *available + held;
      budget.source = "MemAvailable of /proc/meminfo";
    }
  } else {
    const Backend& backend = engine_ ? engine_->backend() : *spare_backend_;
    const size_t free_now = backend.free_memory();
    if (free_now > 0) {
      budget.bytes = reuse && baseline_free_ > 0 ? baseline_free_ : free_now;
      budget.source = "free device memory";
    }
  }
  if (options_.max_memory > 0 && options_.max_memory <= budget.bytes) {
    budget.bytes = options_.max_memory;
    budget.source = "--max-memory " + options_.max_memory_text;
    budget.from_flag = true;
  }
  return budget;
}

double Runner::expected_seconds(const BenchCase& c) {
  auto spec = weight_spec_of(c.source, c.format, c.format_explicit, options_.block);
  if (!spec.is_ok() || !ensure_backend().is_ok()) return 0;
  const Backend& backend = engine_ ? engine_->backend() : *spare_backend_;
  const double kv_bytes =
      kv_entry_bytes(backend, spec->config, resolve_kv_cache(options_.kv_cache, spec->format));
  return expected_case_seconds(*spec, profile_, kv_bytes, options_.prefill_chunk, c);
}

Result<std::vector<int32_t>> Runner::prompt_for(const std::string& source, int64_t n_tokens,
                                                int64_t vocab_size) {
  Tokenize tokenize;
  if (options_.tokenizer_for) {
    auto cached = tokenized_text_.find(source);
    if (cached == tokenized_text_.end()) {
      KS_ASSIGN_OR_RETURN(Tokenize tokenizer, options_.tokenizer_for(source));
      if (tokenizer) {
        KS_ASSIGN_OR_RETURN(std::vector<int32_t> ids, tokenizer(options_.prompt_text));
        cached = tokenized_text_.emplace(source, std::move(ids)).first;
      }
    }
    if (cached != tokenized_text_.end()) {
      const std::vector<int32_t>& ids = cached->second;
      tokenize = [&ids](const std::string&) -> Result<std::vector<int32_t>> { return ids; };
    }
  }
  return prompt_tokens(options_.prompt_text, n_tokens, vocab_size, tokenize);
}

CaseResult Runner::run(const BenchCase& c) {
  CaseResult result;
  result.bench_case = c;
  result.commit = options_.commit;
  result.device = engine_          ? engine_->backend().name()
                  : spare_backend_ ? spare_backend_->name()
                                   : options_.device;
  {
    std::lock_guard<std::mutex> lock(current_mutex_);
    current_ = result;
  }
  const double expected = options_.on_progress ? expected_seconds(c) : 0.0;
  progress_reported_ = 0;
  const Status status = run_case(c, result);
  if (status.is_ok()) {
    result.ok = true;
    result.status = "ok";
  } else {
    result.ok = false;
    result.status = "error: " + status.message();
  }
  if (options_.on_progress && expected > progress_reported_) {
    options_.on_progress(expected - progress_reported_);
  }
  return result;
}

Status Runner::run_case(const BenchCase& c, CaseResult& result) {
  KS_ASSIGN_OR_RETURN(WeightSpec spec,
                      weight_spec_of(c.source, c.format, c.format_explicit, options_.block));
  const int ranks = options_.tensor_parallel;
  KS_ASSIGN_OR_RETURN(const WeightSpec rank_spec, rank_weight_spec(spec, ranks));
  result.weight_bytes = size_t(ranks) * planned_weight_bytes(rank_spec);
  result.decode_bytes = size_t(ranks) * planned_decode_bytes(rank_spec);
  const std::string key = engine_key(c);
  if (engine_ && engine_key_ != key) {
    engine_.reset();
    engine_key_.clear();
  }
  KS_RETURN_IF_ERROR(ensure_backend());
  {
    const Backend& backend = engine_ ? engine_->backend() : *spare_backend_;
    result.device = backend.name() + (ranks > 1 ? " x" + std::to_string(ranks) : "");
  }

  // Plan before anything is built.
  KS_ASSIGN_OR_RETURN(MemoryBudget budget, budget_for(key));
  // The ranks of a split on the CPU share the host's memory.
  const size_t host_ranks = profile_.host_memory ? size_t(ranks) : 1;
  budget.bytes /= host_ranks;
  PlanInputs inputs;
  inputs.weights = rank_spec;
  inputs.batch_size = c.batch_size;
  inputs.num_beams = c.num_beams;
  inputs.in_len = c.in_len;
  inputs.out_len = c.out_len;
  inputs.prefill_chunk = options_.prefill_chunk;
  inputs.reserve_bytes = profile_.reserve_bytes;
  inputs.host_logits = profile_.host_memory;
  const KvCacheType kv_cache = resolve_kv_cache(options_.kv_cache, spec.format);
  const LayoutOf layout_of = [&](const RunShape& shape) {
    const Backend& backend = engine_ ? engine_->backend() : *spare_backend_;
    RunShape typed = shape;
    typed.kv_cache = kv_cache;
    return backend.reserve_layout(rank_spec.config, typed);
  };
  auto plan = plan_memory(inputs, budget, layout_of);
  if (!plan.is_ok()) {
    // The row still records what the configuration would need at the smallest chunk.
    PlanInputs smallest = inputs;
    smallest.prefill_chunk = kMinPrefillChunk;
    MemoryBudget unlimited;
    unlimited.bytes = std::numeric_limits<size_t>::max();
    auto needed = plan_memory(smallest, unlimited, layout_of);
    if (needed.is_ok()) result.planned_bytes = needed->total_bytes() * host_ranks;
    return plan.status();
  }
  result.planned_bytes = plan->total_bytes() * host_ranks;
  result.prefill_chunk = std::min(options_.prefill_chunk, plan->shape.max_batch_tokens);
  {
    std::lock_guard<std::mutex> lock(current_mutex_);
    current_ = result;
  }

  const std::string label =
      c.model + " " + InOut{c.in_len, c.out_len}.text() + " batch " + std::to_string(c.batch_size);
  // The prompt is tokenized before anything is measured: loading a tokenizer (a 150k-entry
  // vocabulary parsed from JSON) takes more memory than a small model, and none of it is the
  // configuration's.
  KS_ASSIGN_OR_RETURN(std::vector<int32_t> prompt,
                      prompt_for(c.source, c.in_len, spec.config.vocab_size));
  // What the tokenizer freed goes back to the system, or the weights would be built in it and
  // the resident set, which the peak is measured against, would not grow.
  malloc_trim(0);
  if (!engine_) {
    if (!profile_.host_memory) {
      // The weights are built on the host before they are uploaded.
      auto available = host_available_memory();
      if (available.is_ok() && *available < result.weight_bytes) {
        return Status::error("building the weights needs " + format_bytes(result.weight_bytes) +
                             " of host memory but only " + format_bytes(*available) +
                             " is available (MemAvailable)");
      }
    }
    auto rss = process_status_bytes("VmRSS");
    baseline_rss_ = rss.is_ok() ? *rss : 0;
    baseline_free_ = spare_backend_->free_memory();
    EngineOptions engine_options;
    engine_options.model = c.source;
    if (c.format_explicit) engine_options.format = c.format;
    engine_options.block = options_.block;
    engine_options.device = options_.device;
    engine_options.threads = options_.threads;
    engine_options.prefill_chunk = options_.prefill_chunk;
    engine_options.progress = false;
    engine_options.run_shape = plan->shape;
    engine_options.run_shape.kv_cache = kv_cache;
    engine_options.kv_cache = kv_cache;
    engine_options.tensor_parallel = ranks;
    // Building the weights reads the disk and converts rows, whose speed no estimate knows: it
    // is watched for stalls, not held to a deadline (--step-timeout is for forward calls).
    watchdog_->arm_until_stall("building the weights of " + c.model, profile_.load_stall_s);
    auto engine = Engine::create(engine_options, std::move(spare_backend_));
    const Status load_status = watchdog_->disarm();
    if (!engine.is_ok()) return engine.status();
    engine_ = std::move(*engine);
    engine_key_ = key;
    called_shapes_.clear();
    KS_RETURN_IF_ERROR(load_status);
  } else {
    const RunShape& now = engine_->run_shape();
    const RunShape& want = plan->shape;
    if (now.max_seqs != want.max_seqs || now.max_context != want.max_context ||
        now.max_batch_tokens != want.max_batch_tokens ||
        now.max_logit_rows != want.max_logit_rows) {
      KS_RETURN_IF_ERROR(engine_->reserve(want));
    }
  }
  result.load_seconds = engine_->load_seconds();
  Backend& backend = engine_->backend();

  // Measure from here: the weights and this configuration's reservation exist.
  const bool rss_peak = profile_.host_memory && reset_peak_rss();
  min_free_ = backend.free_memory();

  const double kv_bytes = kv_entry_bytes(backend, spec.config, kv_cache);
  const int n_runs = c.warm_up + c.num_trials;
  bool interrupted = false;
  int run_index = 0;
  StepHooks hooks;
  hooks.before = [&](const StepInfo& info) -> Status {
    const std::string step =
        label + ", " +
        (run_index < c.warm_up ? "warm-up " + std::to_string(run_index + 1)
                               : "trial " + std::to_string(run_index - c.warm_up + 1)) +
        ", " + info.describe();
    if (options_.stop != nullptr && options_.stop->load()) {
      interrupted = true;
      return Status::error("interrupted (Ctrl-C) before " + step);
    }
    const StepCost cost = info.prefill ? prefill_cost(spec, info.n_tokens, info.context, kv_bytes)
                                       : decode_cost(spec, info.n_tokens, info.context, kv_bytes);
    const bool first_call = called_shapes_.insert({info.prefill, info.n_tokens}).second;
    watchdog_->arm(step, step_deadline(kestrel::expected_seconds(cost, profile_), first_call));
    return Status::ok();
  };
  hooks.after = [&](const StepInfo& info, double) -> Status {
    KS_RETURN_IF_ERROR(watchdog_->disarm());
    // Nothing allocates in the steps, so the first calls and the last show the peak.
    if (!profile_.host_memory && (info.prefill || info.index == 1 || info.index == info.count)) {
      const size_t free_now = backend.free_memory();
      if (free_now > 0) min_free_ = std::min(min_free_, free_now);
    }
    if (options_.on_progress) {
      const StepCost cost = info.prefill ? prefill_cost(spec, info.n_tokens, info.context, kv_bytes)
                                         : decode_cost(spec, info.n_tokens, info.context, kv_bytes);
      const double done = kestrel::expected_seconds(cost, profile_);
      progress_reported_ += done;
      options_.on_progress(done);
    }
    return Status::ok();
  };

  BatchGenerateParams params;
  params.batch_size = c.batch_size;
  params.num_beams = c.num_beams;
  params.n_new = c.out_len;
  for (run_index = 0; run_index < n_runs; ++run_index) {
    auto generated = engine_->generate_batch(prompt, params, hooks);
    if (!generated.is_ok()) {
      // The backend may be left mid-step; the next configuration builds a fresh one.
      (void)watchdog_->disarm();
      result.interrupted = interrupted;
      if (!interrupted) {
        engine_.reset();
        engine_key_.clear();
      }
      return generated.status();
    }
    if (run_index < c.warm_up) continue;
    result.trial_first_token_s.push_back(generated->first_token_seconds);
    if (!generated->step_seconds.empty()) {
      result.trial_next_token_s.push_back(mean(generated->step_seconds));
    }
    result.actual_in = int64_t(prompt.size());
    result.actual_out = int64_t(generated->tokens[0].size());
  }

  if (rss_peak) {
    auto hwm = process_status_bytes("VmHWM");
    if (hwm.is_ok() && *hwm > baseline_rss_) result.peak_bytes = *hwm - baseline_rss_;
  } else if (profile_.host_memory) {
    // No resettable peak: count the buffers the process holds for this configuration.
    result.peak_bytes = backend.peak_memory() * host_ranks + engine_->info().weight_bytes +
                        size_t(c.batch_size * c.num_beams * spec.config.vocab_size) * sizeof(float);
  } else if (baseline_free_ > 0 && min_free_ > 0 && baseline_free_ > min_free_) {
    result.peak_bytes = baseline_free_ - min_free_;
  } else {
    result.peak_bytes = backend.peak_memory();
  }

  result.has_timings = true;
  result.first_token_ms = median(result.trial_first_token_s) * 1e3;
  if (!result.trial_next_token_s.empty()) {
    const double next_s = median(result.trial_next_token_s);
    const ModelConfig& m = spec.config;
    result.has_next_token = true;
    result.next_token_ms = next_s * 1e3;
    result.decode_tps = double(c.batch_size) / next_s;
    // Decode step s reads the caches of every sequence up to position in_len + s; over steps
    // 1 .. out_len - 1 that is in_len + out_len / 2 positions on average.
    const double mean_context = double(c.in_len) + double(c.out_len) / 2.0;
    const double kv_read = double(c.batch_size * c.num_beams) * mean_context * double(m.n_layers) *
                           2.0 * double(m.kv_dim()) * kv_bytes;
    result.step_bytes = double(result.decode_bytes) + kv_read;
    result.achieved_gbs = result.step_bytes / next_s / 1e9;
    result.roofline_pct = result.achieved_gbs / roofline_.bandwidth_gbs * 100.0;
  }
  return Status::ok();
}

}  // namespace kestrel::bench
