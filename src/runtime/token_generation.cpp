// kestrel::generate_tokens and kestrel::save_converted (include/kestrel/generate.h): several
// prompts generated together, one sequence slot each, with the samplers and stop conditions of
// the text path.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <memory>
#include <span>
#include <thread>

#include "core/thread_pool.h"
#include "io/config.h"
#include "kestrel/generate.h"
#include "model/loader.h"
#include "runtime/kv_cache.h"
#include "runtime/planner.h"
#include "sample/sampler.h"
#include "sample/stop.h"

namespace kestrel {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

Status check_prompts(const Engine& engine, const std::vector<std::vector<int32_t>>& prompts,
                     const TokenGenerationParams& params) {
  KS_RETURN_IF_ERROR(engine.check_reserved());
  if (prompts.empty()) return Status::error("no prompts to generate from");
  if (params.max_new_tokens < 0 || params.min_new_tokens < 0) {
    return Status::error("max_new_tokens and min_new_tokens must not be negative");
  }
  const RunShape& shape = engine.run_shape();
  const int64_t n = int64_t(prompts.size());
  if (n > shape.max_seqs || n > shape.max_batch_tokens || n > shape.max_logit_rows) {
    return Status::error(std::to_string(n) + " prompts exceed the reservation (" +
                         std::to_string(shape.max_seqs) + " sequences, decode batches of " +
                         std::to_string(std::min(shape.max_batch_tokens, shape.max_logit_rows)) +
                         "; raise EngineOptions::max_seqs)");
  }
  const int64_t vocab = engine.info().vocab_size;
  for (size_t p = 0; p < prompts.size(); ++p) {
    const std::vector<int32_t>& prompt = prompts[p];
    if (prompt.empty()) return Status::error("prompt " + std::to_string(p) + " is empty");
    for (int32_t id : prompt) {
      if (id < 0 || id >= vocab) {
        return Status::error("prompt " + std::to_string(p) + ": token " + std::to_string(id) +
                             " is outside the model's " + std::to_string(vocab) +
                             "-token vocabulary");
      }
    }
    // Written as a difference: max_new_tokens may be anything a caller passes.
    if (params.max_new_tokens > engine.max_context() - int64_t(prompt.size())) {
      return Status::error("prompt " + std::to_string(p) + " (" + std::to_string(prompt.size()) +
                           " tokens) + " + std::to_string(params.max_new_tokens) +
                           " new tokens exceed the context of " +
                           std::to_string(engine.max_context()) +
                           " positions (raise EngineOptions::max_context or generate fewer "
                           "tokens)");
    }
  }
  for (int32_t id : params.eos_token_ids) {
    if (id < 0 || id >= vocab) {
      return Status::error("eos token id " + std::to_string(id) + " is outside the model's " +
                           std::to_string(vocab) + "-token vocabulary");
    }
  }
  return validate_sampling_params(params.sampling);
}

// One prompt's generation state.
struct Sequence {
  Sampler sampler;
  StopChecker stop;
  std::vector<int32_t> history;  // prompt and generated tokens (the penalties read it)
  int32_t next = -1;             // the token chosen last, fed at the next step
  bool running = true;
};

}  // namespace

