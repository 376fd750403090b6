#include "kestrel/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <string>

#include "core/thread_pool.h"
#include "model/loader.h"
#include "runtime/planner.h"

namespace kestrel {

namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
// Refuses a reservation larger than the memory it would come from, before allocating any of it:
// a huge context must fail with its numbers, not with std::bad_alloc or the OOM killer.
Status check_reservation_fits(const Backend& backend, const ModelConfig& config,
                              const RunShape& shape) {
  Result<WorkspaceLayout> layout = backend.reserve_layout(config, shape);
  if (!layout.is_ok()) return Status::ok();  // a backend that cannot tell checks for itself
  size_t available = backend.free_memory();
  std::string where = "free device memory";
  if (available == 0) {
    Result<size_t> host = host_available_memory();
    if (!host.is_ok()) return Status::ok();
    available = *host;
    where = "MemAvailable of the host";
  }
  const size_t needed = layout->total_bytes();
  if (needed <= available) return Status::ok();
  return Status::error("the KV cache (" + format_bytes(layout->kv_cache_bytes()) + " for " +
                       std::to_string(shape.max_seqs) + " sequences x " +
                       std::to_string(shape.max_context) + " positions) and workspace need " +
                       format_bytes(needed) + " but only " + format_bytes(available) +
                       " is free (" + where + "); lower the context length (-c)");
}

}  // namespace

int32_t argmax(const float* values, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i) {
    if (values[i] > values[best]) best = i;
  }
  return int32_t(best);
}

namespace {
Status check_threads(int threads) {
  if (threads >= 0 && threads <= kMaxThreads) return Status::ok();
  return Status::error("threads must be between 0 (all) and " + std::to_string(kMaxThreads) +
                       ", got " + std::to_string(threads));
}
}  // namespace

Result<std::unique_ptr<Engine>> Engine::create(const EngineOptions& options) {
  KS_RETURN_IF_ERROR(check_threads(options.threads));
  KS_ASSIGN_OR_RETURN(std::unique_ptr<Backend> backend,
                      make_backend(options.device, options.threads));
  return create(options, std::move(backend));
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
  engine->backend_ = std::move(backend);
  {
    ThreadPool load_pool(options.threads);
    LoadOptions load;
    load.format = options.format;
    load.format_explicit = options.format_explicit;
    load.block = options.block;
    load.progress = options.progress;
    KS_ASSIGN_OR_RETURN(engine->weights_, load_model(options.model, load, load_pool));
  }
  const ModelConfig& c = engine->weights_.config;
  int64_t max_context = options.max_context;
  if (max_context <= 0) {
    max_context =
        c.max_position_embeddings > 0 ? std::min<int64_t>(c.max_position_embeddings, 4096) : 4096;
  }
  KS_RETURN_IF_ERROR(engine->backend_->upload(engine->weights_));
  RunShape shape = options.run_shape;
  if (shape.max_batch_tokens <= 0) {
    shape.max_seqs = options.max_seqs;
    shape.max_context = max_context;
    shape.max_batch_tokens = std::max(options.prefill_chunk, options.max_seqs);
    shape.max_logit_rows = shape.max_batch_tokens;
  }
  KS_RETURN_IF_ERROR(engine->reserve(shape));
  engine->load_seconds_ = seconds_since(start);
  return engine;
}

Status Engine::reserve(const RunShape& shape) {
  if (shape.max_seqs <= 0 || shape.max_context <= 0 || shape.max_batch_tokens <= 0 ||
      shape.max_logit_rows <= 0) {
    return Status::error(
        "run shape needs positive sequences, context, batch tokens and logit rows");
  }
  if (shape.max_context > std::numeric_limits<int32_t>::max()) {
    return Status::error("context length " + std::to_string(shape.max_context) +
                         " is past the limit of " +
                         std::to_string(std::numeric_limits<int32_t>::max()) + " positions");
  }
  KS_RETURN_IF_ERROR(check_reservation_fits(*backend_, config(), shape));
  KS_RETURN_IF_ERROR(backend_->reserve(config(), shape));
  run_shape_ = shape;
  max_context_ = shape.max_context;
  return Status::ok();
}

int64_t Engine::chunk_tokens() const {
  return std::min(options_.prefill_chunk, run_shape_.max_batch_tokens);
}

Status Engine::run(const Batch& batch, std::vector<float>* logits) {
  return forward(*backend_, weights_, batch, logits);
}

