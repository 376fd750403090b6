#include "server/scheduler.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "core/thread_pool.h"
#include "io/config.h"
#include "runtime/kv_cache.h"
#include "sample/stop.h"

namespace kestrel::server {

namespace {
// log(sum(exp(row))) in double, stable; the exponentials are the sampler's (exp_in_place: the
// vectorized loop, within an ulp of std::exp), in a buffer of the calling thread.
double log_sum_exp(std::span<const float> row) {
  float max_value = -INFINITY;
  for (float v : row) max_value = std::max(max_value, v);
  thread_local std::vector<double> shifted;
  shifted.resize(row.size());
  for (size_t i = 0; i < row.size(); ++i) shifted[i] = double(row[i]) - double(max_value);
  exp_in_place(shifted);
  double sum = 0;
  for (const double e : shifted) sum += e;
  return double(max_value) + std::log(sum);
}

// The k most likely tokens of `row` (ties: lower id) with their log-probabilities.
std::vector<std::pair<int32_t, float>> top_tokens(std::span<const float> row, int k, double lse) {
  std::vector<int32_t> best;
  auto better = [&](int32_t a, int32_t b) {
    return row[size_t(a)] > row[size_t(b)] || (row[size_t(a)] == row[size_t(b)] && a < b);
  };
  for (int32_t i = 0; k > 0 && i < int32_t(row.size()); ++i) {
    if (int(best.size()) == k && !better(i, best.back())) continue;
    best.insert(std::upper_bound(best.begin(), best.end(), i, better), i);
    if (int(best.size()) > k) best.pop_back();
  }
  std::vector<std::pair<int32_t, float>> out;
  for (int32_t id : best) out.push_back({id, float(double(row[size_t(id)]) - lse)});
  return out;
}

double seconds_between(std::chrono::steady_clock::time_point a,
                       std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

StreamEvent failed(int status, std::string message) {
  StreamEvent e;
  e.kind = StreamEvent::Kind::failed;
  e.status = status;
  e.message = std::move(message);
  return e;
}
}  // namespace

void RequestChannel::push(StreamEvent event) {
  {
    std::lock_guard lock(mutex_);
    events_.push_back(std::move(event));
  }
  ready_.notify_one();
}

std::optional<StreamEvent> RequestChannel::pop(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mutex_);
  if (!ready_.wait_for(lock, timeout, [&] { return !events_.empty(); })) return std::nullopt;
  StreamEvent e = std::move(events_.front());
  events_.pop_front();
  return e;
}

// A request holding a slot: its prompt goes in over one or more steps, then one token a step.
struct Scheduler::Sequence {
  Sequence(ScheduledRequest r, int32_t s, const Tokenizer& tokenizer, StopConditions conditions,
           int32_t vocab)
      : request(std::move(r)),
        slot(s),
        sampler(request.sampling, vocab),
        stop(std::move(conditions)),
        decoder(tokenizer, /*skip_special_tokens=*/true) {}

  ScheduledRequest request;
  int32_t slot;
  size_t prefilled = 0;   // prompt tokens whose keys and values the slot holds
  size_t cached = 0;      // positions whose keys and values the slot holds (prompt, then output)
  int64_t published = 0;  // full blocks offered to the prefix cache
  uint64_t chain = 0;     // the chained hash of those blocks
  std::vector<int32_t> generated;
  Sampler sampler;
  StopChecker stop;
  StreamDecoder decoder;
  std::chrono::steady_clock::time_point last_token;
  std::vector<TokenLogprob> pending_logprobs;  // generated since the last event
  bool done = false;

