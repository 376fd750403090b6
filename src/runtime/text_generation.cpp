#include "runtime/text_generation.h"

#include <algorithm>
#include <chrono>

#include "io/config.h"
#include "runtime/planner.h"

namespace kestrel {

namespace {
double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}
}  // namespace

TextSession::TextSession(Engine& engine, const Tokenizer& tokenizer)
    : engine_(engine), tokenizer_(tokenizer) {}

Result<TextGenerationStats> TextSession::generate(
    const std::vector<int32_t>& prompt_ids, const TextGenerationParams& params,
    const std::function<void(const std::string&)>& on_text) {
  KS_RETURN_IF_ERROR(validate_sampling_params(params.sampling));
  KS_RETURN_IF_ERROR(engine_.check_reserved());
  if (prompt_ids.empty()) return Status::error("prompt is empty");
  const ModelConfig& config = engine_.config();
  const int64_t vocab = config.vocab_size;
  for (int32_t id : prompt_ids) {
    if (id < 0 || id >= vocab) {
      return Status::error("prompt token " + std::to_string(id) + " is outside the model's " +
                           std::to_string(vocab) +
                           "-token vocabulary (tokenizer and model differ)");
    }
  }
  const int64_t limit = engine_.max_context();
  if (params.max_new_tokens > limit - int64_t(prompt_ids.size())) {  // a sum could overflow
    return Status::error("prompt (" + std::to_string(prompt_ids.size()) + " tokens) + " +
                         std::to_string(params.max_new_tokens) +
                         " new tokens exceed the context of " + std::to_string(limit) +
                         " positions (raise EngineOptions::max_context or generate fewer tokens)");
  }

  // Reuse the cache for the longest common prefix; at least the last prompt token is rerun so
  // its logits come back.
  size_t reuse = 0;
  while (reuse < cached_.size() && reuse < prompt_ids.size() &&
         cached_[reuse] == prompt_ids[reuse]) {
    ++reuse;
  }
  reuse = std::min(reuse, prompt_ids.size() - 1);
  cached_.resize(reuse);

  TextGenerationStats stats;
  stats.reused_tokens = int64_t(reuse);
  stats.prompt_tokens = int64_t(prompt_ids.size() - reuse);

  StopConditions conditions;
  if (params.stop_at_eos) {
    for (int64_t id : config.eos_token_ids) conditions.eos_ids.push_back(int32_t(id));
  }
  conditions.stop_strings = params.stop_strings;
  conditions.max_new_tokens = params.max_new_tokens;
  conditions.min_new_tokens = params.min_new_tokens;
  StopChecker stop(conditions);
  Sampler sampler(params.sampling, int32_t(vocab));
  StreamDecoder decoder(tokenizer_, /*skip_special_tokens=*/true);
  std::vector<int32_t> history = prompt_ids;

  auto start = std::chrono::steady_clock::now();
  // The engine's chunk, which it may have shrunk to fit its memory (its reservation holds no
  // longer call).
  const int64_t chunk =
      std::max<int64_t>(1, prefill_chunk_of(engine_.options(), engine_.run_shape()));
  std::vector<float> logits;
  for (size_t begin = reuse; begin < prompt_ids.size(); begin += size_t(chunk)) {
    const size_t end = std::min(prompt_ids.size(), begin + size_t(chunk));
    Batch batch;
    for (size_t i = begin; i < end; ++i) {
      batch.add(prompt_ids[i], int32_t(i), 0, i + 1 == prompt_ids.size());
    }
    KS_RETURN_IF_ERROR(engine_.run(batch, &logits));
    cached_.insert(cached_.end(), prompt_ids.begin() + std::ptrdiff_t(begin),
                   prompt_ids.begin() + std::ptrdiff_t(end));
  }

  bool first = true;
  bool interrupted = false;
  while (!stop.done()) {
    stop.suppress_eos(logits);
    const int32_t token = sampler.sample(logits, history);
    if (first) {
      stats.prefill_seconds = seconds_since(start);
      start = std::chrono::steady_clock::now();
      first = false;
    }
    history.push_back(token);
    stats.tokens.push_back(token);
    ++stats.generated_tokens;
    const StopReason reason = stop.add(token, decoder.feed(token));
    if (on_text) {
      const std::string ready = stop.take_ready_text();
      if (!ready.empty()) on_text(ready);
    }
    if (reason != StopReason::none || stop.done()) break;
    if (params.interrupt != nullptr && params.interrupt->load()) {
      interrupted = true;
      break;
    }
    Batch batch;
    batch.add(token, int32_t(history.size() - 1), 0, true);
    KS_RETURN_IF_ERROR(engine_.run(batch, &logits));
    cached_.push_back(token);
  }
  stats.decode_seconds = seconds_since(start);
  // The decoder may hold the bytes of an unfinished character (a token budget that ran out
  // mid-character); they end the output, as HF's decode would show them.
  std::string rest = stop.take_remaining_text();
  stats.text = stop.text();
  if (stop.reason() != StopReason::stop_string) {
    const std::string tail = decoder.finish();
    rest += tail;
    stats.text += tail;
  }
  if (on_text && !rest.empty()) on_text(rest);
  stats.stop_reason = interrupted                         ? StopReason::interrupted
                      : stop.reason() == StopReason::none ? StopReason::max_tokens
                                                          : stop.reason();
  return stats;
}

}  // namespace kestrel
