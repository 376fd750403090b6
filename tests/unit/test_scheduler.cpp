// The server's scheduler without HTTP (src/server/scheduler.h): requests submitted together run
// in the same steps, so a step's host-sampled rows picked side by side on the scheduler's pool
// must give each request exactly the tokens it gets when the rows are picked one after another,
// and steps run ahead the text of steps in turn.
#include "server/scheduler.h"

#include <gtest/gtest.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

#include "kestrel/engine.h"
#include "tokenizer/tokenizer.h"

namespace kestrel::server {
namespace {

struct Outcome {
  std::vector<int32_t> tokens;  // with logprobs
  std::vector<float> logprobs;
  std::string text;
  bool finished = false;
  FinishReason reason = FinishReason::stop;
  int64_t completion_tokens = 0;
};

// How a run of run_requests picks: its pool's threads, whether the requests ask for logprobs
// (then every row crosses to the host), SchedulerOptions::draw_rows and run_ahead, which
// requests are greedy, and each request's max_tokens and stop strings.
struct Picking {
  int host_threads = 1;
  bool logprobs = true;
  std::optional<bool> draw_rows;
  std::optional<bool> run_ahead = false;
  std::vector<bool> greedy = {false, false, false, false};
  std::vector<int64_t> max_tokens = {20, 20, 20, 20};
  std::vector<std::vector<std::string>> stop = {{}, {}, {}, {}};
};

// A counter's value in /metrics text (-1 when absent).
int64_t counter(const std::string& metrics, const std::string& name) {
  const size_t at = metrics.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stoll(metrics.substr(at + name.size() + 2));
}

// Four requests (the sampled ones each with its own seed) on four slots, submitted before the
// scheduler starts, so its first step admits them all and every run has the same steps.
// `metrics_text` gets the run's /metrics.
std::vector<Outcome> run_requests(const Tokenizer& tokenizer, const Picking& picking,
                                  std::string* metrics_text = nullptr) {
  EngineOptions options;
  options.model = "synthetic:tiny-qwen2";
  options.format = WeightFormat::fp32;
  options.threads = 2;
  options.progress = false;
  options.max_context = 128;
  options.max_seqs = 4;
  options.prefill_chunk = 64;
  auto engine = Engine::create(options);
  EXPECT_TRUE(engine.is_ok()) << engine.status().message();
  if (!engine.is_ok()) return {};
  Metrics metrics;
  SchedulerOptions scheduler_options;
  scheduler_options.host_threads = picking.host_threads;
  scheduler_options.draw_rows = picking.draw_rows;
  scheduler_options.run_ahead = picking.run_ahead;
  Scheduler scheduler(**engine, tokenizer, metrics, scheduler_options);
  std::vector<std::shared_ptr<RequestChannel>> channels;
  for (int i = 0; i < 4; ++i) {
    ScheduledRequest r;
    for (int t = 0; t < 9 + 3 * i; ++t) r.prompt.push_back(int32_t((37 * t + 11 * i + 5) % 300));
    r.max_tokens = picking.max_tokens[size_t(i)];
    r.stop = picking.stop[size_t(i)];
    r.ignore_eos = true;
    r.sampling.temperature = picking.greedy[size_t(i)] ? 0.0f : 1.3f;
    r.sampling.top_p = i % 2 == 0 ? 0.9f : 1.0f;
    r.sampling.top_k = i == 3 ? 40 : 0;
    r.sampling.seed = uint64_t(100 + i);
    r.top_logprobs = picking.logprobs ? 0 : -1;  // 0: each token's id and log-probability
    r.channel = std::make_shared<RequestChannel>();
    channels.push_back(r.channel);
    EXPECT_EQ(scheduler.submit(std::move(r)), Scheduler::Admission::queued);
  }
  scheduler.start();
  std::vector<Outcome> out(channels.size());
  for (size_t i = 0; i < channels.size(); ++i) {
    while (!out[i].finished) {
      auto event = channels[i]->pop(std::chrono::milliseconds(60000));
      if (!event) {
        ADD_FAILURE() << "request " << i << ": no event in 60 s";
        break;
      }
      EXPECT_NE(event->kind, StreamEvent::Kind::failed) << event->message;
      out[i].text += event->text;
      for (const TokenLogprob& lp : event->logprobs) {
        out[i].tokens.push_back(lp.token);
        out[i].logprobs.push_back(lp.logprob);
      }
      out[i].finished = event->kind != StreamEvent::Kind::text;
      out[i].reason = event->reason;
      out[i].completion_tokens = event->usage.completion_tokens;
    }
  }
  scheduler.shutdown(std::chrono::milliseconds(0));
  // Nothing follows a request's end (a row run ahead past it is dropped, not delivered).
  for (size_t i = 0; i < channels.size(); ++i) {
    const auto extra = channels[i]->pop(std::chrono::milliseconds(0));
    EXPECT_FALSE(extra.has_value()) << "request " << i << ": an event after its end";
  }
  if (metrics_text != nullptr) *metrics_text = metrics.render();
  return out;
}

TEST(Scheduler, HostRowsSampledSideBySideGiveTheTokensOfALoop) {
  auto tokenizer =
      Tokenizer::load(std::string(KESTREL_SOURCE_DIR) + "/.cache/tokenizers/qwen3/models");
  ASSERT_TRUE(tokenizer.is_ok()) << tokenizer.status().message();
  const std::vector<Outcome> serial = run_requests(*tokenizer, Picking{1, true, std::nullopt});
  const std::vector<Outcome> pooled = run_requests(*tokenizer, Picking{4, true, std::nullopt});
  ASSERT_EQ(serial.size(), 4u);
  ASSERT_EQ(pooled.size(), 4u);
  for (size_t i = 0; i < serial.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    EXPECT_EQ(serial[i].tokens.size(), 20u);
    EXPECT_EQ(pooled[i].tokens, serial[i].tokens);
    EXPECT_EQ(pooled[i].logprobs, serial[i].logprobs);
    EXPECT_EQ(pooled[i].text, serial[i].text);
  }
  // The four seeds drew four different streams (the test is not comparing one stream).
  EXPECT_NE(serial[0].tokens, serial[2].tokens);
}

// Sampled rows drawn through Engine::run_argmax (RowDraw: each request's settings and its own
// generator's next number) give each request the text its host sampler gives from the whole
// row: on the CPU the backend's default draws with the same rule, as the CUDA kernel does.
TEST(Scheduler, RowsDrawnByTheEngineGiveTheHostSamplersText) {
  auto tokenizer =
      Tokenizer::load(std::string(KESTREL_SOURCE_DIR) + "/.cache/tokenizers/qwen3/models");
  ASSERT_TRUE(tokenizer.is_ok()) << tokenizer.status().message();
  std::string host_metrics, drawn_metrics;
  const std::vector<Outcome> host =
      run_requests(*tokenizer, Picking{2, false, false}, &host_metrics);
  const std::vector<Outcome> drawn =
      run_requests(*tokenizer, Picking{2, false, true}, &drawn_metrics);
  ASSERT_EQ(host.size(), 4u);
  ASSERT_EQ(drawn.size(), 4u);
  for (size_t i = 0; i < host.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    EXPECT_FALSE(host[i].text.empty());
    EXPECT_EQ(drawn[i].text, host[i].text);
  }
  EXPECT_NE(host[0].text, host[2].text);
  // 4 requests x 20 tokens, each picked where the run says.
  EXPECT_NE(host_metrics.find("kestrel_tokens_picked_total{where=\"host\"} 80"), std::string::npos)
      << host_metrics;
  EXPECT_NE(drawn_metrics.find("kestrel_tokens_picked_total{where=\"device_draw\"} 80"),
            std::string::npos)
      << drawn_metrics;
}

}  // namespace
}  // namespace kestrel::server

