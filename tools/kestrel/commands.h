// Subcommands defined in their own files register here; main.cpp runs the one that was parsed.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

#include "core/status.h"
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

// Model, format and device flags shared by the subcommands that load a model.
struct ModelFlags {
  std::string model;
  std::string low_bit;
  int block = 32;
  std::string device = "cpu";
  int threads = 0;
  int64_t context = 0;
  bool quiet = false;

  void add_to(CLI::App* app);
  EngineOptions engine_options() const;
};

// "1,2,3" -> ids; exits with an error naming `flag` on anything but non-negative integers.
std::vector<int32_t> parse_ids(const std::string& text, const std::string& flag);

// `kestrel run`, `chat`, `tokenize` and `template` (tools/kestrel/cmd_text.cpp).
void add_text_commands(CLI::App& app, std::vector<Command>& commands);

// `kestrel bench` (tools/kestrel/cmd_bench.cpp).
void add_bench_command(CLI::App& app, std::vector<Command>& commands);

// `kestrel serve` (tools/kestrel/cmd_serve.cpp).
void add_serve_command(CLI::App& app, std::vector<Command>& commands);

}  // namespace kestrel::cli