  bool decoding() const { return prefilled == request.prompt.size(); }
  int32_t token_at(size_t position) const {
    const size_t n = request.prompt.size();
    return position < n ? request.prompt[position] : generated[position - n];
  }
};

Scheduler::Scheduler(Engine& engine, const Tokenizer& tokenizer, Metrics& metrics,
                     SchedulerOptions options)
    : engine_(engine), tokenizer_(tokenizer), metrics_(metrics), options_(options) {
  n_slots_ = engine_.run_shape().max_seqs;
  // Every step's logit rows are a subset of its tokens, so the budget is the smaller of the two.
  budget_ = std::min(engine_.run_shape().max_batch_tokens, engine_.run_shape().max_logit_rows);
  for (int64_t id : engine_.config().eos_token_ids) eos_ids_.push_back(int32_t(id));
  slot_busy_.assign(size_t(n_slots_), false);
  // A measurement aid (gpu-ab's serve benchmark, A against B): every row crosses to the host and
  // is picked there, as before greedy rows took the device's argmax.
  const char* host_picks = std::getenv("KESTREL_SERVER_HOST_PICKS");
  host_picks_only_ = host_picks != nullptr && std::string(host_picks) == "1";
  device_draws_ = !host_picks_only_ && options_.draw_rows.value_or(engine_.draws_on_device());
  run_ahead_ =
      options_.run_ahead.value_or(engine_.runs_ahead()) && engine_.options().tensor_parallel <= 1;
  const int64_t threads = options_.host_threads > 0
                              ? options_.host_threads
                              : std::min<int64_t>(n_slots_, std::thread::hardware_concurrency());
  pool_ = std::make_unique<ThreadPool>(int(std::max<int64_t>(threads, 1)));
}

Scheduler::~Scheduler() {
  shutdown(std::chrono::milliseconds(0));
}

void Scheduler::start() {
  metrics_.set_decode_weight_bytes(int64_t(engine_.info().decode_bytes));
  publish_gauges();
  thread_ = std::thread([this] { loop(); });
}

Scheduler::Admission Scheduler::submit(ScheduledRequest request) {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return Admission::shutting_down;
    // Free slots take requests at the next step; the queue holds those beyond them.
    if (int64_t(waiting_.size()) + active_ >= n_slots_ + options_.max_queue) {
      return Admission::queue_full;
    }
    waiting_.push_back(std::move(request));
  }
  wake_.notify_one();
  return Admission::queued;
}

void Scheduler::shutdown(std::chrono::milliseconds grace) {
  {
    std::lock_guard lock(mutex_);
    if (!stopping_) {
      stopping_ = true;
      deadline_ = std::chrono::steady_clock::now() + grace;
    }
  }
  wake_.notify_one();
  if (thread_.joinable()) thread_.join();
}

void Scheduler::publish_gauges() {
  int64_t waiting = 0;
  {
    std::lock_guard lock(mutex_);
    waiting = int64_t(waiting_.size());
  }
  metrics_.set_queue(int64_t(running_.size()), waiting, n_slots_);
  const PagedKvCache& kv = engine_.kv_cache();
  metrics_.set_kv_blocks(kv.used_blocks(), kv.available_blocks(), kv.cached_blocks());
}

void Scheduler::finish(Sequence& seq, StreamEvent event, const std::string& metric_reason) {
  seq.done = true;
  slot_busy_[size_t(seq.slot)] = false;
  engine_.kv_cache().release(seq.slot);
  metrics_.record_finished(metric_reason);
  seq.request.channel->push(std::move(event));
}

void Scheduler::loop() {
  for (;;) {
    std::optional<std::chrono::steady_clock::time_point> deadline;
    {
      std::unique_lock lock(mutex_);
      wake_.wait(lock, [&] { return stopping_ || !waiting_.empty() || !running_.empty(); });
      if (stopping_) {
        for (ScheduledRequest& r : waiting_) {
          r.channel->push(failed(503, "the server is shutting down"));
          metrics_.record_finished("shutdown");
        }
        waiting_.clear();
        if (running_.empty()) break;
      }
      deadline = deadline_;
      // First come, first served: the queue's head takes the next free slot once the pool has
      // the blocks it can need; until then everything behind it waits too.
      while (!waiting_.empty() && int64_t(running_.size()) < n_slots_) {
        if (waiting_.front().channel->cancelled()) {
          waiting_.pop_front();
          metrics_.record_finished("abort");
          continue;
        }
        if (!admit(waiting_.front())) break;
        waiting_.pop_front();
      }
      active_ = int64_t(running_.size());
    }
    if (deadline && std::chrono::steady_clock::now() >= *deadline) {
      for (auto& seq : running_) {
        finish(*seq, failed(503, "the server is shutting down"), "shutdown");
      }
      running_.clear();
    }
    publish_gauges();
    step();
    std::erase_if(running_, [](const std::shared_ptr<Sequence>& s) { return s->done; });
    {
      std::lock_guard lock(mutex_);
      active_ = int64_t(running_.size());
    }
    publish_gauges();
  }
  publish_gauges();
}

