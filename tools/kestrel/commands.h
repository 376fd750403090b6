// Subcommands defined in their own files register here; main.cpp runs the one that was parsed.
#pragma once

#include <CLI/CLI.hpp>

#include <functional>
#include <string>
#include <vector>

#include "core/status.h"

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

// `kestrel bench` (tools/kestrel/cmd_bench.cpp).
void add_bench_command(CLI::App& app, std::vector<Command>& commands);

}  // namespace kestrel::cli
