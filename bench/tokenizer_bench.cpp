// Tokenizer encode throughput, single thread, for the Llama 3.1 and Qwen3 vocabularies.
//
// Build: `cmake --build build --target tokenizer_bench` (needs the tokenizer files from
// scripts/fetch_tokenizers.sh to run).
// Run (from the repository root):
//   build/tokenizer_bench [--cache .cache/tokenizers] [--golden
//   tests/golden/tokenizer/golden.jsonl]
//                        [--mb 4] [--reps 3]
//
// Workload (the same as bench/tokenizer_bench_hf.py, the HF reference): the texts of the golden
// fixture rows without special tokens, repeated until they reach --mb megabytes, each encoded
// with add_special_tokens=false. MB/s is UTF-8 input bytes over the best wall time of --reps
// passes after one warm-up pass. The token count printed must equal HF's for the same workload.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tokenizer/tokenizer.h"

namespace {

[[noreturn]] void die(const std::string& message) {
  std::fprintf(stderr, "tokenizer_bench: %s\n", message.c_str());
  std::exit(1);
}

std::vector<std::string> load_workload(const std::string& golden, double mb, size_t& total) {
  std::ifstream in(golden);
  if (!in) die("cannot open " + golden);
  std::vector<std::string> texts;
  size_t base = 0;
  std::string line;
  while (std::getline(in, line)) {
    const auto row = nlohmann::json::parse(line);
    if (row["add_special_tokens"].get<bool>()) continue;
    texts.push_back(row["text"].get<std::string>());
    base += texts.back().size();
  }
  if (base == 0) die(golden + " has no texts");
  const auto target = static_cast<size_t>(mb * 1e6);
  const size_t reps = std::max<size_t>(1, (target + base - 1) / base);
  std::vector<std::string> all;
  all.reserve(texts.size() * reps);
  for (size_t r = 0; r < reps; ++r) all.insert(all.end(), texts.begin(), texts.end());
  total = base * reps;
  return all;
}

}  // namespace

int main(int argc, char** argv) {
  std::string cache = ".cache/tokenizers";
  std::string golden = "tests/golden/tokenizer/golden.jsonl";
  double mb = 4.0;
  int reps = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) die("missing value for " + arg);
    if (arg == "--cache") {
      cache = argv[++i];
    } else if (arg == "--golden") {
      golden = argv[++i];
    } else if (arg == "--mb") {
      mb = std::atof(argv[++i]);
    } else if (arg == "--reps") {
      reps = std::max(1, std::atoi(argv[++i]));
    } else {
      die("unknown argument " + arg);
    }
  }
  size_t total_bytes = 0;
  const std::vector<std::string> texts = load_workload(golden, mb, total_bytes);

  for (const char* vocab : {"llama3_1", "qwen3"}) {
    auto tokenizer = kestrel::Tokenizer::load(cache + "/" + vocab + "/models/tokenizer.json");
    if (!tokenizer.is_ok()) {
      die(tokenizer.status().message() + " (run scripts/fetch_tokenizers.sh)");
    }
    std::vector<int32_t> ids;
    size_t tokens = 0;
    double best = 1e30;
    for (int pass = 0; pass <= reps; ++pass) {  // pass 0 warms up
      tokens = 0;
      const auto t0 = std::chrono::steady_clock::now();
      for (const std::string& text : texts) {
        ids.clear();
        const kestrel::Status status = tokenizer->encode_into(text, false, ids);
        if (!status.is_ok()) die(status.message());
        tokens += ids.size();
      }
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      if (pass > 0) best = std::min(best, seconds);
    }
    std::printf("Kestrel %s: %.2f MB, %zu texts, %zu tokens; encode %.2f MB/s (%.1f ns/byte)\n",
                vocab, total_bytes / 1e6, texts.size(), tokens, total_bytes / best / 1e6,
                best * 1e9 / total_bytes);
  }
  return 0;
}