std::optional<std::vector<int32_t>> Scheduler::blocks_for(const ScheduledRequest& r) const {
  const PagedKvCache& kv = engine_.kv_cache();
  // Blocks of the prompt already computed by earlier requests; at least the prompt's last token
  // is computed here, for its logits.
  const int64_t prompt_len = int64_t(r.prompt.size());
  const int64_t queried = (prompt_len - 1) / kKvBlockSize;
  std::vector<int32_t> reused = kv.lookup(r.prompt, queried);
  const int64_t n_reused = int64_t(reused.size());
  const int64_t blocks = (prompt_len + r.max_tokens + kKvBlockSize - 1) / kKvBlockSize;
  if (kv.available_blocks() - kv.unheld(reused) < blocks - n_reused) return std::nullopt;
  return reused;
}

bool Scheduler::admit(ScheduledRequest& r) {
  PagedKvCache& kv = engine_.kv_cache();
  const std::optional<std::vector<int32_t>> found = blocks_for(r);
  if (!found) return false;
  const std::vector<int32_t>& reused = *found;
  const int64_t prompt_len = int64_t(r.prompt.size());
  const int64_t queried = (prompt_len - 1) / kKvBlockSize;
  const int64_t n_reused = int64_t(reused.size());

  const auto free_slot = std::find(slot_busy_.begin(), slot_busy_.end(), false);
  const int32_t slot = int32_t(free_slot - slot_busy_.begin());
  kv.attach(slot, reused);
  if (!kv.reserve(slot, prompt_len + r.max_tokens)) {
    kv.release(slot);  // unreachable: the count above is what reserve takes
    return false;
  }
  slot_busy_[size_t(slot)] = true;
  metrics_.record_prefix_cache(queried, n_reused);
  StopConditions conditions;
  if (!r.ignore_eos) conditions.eos_ids = eos_ids_;
  conditions.min_new_tokens = r.min_tokens;
  conditions.stop_strings = r.stop;
  conditions.max_new_tokens = r.max_tokens;
  auto seq = std::make_shared<Sequence>(std::move(r), slot, tokenizer_, std::move(conditions),
                                        int32_t(engine_.config().vocab_size));
  seq->prefilled = size_t(n_reused * kKvBlockSize);
  seq->cached = seq->prefilled;
  seq->published = n_reused;
  for (int64_t b = 0; b < n_reused; ++b) {
    seq->chain = PagedKvCache::chain_hash(
        seq->chain,
        std::span(seq->request.prompt).subspan(size_t(b * kKvBlockSize), size_t(kKvBlockSize)));
  }
  running_.push_back(std::move(seq));
  return true;
}

void Scheduler::publish_blocks(Sequence& seq) {
  PagedKvCache& kv = engine_.kv_cache();
  std::vector<int32_t> tokens(static_cast<size_t>(kKvBlockSize));
  while (int64_t(seq.cached) >= (seq.published + 1) * kKvBlockSize) {
    const size_t begin = size_t(seq.published * kKvBlockSize);
    for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = seq.token_at(begin + i);
    seq.chain = PagedKvCache::chain_hash(seq.chain, tokens);
    kv.publish(seq.slot, seq.published, seq.chain, tokens);
    ++seq.published;
  }
}

