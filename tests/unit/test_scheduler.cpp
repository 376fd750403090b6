// The server's scheduler without HTTP (src/server/scheduler.h): requests submitted together run
// in the same steps, so a step's host-sampled rows picked side by side on the scheduler's pool
// must give each request exactly the tokens it gets when the rows are picked one after another.
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
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::string text;
  bool finished = false;
};

// How a run of run_requests picks: its pool's threads, whether the requests ask for logprobs
// (then every row crosses to the host), and SchedulerOptions::draw_rows.
struct Picking {
  int host_threads = 1;
  bool logprobs = true;
  std::optional<bool> draw_rows;
};

// Four sampled requests (each its own seed) on four slots, submitted before the scheduler
// starts, so its first step admits them all and every run has the same steps. `metrics_text`
// gets the run's /metrics.
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
  Scheduler scheduler(**engine, tokenizer, metrics, scheduler_options);
  std::vector<std::shared_ptr<RequestChannel>> channels;
  for (int i = 0; i < 4; ++i) {
    ScheduledRequest r;
    for (int t = 0; t < 9 + 3 * i; ++t) r.prompt.push_back(int32_t((37 * t + 11 * i + 5) % 300));
    r.max_tokens = 20;
    r.ignore_eos = true;
    r.sampling.temperature = 1.3f;
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
    }
  }
  scheduler.shutdown(std::chrono::milliseconds(0));
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
