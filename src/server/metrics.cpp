#include "server/metrics.h"

#include <cstdio>

namespace kestrel::server {

namespace {
std::string number(double value) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%.9g", value);
  return buf;
}

void line(std::string& out, const std::string& text) {
  out += text;
  out += '\n';
}

void header(std::string& out, const std::string& name, const char* type, const char* help) {
  line(out, "# HELP " + name + " " + help);
  line(out, "# TYPE " + name + " " + type);
}

template <typename T>
void scalar(std::string& out, const std::string& name, const char* type, const char* help,
            T value) {
  header(out, name, type, help);
  line(out, name + " " + std::to_string(value));
}
}  // namespace

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::observe(double value) {
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += value;
  ++count_;
}

void Histogram::render(const std::string& name, std::string& out) const {
  uint64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    line(out, name + "_bucket{le=\"" + number(bounds_[i]) + "\"} " + std::to_string(cumulative));
  }
  line(out, name + "_bucket{le=\"+Inf\"} " + std::to_string(count_));
  line(out, name + "_sum " + number(sum_));
  line(out, name + "_count " + std::to_string(count_));
}

// Buckets span a GPU's milliseconds to a loaded CPU's seconds (vLLM uses similar ranges).
Metrics::Metrics()
    : first_token_({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5,
                    7.5, 10, 20, 40, 80}),
      token_gap_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                  0.75, 1, 2.5, 5, 10}) {}

void Metrics::record_response(int status) {
  std::lock_guard lock(mutex_);
  ++responses_[status];
}

void Metrics::record_prompt_tokens(int64_t n) {
  std::lock_guard lock(mutex_);
  prompt_tokens_ += uint64_t(n);
}

void Metrics::record_generated_tokens(int64_t n) {
  std::lock_guard lock(mutex_);
  generated_tokens_ += uint64_t(n);
}

void Metrics::record_first_token(double seconds) {
  std::lock_guard lock(mutex_);
  first_token_.observe(seconds);
}

void Metrics::record_token_gap(double seconds) {
  std::lock_guard lock(mutex_);
  token_gap_.observe(seconds);
}

void Metrics::record_finished(const std::string& reason) {
  std::lock_guard lock(mutex_);
  ++finished_[reason];
}

void Metrics::set_queue(int64_t running, int64_t waiting, int64_t slots) {
  std::lock_guard lock(mutex_);
  running_ = running;
  waiting_ = waiting;
  slots_ = slots;
}

void Metrics::record_prefix_cache(int64_t queried_blocks, int64_t hit_blocks) {
  std::lock_guard lock(mutex_);
  prefix_queries_ += uint64_t(queried_blocks);
  prefix_hits_ += uint64_t(hit_blocks);
}

void Metrics::record_picks(int64_t on_device, int64_t drawn_on_device, int64_t on_host) {
  std::lock_guard lock(mutex_);
  device_picks_ += uint64_t(on_device);
  device_draws_ += uint64_t(drawn_on_device);
  host_picks_ += uint64_t(on_host);
}

void Metrics::record_step(bool run_ahead) {
  std::lock_guard lock(mutex_);
  ++(run_ahead ? steps_ahead_ : steps_in_turn_);
}

void Metrics::set_decode_weight_bytes(int64_t bytes) {
  std::lock_guard lock(mutex_);
  decode_weight_bytes_ = bytes;
}

void Metrics::record_dropped_rows(int64_t n) {
  std::lock_guard lock(mutex_);
  dropped_rows_ += uint64_t(n);
}

void Metrics::set_kv_blocks(int64_t used, int64_t free, int64_t cached) {
  std::lock_guard lock(mutex_);
  kv_used_ = used;
  kv_free_ = free;
  kv_cached_ = cached;
}

std::string Metrics::render() const {
  std::lock_guard lock(mutex_);
  std::string out;
  header(out, "kestrel_http_responses_total", "counter", "HTTP responses by status code.");
  for (const auto& [status, count] : responses_) {
    line(out, "kestrel_http_responses_total{status=\"" + std::to_string(status) + "\"} " +
                  std::to_string(count));
  }
  header(out, "kestrel_requests_finished_total", "counter",
         "Generation requests by how they ended.");
  for (const auto& [reason, count] : finished_) {
    line(out,
         "kestrel_requests_finished_total{reason=\"" + reason + "\"} " + std::to_string(count));
  }
  scalar(out, "kestrel_prompt_tokens_total", "counter", "Prompt tokens prefilled.", prompt_tokens_);
  scalar(out, "kestrel_generation_tokens_total", "counter", "Tokens generated.", generated_tokens_);
  header(out, "kestrel_time_to_first_token_seconds", "histogram",
         "Arrival to the first generated token.");
  first_token_.render("kestrel_time_to_first_token_seconds", out);
  header(out, "kestrel_time_per_output_token_seconds", "histogram",
         "Time between generated tokens.");
  token_gap_.render("kestrel_time_per_output_token_seconds", out);
  scalar(out, "kestrel_requests_running", "gauge", "Requests holding a sequence slot.", running_);
  scalar(out, "kestrel_requests_waiting", "gauge", "Requests queued for a slot.", waiting_);
  scalar(out, "kestrel_slots", "gauge", "Sequence slots.", slots_);
  scalar(out, "kestrel_kv_blocks_used", "gauge", "KV cache blocks held by running requests.",
         kv_used_);
  scalar(out, "kestrel_kv_blocks_free", "gauge",
         "KV cache blocks free to take (including cached prefix blocks no request holds).",
         kv_free_);
  scalar(out, "kestrel_kv_blocks_cached", "gauge", "KV cache blocks the prefix cache offers.",
         kv_cached_);
  scalar(out, "kestrel_prefix_cache_queries_total", "counter",
         "Full prompt blocks looked up in the prefix cache.", prefix_queries_);
  scalar(out, "kestrel_prefix_cache_hits_total", "counter",
         "Prompt blocks found in the prefix cache (not prefilled).", prefix_hits_);
  header(out, "kestrel_tokens_picked_total", "counter",
         "Generated tokens by where they were picked: the device's argmax (greedy requests, "
         "no logit row read back), a draw on the device (sampled requests without penalties, "
         "logprobs or eos held back, on a CUDA model) or a host sampler (from the whole logit "
         "row).");
  line(out, "kestrel_tokens_picked_total{where=\"device\"} " + std::to_string(device_picks_));
  line(out, "kestrel_tokens_picked_total{where=\"device_draw\"} " + std::to_string(device_draws_));
  line(out, "kestrel_tokens_picked_total{where=\"host\"} " + std::to_string(host_picks_));
  header(out, "kestrel_steps_total", "counter",
         "Forward steps by when they were queued: before the tokens of the step before them came "
         "back, fed them on the device (ahead), or after (in_turn).");
  line(out, "kestrel_steps_total{queued=\"ahead\"} " + std::to_string(steps_ahead_));
  line(out, "kestrel_steps_total{queued=\"in_turn\"} " + std::to_string(steps_in_turn_));
  scalar(out, "kestrel_decode_weight_bytes", "gauge",
         "Weight bytes one decode step streams from memory, whatever its batch (the model's "
         "quantized weights, every rank's when split).",
         decode_weight_bytes_);
  scalar(out, "kestrel_step_rows_dropped_total", "counter",
         "Rows of steps run ahead whose request had ended (eos, a stop string, its client gone, "
         "an error) when their tokens came back: computed and not used.",
         dropped_rows_);
  return out;
}

}  // namespace kestrel::server