bool Scheduler::step() {
  for (auto& seq : running_) {
    // finish() gives the slot's blocks back to the pool.
    if (seq->request.channel->cancelled()) finish(*seq, failed(499, "client went away"), "abort");
  }
  if (ahead_) {
    QueuedStep queued = std::move(*ahead_);
    ahead_.reset();
    finish_queued(std::move(queued));
    return true;
  }
  std::erase_if(running_, [](const std::shared_ptr<Sequence>& s) { return s->done; });
  if (running_.empty()) return false;

  Batch batch;
  QueuedStep rows;  // the sequence, position and pick of each of the batch's logit rows
  int64_t budget = budget_;
  // Decode tokens first, so running streams advance every step whatever prompts are waiting.
  for (auto& seq : running_) {
    if (!seq->decoding()) continue;
    const size_t position = seq->request.prompt.size() + seq->generated.size() - 1;
    batch.add(seq->generated.back(), int32_t(position), seq->slot, true);
    rows.rows.push_back(seq);
    rows.positions.push_back(int32_t(position));
    --budget;
  }
  // Then prompt chunks in admission order, in what the budget leaves.
  bool prefills = false;
  for (auto& seq : running_) {
    if (seq->decoding() || budget <= 0) continue;
    const std::vector<int32_t>& prompt = seq->request.prompt;
    const size_t n = std::min(prompt.size() - seq->prefilled, size_t(budget));
    for (size_t i = seq->prefilled; i < seq->prefilled + n; ++i) {
      batch.add(prompt[i], int32_t(i), seq->slot, i + 1 == prompt.size());
    }
    seq->prefilled += n;
    seq->cached = seq->prefilled;
    budget -= int64_t(n);
    prefills = true;
    metrics_.record_prompt_tokens(int64_t(n));
    if (seq->decoding()) {
      rows.rows.push_back(seq);
      rows.positions.push_back(int32_t(prompt.size() - 1));
    }
  }

  // A request samples on the host from its whole logit row unless nothing edits the row
  // (penalties, eos held back) or reads it (logprobs): then a greedy one takes the device's
  // argmax, and a sampled one, where the engine draws on the device (CUDA), a token drawn there
  // from its settings and its own generator's next number (the host sampler's token: RowDraw).
  // Its row never crosses to the host (513 KB a row on a 128k vocabulary).
  std::vector<int32_t> full_rows;
  std::vector<RowDraw> draws;
  const size_t n_rows = rows.rows.size();
  for (size_t i = 0; i < n_rows; ++i) {
    Sequence& seq = *rows.rows[i];
    const bool row_as_is = seq.request.top_logprobs < 0 && !seq.stop.suppresses_eos();
    if (row_as_is && seq.sampler.picks_argmax() && !host_picks_only_) {
      rows.picks.push_back(Pick::argmax);
    } else if (row_as_is && device_draws_ && seq.sampler.draws_from_row()) {
      draws.push_back(seq.sampler.next_draw(int32_t(i)));
      rows.picks.push_back(Pick::draw);
    } else {
      full_rows.push_back(int32_t(i));
      rows.picks.push_back(Pick::host);
    }
  }
  metrics_.record_step(false);
  if (run_ahead_ && !prefills && full_rows.empty()) {
    const Status status = engine_.start_argmax(batch, false, draws);
    if (!status.is_ok()) {
      fail_running(status);
      return true;
    }
    finish_queued(std::move(rows));
    return true;
  }
  std::vector<int32_t> tokens;
  std::vector<float> logits;
  const Status status = full_rows.size() == n_rows
                            ? engine_.run(batch, &logits)
                            : engine_.run_argmax(batch, &tokens, full_rows, &logits, draws);
  if (!status.is_ok()) {
    fail_running(status);
    return true;
  }

  // The host's picks, a row each, spread over the pool: a row touches only its own sequence (its
  // sampler, with its own seed and generator, its stop checker and logprobs), so the tokens are
  // a loop's. A sampled row is 0.25-1 ms of work on a 128k vocabulary (bench/sampler_bench.cpp),
  // and a step can hold a row for every slot.
  const int64_t vocab = engine_.config().vocab_size;
  tokens.resize(n_rows);
  auto pick = [&](int64_t begin, int64_t end, int) {
    for (int64_t r = begin; r < end; ++r) {
      const size_t i = size_t(full_rows[size_t(r)]);
      Sequence& seq = *rows.rows[i];
      std::span<float> row(logits.data() + r * vocab, size_t(vocab));
      // Log-probabilities come from the raw row, before suppress_eos edits it.
      std::optional<double> lse;
      std::vector<std::pair<int32_t, float>> top;
      if (seq.request.top_logprobs >= 0) {
        lse = log_sum_exp(row);
        top = top_tokens(row, seq.request.top_logprobs, *lse);
      }
      seq.stop.suppress_eos(row);
      // OpenAI's presence and frequency penalties count the generated tokens only.
      const int32_t token = seq.sampler.sample(row, seq.generated);
      if (lse) {
        // suppress_eos only lowers eos ids to -inf, which are never sampled: row[token] is raw.
        seq.pending_logprobs.push_back(
            {token, float(double(row[size_t(token)]) - *lse), std::move(top)});
      }
      tokens[i] = token;
    }
  };
  pool_->parallel_for(int64_t(full_rows.size()), 1, pick);  // one thread or row: in line
  deliver(rows.rows, rows.positions, rows.picks, tokens);
  return true;
}

