// The benchmark's YAML configuration, its expansion into rows, the prompt source, sizes, and
// the CSV and quick-mode writers.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <set>

#include "bench/config.h"
#include "bench/profile.h"
#include "bench/prompt.h"
#include "bench/report.h"
#include "bench/runner.h"
#include "core/stats.h"

namespace kestrel::bench {
namespace {

const char* kAllInOne = R"(
repo_id:
  - 'Qwen/Qwen2-1.5B-Instruct'
  - 'synthetic:qwen2-1.5b'
local_model_hub: '/mnt/disk1/models'
warm_up: 2
num_trials: 5
num_beams: 1
low_bit: 'asym_int4'
batch_size: [1, 4, 16]
in_out_pairs:
  - '32-32'
  - '1024-128'
test_api:
  - "transformer_int4_gpu"
cpu_embedding: False
exclude:
  - 'synthetic:qwen2-1.5b:1024'
  - 'Qwen/Qwen2-1.5B-Instruct:32:16'
)";

TEST(BenchConfig, ReadsTheAllInOneKeys) {
  auto config = parse_bench_config(kAllInOne, "config.yaml");
  ASSERT_TRUE(config.is_ok()) << config.status().message();
  EXPECT_EQ(config->repo_ids,
            (std::vector<std::string>{"Qwen/Qwen2-1.5B-Instruct", "synthetic:qwen2-1.5b"}));
  EXPECT_EQ(config->local_model_hub, "/mnt/disk1/models");
  EXPECT_EQ(config->warm_up, 2);
  EXPECT_EQ(config->num_trials, 5);
  EXPECT_EQ(config->num_beams, 1);
  EXPECT_EQ(config->low_bit, WeightFormat::asym_int4);
  EXPECT_TRUE(config->low_bit_given);
  EXPECT_EQ(config->batch_sizes, (std::vector<int64_t>{1, 4, 16}));
  EXPECT_EQ(config->tensor_parallel, 0);  // not given: the command line's
  ASSERT_EQ(config->in_out_pairs.size(), 2u);
  EXPECT_EQ(config->in_out_pairs[1].in_len, 1024);
  EXPECT_EQ(config->in_out_pairs[1].out_len, 128);
  EXPECT_EQ(config->ignored_keys, (std::vector<std::string>{"test_api", "cpu_embedding"}));

  std::vector<std::string> excluded;
  const std::vector<BenchCase> cases = expand_cases(*config, &excluded);
  // 2 models x 3 batches x 2 pairs = 12, minus synthetic 1024-in at every batch (3) and the
  // hub model's 32-in at batch 16 (1).
  ASSERT_EQ(cases.size(), 8u);
  EXPECT_EQ(excluded.size(), 4u);
  EXPECT_EQ(cases[0].model, "Qwen/Qwen2-1.5B-Instruct");
  EXPECT_EQ(cases[0].source, "/mnt/disk1/models/Qwen2-1.5B-Instruct");
  EXPECT_EQ(cases[0].batch_size, 1);
  EXPECT_EQ(cases[0].in_len, 32);
  EXPECT_EQ(cases[1].in_len, 1024);  // pairs vary fastest, then batch sizes
  EXPECT_EQ(cases[2].batch_size, 4);
  EXPECT_EQ(cases[4].batch_size, 16);
  EXPECT_EQ(cases[4].in_len, 1024);
  EXPECT_EQ(cases[5].source, "synthetic:qwen2-1.5b");
  for (const BenchCase& c : cases) {
    EXPECT_EQ(c.format, WeightFormat::asym_int4);
    EXPECT_EQ(c.warm_up, 2);
    EXPECT_EQ(c.num_trials, 5);
    EXPECT_FALSE(c.source == "synthetic:qwen2-1.5b" && c.in_len == 1024);
  }
}

TEST(BenchConfig, DefaultsAndScalarForms) {
  auto config = parse_bench_config(
      "repo_id: synthetic:tiny-qwen2\nin_out_pairs: '8-4'\n"
      "batch_size: 3\nexclude:\n",
      "c.yaml");
  ASSERT_TRUE(config.is_ok()) << config.status().message();
  EXPECT_EQ(config->warm_up, 1);
  EXPECT_EQ(config->num_trials, 3);
  EXPECT_EQ(config->low_bit, WeightFormat::sym_int4);
  EXPECT_FALSE(config->low_bit_given);
  EXPECT_EQ(config->batch_sizes, (std::vector<int64_t>{3}));
  const auto cases = expand_cases(*config);
  ASSERT_EQ(cases.size(), 1u);
  EXPECT_EQ(cases[0].out_len, 4);
}

void expect_error(const std::string& yaml, const std::string& needle) {
  auto config = parse_bench_config(yaml, "bench.yaml");
  ASSERT_FALSE(config.is_ok()) << yaml;
  EXPECT_NE(config.status().message().find(needle), std::string::npos)
      << "message: " << config.status().message() << "\nwanted: " << needle;
  EXPECT_NE(config.status().message().find("bench.yaml"), std::string::npos);
}

TEST(BenchConfig, TensorParallelSplitsEveryModel) {
  auto config = parse_bench_config(
      "repo_id: [synthetic:llama3.1-70b]\nin_out_pairs: ['1024-128']\ntensor_parallel: 4\n",
      "tp.yaml");
  ASSERT_TRUE(config.is_ok()) << config.status().message();
  EXPECT_EQ(config->tensor_parallel, 4);
}

TEST(BenchConfig, ReportsWhatIsWrongAndWhere) {
  const std::string base = "repo_id: [synthetic:tiny-qwen2]\nin_out_pairs: ['8-4']\n";
  expect_error(base + "batch: 4\n", "unknown key 'batch'");
  expect_error(base + "num_trails: 4\n", "unknown key 'num_trails'");
  expect_error(base + "batch_size: 0\n", "batch_size must be an integer from 1 to 4096");
  expect_error(base + "batch_size: [1, two]\n", "got 'two'");
  expect_error(base + "batch_size: []\n", "batch_size is an empty list");
  expect_error(base + "warm_up: -1\n", "warm_up must be an integer from 0 to 10000");
  expect_error(base + "num_trials: 1000000000\n", "num_trials must be an integer from 1 to 10000");
  expect_error(base + "batch_size: [1, 100000]\n", "got '100000'");
  expect_error(base + "num_trials: 2\nnum_trials: 3\n", "key 'num_trials' is given twice");
  expect_error(base + "num_beams: 1.5\n", "num_beams");
  expect_error(base + "low_bit: int3\n", "low_bit: unknown weight format 'int3'");
  expect_error(base + "tensor_parallel: 0\n", "tensor_parallel must be an integer from 1 to 64");
  expect_error(base + "tensor_parallel: two\n", "tensor_parallel");
  expect_error("repo_id: [synthetic:tiny-qwen2]\nin_out_pairs: ['1024x512']\n", "'1024x512'");
  expect_error("repo_id: [synthetic:tiny-qwen2]\nin_out_pairs: ['0-8']\n", "'0-8'");
  expect_error("repo_id: [synthetic:tiny-qwen2]\n", "in_out_pairs lists no");
  expect_error("in_out_pairs: ['8-8']\n", "repo_id lists no model");
  expect_error("repo_id: [a\nin_out_pairs: ['8-8']\n", "not valid YAML");
  expect_error("- just\n- a list\n", "expected a mapping");
  expect_error("in_out_pairs: ['8-4']\nrepo_id: {a: b}\n", "repo_id must be a string or a list");
}

// A pair past 2^31 - 1 positions fails as it is read; before, the progress estimate walked
// every step of it (2^31 decode steps) before any check could refuse it.
TEST(BenchConfig, RefusesPairsPastThePositionLimit) {
  for (const char* pair : {"1-999999999999999999", "999999999999999999-1", "2147483647-1",
                           "1-2147483647", "99999999999999999999-1", "1-123456789012345678901"}) {
    auto parsed = parse_in_out(pair);
    ASSERT_FALSE(parsed.is_ok()) << pair;
    EXPECT_NE(parsed.status().message().find("IN + OUT must be at most 2147483647 positions"),
              std::string::npos)
        << parsed.status().message();
    EXPECT_NE(parsed.status().message().find(pair), std::string::npos);
  }
  auto largest = parse_in_out("2147483646-1");
  ASSERT_TRUE(largest.is_ok()) << largest.status().message();
  EXPECT_EQ(largest->in_len + largest->out_len, kMaxPositions);
  EXPECT_FALSE(parse_in_out("12a-1").is_ok());
  expect_error("repo_id: [synthetic:tiny-qwen2]\nin_out_pairs: ['1-999999999999999999']\n",
               "in_out_pairs: '1-999999999999999999': IN + OUT must be at most");
}

// The product of the lists is checked before anything is expanded: 1000 x 1000 x 1000 once took
// 5.8 GB before bad_alloc.
TEST(BenchConfig, BoundsTheNumberOfConfigurations) {
  auto config_of = [](int models, int batches, int pairs) {
    std::string yaml = "repo_id:\n";
    for (int i = 0; i < models; ++i) yaml += "  - synthetic:m" + std::to_string(i) + "\n";
    yaml += "batch_size:\n";
    for (int i = 1; i <= batches; ++i) yaml += "  - " + std::to_string(i) + "\n";
    yaml += "in_out_pairs:\n";
    for (int i = 1; i <= pairs; ++i) yaml += "  - '" + std::to_string(i) + "-8'\n";
    return yaml;
  };
  auto at_limit = parse_bench_config(config_of(100, 10, 10), "bench.yaml");
  ASSERT_TRUE(at_limit.is_ok()) << at_limit.status().message();
  EXPECT_EQ(expand_cases(*at_limit).size(), size_t(kMaxCases));
  expect_error(config_of(100, 10, 11),
               "repo_id x batch_size x in_out_pairs: 100 x 10 x 11 configurations, past the "
               "limit of 10000");
  expect_error(config_of(1000, 1000, 3), "1000 x 1000 x 3 configurations");

  EXPECT_EQ(*count_cases({3, 4, 5}, "lists"), 60);
  const size_t huge = std::numeric_limits<size_t>::max();
  for (const std::vector<size_t>& sizes : std::vector<std::vector<size_t>>{
           {huge, huge}, {size_t(1) << 32, size_t(1) << 32}, {10001}, {2, 5001}}) {
    auto count = count_cases(sizes, "-b x (-p + -n)");
    ASSERT_FALSE(count.is_ok());
    EXPECT_NE(count.status().message().find("-b x (-p + -n): "), std::string::npos);
    EXPECT_NE(count.status().message().find("past the limit of 10000"), std::string::npos);
  }
}

TEST(BenchConfig, RefusesItemsGivenTwice) {
  const std::string pairs = "in_out_pairs: ['8-4']\n";
  expect_error("repo_id: [synthetic:a, synthetic:b, synthetic:a]\n" + pairs,
               "repo_id lists 'synthetic:a' twice");
  expect_error("repo_id: [synthetic:a]\n" + pairs + "batch_size: [1, 4, 1]\n",
               "batch_size lists '1' twice");
  // The same pair however it is written.
  expect_error("repo_id: [synthetic:a]\nin_out_pairs: ['32-32', '64-8', '032-32']\n",
               "in_out_pairs lists '032-32' twice");
  expect_error("repo_id: [synthetic:a]\n" + pairs + "exclude: [synthetic:a:8, synthetic:a:8]\n",
               "exclude lists 'synthetic:a:8' twice");
}

// yaml-cpp takes about 140 times a file's size: a benchmark config is held to 1 MiB before it
// is parsed (a 60 MB one within the generic 64 MiB text limit needed more than 8 GB).
TEST(BenchConfig, RefusesLargeFilesAndSeveralDocuments) {
  std::string big = "repo_id: [synthetic:tiny-qwen2]\nin_out_pairs: ['8-4']\n#";
  big.resize(kMaxBenchConfigBytes + 1, 'x');
  expect_error(big, "bytes is larger than the 1 MiB limit for a benchmark configuration");

  const std::string path = ::testing::TempDir() + "/bench_config_2mib.yaml";
  {
    std::ofstream file(path);
    file << big << std::string(kMaxBenchConfigBytes, 'x') << "\n";
  }
  auto loaded = load_bench_config(path);
  std::remove(path.c_str());
  ASSERT_FALSE(loaded.is_ok());
  EXPECT_NE(loaded.status().message().find("1 MiB limit"), std::string::npos)
      << loaded.status().message();

  const std::string one = "repo_id: [synthetic:tiny-qwen2]\nin_out_pairs: ['8-4']\n";
  EXPECT_TRUE(parse_bench_config("---\n" + one, "bench.yaml").is_ok());
  expect_error(one + "---\n" + one, "holds 2 YAML documents");
  expect_error(one + "---\nnum_trials: 1\n", "holds 2 YAML documents");
}

// The estimate as it was computed before it had a closed form: one prefill_cost per chunk of
// each copy's prompt and one decode_cost per later step. `mixed_decode` is set when the decode
// steps of one case are memory-bound at one end and compute-bound at the other.
double stepwise_case_seconds(const WeightSpec& spec, const DeviceProfile& profile, double kv_bytes,
                             int64_t prefill_chunk, const BenchCase& c, bool* mixed_decode) {
  const int64_t chunk = std::max<int64_t>(1, std::min(prefill_chunk, c.in_len));
  double trial = 0;
  for (int64_t begin = 0; begin < c.in_len; begin += chunk) {
    const int64_t end = std::min(c.in_len, begin + chunk);
    trial += expected_seconds(prefill_cost(spec, end - begin, end, kv_bytes), profile);
  }
  trial *= double(c.batch_size);
  bool memory_bound = false, compute_bound = false;
  for (int64_t s = 1; s < c.out_len; ++s) {
    const StepCost cost = decode_cost(spec, c.batch_size * c.num_beams, c.in_len + s, kv_bytes);
    const double memory = expected_seconds(StepCost{cost.bytes, 0}, profile);
    const double compute = expected_seconds(StepCost{0, cost.flops}, profile);
    (memory > compute ? memory_bound : compute_bound) = true;
    trial += expected_seconds(cost, profile);
  }
  if (memory_bound && compute_bound) *mixed_decode = true;
  return trial * double(c.warm_up + c.num_trials);
}

TEST(BenchRunner, ClosedFormEstimateMatchesTheStepByStepSum) {
  int compared = 0;
  for (const char* model : {"synthetic:tiny-llama", "synthetic:qwen2-1.5b"}) {
    auto spec = weight_spec_of(model, WeightFormat::sym_int4, false, 32);
    ASSERT_TRUE(spec.is_ok()) << spec.status().message();
    for (const char* device : {"cpu", "cuda"}) {
      auto base = device_profile(device, 2);
      ASSERT_TRUE(base.is_ok());
      const double kv_bytes = device == std::string("cpu") ? 4.0 : 2.0;
      for (int64_t in_len : {1, 7, 513}) {
        for (int64_t out_len : {1, 2, 33, 150}) {
          for (int64_t batch : {1, 3}) {
            BenchCase c;
            c.in_len = in_len;
            c.out_len = out_len;
            c.batch_size = batch;
            c.num_beams = batch == 3 ? 2 : 1;
            c.warm_up = 1;
            c.num_trials = 2;
            // The profile's own rates, bandwidths far below and above them (every step bound by
            // one side), and bandwidths at which a decode step a third or half of the way along
            // takes as long to read as to compute: the bound changes within the run of steps.
            std::vector<double> bandwidths = {base->bandwidth_gbs, base->bandwidth_gbs * 1e-3,
                                              base->bandwidth_gbs * 1e3};
            for (int64_t step : {out_len / 3, out_len / 2}) {
              if (step < 1) continue;
              const StepCost cost =
                  decode_cost(*spec, c.batch_size * c.num_beams, in_len + step, kv_bytes);
              bandwidths.push_back(cost.bytes * base->compute_gflops / cost.flops);
            }
            for (size_t b = 0; b < bandwidths.size(); ++b) {
              DeviceProfile profile = *base;
              profile.bandwidth_gbs = bandwidths[b];
              for (int64_t chunk : {64, 512}) {
                bool mixed = false;
                const double want =
                    stepwise_case_seconds(*spec, profile, kv_bytes, chunk, c, &mixed);
                const double got = expected_case_seconds(*spec, profile, kv_bytes, chunk, c);
                const std::string what = std::string(model) + " " + device + " " +
                                         std::to_string(bandwidths[b]) + " GB/s " +
                                         InOut{in_len, out_len}.text() + " batch " +
                                         std::to_string(batch) + " chunk " + std::to_string(chunk);
                ASSERT_GT(want, 0.0) << what;
                ASSERT_NEAR(got, want, want * 1e-9) << what;
                // The two tuned bandwidths put the change of bound inside the run.
                if (b >= 3 && out_len >= 33) {
                  EXPECT_TRUE(mixed) << what;
                }
                ++compared;
              }
            }
          }
        }
      }
    }
  }
  EXPECT_GT(compared, 300);
}

// The largest pair and batch the limits allow: 2^31 steps, which the estimate does not walk.
TEST(BenchRunner, EstimateOfTheLargestCaseIsFinite) {
  auto spec = weight_spec_of("synthetic:tiny-llama", WeightFormat::sym_int4, false, 32);
  ASSERT_TRUE(spec.is_ok()) << spec.status().message();
  auto profile = device_profile("cpu", 2);
  ASSERT_TRUE(profile.is_ok());
  BenchCase c;
  c.batch_size = kMaxBatchSize;
  c.num_beams = kMaxBeams;
  c.warm_up = c.num_trials = int(kMaxTrials);
  for (const InOut pair : {InOut{1, kMaxPositions - 1}, InOut{kMaxPositions - 1, 1}}) {
    c.in_len = pair.in_len;
    c.out_len = pair.out_len;
    const double seconds = expected_case_seconds(*spec, *profile, 4.0, 512, c);
    EXPECT_TRUE(std::isfinite(seconds)) << pair.text();
    EXPECT_GT(seconds, 0.0) << pair.text();
  }
}

TEST(BenchConfig, ModelSources) {
  EXPECT_EQ(model_source("synthetic:qwen2-7b", "/hub"), "synthetic:qwen2-7b");
  EXPECT_EQ(model_source("meta-llama/Llama-3.1-8B", "/hub"), "/hub/Llama-3.1-8B");
  EXPECT_EQ(model_source("meta-llama/Llama-3.1-8B/", "/hub/"), "/hub/Llama-3.1-8B");
  EXPECT_EQ(model_source("meta-llama/Llama-3.1-8B", ""), "meta-llama/Llama-3.1-8B");
  EXPECT_EQ(model_source("/models/qwen", "/hub"), "/models/qwen");
}

TEST(BenchConfig, Sizes) {
  EXPECT_EQ(*parse_size("24GB"), size_t(24000000000ull));
  EXPECT_EQ(*parse_size("512MiB"), size_t(512) << 20);
  EXPECT_EQ(*parse_size("1.5G"), size_t(1536) << 20);
  EXPECT_EQ(*parse_size("2 gib"), size_t(2) << 30);
  EXPECT_EQ(*parse_size("1000"), size_t(1000));
  EXPECT_EQ(*parse_size("64kB"), size_t(64000));
  EXPECT_EQ(*parse_size(".5G"), size_t(512) << 20);
  // Decimal digits with at most one point only: no hex, exponent, sign, space or "inf".
  for (const char* bad : {"", "GB", "-1GB", "12 parsecs", "1e30TB", "nan", "0x10GB", "1e3", " 5GB",
                          "+5GB", "inf", "1.2.3GB", ".", ".GB"}) {
    EXPECT_FALSE(parse_size(bad).is_ok()) << bad;
  }
}

TEST(BenchPrompt, ExactLengthsFromTheText) {
  const std::string text =
      "It is a truth universally acknowledged, that a single man\n"
      "in possession of a good fortune, must be in want of a wife.";
  const auto pieces = split_pieces(text);
  // Words keep their leading space; punctuation and the line break are pieces of their own.
  EXPECT_EQ(pieces[0], "It");
  EXPECT_EQ(pieces[1], " is");
  EXPECT_EQ(pieces[6], ",");
  EXPECT_EQ(pieces[11], "\n");
  std::string joined;
  for (const auto& p : pieces) joined += p;
  EXPECT_EQ(joined, text);

  const int64_t vocab = 1000;
  auto short_ids = prompt_tokens(text, 5, vocab);
  auto long_ids = prompt_tokens(text, 1000, vocab);
  ASSERT_TRUE(short_ids.is_ok());
  ASSERT_TRUE(long_ids.is_ok());
  ASSERT_EQ(short_ids->size(), 5u);
  ASSERT_EQ(long_ids->size(), 1000u);
  EXPECT_TRUE(std::equal(short_ids->begin(), short_ids->end(), long_ids->begin()));
  // "a" recurs in the text: the same piece, the same id.
  EXPECT_EQ((*long_ids)[2], piece_id(" a", vocab));
  EXPECT_EQ((*long_ids)[8], (*long_ids)[2]);
  // Past the end the text starts again.
  EXPECT_EQ((*long_ids)[pieces.size()], (*long_ids)[0]);
  std::set<int32_t> distinct(long_ids->begin(), long_ids->end());
  EXPECT_GT(distinct.size(), 15u);
  for (int32_t id : *long_ids) {
    EXPECT_GE(id, 0);
    EXPECT_LT(id, vocab);
  }
  EXPECT_EQ(prompt_tokens(text, 0, vocab)->size(), 0u);
  EXPECT_FALSE(prompt_tokens("", 3, vocab).is_ok());
}

TEST(BenchPrompt, UsesATokenizerWhenGiven) {
  int calls = 0;
  const Tokenize bytes = [&](const std::string& text) -> Result<std::vector<int32_t>> {
    ++calls;
    std::vector<int32_t> ids;
    for (unsigned char ch : text) ids.push_back(ch);
    return ids;
  };
  auto ids = prompt_tokens("abc", 7, 256, bytes);
  ASSERT_TRUE(ids.is_ok());
  EXPECT_EQ(*ids, (std::vector<int32_t>{'a', 'b', 'c', 'a', 'b', 'c', 'a'}));
  EXPECT_EQ(calls, 1);
  auto outside = prompt_tokens("abc", 2, 99, bytes);  // 'c' = 99 is not below 99
  ASSERT_FALSE(outside.is_ok());
  EXPECT_NE(outside.status().message().find("99"), std::string::npos);
}

TEST(BenchPrompt, ShippedTextIsLongEnough) {
  auto text = load_prompt_text(std::string(KESTREL_SOURCE_DIR) + "/bench/prompt.txt");
  ASSERT_TRUE(text.is_ok()) << text.status().message();
  // The sweep's longest prompt, 8192 tokens, without repeating the text.
  EXPECT_GE(split_pieces(*text).size(), 8192u);
  EXPECT_FALSE(load_prompt_text("/nonexistent/prompt.txt").is_ok());
  auto missing = load_prompt_text("");
  ASSERT_FALSE(missing.is_ok());
  EXPECT_NE(missing.status().message().find("--prompt-file"), std::string::npos);
}

// First- and next-token latencies are medians over trials: one slow trial does not move them.
TEST(BenchRunner, LatenciesAreMediansOverTrials) {
  EXPECT_DOUBLE_EQ(median({}), 0.0);
  EXPECT_DOUBLE_EQ(median({0.5}), 0.5);
  EXPECT_DOUBLE_EQ(median({0.030, 0.029, 0.500}), 0.030);  // the outlier is ignored
  EXPECT_DOUBLE_EQ(median({4.0, 1.0, 3.0, 2.0}), 2.5);     // even count: the middle two
  EXPECT_DOUBLE_EQ(median({2.0, 2.0, 9.0, 1.0, 2.0}), 2.0);
}

TEST(BenchReport, CsvColumnsInTheIssuesOrder) {
  const std::vector<std::string> want = {"model",
                                         "1st token avg latency (ms)",
                                         "2+ avg latency (ms/token)",
                                         "encoder time (ms)",
                                         "input/output tokens",
                                         "batch_size",
                                         "actual input/output tokens",
                                         "num_beams",
                                         "low_bit",
                                         "model loading time (s)",
                                         "peak mem (GB)",
                                         "decode tok/s",
                                         "achieved GB/s",
                                         "roofline %",
                                         "planned mem (GB)",
                                         "status",
                                         "device",
                                         "commit"};
  EXPECT_EQ(csv_columns(), want);
}

TEST(BenchReport, CsvRows) {
  EXPECT_EQ(csv_line({"a", "b,c", "say \"hi\"", ""}), "a,\"b,c\",\"say \"\"hi\"\"\",\n");

  CaseResult ok;
  ok.bench_case.model = "synthetic:qwen2-1.5b";
  ok.bench_case.in_len = 1024;
  ok.bench_case.out_len = 128;
  ok.bench_case.batch_size = 4;
  ok.ok = true;
  ok.status = "ok";
  ok.device = "cpu (avx2)";
  ok.commit = "abc123";
  ok.has_timings = ok.has_next_token = true;
  ok.first_token_ms = 1234.567;
  ok.next_token_ms = 45.678;
  ok.actual_in = 1024;
  ok.actual_out = 128;
  ok.load_seconds = 3.21;
  ok.peak_bytes = 1234567890;
  ok.planned_bytes = 1300000000;
  ok.decode_tps = 87.57;
  ok.achieved_gbs = 25.1;
  ok.roofline_pct = 80.96;
  EXPECT_EQ(csv_line(csv_fields(ok)),
            "synthetic:qwen2-1.5b,1234.57,45.68,0.00,1024-128,4,1024-128,1,sym_int4,3.21,1.2346,"
            "87.57,25.10,81.0,1.3000,ok,cpu (avx2),abc123\n");

  CaseResult failed;
  failed.bench_case = ok.bench_case;
  failed.status = "error: needs 5.00 GB, but --max-memory 1GB allows 1.00 GB";
  failed.planned_bytes = 5000000000;
  failed.device = "cpu (avx2)";
  const auto fields = csv_fields(failed);
  ASSERT_EQ(fields.size(), csv_columns().size());
  EXPECT_EQ(fields[1], "");   // no latency
  EXPECT_EQ(fields[10], "");  // no measured peak
  EXPECT_EQ(fields[14], "5.0000");
  EXPECT_EQ(fields[15], failed.status);
}

TEST(BenchReport, QuickModeFormats) {
  QuickRow pp;
  pp.model = "synthetic:tiny-qwen2";
  pp.low_bit = "sym_int4";
  pp.backend = "cpu (avx2)";
  pp.threads = 2;
  pp.test = "pp512";
  pp.ok = true;
  pp.status = "ok";
  pp.tps_mean = 1000.5;
  pp.tps_stddev = 2.25;
  pp.tflops = 0.0123;
  QuickRow tg = pp;
  tg.test = "tg128";
  tg.tflops = -1;
  tg.gbs = 21.5;
  tg.roofline_pct = 69.4;
  QuickRow failed = pp;
  failed.ok = false;
  failed.status = "error: no memory";

  auto md = render_quick({pp, tg, failed}, "md");
  ASSERT_TRUE(md.is_ok());
  EXPECT_NE(md->find("| model "), std::string::npos) << *md;
  EXPECT_NE(md->find("1000.50 ± 2.25"), std::string::npos) << *md;
  EXPECT_NE(md->find("21.5"), std::string::npos);
  EXPECT_NE(md->find("69.4"), std::string::npos);
  EXPECT_NE(md->find("failed"), std::string::npos);
  EXPECT_EQ(std::count(md->begin(), md->end(), '\n'), 5);  // header, rule, 3 rows

  auto csv = render_quick({pp, tg}, "csv");
  ASSERT_TRUE(csv.is_ok());
  EXPECT_EQ(csv->substr(0, csv->find('\n')),
            "model,low_bit,size (GiB),params (B),backend,threads,batch,test,t/s,t/s stddev,GB/s,"
            "TFLOP/s,roofline %,status");
  EXPECT_NE(csv->find("tg128,1000.50,2.25,21.5,,69.4,ok"), std::string::npos) << *csv;

  auto json = render_quick({pp, tg, failed}, "json");
  ASSERT_TRUE(json.is_ok());
  const auto parsed = nlohmann::json::parse(*json);
  ASSERT_EQ(parsed.size(), 3u);
  EXPECT_DOUBLE_EQ(parsed[0]["tokens_per_second"].get<double>(), 1000.5);
  EXPECT_DOUBLE_EQ(parsed[1]["achieved_gbs"].get<double>(), 21.5);
  EXPECT_FALSE(parsed[1].contains("achieved_tflops"));
  EXPECT_FALSE(parsed[2].contains("tokens_per_second"));
  EXPECT_EQ(parsed[2]["status"], "error: no memory");

  EXPECT_FALSE(render_quick({pp}, "html").is_ok());
}

}  // namespace
}  // namespace kestrel::bench
