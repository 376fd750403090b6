// The server's scheduler without HTTP (src/server/scheduler.h): requests submitted together run
// in the same steps, so a step's host-sampled rows picked side by side on the scheduler's pool
// must give each request exactly the tokens it gets when the rows are picked one after another,
// and steps run ahead the text of steps in turn.
#include "server/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <thread>
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

// synthetic:tiny-qwen2 in fp32 on the CPU, 4 slots of 128 positions, a pool of kv_blocks
// blocks of 16 (0: a full context a slot).
std::unique_ptr<Engine> tiny_engine(int64_t prefill_chunk, int64_t kv_blocks = 0) {
  EngineOptions options;
  options.model = "synthetic:tiny-qwen2";
  options.format = WeightFormat::fp32;
  options.threads = 2;
  options.progress = false;
  options.max_context = 128;
  options.max_seqs = 4;
  options.prefill_chunk = prefill_chunk;
  options.kv_blocks = kv_blocks;
  auto engine = Engine::create(options);
  EXPECT_TRUE(engine.is_ok()) << engine.status().message();
  return engine.is_ok() ? std::move(engine).value() : nullptr;
}

// Four requests (the sampled ones each with its own seed) on four slots, submitted before the
// scheduler starts, so its first step admits them all and every run has the same steps.
// `metrics_text` gets the run's /metrics.
std::vector<Outcome> run_requests(const Tokenizer& tokenizer, const Picking& picking,
                                  std::string* metrics_text = nullptr) {
  auto engine = tiny_engine(64);
  if (!engine) return {};
  Metrics metrics;
  SchedulerOptions scheduler_options;
  scheduler_options.host_threads = picking.host_threads;
  scheduler_options.draw_rows = picking.draw_rows;
  scheduler_options.run_ahead = picking.run_ahead;
  Scheduler scheduler(*engine, tokenizer, metrics, scheduler_options);
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

namespace kestrel::server {
namespace {

// How a request ended: its text, the terminal event, and whether anything followed it.
struct Ending {
  std::string text;
  bool ended = false;
  StreamEvent::Kind kind = StreamEvent::Kind::text;
  FinishReason reason = FinishReason::stop;
  int64_t completion_tokens = 0;
  int status = 0;
};

// A started scheduler over tiny_engine(16, kv_blocks), running ahead or not; its destructor
// shuts the scheduler down before the engine goes.
struct TinyServer {
  std::unique_ptr<Engine> engine;
  Metrics metrics;
  std::unique_ptr<Scheduler> scheduler;
  TinyServer(const Tokenizer& tokenizer, bool run_ahead, int64_t kv_blocks = 0)
      : engine(tiny_engine(16, kv_blocks)) {
    if (!engine) return;
    SchedulerOptions options;
    options.run_ahead = run_ahead;
    scheduler = std::make_unique<Scheduler>(*engine, tokenizer, metrics, options);
    scheduler->start();
  }
};

// Takes `channel`'s events until its request ends (or 60 s pass without one).
Ending wait_for_end(RequestChannel& channel) {
  Ending e;
  while (!e.ended) {
    auto event = channel.pop(std::chrono::milliseconds(60000));
    if (!event) {
      ADD_FAILURE() << "no event in 60 s";
      break;
    }
    e.text += event->text;
    e.kind = event->kind;
    e.ended = event->kind != StreamEvent::Kind::text;
    e.reason = event->reason;
    e.completion_tokens = event->usage.completion_tokens;
    e.status = event->status;
  }
  return e;
}

// Greedy requests arriving at random moments into four slots (prompt chunks sharing steps with
// decode tokens, requests queueing for slots), ending at random steps (max_tokens from 1,
// stop strings, eos), two of them cancelled by their clients (one as soon as it is submitted,
// queued or already admitted; one after its first text), all with steps run ahead wherever
// they can: every request that is not cancelled gets the text, finish reason and token count
// it gets alone, in turn; a cancelled one ends once (as 499, or finished with its text alone),
// and nothing follows any end. Which requests share a step depends on the threads' timing, and
// the CPU matmul rounds by a step's token count (docs/ARCHITECTURE.md, "Determinism"), so a
// near tie could flip a greedy token; these requests' ties are not near (the CLI test takes
// the same risk for eight concurrent requests).
TEST(Scheduler, RequestsArrivingAndEndingAtRandomRunAheadAsEachAlone) {
  auto tokenizer =
      Tokenizer::load(std::string(KESTREL_SOURCE_DIR) + "/.cache/tokenizers/qwen3/models");
  ASSERT_TRUE(tokenizer.is_ok()) << tokenizer.status().message();
  struct Spec {
    std::vector<int32_t> prompt;
    int64_t max_tokens = 1;
    std::vector<std::string> stop;
    bool ignore_eos = false;
  };
  constexpr size_t kRequests = 10;
  constexpr size_t kCancelledAtOnce = 3, kCancelledAfterText = 7;
  std::mt19937 rng(2026);
  std::vector<Spec> specs(kRequests);
  const int64_t max_tokens[] = {1, 2, 5, 12, 24};
  const char* stops[] = {"e", "s", "o", "a"};
  for (size_t i = 0; i < kRequests; ++i) {
    Spec& spec = specs[i];
    const size_t length = 2 + rng() % 39;
    for (size_t t = 0; t < length; ++t) spec.prompt.push_back(int32_t(3 + rng() % 5000));
    spec.max_tokens = max_tokens[rng() % std::size(max_tokens)];
    if (i % 2 == 1) spec.stop = {stops[i / 2 % std::size(stops)], "i"};
    spec.ignore_eos = rng() % 2 == 0;
    if (i >= kCancelledAfterText) {
      // The last three decode long, with nothing left to prefill: steps run ahead.
      spec.max_tokens = 24;
      spec.stop.clear();
      spec.ignore_eos = true;
    }
  }
  auto request_of = [&](const Spec& spec) {
    ScheduledRequest r;
    r.prompt = spec.prompt;
    r.max_tokens = spec.max_tokens;
    r.stop = spec.stop;
    r.ignore_eos = spec.ignore_eos;
    r.sampling.temperature = 0.0f;
    r.channel = std::make_shared<RequestChannel>();
    return r;
  };

  // Alone, in turn: one request at a time.
  std::vector<Ending> alone;
  {
    TinyServer in_turn(*tokenizer, false);
    ASSERT_TRUE(in_turn.scheduler);
    for (const Spec& spec : specs) {
      ScheduledRequest r = request_of(spec);
      std::shared_ptr<RequestChannel> channel = r.channel;
      ASSERT_EQ(in_turn.scheduler->submit(std::move(r)), Scheduler::Admission::queued);
      alone.push_back(wait_for_end(*channel));
      ASSERT_EQ(alone.back().kind, StreamEvent::Kind::finished);
    }
  }
  // The requests end in several ways.
  int by_length = 0, by_stop = 0;
  for (const Ending& e : alone) (e.reason == FinishReason::length ? by_length : by_stop) += 1;
  EXPECT_GT(by_length, 0);
  EXPECT_GT(by_stop, 0);

  // Together, run ahead: submitted from another thread with random pauses.
  TinyServer ahead(*tokenizer, true);
  ASSERT_TRUE(ahead.scheduler);
  Scheduler& scheduler = *ahead.scheduler;
  std::vector<std::shared_ptr<RequestChannel>> channels;
  std::vector<ScheduledRequest> requests;
  for (const Spec& spec : specs) {
    requests.push_back(request_of(spec));
    channels.push_back(requests.back().channel);
  }
  std::vector<int> pauses_us;
  for (size_t i = 0; i < kRequests; ++i) pauses_us.push_back(int(rng() % 3000));
  std::thread submitter([&] {
    for (size_t i = 0; i < kRequests; ++i) {
      EXPECT_EQ(scheduler.submit(std::move(requests[i])), Scheduler::Admission::queued);
      if (i == kCancelledAtOnce) channels[i]->cancel();
      std::this_thread::sleep_for(std::chrono::microseconds(pauses_us[i]));
    }
  });
  Ending after_text;
  std::thread canceller([&] {
    // The client of kCancelledAfterText goes away after its first text.
    RequestChannel& channel = *channels[kCancelledAfterText];
    auto first = channel.pop(std::chrono::milliseconds(60000));
    ASSERT_TRUE(first.has_value());
    after_text.text = first->text;
    channel.cancel();
    if (first->kind != StreamEvent::Kind::text) {
      after_text.ended = true;
      after_text.kind = first->kind;
      after_text.status = first->status;
      return;
    }
    const Ending rest = wait_for_end(channel);
    after_text.text += rest.text;
    after_text.ended = rest.ended;
    after_text.kind = rest.kind;
    after_text.status = rest.status;
    after_text.reason = rest.reason;
  });
  submitter.join();
  for (size_t i = 0; i < kRequests; ++i) {
    if (i == kCancelledAtOnce || i == kCancelledAfterText) continue;
    SCOPED_TRACE("request " + std::to_string(i));
    const Ending e = wait_for_end(*channels[i]);
    EXPECT_EQ(e.kind, StreamEvent::Kind::finished);
    EXPECT_EQ(e.text, alone[i].text);
    EXPECT_EQ(e.reason, alone[i].reason);
    EXPECT_EQ(e.completion_tokens, alone[i].completion_tokens);
  }
  canceller.join();
  // Cancelled after its first text: failed with 499, or finished (its text alone) first.
  EXPECT_TRUE(after_text.ended);
  if (after_text.kind == StreamEvent::Kind::failed) {
    EXPECT_EQ(after_text.status, 499);
    EXPECT_EQ(after_text.text, alone[kCancelledAfterText].text.substr(0, after_text.text.size()));
  } else {
    EXPECT_EQ(after_text.text, alone[kCancelledAfterText].text);
  }
  scheduler.shutdown(std::chrono::milliseconds(0));
  // Cancelled at once: dropped from the queue without an event, or ended once.
  std::vector<StreamEvent> at_once;
  while (auto event = channels[kCancelledAtOnce]->pop(std::chrono::milliseconds(0))) {
    at_once.push_back(std::move(*event));
  }
  for (size_t k = 0; k < at_once.size(); ++k) {
    const bool last = k + 1 == at_once.size();
    EXPECT_EQ(at_once[k].kind != StreamEvent::Kind::text, last) << "event " << k;
    if (at_once[k].kind == StreamEvent::Kind::failed) {
      EXPECT_EQ(at_once[k].status, 499);
    }
  }
  for (size_t i = 0; i < kRequests; ++i) {
    if (i == kCancelledAtOnce) continue;
    EXPECT_FALSE(channels[i]->pop(std::chrono::milliseconds(0)).has_value())
        << "request " << i << ": an event after its end";
  }
  const std::string m = ahead.metrics.render();
  EXPECT_GT(counter(m, "kestrel_steps_total{queued=\"ahead\"}"), 0) << m;
}

}  // namespace
}  // namespace kestrel::server

namespace kestrel::server {
namespace {

// The queue's head waiting for KV blocks, not for a slot, does not keep the running requests
// from running ahead: two requests hold the whole pool (8 blocks, 4 each) and two slots are
// free while a third waits; it takes one token at its prefill, so every step run ahead is
// one of the first two's, before it got in. It gets in once they end, with its text alone.
TEST(Scheduler, RunsAheadWhileTheQueuesHeadWaitsForBlocks) {
  auto tokenizer =
      Tokenizer::load(std::string(KESTREL_SOURCE_DIR) + "/.cache/tokenizers/qwen3/models");
  ASSERT_TRUE(tokenizer.is_ok()) << tokenizer.status().message();
  auto request = [](int i, int64_t prompt_len, int64_t max_tokens) {
    ScheduledRequest r;
    for (int64_t t = 0; t < prompt_len; ++t)
      r.prompt.push_back(int32_t((53 * t + 17 * i + 9) % 4000));
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    r.sampling.temperature = 0.0f;
    r.channel = std::make_shared<RequestChannel>();
    return r;
  };
  // 20 + 44 positions: 4 blocks each; the third needs 1.
  const ScheduledRequest specs[] = {request(0, 20, 44), request(1, 20, 44), request(2, 9, 1)};
  Ending third_alone;
  {
    TinyServer alone(*tokenizer, false, 8);
    ASSERT_TRUE(alone.scheduler);
    ScheduledRequest r = specs[2];
    r.channel = std::make_shared<RequestChannel>();
    std::shared_ptr<RequestChannel> channel = r.channel;
    ASSERT_EQ(alone.scheduler->submit(std::move(r)), Scheduler::Admission::queued);
    third_alone = wait_for_end(*channel);
  }
  TinyServer server(*tokenizer, true, 8);
  ASSERT_TRUE(server.scheduler);
  std::vector<std::shared_ptr<RequestChannel>> channels;
  for (const ScheduledRequest& spec : specs) {
    ScheduledRequest r = spec;
    r.channel = std::make_shared<RequestChannel>();
    channels.push_back(r.channel);
    // Submitted before the scheduler's first step takes any: the three wait together.
    ASSERT_EQ(server.scheduler->submit(std::move(r)), Scheduler::Admission::queued);
  }
  std::vector<Ending> endings;
  for (auto& channel : channels) endings.push_back(wait_for_end(*channel));
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(endings[i].kind, StreamEvent::Kind::finished) << i;
    EXPECT_EQ(endings[i].completion_tokens, 44) << i;
  }
  EXPECT_EQ(endings[2].kind, StreamEvent::Kind::finished);
  EXPECT_EQ(endings[2].completion_tokens, 1);
  EXPECT_EQ(endings[2].text, third_alone.text);
  const std::string m = server.metrics.render();
  // 44 tokens each: the prefill step gives the first, then 43 decode steps, of which the
  // first and the last go in turn.
  EXPECT_EQ(counter(m, "kestrel_steps_total{queued=\"ahead\"}"), 41) << m;
}

}  // namespace
}  // namespace kestrel::server