void Scheduler::finish_queued(QueuedStep queued) {
  Status ahead_failed = Status::ok();
  std::optional<QueuedStep> next = queue_ahead(queued, &ahead_failed);
  std::vector<int32_t> tokens;
  const Status status = engine_.finish_argmax(&tokens);
  if (!status.is_ok()) {
    fail_running(status);
    if (next) drop(std::move(*next));
    return;
  }
  deliver(queued.rows, queued.positions, queued.picks, tokens);
  // A step ahead whose start failed after its drawn rows took their generators' numbers: going
  // on in turn would not give a seed's text, so the requests end as a failed step ends them.
  if (!ahead_failed.is_ok()) fail_running(ahead_failed);
  if (!next) return;
  // A step whose every request ended with this one's tokens is not worth a step() of its own.
  if (std::all_of(next->rows.begin(), next->rows.end(),
                  [](const std::shared_ptr<Sequence>& s) { return s->done; })) {
    drop(std::move(*next));
    return;
  }
  ahead_ = std::move(next);
}

std::optional<Scheduler::QueuedStep> Scheduler::queue_ahead(const QueuedStep& queued,
                                                            Status* failed_after_draws) {
  if (!run_ahead_) return std::nullopt;
  // The same rows: every running request is one of them and none has ended, is leaving, or takes
  // its last token from `queued` (then the step after it would be past max_tokens; the slot's
  // blocks cover prompt + max_tokens positions, so every step queued here writes inside them).
  int64_t live = 0;
  for (const auto& seq : running_) live += seq->done ? 0 : 1;
  if (live != int64_t(queued.rows.size())) return std::nullopt;
  for (const auto& seq : queued.rows) {
    if (seq->done || seq->request.channel->cancelled() ||
        int64_t(seq->generated.size()) + 2 > seq->request.max_tokens) {
      return std::nullopt;
    }
  }
  // A request a free slot and the pool could take now goes in at the next step, in turn; one
  // waiting for blocks lets the running requests go on ahead.
  {
    std::lock_guard lock(mutex_);
    if (!waiting_.empty() && int64_t(running_.size()) < n_slots_ && blocks_for(waiting_.front())) {
      return std::nullopt;
    }
  }
  // The same rows a position on, each picking where it did: a row's settings and logprobs never
  // change, and eos held back (min tokens) only ever stops being held back.
  QueuedStep next = queued;
  Batch batch;
  std::vector<RowDraw> draws;
  for (size_t i = 0; i < next.rows.size(); ++i) {
    Sequence& seq = *next.rows[i];
    ++next.positions[i];
    batch.add(0, next.positions[i], seq.slot,
              true);  // the token: row i of `queued`'s, on the device
    if (next.picks[i] == Pick::draw) draws.push_back(seq.sampler.next_draw(int32_t(i)));
  }
  const Status status = engine_.start_argmax(batch, true, draws);
  if (!status.is_ok()) {
    // Nothing was queued. Greedy rows go on in turn (and fail there if they must); drawn rows
    // have taken their generators' next numbers, so their requests cannot.
    if (!draws.empty()) *failed_after_draws = status;
    return std::nullopt;
  }
  metrics_.record_step(true);
  return next;
}

