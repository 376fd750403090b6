// Host sampling microbenchmark: Sampler::sample on one logit row of a real vocabulary, per
// setting and per distribution, then a server step's rows (one per slot) on a thread pool as
// the scheduler samples them. A row is read once, so each line prints rows/s (tokens/s of one
// core), the row's GB/s and its share of one core's read bandwidth over the same row (a sum of
// the row, measured first): how far sampling is from costing what reading its input costs.
//
// Build: `cmake --build build --target sampler_bench`.
// Run: build/sampler_bench [--vocab 128256] [--reps 50] [--rows 16] [--threads 0 (the cores)]
#include <algorithm>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "sample/sampler.h"

namespace {

using kestrel::Sampler;
using kestrel::SamplingParams;

struct Options {
  int64_t vocab = 128256;
  int reps = 50;
  int64_t rows = 16;
  int threads = 0;
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

template <typename Fn>
double median_seconds(int reps, Fn fn) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count());
  }
  return median(t);
}

struct Setting {
  const char* name;
  SamplingParams params;
  bool history;  // 512 earlier tokens for the penalties
};

std::vector<Setting> settings() {
  auto warm = [](float top_p, int top_k, float min_p, float repetition) {
    return SamplingParams{.temperature = 0.9f,
                          .top_k = top_k,
                          .top_p = top_p,
                          .min_p = min_p,
                          .repetition_penalty = repetition,
                          .seed = 7};
  };
  return {{"greedy", SamplingParams{}, false},
          {"T 0.9", warm(1.0f, 0, 0.0f, 1.0f), false},
          {"T 0.9, top_k 50", warm(1.0f, 50, 0.0f, 1.0f), false},
          {"T 0.9, top_p 0.95", warm(0.95f, 0, 0.0f, 1.0f), false},
          {"T 0.9, top_k 50, top_p 0.95", warm(0.95f, 50, 0.0f, 1.0f), false},
          {"T 0.9, min_p 0.05", warm(1.0f, 0, 0.05f, 1.0f), false},
          {"T 0.9, top_p 0.95, rep 1.1, 512 seen", warm(0.95f, 0, 0.0f, 1.1f), true}};
}

// "flat": N(0, 1) logits, as a random synthetic model gives (nearly every token in a top-p
// nucleus); "peaked": the same plus 20 tokens 12 above the rest, as a trained model's row
// usually is (a nucleus of a few tokens).
std::vector<float> make_row(int64_t vocab, bool peaked, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> row(static_cast<size_t>(vocab));
  for (float& v : row) v = dist(rng);
  if (peaked) {
    for (int i = 0; i < 20; ++i) row[rng() % uint32_t(vocab)] += 12.0f;
  }
  return row;
}

bool parse(int argc, char** argv, Options* o) {
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const bool has_value = i + 1 < argc;
    if (a == "--vocab" && has_value) {
      o->vocab = std::atoll(argv[++i]);
    } else if (a == "--reps" && has_value) {
      o->reps = std::atoi(argv[++i]);
    } else if (a == "--rows" && has_value) {
      o->rows = std::atoll(argv[++i]);
    } else if (a == "--threads" && has_value) {
      o->threads = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "sampler_bench: unknown or incomplete argument %s\n", a.c_str());
      return false;
    }
  }
  if (o->vocab < 1 || o->vocab > (int64_t(1) << 24) || o->reps < 1 || o->rows < 1 ||
      o->rows > 1024 || o->threads < 0) {
    std::fprintf(stderr, "sampler_bench: --vocab 1..16777216, --reps >= 1, --rows 1..1024\n");
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  if (!parse(argc, argv, &o)) return 2;
  const double row_bytes = double(o.vocab) * sizeof(float);
  const std::vector<float> flat = make_row(o.vocab, false, 1);
  const std::vector<float> peaked = make_row(o.vocab, true, 2);
  std::vector<int32_t> seen(512);
  for (size_t i = 0; i < seen.size(); ++i) seen[i] = int32_t((i * 7919) % size_t(o.vocab));

  // One core reading the row (hot in cache, as the sampler finds it after its copy): an OR of
  // its bits, which vectorizes (a float sum would time the adds' latency instead).
  volatile float sink = 0;
  volatile uint32_t bits_sink = 0;
  const double read_s = median_seconds(std::max(o.reps, 200), [&] {
    uint32_t acc = 0;
    for (const float v : flat) acc |= std::bit_cast<uint32_t>(v);
    bits_sink = bits_sink | acc;
  });
  const double read_gbs = row_bytes / read_s / 1e9;
  std::printf("vocabulary %lld, %.0f KB a row; one core reads it at %.1f GB/s (median of %d)\n\n",
              static_cast<long long>(o.vocab), row_bytes / 1024, read_gbs, std::max(o.reps, 200));

  std::printf("| %-38s | %-6s | %9s | %9s | %7s | %6s |\n", "setting", "row", "us a row", "rows/s",
              "GB/s", "% read");
  std::printf("|%s|%s|%s|%s|%s|%s|\n", std::string(40, '-').c_str(), std::string(8, '-').c_str(),
              std::string(10, '-').c_str(), std::string(10, '-').c_str(),
              std::string(8, '-').c_str(), std::string(7, '-').c_str());
  for (const Setting& s : settings()) {
    for (const bool is_peaked : {false, true}) {
      const std::vector<float>& row = is_peaked ? peaked : flat;
      Sampler sampler(s.params, int32_t(o.vocab));
      const std::span<const int32_t> history =
          s.history ? std::span<const int32_t>(seen) : std::span<const int32_t>();
      const double t =
          median_seconds(o.reps, [&] { sink = sink + float(sampler.sample(row, history)); });
      const double gbs = row_bytes / t / 1e9;
      std::printf("| %-38s | %-6s | %9.1f | %9.0f | %7.2f | %5.1f%% |\n", s.name,
                  is_peaked ? "peaked" : "flat", t * 1e6, 1.0 / t, gbs, 100.0 * gbs / read_gbs);
    }
  }

  // A server step: one row a slot, each with its own sampler, on a pool as the scheduler does.
  kestrel::ThreadPool pool(o.threads);
  std::printf("\nA step of %lld flat rows (T 0.9, top_p 0.95), each its own sampler:\n",
              static_cast<long long>(o.rows));
  std::vector<Sampler> samplers;
  for (int64_t r = 0; r < o.rows; ++r)
    samplers.emplace_back(settings()[3].params, int32_t(o.vocab));
  std::vector<int32_t> picks(size_t(o.rows));
  for (const int threads : {1, pool.size()}) {
    const double t = median_seconds(o.reps, [&] {
      auto job = [&](int64_t begin, int64_t end, int) {
        for (int64_t r = begin; r < end; ++r)
          picks[size_t(r)] = samplers[size_t(r)].sample(flat, {});
      };
      if (threads == 1) {
        job(0, o.rows, 0);
      } else {
        pool.parallel_for(o.rows, 1, job);
      }
    });
    const double gbs = double(o.rows) * row_bytes / t / 1e9;
    std::printf(
        "  %2d thread%s: %8.1f us a step, %9.0f rows/s, %6.2f GB/s (%.1f%% of %d x %.1f GB/s)\n",
        threads, threads == 1 ? " " : "s", t * 1e6, double(o.rows) / t, gbs,
        100.0 * gbs / (read_gbs * threads), threads, read_gbs);
  }
  return sink == 12345.0f ? 1 : 0;
}
