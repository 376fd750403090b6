// Continuous batching: one thread owns the Engine and runs steps. A step carries the next token
// of every sequence that is decoding plus chunks of prompts still being prefilled, within a
// token budget, so a long prompt never stalls the running streams. Requests join between steps,
// first come first served, from a bounded queue; a request whose client has gone frees its slot
// at the next step.
//
// Memory: the engine's KV cache is a pool of blocks (runtime/kv_cache.h). A request is admitted
// to a free slot only when the pool can give it every block it can need (prompt + max_tokens,
// less the prompt blocks the prefix cache already holds), and it takes them at once, so a running
// request can always finish (no stream fails half-way for lack of KV cache); until then it and
// everything behind it waits. Full blocks a sequence has computed are published to the prefix
// cache, so a later prompt with the same beginning skips computing them.
//
// Each request samples with its own Sampler and seed, and each token attends only to its own
// slot, so other requests change a request's logits by float rounding at most (the CPU matmul's
// accumulation order follows the step's token count; docs/ARCHITECTURE.md).
//
// Run ahead (Engine::runs_ahead): while every running request decodes and takes its token on
// the device (the argmax, or a draw), the step after the current one is queued before the
// current one's tokens come back, fed them on the device, so the device never waits for the
// host's stop checks, detokenizing and streaming. A request the current token ends (eos, a stop
// string, its client gone) leaves the queued step a row that is dropped; a request waiting for a
// slot, a prompt to prefill or a row sampled on the host makes the next step go in turn.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "kestrel/engine.h"
#include "sample/sampler.h"
#include "server/api.h"
#include "server/metrics.h"
#include "tokenizer/tokenizer.h"

namespace kestrel {
class ThreadPool;
}

namespace kestrel::server {

// What the scheduler tells the request's HTTP worker.
struct StreamEvent {
  enum class Kind : uint8_t { text, finished, failed } kind = Kind::text;
  std::string text;                          // text: the next piece of output
  FinishReason reason = FinishReason::stop;  // finished
  Usage usage;                               // finished
  int status = 0;                            // failed: the HTTP status that fits
  std::string message;                       // failed
  // text, finished: the tokens generated since the last event, when logprobs were asked for.
  std::vector<TokenLogprob> logprobs;
};

// The channel between one request's HTTP worker and the scheduler thread.
class RequestChannel {
 public:
  // Scheduler side.
  void push(StreamEvent event);
  bool cancelled() const { return cancelled_.load(); }

  // HTTP side: the next event, or nullopt after `timeout`.
  std::optional<StreamEvent> pop(std::chrono::milliseconds timeout);
  // The client is gone: the scheduler drops the request at its next step.
  void cancel() { cancelled_.store(true); }

 private:
  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<StreamEvent> events_;
  std::atomic<bool> cancelled_{false};
};

// A request the server has validated: the prompt fits the context with max_tokens.
struct ScheduledRequest {
  std::vector<int32_t> prompt;  // token ids, each inside the model's vocabulary
  int64_t max_tokens = 1;
  SamplingParams sampling;
  std::vector<std::string> stop;
  bool ignore_eos = false;  // end-of-sequence tokens do not end the request
  int64_t min_tokens = 0;   // no end-of-sequence token is drawn before this many tokens
  int top_logprobs = -1;    // -1: none; else alternatives per token (GenerationRequest's)
  std::shared_ptr<RequestChannel> channel;
  std::chrono::steady_clock::time_point arrival = std::chrono::steady_clock::now();
};

struct SchedulerOptions {
  int64_t max_queue = 64;  // requests waiting while every slot is busy; more are refused
  // Threads that sample a step's host rows side by side: 0 for one a slot, at most the cores;
  // 1 samples them one after another.
  int host_threads = 0;
  // Whether sampled rows drawn from as they are go to Engine::run_argmax as draws (RowDraw)
  // instead of crossing to the host whole: unset, where the engine draws on its device
  // (Engine::draws_on_device); set, always or never (tests compare the two on the CPU, where
  // the backend's default draws with the host sampler's rule).
  std::optional<bool> draw_rows;
  // Whether decode steps run ahead: unset, where the engine runs ahead (Engine::runs_ahead: by
  // default where that overlaps the host's work with the device's, CUDA; on the CPU a step run
  // ahead is computed before the step before it is streamed, which only delays every token by a
  // step). A model split over ranks never runs ahead.
  std::optional<bool> run_ahead;
};

class Scheduler {
 public:
  // `engine` must have been created with its sequence slots (max_seqs) and a batch of at least
  // max_seqs tokens; the scheduler uses all of them.
  Scheduler(Engine& engine, const Tokenizer& tokenizer, Metrics& metrics, SchedulerOptions options);
  ~Scheduler();
  Scheduler(const Scheduler&) = delete;
  Scheduler& operator=(const Scheduler&) = delete;