void Scheduler::drop(QueuedStep queued) {
  std::vector<int32_t> tokens;
  (void)engine_.finish_argmax(&tokens);  // its requests have ended: their tokens are not needed
  metrics_.record_dropped_rows(int64_t(queued.rows.size()));
}

void Scheduler::fail_running(const Status& status) {
  for (auto& seq : running_) {
    if (!seq->done) finish(*seq, failed(500, "generation failed: " + status.message()), "error");
  }
}

void Scheduler::deliver(std::span<const std::shared_ptr<Sequence>> rows,
                        std::span<const int32_t> positions, std::span<const Pick> picks,
                        std::span<const int32_t> tokens) {
  // The positions the step computed are cached now; their full blocks go to the prefix cache.
  int64_t picked[3] = {};
  int64_t dropped = 0;
  for (size_t i = 0; i < rows.size(); ++i) {
    if (rows[i]->done) {
      ++dropped;
      continue;
    }
    rows[i]->cached = std::max(rows[i]->cached, size_t(positions[i]) + 1);
    ++picked[size_t(picks[i])];
  }
  if (dropped > 0) metrics_.record_dropped_rows(dropped);
  for (auto& seq : running_) {
    if (!seq->done) publish_blocks(*seq);
  }
  metrics_.record_picks(picked[size_t(Pick::argmax)], picked[size_t(Pick::draw)],
                        picked[size_t(Pick::host)]);

  const auto now = std::chrono::steady_clock::now();
  for (size_t i = 0; i < rows.size(); ++i) {
    Sequence& seq = *rows[i];
    if (seq.done) continue;  // a row of a step run ahead past the request's end
    const int32_t token = tokens[i];
    if (seq.generated.empty()) {
      metrics_.record_first_token(seconds_between(seq.request.arrival, now));
    } else {
      metrics_.record_token_gap(seconds_between(seq.last_token, now));
    }
    seq.last_token = now;
    seq.generated.push_back(token);
    metrics_.record_generated_tokens(1);

    const StopReason reason = seq.stop.add(token, seq.decoder.feed(token));
    std::string ready = seq.stop.take_ready_text();
    const bool end = reason != StopReason::none || seq.stop.done();
    if (end) {
      ready += seq.stop.take_remaining_text();
      // A budget that ran out mid-character shows the partial character, as HF's decode does;
      // after a stop string the decoder's tail belongs to the cut-off text.
      if (seq.stop.reason() != StopReason::stop_string) ready += seq.decoder.finish();
    }
    if (!ready.empty()) {
      StreamEvent text;
      text.text = std::move(ready);
      text.logprobs = std::move(seq.pending_logprobs);
      seq.pending_logprobs.clear();
      seq.request.channel->push(std::move(text));
    }
    if (end) {
      const StopReason why =
          seq.stop.reason() == StopReason::none ? StopReason::max_tokens : seq.stop.reason();
      StreamEvent done;
      done.kind = StreamEvent::Kind::finished;
      done.reason = why == StopReason::max_tokens ? FinishReason::length : FinishReason::stop;
      done.usage.prompt_tokens = int64_t(seq.request.prompt.size());
      done.usage.completion_tokens = int64_t(seq.generated.size());
      done.logprobs = std::move(seq.pending_logprobs);
      const std::string metric_reason = finish_reason_name(done.reason);
      finish(seq, std::move(done), metric_reason);
    }
  }
}

}  // namespace kestrel::server
