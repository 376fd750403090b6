// Subcommands defined in their own files register here; main.cpp runs the one that was parsed.
#pragma once

#include <CLI/CLI.hpp>

#include <atomic>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "core/thread_pool.h"
#include "kestrel/engine.h"

namespace kestrel::cli {

struct Command {
  CLI::App* app = nullptr;
  std::function<void()> run;
};

// Prints "kestrel: error: MESSAGE" on stderr and exits 1.
[[noreturn]] void fail(const std::string& message);
inline void check(const Status& status) {
  if (!status.is_ok()) fail(status.message());
}
template <typename T>
T unwrap(Result<T> result) {
  if (!result.is_ok()) fail(result.status().message());
  return std::move(result).value();
}
// As unwrap, for a value the library refused: the library's message does not know the flag.
template <typename T>
T unwrap(Result<T> result, const std::string& flag) {
  if (!result.is_ok()) fail(flag + ": " + result.status().message());
  return std::move(result).value();
}

// Model, format and device flags shared by the subcommands that load a model.
struct ModelFlags {
  std::string model;
  std::string low_bit;
  int block = 32;
  std::string device = "auto";
  int threads = 0;
  int64_t context = 0;
  int64_t batch = 512;      // prompt tokens per forward call (llama.cpp's -b)
  int64_t gpu_layers = -1;  // llama.cpp's -ngl: > 0 asks for CUDA, 0 for the CPU
  std::string kv_cache = "auto";
  int tensor_parallel = 1;  // ranks the model is split over (-tp)
  // --max-memory as given ('' too, which is refused rather than taken for no cap).
  std::optional<std::string> max_memory;
  bool quiet = false;

  // The options write into this object as the app parses: it must not move until then.
  void add_to(CLI::App* app);
  EngineOptions engine_options() const;
};

// Checks a number-valued flag: finite and within [min, max] (or above min when `min_exclusive`).
void check_range(const std::string& flag, double value, double min, double max,
                 bool min_exclusive = false);

// --max-memory SIZE (bench, and the commands that load a model): bytes, e.g. 24GB, 512MiB, 1.5G
// or a count, read by kestrel::parse_max_memory (as the Python package's max_memory); exits with
// an error naming the flag for anything else, 0 included.
size_t parse_max_memory(const std::string& text);

// Exits with an error when what was written to standard output could not be (a full disk, a
// closed pipe): the output is the product, so losing it is a failure.
void check_stdout_written();

// Ctrl-C sets `*flag` instead of ending the process. With `once`, a second Ctrl-C ends it. The
// handler does not restart system calls, so a read waiting for input returns as well.
void catch_sigint(std::atomic<bool>* flag, bool once);

// Prints what the loader went past ("kestrel: warning: ...") on stderr.
void print_warnings(const ModelWeights& weights);
// The same, and a context (-c) past the model's trained one.
void print_load_warnings(const Engine& engine);

// "1,2,3" -> ids; exits with an error naming `flag` on anything but non-negative integers.
std::vector<int32_t> parse_ids(const std::string& text, const std::string& flag);

// `kestrel run`, `chat`, `tokenize` and `template` (tools/kestrel/cmd_text.cpp).
void add_text_commands(CLI::App& app, std::vector<Command>& commands);

// `kestrel bench` (tools/kestrel/cmd_bench.cpp).
void add_bench_command(CLI::App& app, std::vector<Command>& commands);

// `kestrel serve` (tools/kestrel/cmd_serve.cpp).
void add_serve_command(CLI::App& app, std::vector<Command>& commands);

}  // namespace kestrel::cli