Result<TokenGenerationResult> generate_tokens(Engine& engine,
                                              const std::vector<std::vector<int32_t>>& prompts,
                                              const TokenGenerationParams& params,
                                              const TokenStepCallback& on_step) {
  KS_RETURN_IF_ERROR(check_prompts(engine, prompts, params));
  const ModelInfo info = engine.info();
  const int64_t vocab = info.vocab_size;
  const size_t n = prompts.size();

  StopConditions conditions;
  if (params.stop_at_eos) {
    if (params.eos_token_ids.empty()) {
      for (int64_t id : info.eos_token_ids) conditions.eos_ids.push_back(int32_t(id));
    } else {
      conditions.eos_ids = params.eos_token_ids;
    }
  }
  conditions.max_new_tokens = params.max_new_tokens;
  conditions.min_new_tokens = params.min_new_tokens;
  std::vector<Sequence> seqs;
  seqs.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    SamplingParams sampling = params.sampling;
    sampling.seed += uint64_t(i);
    seqs.push_back(
        Sequence{Sampler(sampling, int32_t(vocab)), StopChecker(conditions), prompts[i], -1, true});
  }
  // Each prompt starts its slot afresh: blocks a slot held from earlier calls go back to the pool.
  for (size_t i = 0; i < n; ++i) engine.release_sequence(int32_t(i));
  TokenGenerationResult result;
  result.tokens.assign(n, {});
  result.stop_reasons.assign(n, StopReason::max_tokens);
  if (params.max_new_tokens == 0) return result;

  // The device picks the token itself (no logits come back) while nothing but the argmax
  // matters: greedy without penalties, and no eos to suppress.
  const bool greedy = seqs.front().sampler.picks_argmax();
  auto argmax_only = [&](int64_t generated) {
    return greedy && (conditions.eos_ids.empty() || generated >= params.min_new_tokens);
  };

  // Sampled rows drawn where the engine draws (Engine::run_argmax with RowDraw), each with its
  // sequence's settings and its own generator's next number: its sampler's token, and no row
  // crosses to the host.
  const bool drawable =
      seqs.front().sampler.draws_from_row() && params.draw_rows.value_or(engine.draws_on_device());
  auto draws_only = [&](int64_t generated) {
    return drawable && (conditions.eos_ids.empty() || generated >= params.min_new_tokens);
  };

  std::vector<float> logits;         // [rows, vocab]
  std::vector<int32_t> argmax_rows;  // [rows]: the argmax, or the drawn tokens
  std::vector<int32_t> step_tokens(n, -1);
  // Picks the next token of `seqs[i]` from row `row` of the last call.
  auto choose = [&](size_t i, size_t row, bool from_argmax) {
    Sequence& s = seqs[i];
    int32_t token;
    if (from_argmax) {
      token = argmax_rows.at(row);
    } else {
      std::span<float> row_logits(logits.data() + row * size_t(vocab), size_t(vocab));
      s.stop.suppress_eos(row_logits);
      token = s.sampler.sample(row_logits, s.history);
    }
    s.history.push_back(token);
    result.tokens[i].push_back(token);
    step_tokens[i] = token;
    s.next = token;
    const StopReason reason = s.stop.add(token, {});
    if (reason != StopReason::none || s.stop.done()) {
      s.running = false;
      result.stop_reasons[i] = reason == StopReason::none ? StopReason::max_tokens : reason;
    }
  };

  // The rows of a step whose tokens are sampled on the host, side by side: choose() touches only
  // its own sequence's state and result entries, so the tokens are a loop's.
  std::unique_ptr<ThreadPool> pool;  // made at the first sampled step: a thread a prompt at most
  auto choose_all = [&](const std::vector<size_t>& seq_of_row, bool from_argmax) {
    const int64_t rows = int64_t(seq_of_row.size());
    if (from_argmax) {
      for (int64_t r = 0; r < rows; ++r) choose(seq_of_row[size_t(r)], size_t(r), true);
      return;
    }
    if (!pool) {
      pool = std::make_unique<ThreadPool>(int(std::max<int64_t>(
          1, std::min<int64_t>(int64_t(n), std::thread::hardware_concurrency()))));
    }
    pool->parallel_for(rows, 1, [&](int64_t begin, int64_t end, int) {
      for (int64_t r = begin; r < end; ++r) choose(seq_of_row[size_t(r)], size_t(r), false);
    });
  };

  // The draws of a call whose logit row r is sequence seq_of_row[r]'s, every row drawn (each
  // takes its generator's next number).
  auto draws_of = [&](const std::vector<size_t>& seq_of_row) {
    std::vector<RowDraw> draws;
    for (size_t r = 0; r < seq_of_row.size(); ++r) {
      draws.push_back(seqs[seq_of_row[r]].sampler.next_draw(int32_t(r)));
    }
    return draws;
  };
  auto run_drawn = [&](const Batch& batch, const std::vector<size_t>& seq_of_row) {
    return engine.run_argmax(batch, &argmax_rows, {}, nullptr, draws_of(seq_of_row));
  };

  // Prefill: the prompts packed back to back into calls of up to the chunk; each prompt's last
  // token asks for its logits.
  auto start = std::chrono::steady_clock::now();
  const int64_t chunk =
      std::max<int64_t>(1, prefill_chunk_of(engine.options(), engine.run_shape()));
  const bool first_argmax = argmax_only(0);
  const bool first_drawn = !first_argmax && draws_only(0);
  size_t next_prompt = 0;
  size_t next_pos = 0;
  bool first_call = true;
  while (next_prompt < n) {
    if (!first_call && params.between_prefill_calls) {
      KS_RETURN_IF_ERROR(params.between_prefill_calls());
    }
    first_call = false;
    Batch batch;
    std::vector<size_t> finished;  // prompts whose last token is in this call
    while (batch.size() < chunk && next_prompt < n) {
      const std::vector<int32_t>& prompt = prompts[next_prompt];
      const size_t take = std::min(size_t(chunk - batch.size()), prompt.size() - next_pos);
      for (size_t i = next_pos; i < next_pos + take; ++i) {
        batch.add(prompt[i], int32_t(i), int32_t(next_prompt), i + 1 == prompt.size());
      }
      next_pos += take;
      if (next_pos == prompt.size()) {
        finished.push_back(next_prompt);
        ++next_prompt;
        next_pos = 0;
      }
    }
    if (!finished.empty() && first_argmax) {
      KS_RETURN_IF_ERROR(engine.run_argmax(batch, &argmax_rows));
    } else if (!finished.empty() && first_drawn) {
      KS_RETURN_IF_ERROR(run_drawn(batch, finished));
    } else {
      KS_RETURN_IF_ERROR(engine.run(batch, &logits));
    }
    choose_all(finished, first_argmax || first_drawn);
  }
  result.prefill_seconds = seconds_since(start);
  if (on_step) KS_RETURN_IF_ERROR(on_step(step_tokens));

  // Decode: one call carries the last token of every running sequence.
  start = std::chrono::steady_clock::now();
  // Run ahead (Engine::runs_ahead), while the device picks the tokens (the argmax, or draws): the
  // step after the current one is queued before the current one's tokens come back, fed them on
  // the device, when it will carry the same sequences (none reaches max_new_tokens with the
  // current token) and picks the same way. A sequence the current token stops (eos, a stop id)
  // leaves the queued step a row it drops (a drawn row has taken its generator's next number,
  // which that ended sequence never uses); the step after that goes from the host's tokens.
  const bool ahead = engine.runs_ahead();
  std::vector<std::vector<size_t>> queued;  // the sequences of each queued step's rows, in order
  auto queue_step = [&](const std::vector<size_t>& rows, bool from_argmax, bool drawn) {
    Batch batch;
    const size_t offset = from_argmax ? 1 : 0;  // fed the token the step before it picks
    for (size_t i : rows) {
      batch.add(from_argmax ? 0 : seqs[i].next, int32_t(seqs[i].history.size() - 1 + offset),
                int32_t(i), true);
    }
    KS_RETURN_IF_ERROR(
        engine.start_argmax(batch, from_argmax, drawn ? draws_of(rows) : std::vector<RowDraw>{}));
    if (from_argmax) ++result.decode_steps_ahead;
    queued.push_back(rows);
    return Status::ok();
  };
  for (int64_t generated = 1;; ++generated) {
    Batch batch;
    std::vector<size_t> rows;  // the sequence of each row
    for (size_t i = 0; i < n; ++i) {
      step_tokens[i] = -1;
      if (!seqs[i].running) continue;
      batch.add(seqs[i].next, int32_t(seqs[i].history.size() - 1), int32_t(i), true);
      rows.push_back(i);
    }
    if (rows.empty()) break;
    const bool use_argmax = argmax_only(generated);
    const bool use_draws = !use_argmax && draws_only(generated);
    if (ahead && (use_argmax || use_draws)) {
      if (queued.empty()) KS_RETURN_IF_ERROR(queue_step(rows, false, use_draws));
      bool same_rows_next = queued.size() == 1 && queued.front() == rows &&
                            (use_argmax ? argmax_only(generated + 1) : draws_only(generated + 1));
      // A step run ahead takes a new KV block only while the pool could still serve every
      // running sequence to max_new_tokens: then the block its sequence may never use (a stop
      // drops the step) cannot be one another sequence needs later. From a tighter pool the
      // blocks are taken as step by step, at the steps that use them.
      const PagedKvCache& kv = engine.kv_cache();
      int64_t new_blocks = 0;
      int64_t worst = 0;  // blocks the running sequences may still take, at most
      for (size_t i : rows) {
        same_rows_next =
            same_rows_next && int64_t(result.tokens[i].size()) + 1 < params.max_new_tokens;
        const int64_t position = int64_t(seqs[i].history.size());  // the step after's
        new_blocks += kv.blocks_to_reserve(int32_t(i), position + 1);
        // Its last write: the token before its max_new_tokens-th, fed at prompt + max - 2.
        const int64_t last = int64_t(prompts[i].size()) + params.max_new_tokens - 2;
        worst += kv.blocks_to_reserve(int32_t(i), last + 1);
      }
      same_rows_next =
          same_rows_next && (new_blocks == 0 || worst <= engine.kv_cache().available_blocks());
      if (same_rows_next) KS_RETURN_IF_ERROR(queue_step(rows, true, use_draws));
      KS_RETURN_IF_ERROR(engine.finish_argmax(&argmax_rows));
      const std::vector<size_t> step_rows = std::move(queued.front());
      queued.erase(queued.begin());
      for (size_t r = 0; r < step_rows.size(); ++r) {
        if (seqs[step_rows[r]].running) choose(step_rows[r], r, true);
      }
      ++result.decode_steps;
      if (on_step) KS_RETURN_IF_ERROR(on_step(step_tokens));
      continue;
    }
    if (use_argmax) {
      KS_RETURN_IF_ERROR(engine.run_argmax(batch, &argmax_rows));
    } else if (use_draws) {
      KS_RETURN_IF_ERROR(run_drawn(batch, rows));
    } else {
      KS_RETURN_IF_ERROR(engine.run(batch, &logits));
    }
    choose_all(rows, use_argmax || use_draws);
    ++result.decode_steps;
    if (on_step) KS_RETURN_IF_ERROR(on_step(step_tokens));
  }
  result.decode_seconds = seconds_since(start);
  // A step queued past the last sequence's stop is waited for and dropped.
  for (; !queued.empty(); queued.pop_back()) KS_RETURN_IF_ERROR(engine.finish_argmax(&argmax_rows));
  return result;
}

Status save_converted(const Engine& engine, const std::string& out_dir, bool replace_existing) {
  const std::string& source = engine.options().model;
  const bool from_dir = source.rfind("synthetic:", 0) != 0;
  return save_converted(engine.weights(), from_dir ? source : "", out_dir, replace_existing);
}

}  // namespace kestrel
