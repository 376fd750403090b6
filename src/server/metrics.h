// The server's counters in Prometheus text format (GET /metrics). Thread-safe: HTTP workers and
// the scheduler thread record into one Metrics.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace kestrel::server {

// A cumulative histogram with fixed upper bounds (seconds), as Prometheus expects.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double value);
  // "NAME_bucket{le=...} N" lines, NAME_sum and NAME_count.
  void render(const std::string& name, std::string& out) const;

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> counts_;  // [bounds_.size() + 1]: the last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

class Metrics {
 public:
  Metrics();

  void record_response(int status);
  void record_prompt_tokens(int64_t n);
  void record_generated_tokens(int64_t n);
  void record_first_token(double seconds);          // arrival to the first generated token
  void record_token_gap(double seconds);            // between two generated tokens of one request
  void record_finished(const std::string& reason);  // stop, length, abort, error
  void set_queue(int64_t running, int64_t waiting, int64_t slots);
  // Full prompt blocks looked up in the prefix cache at admission, and those found.
  void record_prefix_cache(int64_t queried_blocks, int64_t hit_blocks);
  // Generated tokens picked from the device's argmax (greedy requests whose logit row never
  // crossed to the host) and by host samplers from whole rows.
  void record_picks(int64_t on_device, int64_t drawn_on_device, int64_t on_host);
  // A forward step queued, either before the tokens of the step before it came back (run ahead)
  // or after them (in turn).
  void record_step(bool run_ahead);
  // Rows of steps run ahead whose request had ended when their tokens came back (computed, not
  // used: the cost of running ahead).
  void record_dropped_rows(int64_t n);
  // KV cache blocks: held by requests, available, offered by the prefix cache.
  void set_kv_blocks(int64_t used, int64_t free, int64_t cached);
  // Weight bytes one decode step streams (bench/serve_bench.py turns TPOT into GB/s with it).
  void set_decode_weight_bytes(int64_t bytes);

  std::string render() const;

 private:
  mutable std::mutex mutex_;
  std::map<int, uint64_t> responses_;  // by HTTP status
  std::map<std::string, uint64_t> finished_;
  uint64_t prompt_tokens_ = 0;
  uint64_t generated_tokens_ = 0;
  Histogram first_token_;
  Histogram token_gap_;
  int64_t running_ = 0;
  int64_t waiting_ = 0;
  int64_t slots_ = 0;
  uint64_t prefix_queries_ = 0;
  uint64_t prefix_hits_ = 0;
  uint64_t device_picks_ = 0;
  uint64_t device_draws_ = 0;
  uint64_t host_picks_ = 0;
  uint64_t steps_in_turn_ = 0;
  uint64_t steps_ahead_ = 0;
  uint64_t dropped_rows_ = 0;
  int64_t kv_used_ = 0;
  int64_t kv_free_ = 0;
  int64_t kv_cached_ = 0;
  int64_t decode_weight_bytes_ = 0;
};

}  // namespace kestrel::server
