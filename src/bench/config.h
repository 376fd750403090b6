// The benchmark's YAML configuration, in the all-in-one benchmark's keys:
//
//   repo_id:            [Qwen/Qwen2-1.5B, synthetic:qwen2-1.5b, /models/llama]   (list)
//   local_model_hub:    /models            joined with each repo_id's last path component
//   warm_up: 1          num_trials: 3       num_beams: 1
//   low_bit: sym_int4   batch_size: 1 (or a list)
//   in_out_pairs:       ['32-32', '1024-128']
//   exclude:            ['MODEL:IN_LEN', 'MODEL:IN_LEN:BATCH', 'MODEL']
//
// A repo_id is synthetic:NAME, or a path when it is one (absolute, or an existing directory),
// or a hub name joined with local_model_hub. Keys the all-in-one benchmark has but Kestrel has
// no use for (test_api, cpu_embedding, ...) are accepted and listed in `ignored_keys`; any
// other key is an error naming it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "core/status.h"
#include "quant/format.h"

namespace kestrel::bench {

struct InOut {
  int64_t in_len = 0;
  int64_t out_len = 0;
  std::string text() const;  // "1024-512"
};

// "1024-512" -> {1024, 512}; both positive, together at most kMaxPositions.
Result<InOut> parse_in_out(const std::string& text);

// Stated limits of the numbers a configuration may ask for: far above any useful benchmark, and
// small enough that a typo fails at once instead of running for days.
constexpr int64_t kMaxTrials = 10000;    // warm_up, num_trials (and bench -r)
constexpr int64_t kMaxBeams = 64;        // num_beams
constexpr int64_t kMaxBatchSize = 4096;  // batch_size (and bench -b)
// IN + OUT of an in/out pair (and of bench -p and -n's tests): positions are int32 in the engine.
constexpr int64_t kMaxPositions = std::numeric_limits<int32_t>::max();
// Configurations one run may expand to (the product of its lists, before exclusions), so a
// config of a few lines cannot ask for billions of rows.
constexpr int64_t kMaxCases = 10000;
// A benchmark YAML's bytes, checked before yaml-cpp parses it: its nodes take up to ~250 times
// the text (1 MiB of "[a]," items peaked at 260 MB; 60 MB, within the generic 64 MiB text limit,
// took more than 8 GB).
constexpr size_t kMaxBenchConfigBytes = size_t(1) << 20;

// The number of configurations lists of `sizes` items make (their product), or an error that
// names `what` ("repo_id x batch_size x in_out_pairs") past kMaxCases.
Result<int64_t> count_cases(const std::vector<size_t>& sizes, const std::string& what);

struct BenchConfig {
  std::vector<std::string> repo_ids;
  std::string local_model_hub;
  int warm_up = 1;
  int num_trials = 3;
  int num_beams = 1;
  WeightFormat low_bit = WeightFormat::sym_int4;
  bool low_bit_given = false;  // a converted model keeps its own format unless low_bit is set
  std::vector<int64_t> batch_sizes = {1};
  std::vector<InOut> in_out_pairs;
  std::vector<std::string> exclude;
  // Ranks every model is split over (`kestrel bench --tensor-parallel`); 0: not given.
  int tensor_parallel = 0;
  std::vector<std::string> ignored_keys;  // all-in-one keys that mean nothing here
};

// Parses YAML text (one document, at most kMaxBenchConfigBytes); `path` names the file in
// errors. Lists hold no item twice, and make at most kMaxCases configurations.
Result<BenchConfig> parse_bench_config(const std::string& text, const std::string& path);
Result<BenchConfig> load_bench_config(const std::string& path);

// One configuration (one CSV row).
struct BenchCase {
  std::string model;   // the repo_id as written (the CSV's model column)
  std::string source;  // what load_model gets: synthetic:NAME or a directory
  WeightFormat format = WeightFormat::sym_int4;
  bool format_explicit = false;
  int64_t in_len = 0;
  int64_t out_len = 0;
  int64_t batch_size = 1;
  int64_t num_beams = 1;
  int warm_up = 1;
  int num_trials = 3;
};

// Every (model, batch size, in/out pair) in that order, minus the excluded ones, which are
// returned in `excluded` as "MODEL in-out batch N" for the log. parse_bench_config has bounded
// their number (kMaxCases).
std::vector<BenchCase> expand_cases(const BenchConfig& config,
                                    std::vector<std::string>* excluded = nullptr);

// Where repo_id's model lives (see the header comment).
std::string model_source(const std::string& repo_id, const std::string& local_model_hub);

// "24GB", "512MiB", "1.5G", "1000000": decimal units for kB/MB/GB/TB, binary for
// KiB/MiB/GiB/TiB and for the bare K/M/G/T; a plain number is bytes.
Result<size_t> parse_size(const std::string& text);

}  // namespace kestrel::bench