Status Engine::run_argmax(const Batch& batch, std::vector<int32_t>* tokens) {
  return forward_argmax(*backend_, weights_, batch, tokens);
}

Result<std::vector<float>> Engine::prompt_logits(const std::vector<int32_t>& ids, int32_t seq) {
  if (ids.empty()) return Status::error("prompt is empty");
  if (int64_t(ids.size()) > max_context_) {
    return Status::error("prompt of " + std::to_string(ids.size()) +
                         " tokens exceeds the context of " + std::to_string(max_context_) +
                         " (raise -c)");
  }
  std::vector<float> all;
  all.reserve(ids.size() * size_t(config().vocab_size));
  std::vector<float> chunk_logits;
  // Every position wants logits here, so a chunk is also bounded by the reserved logit rows.
  const size_t chunk = size_t(std::min(chunk_tokens(), run_shape_.max_logit_rows));
  for (size_t begin = 0; begin < ids.size(); begin += chunk) {
    const size_t end = std::min(ids.size(), begin + chunk);
    Batch batch;
    for (size_t i = begin; i < end; ++i) batch.add(ids[i], int32_t(i), seq, true);
    KS_RETURN_IF_ERROR(run(batch, &chunk_logits));
    all.insert(all.end(), chunk_logits.begin(), chunk_logits.end());
  }
  return all;
}

