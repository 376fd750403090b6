// kestrel::generate_tokens (include/kestrel/generate.h): prompts of different lengths generated
// together, sampling, end-of-sequence handling and the step callback, on a tiny synthetic model.
#include <gtest/gtest.h>

#include <functional>
#include <random>

#include "argmax_rows_check.h"
#include "kestrel/engine.h"
#include "kestrel/generate.h"

namespace kestrel {
namespace {

std::unique_ptr<Engine> make_engine(int64_t max_seqs, int64_t prefill_chunk, int64_t kv_blocks = 0,
                                    bool run_ahead = false) {
  EngineOptions options;
  options.run_ahead = run_ahead;
  options.model = "synthetic:tiny-llama";
  options.format = WeightFormat::fp32;
  options.threads = 2;
  options.progress = false;
  options.max_context = 96;
  options.max_seqs = max_seqs;
  options.prefill_chunk = prefill_chunk;
  options.kv_blocks = kv_blocks;
  auto engine = Engine::create(options);
  EXPECT_TRUE(engine.is_ok()) << engine.status().message();
  return std::move(engine).value();
}

std::vector<int32_t> random_prompt(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int32_t> id(3, 5000);
  std::vector<int32_t> ids(n);
  for (auto& v : ids) v = id(rng);
  return ids;
}

// A hook that fails ("stop here") at its n-th call, counting its calls in `calls`.
std::function<Status()> stop_at_call(int n, int& calls) {
  return [n, &calls] { return ++calls == n ? Status::error("stop here") : Status::ok(); };
}

// A call that a stop_at_call(2, calls) hook stopped.
template <typename R>
void expect_stopped_at_second_call(const R& result, int calls) {
  ASSERT_FALSE(result.is_ok());
  EXPECT_EQ(result.status().message(), "stop here");
  EXPECT_EQ(calls, 2);
}

TEST(TokenGeneration, BatchOfDifferentLengthsEqualsEachPromptAlone) {
  // A small chunk, so prompts are split across prefill calls and share them.
  auto engine = make_engine(3, 16);
  const std::vector<std::vector<int32_t>> prompts = {random_prompt(5, 1), random_prompt(29, 2),
                                                     random_prompt(12, 3)};
  TokenGenerationParams params;
  params.max_new_tokens = 10;
  params.stop_at_eos = false;
  auto together = generate_tokens(*engine, prompts, params);
  ASSERT_TRUE(together.is_ok()) << together.status().message();
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto alone = engine->generate_greedy(prompts[i], 10);
    ASSERT_TRUE(alone.is_ok());
    EXPECT_EQ(together->tokens[i], alone->tokens) << "prompt " << i;
    EXPECT_EQ(together->stop_reasons[i], StopReason::max_tokens);
  }
  EXPECT_EQ(together->decode_steps, 9);
}

TEST(TokenGeneration, EosStopsOnlyItsSequenceAndMinNewTokensSuppressesIt) {
  auto engine = make_engine(2, 512);
  const std::vector<std::vector<int32_t>> prompts = {random_prompt(7, 4), random_prompt(9, 5)};
  TokenGenerationParams params;
  params.max_new_tokens = 8;
  params.stop_at_eos = false;
  auto free_run = generate_tokens(*engine, prompts, params);
  ASSERT_TRUE(free_run.is_ok());
  // Prompt 0's fourth token becomes the eos: it stops there, prompt 1 runs on (unless the same
  // token comes up there first).
  const int32_t eos = free_run->tokens[0][3];
  params.stop_at_eos = true;
  params.eos_token_ids = {eos};
  std::vector<std::vector<int32_t>> steps;
  auto stopped = generate_tokens(*engine, prompts, params, [&](const std::vector<int32_t>& step) {
    steps.push_back(step);
    return Status::ok();
  });
  ASSERT_TRUE(stopped.is_ok());
  const auto& first = free_run->tokens[0];
  const size_t cut = size_t(std::find(first.begin(), first.end(), eos) - first.begin()) + 1;
  EXPECT_EQ(stopped->tokens[0], std::vector<int32_t>(first.begin(), first.begin() + cut));
  EXPECT_EQ(stopped->stop_reasons[0], StopReason::eos);
  // The callback saw every token, and -1 for prompt 0 once it had stopped.
  ASSERT_EQ(steps.size(), std::max(stopped->tokens[0].size(), stopped->tokens[1].size()));
  for (size_t s = 0; s < steps.size(); ++s) {
    EXPECT_EQ(steps[s][0], s < cut ? first[s] : -1);
    EXPECT_EQ(steps[s][1], s < stopped->tokens[1].size() ? stopped->tokens[1][s] : -1);
  }
  // min_new_tokens keeps the eos out of the first tokens.
  params.min_new_tokens = int64_t(cut) + 1;
  auto suppressed = generate_tokens(*engine, {prompts[0]}, params);
  ASSERT_TRUE(suppressed.is_ok());
  ASSERT_GE(suppressed->tokens[0].size(), cut + 1);
  for (size_t i = 0; i < cut + 1; ++i) EXPECT_NE(suppressed->tokens[0][i], eos) << i;
}

// generate_tokens on a fresh engine of 3 slots (make_engine's), its tokens, stop reasons and the
// tokens of each step its callback saw.
struct Generation {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<StopReason> reasons;
  std::vector<std::vector<int32_t>> steps;
  int64_t steps_ahead = 0;
};
Generation generate_on_fresh_engine(const std::vector<std::vector<int32_t>>& prompts,
                                    const TokenGenerationParams& params, int64_t prefill_chunk,
                                    int64_t kv_blocks, bool run_ahead) {
  Generation g;
  auto engine = make_engine(3, prefill_chunk, kv_blocks, run_ahead);
  auto result = generate_tokens(*engine, prompts, params, [&](const std::vector<int32_t>& step) {
    g.steps.push_back(step);
    return Status::ok();
  });
  EXPECT_TRUE(result.is_ok()) << result.status().message();
  if (!result.is_ok()) return g;
  g.tokens = result->tokens;
  g.reasons = result->stop_reasons;
  g.steps_ahead = result->decode_steps_ahead;
  return g;
}

// Run ahead (EngineOptions::run_ahead): the same tokens, stop reasons and step callbacks as step
// by step, with sequences stopping at different steps (an eos; max_new_tokens), min_new_tokens
// holding the device argmax back for the first steps, and a pool of KV blocks with no spare.
TEST(TokenGeneration, RunAheadEqualsStepByStep) {
  const std::vector<std::vector<int32_t>> prompts = {random_prompt(12, 11), random_prompt(29, 12),
                                                     random_prompt(12, 13)};
  TokenGenerationParams params;
  params.max_new_tokens = 12;
  params.stop_at_eos = false;
  auto reference = make_engine(3, 16);
  auto free_run = generate_tokens(*reference, prompts, params);
  ASSERT_TRUE(free_run.is_ok()) << free_run.status().message();
  const int32_t eos = free_run->tokens[0][4];  // stops prompt 0 at its fifth token (or earlier)
  struct Case {
    int64_t min_new_tokens;
    bool eos;
    int64_t kv_blocks;  // 0: a full context a slot
  };
  for (const Case c : {Case{0, false, 0}, Case{0, true, 0}, Case{3, true, 0}, Case{0, true, 6}}) {
    SCOPED_TRACE("min_new " + std::to_string(c.min_new_tokens) + (c.eos ? ", eos" : "") +
                 ", kv_blocks " + std::to_string(c.kv_blocks));
    params.min_new_tokens = c.min_new_tokens;
    params.stop_at_eos = c.eos;
    params.eos_token_ids = c.eos ? std::vector<int32_t>{eos} : std::vector<int32_t>{};
    // 6 blocks of 16: prompt 0 stopping at its fifth token writes positions up to 15 (one
    // block), prompt 1 up to 39 (three), prompt 2 up to 22 (two). A step run ahead past prompt
    // 0's eos, at position 16, would take the block prompt 2 needs at its position 16.
    const Generation in_turn = generate_on_fresh_engine(prompts, params, 16, c.kv_blocks, false);
    const Generation ahead = generate_on_fresh_engine(prompts, params, 16, c.kv_blocks, true);
    ASSERT_EQ(in_turn.reasons.size(), 3u);
    EXPECT_EQ(ahead.tokens, in_turn.tokens);
    EXPECT_EQ(ahead.reasons, in_turn.reasons);
    EXPECT_EQ(ahead.steps, in_turn.steps);
    EXPECT_EQ(in_turn.steps_ahead, 0);
    EXPECT_GT(ahead.steps_ahead, 0);
    if (c.eos && c.min_new_tokens == 0) {
      EXPECT_EQ(ahead.reasons[0], StopReason::eos);
    }
  }
}

// A server step's call: every row's argmax, some rows whole (Engine::run_argmax).
TEST(TokenGeneration, ArgmaxWithSomeRowsWholeMatchesRun) {
  auto engine = make_engine(3, 16);
  argmax_rows_check::expect_rows_and_argmax_match_run(*engine, 0.0);
}

// Draws in the same call (Engine::run_argmax with draws; on the CPU through Backend::pick_rows'
// default): each the host sampler's pick from its row.
TEST(TokenGeneration, DrawsAreTheHostSamplersPicks) {
  auto engine = make_engine(3, 16);
  EXPECT_FALSE(engine->draws_on_device());  // the server samples CPU rows on its own pool
  argmax_rows_check::expect_draws_match_pick(*engine);
}

// Drawn rows run ahead (Engine::start_argmax with draws; the backend's default halves draw on
// the host at once): the steps' tokens are those of the steps run in turn.
TEST(TokenGeneration, DrawnStepsRunAheadAsInTurn) {
  auto engine = make_engine(3, 16);
  argmax_rows_check::expect_drawn_steps_run_ahead_as_in_turn(*engine);
}

TEST(TokenGeneration, SamplingIsSeededPerSequence) {
  auto engine = make_engine(2, 512);
  const std::vector<int32_t> prompt = random_prompt(6, 6);
  TokenGenerationParams params;
  params.max_new_tokens = 12;
  params.stop_at_eos = false;
  params.sampling.temperature = 1.5f;
  params.sampling.seed = 42;
  auto pair = generate_tokens(*engine, {prompt, prompt}, params);
  ASSERT_TRUE(pair.is_ok());
  auto again = generate_tokens(*engine, {prompt}, params);
  ASSERT_TRUE(again.is_ok());
  EXPECT_EQ(pair->tokens[0], again->tokens[0]);  // sequence 0 draws with the seed itself
  params.sampling.seed = 43;
  auto next_seed = generate_tokens(*engine, {prompt}, params);
  ASSERT_TRUE(next_seed.is_ok());
  EXPECT_EQ(pair->tokens[1], next_seed->tokens[0]);  // sequence 1 with seed + 1
}

// Sampled rows drawn through the engine (TokenGenerationParams::draw_rows; on the CPU the
// backend's default draws with the sampler's rule) give every sequence its host sampler's
// tokens, with top-k, top-p and min-p, with and without an eos held back for a while (those
// steps go to the host), and stop at the same eos.
TEST(TokenGeneration, DrawnRowsGiveTheSamplersTokens) {
  auto engine = make_engine(3, 8);  // prompts of 6-11 tokens: prefill over several calls
  const std::vector<std::vector<int32_t>> prompts = {random_prompt(6, 21), random_prompt(11, 22),
                                                     random_prompt(9, 23)};
  for (int variant = 0; variant < 3; ++variant) {
    SCOPED_TRACE("variant " + std::to_string(variant));
    TokenGenerationParams params;
    params.max_new_tokens = 16;
    params.sampling.temperature = 1.2f;
    params.sampling.seed = 7 + uint64_t(variant);
    params.sampling.top_k = variant == 1 ? 30 : 0;
    params.sampling.top_p = variant == 2 ? 0.8f : 1.0f;
    params.sampling.min_p = variant == 2 ? 0.01f : 0.0f;
    params.stop_at_eos = variant != 0;
    params.min_new_tokens = variant == 2 ? 5 : 0;
    params.draw_rows = false;
    auto host = generate_tokens(*engine, prompts, params);
    params.draw_rows = true;
    auto drawn = generate_tokens(*engine, prompts, params);
    ASSERT_TRUE(host.is_ok() && drawn.is_ok()) << drawn.status().message();
    EXPECT_EQ(drawn->tokens, host->tokens);
    EXPECT_EQ(drawn->stop_reasons, host->stop_reasons);
    EXPECT_NE(host->tokens[0], host->tokens[1]);
  }
}

// Drawn steps run ahead (each queued with its rows' next numbers before the step before it is
// finished, fed its drawn tokens on the device) give the tokens and steps of drawn steps in turn,
// with an eos that stops one sequence while a step past it is queued, and min_new_tokens holding
// it back at first (host rows then, draws after).
TEST(TokenGeneration, DrawnGenerationRunsAheadAsStepByStep) {
  const std::vector<std::vector<int32_t>> prompts = {random_prompt(7, 31), random_prompt(13, 32),
                                                     random_prompt(10, 33)};
  TokenGenerationParams params;
  params.max_new_tokens = 14;
  params.sampling.temperature = 1.1f;
  params.sampling.top_k = 40;
  params.sampling.seed = 5;
  params.draw_rows = true;
  params.stop_at_eos = false;
  auto reference = make_engine(3, 8);
  auto free_run = generate_tokens(*reference, prompts, params);
  ASSERT_TRUE(free_run.is_ok()) << free_run.status().message();
  const int32_t eos = free_run->tokens[1][6];  // stops prompt 1 at its seventh token (or earlier)
  for (int64_t min_new : {int64_t(0), int64_t(3)}) {
    SCOPED_TRACE("min_new_tokens " + std::to_string(min_new));
    params.stop_at_eos = true;
    params.eos_token_ids = {eos};
    params.min_new_tokens = min_new;
    const Generation in_turn = generate_on_fresh_engine(prompts, params, 8, 0, false);
    const Generation ahead = generate_on_fresh_engine(prompts, params, 8, 0, true);
    ASSERT_EQ(in_turn.reasons.size(), 3u);
    EXPECT_EQ(ahead.tokens, in_turn.tokens);
    EXPECT_EQ(ahead.reasons, in_turn.reasons);
    EXPECT_EQ(ahead.steps, in_turn.steps);
    EXPECT_EQ(in_turn.reasons[1], StopReason::eos);
    EXPECT_EQ(in_turn.steps_ahead, 0);
    EXPECT_GT(ahead.steps_ahead, 0);
  }
}

TEST(TokenGeneration, SlotsGiveBackTheirKvBlocksBetweenCalls) {
  // A pool of one full context (96 positions = 6 blocks of 16) shared by two slots: a long
  // generation in slot 0 takes all of it, and the next call fits only if slot 0 starts afresh.
  auto engine = make_engine(2, 512, 6);
  TokenGenerationParams params;
  params.stop_at_eos = false;
  params.max_new_tokens = 30;
  auto long_run = generate_tokens(*engine, {random_prompt(60, 8)}, params);
  ASSERT_TRUE(long_run.is_ok()) << long_run.status().message();
  params.max_new_tokens = 10;
  const std::vector<std::vector<int32_t>> prompts = {random_prompt(20, 9), random_prompt(18, 10)};
  auto two = generate_tokens(*engine, prompts, params);
  ASSERT_TRUE(two.is_ok()) << two.status().message();
  auto again = generate_tokens(*engine, prompts, params);
  ASSERT_TRUE(again.is_ok()) << again.status().message();
  EXPECT_EQ(two->tokens, again->tokens);
}

TEST(TokenGeneration, RefusesWhatDoesNotFitAndStopsWhenTheCallbackSays) {
  auto engine = make_engine(2, 512);
  TokenGenerationParams params;
  params.max_new_tokens = 4;
  auto too_many = generate_tokens(*engine, {{1}, {2}, {3}}, params);
  ASSERT_FALSE(too_many.is_ok());
  EXPECT_NE(too_many.status().message().find("3 prompts exceed"), std::string::npos);
  params.max_new_tokens = 90;
  auto too_long = generate_tokens(*engine, {random_prompt(10, 7)}, params);
  ASSERT_FALSE(too_long.is_ok());
  EXPECT_NE(too_long.status().message().find("context of 96"), std::string::npos);
  params.max_new_tokens = 4;
  EXPECT_FALSE(generate_tokens(*engine, {{}}, params).is_ok());
  EXPECT_FALSE(generate_tokens(*engine, {{1, 1 << 30}}, params).is_ok());
  int calls = 0;
  auto stopped = generate_tokens(
      *engine, {{1, 2, 3}}, params,
      [hook = stop_at_call(2, calls)](const std::vector<int32_t>&) { return hook(); });
  expect_stopped_at_second_call(stopped, calls);
}

// A long prompt can be stopped between its prefill calls, before its first token (the Python
// package's Ctrl-C check): generation and prompt_logits alike return the hook's error.
TEST(TokenGeneration, PrefillStopsBetweenCallsWhenTheHookSays) {
  auto engine = make_engine(2, 16);
  TokenGenerationParams params;
  params.max_new_tokens = 4;
  int checks = 0;
  params.between_prefill_calls = stop_at_call(2, checks);
  int steps = 0;
  auto stopped =
      generate_tokens(*engine, {random_prompt(60, 11)}, params, [&](const std::vector<int32_t>&) {
        ++steps;
        return Status::ok();
      });
  expect_stopped_at_second_call(stopped,
                                checks);  // before the second and third of four calls of 16 tokens
  EXPECT_EQ(steps, 0);
  // A prompt of one call never asks; the engine goes on after an interrupted call.
  checks = 0;
  auto short_one = generate_tokens(*engine, {random_prompt(10, 12)}, params);
  ASSERT_TRUE(short_one.is_ok()) << short_one.status().message();
  EXPECT_EQ(checks, 0);
  int chunks = 0;
  auto logits = engine->prompt_logits(random_prompt(40, 13), 0, stop_at_call(2, chunks));
  expect_stopped_at_second_call(logits, chunks);
}

// A reservation refused for memory leaves the old one in place: the engine goes on as before
// (the Python package reserves per call, and an oversized batch used to leave the engine without
// a KV cache, so its next call dereferenced none).
TEST(TokenGeneration, ARefusedReservationKeepsTheOldOne) {
  auto engine = make_engine(2, 512);
  TokenGenerationParams params;
  params.max_new_tokens = 6;
  params.stop_at_eos = false;
  const std::vector<int32_t> prompt = random_prompt(12, 14);
  auto before = generate_tokens(*engine, {prompt}, params);
  ASSERT_TRUE(before.is_ok()) << before.status().message();
  RunShape huge = engine->run_shape();
  huge.max_seqs = int64_t(1) << 24;  // 2^24 slots of 96 positions: terabytes of KV cache
  huge.max_batch_tokens = huge.max_seqs;
  huge.max_logit_rows = huge.max_seqs;
  const Status refused = engine->reserve(huge);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.message().find("lower the context length (max_context)"), std::string::npos)
      << refused.message();
  // A library error names the engine's options, not the CLI's flags (ARCHITECTURE.md).
  EXPECT_EQ(refused.message().find("(-c)"), std::string::npos) << refused.message();
  EXPECT_EQ(engine->run_shape().max_seqs, 2);
  auto after = generate_tokens(*engine, {prompt}, params);
  ASSERT_TRUE(after.is_ok()) << after.status().message();
  EXPECT_EQ(after->tokens, before->tokens);
  EXPECT_TRUE(engine->prompt_logits(prompt).is_ok());
  engine->release_sequence(1);
}

}  // namespace
}  // namespace kestrel