namespace kestrel::server {
namespace {

// The requests of `picking` with steps in turn, then with steps run ahead.
struct TwoRuns {
  std::vector<Outcome> in_turn, ahead;
  std::string turn_metrics, ahead_metrics;
};
TwoRuns run_in_turn_and_ahead(const Tokenizer& tokenizer, Picking picking) {
  TwoRuns runs;
  picking.run_ahead = false;
  runs.in_turn = run_requests(tokenizer, picking, &runs.turn_metrics);
  picking.run_ahead = true;
  runs.ahead = run_requests(tokenizer, picking, &runs.ahead_metrics);
  EXPECT_EQ(runs.in_turn.size(), 4u);
  EXPECT_EQ(runs.ahead.size(), 4u);
  if (runs.in_turn.size() != 4 || runs.ahead.size() != 4) runs.in_turn = runs.ahead = {};
  return runs;
}

// Steps run ahead (each queued before the tokens of the one before it are back, fed them on the
// engine's device) give every request the text of steps in turn: greedy rows (the argmax) and
// drawn rows (RowDraw) alike, requests ending at different steps (a step whose request takes its
// last token is never run past).
TEST(Scheduler, StepsRunAheadGiveTheTextOfStepsInTurn) {
  auto tokenizer =
      Tokenizer::load(std::string(KESTREL_SOURCE_DIR) + "/.cache/tokenizers/qwen3/models");
  ASSERT_TRUE(tokenizer.is_ok()) << tokenizer.status().message();
  Picking picking;
  picking.logprobs = false;
  picking.draw_rows = true;
  picking.greedy = {true, false, true, false};
  picking.max_tokens = {20, 14, 23, 9};
  const auto [in_turn, ahead, turn_metrics, ahead_metrics] =
      run_in_turn_and_ahead(*tokenizer, picking);
  ASSERT_EQ(in_turn.size(), 4u);
  for (size_t i = 0; i < in_turn.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    EXPECT_EQ(in_turn[i].completion_tokens, picking.max_tokens[i]);
    EXPECT_EQ(ahead[i].completion_tokens, picking.max_tokens[i]);
    EXPECT_FALSE(in_turn[i].text.empty());
    EXPECT_EQ(ahead[i].text, in_turn[i].text);
  }
  EXPECT_NE(in_turn[1].text, in_turn[3].text);
  // Both runs picked every token on the engine: 43 argmax, 23 drawn.
  for (const std::string* m : {&turn_metrics, &ahead_metrics}) {
    EXPECT_EQ(counter(*m, "kestrel_tokens_picked_total{where=\"device\"}"), 43) << *m;
    EXPECT_EQ(counter(*m, "kestrel_tokens_picked_total{where=\"device_draw\"}"), 23) << *m;
  }
  // In turn, no step went ahead; ahead, every decode step but those after a request's last
  // token did. 23 tokens: the prefill step gives the first, 22 decode steps the rest, of which
  // the steps after the 9th, 14th and 20th tokens of requests 3, 1 and 0 and the first decode
  // step go in turn.
  EXPECT_EQ(counter(turn_metrics, "kestrel_steps_total{queued=\"ahead\"}"), 0) << turn_metrics;
  EXPECT_EQ(counter(ahead_metrics, "kestrel_steps_total{queued=\"ahead\"}"), 18) << ahead_metrics;
  EXPECT_EQ(counter(ahead_metrics, "kestrel_steps_total{queued=\"ahead\"}") +
                counter(ahead_metrics, "kestrel_steps_total{queued=\"in_turn\"}"),
            counter(turn_metrics, "kestrel_steps_total{queued=\"in_turn\"}"));
  EXPECT_EQ(counter(ahead_metrics, "kestrel_step_rows_dropped_total"), 0) << ahead_metrics;
}

// A request a stop string ends leaves the step run ahead past it a row that is dropped; every
// request's text is still that of steps in turn. The stop strings come from an earlier run's
// text, so each first matches several tokens into the output, while steps run ahead.
TEST(Scheduler, ARowRunAheadPastAStopIsDropped) {
  auto tokenizer =
      Tokenizer::load(std::string(KESTREL_SOURCE_DIR) + "/.cache/tokenizers/qwen3/models");
  ASSERT_TRUE(tokenizer.is_ok()) << tokenizer.status().message();
  Picking picking;
  picking.greedy = {true, true, true, true};
  picking.max_tokens = {24, 24, 24, 24};
  const std::vector<Outcome> reference = run_requests(*tokenizer, picking);
  ASSERT_EQ(reference.size(), 4u);
  // Requests 1 and 2 stop at text that first appears after their 6th token and ends before
  // their 20th: 3 printable ASCII characters, no space.
  for (size_t i : {size_t(1), size_t(2)}) {
    const std::vector<int32_t>& tokens = reference[i].tokens;
    ASSERT_EQ(tokens.size(), 24u);
    const std::string& text = reference[i].text;
    auto prefix = [&](size_t n) {
      return tokenizer->decode(std::vector<int32_t>(tokens.begin(), tokens.begin() + long(n)),
                               true);
    };
    const size_t from = prefix(6).size();
    const size_t to = prefix(20).size();
    std::string stop;
    for (size_t at = from; stop.empty() && at + 3 <= std::min(to, text.size()); ++at) {
      const std::string candidate = text.substr(at, 3);
      const bool printable = std::all_of(candidate.begin(), candidate.end(),
                                         [](char c) { return c > ' ' && c < 0x7f; });
      if (printable && text.find(candidate) == at) stop = candidate;
    }
    ASSERT_FALSE(stop.empty()) << "request " << i << " has no stop candidate in: " << text;
    picking.stop[i] = {stop};
  }
  picking.logprobs = false;
  const auto [in_turn, ahead, turn_metrics, ahead_metrics] =
      run_in_turn_and_ahead(*tokenizer, picking);
  ASSERT_EQ(in_turn.size(), 4u);
  for (size_t i = 0; i < in_turn.size(); ++i) {
    SCOPED_TRACE("request " + std::to_string(i));
    const bool stopped = i == 1 || i == 2;
    EXPECT_EQ(in_turn[i].reason, stopped ? FinishReason::stop : FinishReason::length);
    EXPECT_EQ(ahead[i].reason, in_turn[i].reason);
    EXPECT_EQ(ahead[i].completion_tokens, in_turn[i].completion_tokens);
    EXPECT_EQ(ahead[i].text, in_turn[i].text);
    if (stopped) {
      EXPECT_LT(in_turn[i].completion_tokens, 20);
      EXPECT_EQ(in_turn[i].text, reference[i].text.substr(0, in_turn[i].text.size()));
    }
  }
  EXPECT_GT(counter(ahead_metrics, "kestrel_steps_total{queued=\"ahead\"}"), 0);
  EXPECT_GE(counter(ahead_metrics, "kestrel_step_rows_dropped_total"), 2) << ahead_metrics;
}

}  // namespace
}  // namespace kestrel::server
