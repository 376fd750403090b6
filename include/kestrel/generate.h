// Token-level generation of several different prompts at once, with sampling and end-of-sequence
// handling (what Hugging Face's model.generate does for a padded batch), on top of an Engine.
//
//   kestrel::TokenGenerationParams params;
//   params.max_new_tokens = 32;
//   auto result = kestrel::generate_tokens(*engine, {{1, 2, 3}, {4, 5}}, params);
//   // result->tokens[0]: the continuation of {1, 2, 3}; result->tokens[1]: that of {4, 5}
//
// Prompt i runs in sequence slot i of the engine (whose KV cache blocks it releases first), so
// the engine must have been reserved for at least as many sequences (EngineOptions::max_seqs or
// Engine::reserve). Its prompt is prefilled
// packed with the others into calls of up to the prefill chunk, then one decode step carries
// every sequence that has not stopped. Each sequence attends only to its own slot, so a prompt's
// continuation does not depend on the others beyond float rounding.
//
// Thread safety: as the Engine's (one thread at a time). `on_step` runs on the calling thread.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "kestrel/engine.h"
#include "kestrel/sampling.h"
#include "kestrel/status.h"

namespace kestrel {

struct TokenGenerationParams {
  // Sequence i draws with seed sampling.seed + i (greedy settings draw nothing).
  SamplingParams sampling;
  int64_t max_new_tokens = 20;
  int64_t min_new_tokens = 0;  // end-of-sequence tokens are suppressed before this many
  bool stop_at_eos = true;
  std::vector<int32_t> eos_token_ids;  // empty: the model's (generation_config.json)
  // Whether sampled rows (no penalty, no eos held back) are drawn through Engine::run_argmax
  // (RowDraw) instead of crossing to the host whole: unset, where the engine draws on its device
  // (Engine::draws_on_device); set, always or never. The tokens are the same either way.
  std::optional<bool> draw_rows;
  // Called before each prefill call after the first (on the calling thread): a non-ok Status
  // stops generation and is returned, so a long prompt can be interrupted (a caller's Ctrl-C
  // check) before it reaches its first token and on_step.
  std::function<Status()> between_prefill_calls;
};

struct TokenGenerationResult {
  std::vector<std::vector<int32_t>> tokens;  // [prompts][<= max_new_tokens]: an eos is kept
  std::vector<StopReason> stop_reasons;      // [prompts]: eos or max_tokens
  double prefill_seconds = 0;                // every prompt through its first token
  double decode_seconds = 0;                 // the later steps
  int64_t decode_steps = 0;
  // Steps queued before the tokens of the step before them came back (run ahead:
  // Engine::runs_ahead, while the device picks every token), a step queued past every
  // sequence's end (waited for and dropped, not in decode_steps) included.
  int64_t decode_steps_ahead = 0;
};

// Called once the first tokens are chosen and after every decode step, with that step's token of
// each prompt (-1 for a prompt that had already stopped). A non-ok Status stops generation and
// is what generate_tokens returns (a caller's Ctrl-C check, a streamer's error).
using TokenStepCallback = std::function<Status(const std::vector<int32_t>& step_tokens)>;

Result<TokenGenerationResult> generate_tokens(Engine& engine,
                                              const std::vector<std::vector<int32_t>>& prompts,
                                              const TokenGenerationParams& params,
                                              const TokenStepCallback& on_step = {});

// Writes the engine's weights as a converted model directory (what `kestrel convert` writes):
// model.safetensors in the engine's weight format, config.json, generation_config.json and the
// tokenizer files of the model directory it was loaded from. Loading that directory later needs
// no conversion and gives bit-identical results. `out_dir` must not be the source directory; a
// directory with files in it is replaced only when `replace_existing`.
Status save_converted(const Engine& engine, const std::string& out_dir,
                      bool replace_existing = false);

}  // namespace kestrel