  void start();

  enum class Admission : uint8_t { queued, queue_full, shutting_down };
  Admission submit(ScheduledRequest request);

  // Stops taking requests (queued ones fail with 503), lets running ones go on until `grace`
  // has passed, then ends them with a failed event; returns once the thread has stopped.
  void shutdown(std::chrono::milliseconds grace);

 private:
  struct Sequence;
  // Where a step row's token is picked (the /metrics counters).
  enum class Pick : uint8_t { argmax, draw, host };
  // A step queued on the engine (start_argmax) whose tokens have not come back: each logit row's
  // sequence (kept alive while the step is in flight), position and pick.
  struct QueuedStep {
    std::vector<std::shared_ptr<Sequence>> rows;
    std::vector<int32_t> positions;
    std::vector<Pick> picks;
  };
  void loop();
  // One forward call over the running sequences; false when there was nothing to run.
  bool step();
  // Waits for `queued`, the step queued last, after queueing the step after it when that one
  // carries the same rows (run ahead), and delivers its tokens.
  void finish_queued(QueuedStep queued);
  // The step after `queued`, fed its tokens on the device, queued; nullopt where it would not
  // carry the same rows, or could not be queued (then `failed_after_draws` gets the failure
  // when drawn rows had already taken their numbers: their requests must end).
  std::optional<QueuedStep> queue_ahead(const QueuedStep& queued, Status* failed_after_draws);
  // Waits for a queued step and drops its tokens (every row's request has ended).
  void drop(QueuedStep queued);
  // Each row's token to its request: metrics, stop checks, streamed text, the end.
  void deliver(std::span<const std::shared_ptr<Sequence>> rows, std::span<const int32_t> positions,
               std::span<const Pick> picks, std::span<const int32_t> tokens);
  // A backend failure: it is not known which rows it spoiled, so every running request ends.
  void fail_running(const Status& status);
  // Admits the request into a free slot if the pool has the blocks it can need.
  bool admit(ScheduledRequest& request);
  // The prompt blocks the prefix cache gives `request` when the pool has every other block it can
  // need (admit's condition), else nullopt.
  std::optional<std::vector<int32_t>> blocks_for(const ScheduledRequest& request) const;
  // Publishes the sequence's newly completed full blocks to the prefix cache.
  void publish_blocks(Sequence& seq);
  void finish(Sequence& seq, StreamEvent event, const std::string& metric_reason);
  void publish_gauges();

  Engine& engine_;
  const Tokenizer& tokenizer_;
  Metrics& metrics_;
  SchedulerOptions options_;
  int64_t n_slots_ = 0;
  int64_t budget_ = 0;  // tokens per step
  std::vector<int32_t> eos_ids_;

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<ScheduledRequest> waiting_;
  int64_t active_ = 0;  // requests holding a slot (running_.size(), readable under mutex_)
  bool stopping_ = false;
  std::optional<std::chrono::steady_clock::time_point> deadline_;
  std::thread thread_;

  // Scheduler-thread state.
  std::vector<std::shared_ptr<Sequence>> running_;  // in admission order
  std::vector<bool> slot_busy_;
  // Samples a step's host rows side by side (in line with one thread).
  std::unique_ptr<ThreadPool> pool_;
  bool host_picks_only_ = false;     // KESTREL_SERVER_HOST_PICKS=1: greedy rows picked on the host
  bool device_draws_ = false;        // SchedulerOptions::draw_rows, or the engine's
  bool run_ahead_ = false;           // SchedulerOptions::run_ahead, or the engine's
  std::optional<QueuedStep> ahead_;  // queued by the last step(), delivered by the next
};

}  // namespace kestrel::server