Result<std::vector<float>> Engine::prefill(const std::vector<int32_t>& ids, int32_t seq) {
  if (ids.empty()) return Status::error("prompt is empty");
  if (int64_t(ids.size()) > max_context_) {
    return Status::error("prompt of " + std::to_string(ids.size()) +
                         " tokens exceeds the context of " + std::to_string(max_context_) +
                         " (raise -c)");
  }
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
  GenerateResult result;
  if (n_new <= 0) return result;
  if (int64_t(prompt.size()) + n_new > max_context_) {
    return Status::error("prompt (" + std::to_string(prompt.size()) + ") + new tokens (" +
                         std::to_string(n_new) + ") exceed the context of " +
                         std::to_string(max_context_) + " (raise -c or lower -n)");
  }
  const auto& eos = config().eos_token_ids;
  auto start = std::chrono::steady_clock::now();
  if (prompt.empty()) return Status::error("prompt is empty");
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

namespace {

// One hypothesis of beam search, or the one sequence of a greedy copy.
struct Beam {
  int32_t slot = 0;
  double score = 0;  // sum of log-probabilities of `tokens`
  std::vector<int32_t> tokens;
};

// log(sum(exp(row))) in double, stable.
double log_sum_exp(const float* row, int64_t n) {
  float max_value = row[0];
  for (int64_t i = 1; i < n; ++i) max_value = std::max(max_value, row[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(double(row[i]) - double(max_value));
  return double(max_value) + std::log(sum);
}

// Indices of the k largest values of row (ties: the lower index first), best first.
std::vector<int32_t> top_k(const float* row, int64_t n, int64_t k) {
  std::vector<int32_t> best;
  best.reserve(size_t(k) + 1);
  auto better = [&](int32_t a, int32_t b) {
    return row[a] > row[b] || (row[a] == row[b] && a < b);
  };
  for (int64_t i = 0; i < n; ++i) {
    if (int64_t(best.size()) == k && !better(int32_t(i), best.back())) continue;
    auto at = std::upper_bound(best.begin(), best.end(), int32_t(i), better);
    best.insert(at, int32_t(i));
    if (int64_t(best.size()) > k) best.pop_back();
  }
  return best;
}

// One beam search step of one copy: `rows` holds the logits of each live beam ([live, vocab]).
// Keeps the `n_beams` best extensions over all beams (ties: lower parent, then lower token), best
// first. A parent's first child inherits its cache slot; further children get a slot no survivor
// holds and a copy of the parent's first `n_positions` cache positions.
Status advance_beams(Backend& backend, std::vector<Beam>& live, const float* rows, int64_t vocab,
                     int64_t n_beams, int32_t first_slot, int64_t n_positions) {
  struct Candidate {
    double score;
    int32_t parent;
    int32_t token;
  };
  std::vector<Candidate> candidates;
  for (size_t p = 0; p < live.size(); ++p) {
    const float* row = rows + int64_t(p) * vocab;
    const double lse = log_sum_exp(row, vocab);
    for (int32_t token : top_k(row, vocab, n_beams)) {
      candidates.push_back({live[p].score + double(row[token]) - lse, int32_t(p), token});
    }
  }
  std::sort(candidates.begin(), candidates.end(), [](const Candidate& a, const Candidate& b) {
    if (a.score != b.score) return a.score > b.score;
    if (a.parent != b.parent) return a.parent < b.parent;
    return a.token < b.token;
  });
  candidates.resize(size_t(std::min<int64_t>(n_beams, int64_t(candidates.size()))));

  std::vector<bool> has_child(live.size(), false);
  for (const Candidate& c : candidates) has_child[size_t(c.parent)] = true;
  std::vector<bool> slot_kept(size_t(n_beams), false);
  for (size_t p = 0; p < live.size(); ++p) {
    if (has_child[p]) slot_kept[size_t(live[p].slot - first_slot)] = true;
  }
  std::vector<int32_t> free_slots;
  for (int64_t i = n_beams - 1; i >= 0; --i) {
    if (!slot_kept[size_t(i)]) free_slots.push_back(first_slot + int32_t(i));
  }
  std::vector<bool> slot_taken(live.size(), false);
  std::vector<Beam> next;
  next.reserve(candidates.size());
  for (const Candidate& c : candidates) {
    const Beam& parent = live[size_t(c.parent)];
    Beam beam;
    if (!slot_taken[size_t(c.parent)]) {
      slot_taken[size_t(c.parent)] = true;
      beam.slot = parent.slot;
    } else {
      beam.slot = free_slots.back();
      free_slots.pop_back();
      KS_RETURN_IF_ERROR(backend.copy_sequence(parent.slot, beam.slot, n_positions));
    }
    beam.score = c.score;
    beam.tokens = parent.tokens;
    beam.tokens.push_back(c.token);
    next.push_back(std::move(beam));
  }
  live = std::move(next);
  return Status::ok();
}

}  // namespace

Result<BatchGenerateResult> Engine::generate_batch(const std::vector<int32_t>& prompt,
                                                   const BatchGenerateParams& params,
                                                   const StepHooks& hooks) {
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
  if (prompt_len + n_new > max_context_) {
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

  BatchGenerateResult result;
  std::vector<std::vector<Beam>> beams(static_cast<size_t>(copies));
  std::vector<float> logits;
  std::vector<int32_t> next_tokens;
  const int64_t chunk = chunk_tokens();
  const int64_t chunks_per_copy = (prompt_len + chunk - 1) / chunk;

  // Prefill every copy on its own, then pick its first token(s).
  for (int64_t c = 0; c < copies; ++c) {
    const int32_t slot = int32_t(c * n_beams);
    for (int64_t k = 0; k < chunks_per_copy; ++k) {
      const int64_t begin = k * chunk;
      const int64_t end = std::min(prompt_len, begin + chunk);
      StepInfo info;
      info.prefill = true;
      info.index = c * chunks_per_copy + k;
      info.count = copies * chunks_per_copy;
      info.n_tokens = end - begin;
      info.context = end;
      KS_RETURN_IF_ERROR(before(info));
      const auto start = std::chrono::steady_clock::now();
      Batch batch;
      for (int64_t i = begin; i < end; ++i) {
        batch.add(prompt[size_t(i)], int32_t(i), slot, i + 1 == prompt_len);
      }
      if (end < prompt_len) {
        KS_RETURN_IF_ERROR(run(batch, &logits));  // no logit rows: nothing comes back
      } else {
        std::vector<Beam>& live = beams[size_t(c)];
        live.assign(1, Beam{slot, 0.0, {}});
        if (n_beams == 1) {
          // Greedy needs only the argmax, which a device backend computes in place.
          KS_RETURN_IF_ERROR(run_argmax(batch, &next_tokens));
          live[0].tokens.push_back(next_tokens.at(0));
        } else {
          KS_RETURN_IF_ERROR(run(batch, &logits));
          KS_RETURN_IF_ERROR(
              advance_beams(*backend_, live, logits.data(), vocab, n_beams, slot, prompt_len));
        }
      }
      const double seconds = seconds_since(start);
      result.first_token_seconds += seconds;
      KS_RETURN_IF_ERROR(after(info, seconds));
    }
  }

  // Decode: step s feeds each sequence's token s - 1 at position prompt_len + s - 1.
  for (int64_t s = 1; s < n_new; ++s) {
    StepInfo info;
    info.index = s;
    info.count = n_new - 1;
    info.n_tokens = n_seqs;
    info.context = prompt_len + s;
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
        KS_RETURN_IF_ERROR(advance_beams(*backend_, live, rows, vocab, n_beams,
                                         int32_t(c * n_beams), prompt_len + s));
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
