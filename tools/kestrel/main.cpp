// kestrel: the one command-line binary. Subcommands follow DESIGN.md's CLI surface; flags follow
// llama.cpp where one exists. Errors print one line on stderr and exit non-zero.
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

#include "backend/backend.h"
#include "commands.h"
#include "core/thread_pool.h"
#include "kestrel/engine.h"
#include "model/loader.h"

namespace kestrel::cli {

void fail(const std::string& message) {
  std::fprintf(stderr, "kestrel: error: %s\n", message.c_str());
  std::exit(1);
}

std::vector<int32_t> parse_ids(const std::string& text, const std::string& flag) {
  std::vector<int32_t> ids;
  std::stringstream stream(text);
  std::string item;
  while (std::getline(stream, item, ',')) {
    size_t used = 0;
    long long value = -1;
    try {
      value = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    if (used == 0 || used != item.size() || value < 0 || value > INT32_MAX) {
      fail(flag + ": '" + item + "' is not a token id (expected comma-separated integers)");
    }
    ids.push_back(int32_t(value));
  }
  if (ids.empty()) fail(flag + ": no token ids given");
  return ids;
}

void ModelFlags::add_to(CLI::App* app) {
  app->add_option("-m,--model", model, "HF model dir, converted dir or synthetic:NAME")->required();
  app->add_option("--low-bit", low_bit,
                  "weight format: sym_int4 (default), asym_int4, sym_int8, fp16, bf16, fp32");
  app->add_option("--block", block, "weights per scale for quantized formats (32 or 64)");
  app->add_option("--device", device, "cpu or cuda");
  app->add_option("-t,--threads", threads, "CPU threads (0: all)");
  app->add_option("-c,--ctx-size", context, "context length (0: min(model max, 4096))");
  app->add_flag("-q,--quiet", quiet, "no progress output");
}

EngineOptions ModelFlags::engine_options() const {
  EngineOptions options;
  options.model = model;
  if (!low_bit.empty()) {
    options.format = unwrap(parse_format(low_bit));
    options.format_explicit = true;
  }
  options.block = block;
  options.device = device;
  options.threads = threads;
  options.max_context = context;
  options.progress = !quiet;
  return options;
}

}  // namespace kestrel::cli

namespace {

using kestrel::cli::check;
using kestrel::cli::fail;
using kestrel::cli::ModelFlags;
using kestrel::cli::parse_ids;
using kestrel::cli::unwrap;

void cmd_logits(const ModelFlags& flags, const std::string& ids_text, const std::string& out) {
  if (out.empty()) fail("logits: -o FILE is required");
  const std::vector<int32_t> ids = parse_ids(ids_text, "--ids");
  auto engine = unwrap(kestrel::Engine::create(flags.engine_options()));
  const std::vector<float> logits = unwrap(engine->prompt_logits(ids));
  std::ofstream file(out, std::ios::binary | std::ios::trunc);
  file.write(reinterpret_cast<const char*>(logits.data()),
             std::streamsize(logits.size() * sizeof(float)));
  if (!file) fail(out + ": cannot write");
  std::fprintf(stderr, "wrote %zu x %lld float32 logits to %s\n", ids.size(),
               (long long)engine->config().vocab_size, out.c_str());
}

void cmd_convert(const ModelFlags& flags, const std::string& out) {
  const auto start = std::chrono::steady_clock::now();
  kestrel::ThreadPool pool(flags.threads);
  kestrel::LoadOptions load;
  const kestrel::EngineOptions options = flags.engine_options();
  load.format = options.format;
  load.format_explicit = options.format_explicit;
  load.block = flags.block;
  load.progress = !flags.quiet;
  const kestrel::ModelWeights weights = unwrap(kestrel::load_model(flags.model, load, pool));
  const bool from_dir = flags.model.rfind("synthetic:", 0) != 0;
  check(kestrel::save_converted(weights, from_dir ? flags.model : "", out));
  std::fprintf(stderr, "converted %s to %s (%.2f GB) in %s in %.1fs\n", flags.model.c_str(),
               kestrel::format_name(weights.format), double(weights.resident_bytes()) / 1e9,
               out.c_str(),
               std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"kestrel: low-bit LLM inference for Qwen2 and Llama 3.x models"};
  app.require_subcommand(0, 1);
  bool version = false;
  app.add_flag("--version", version, "print the version and the backends compiled in");

  ModelFlags logits_flags;
  std::string logits_ids, logits_out;
  CLI::App* logits = app.add_subcommand("logits", "write float32 logits of every position");
  logits_flags.add_to(logits);
  logits->add_option("--ids", logits_ids, "token ids, comma-separated")->required();
  logits->add_option("-o,--output", logits_out, "output file")->required();

  ModelFlags convert_flags;
  std::string convert_out;
  CLI::App* convert = app.add_subcommand("convert", "save a model converted to a low-bit format");
  convert_flags.add_to(convert);
  convert->add_option("-o,--output", convert_out, "output directory")->required();

  std::vector<kestrel::cli::Command> commands = {
      {logits, [&] { cmd_logits(logits_flags, logits_ids, logits_out); }},
      {convert, [&] { cmd_convert(convert_flags, convert_out); }},
  };
  kestrel::cli::add_text_commands(app, commands);
  kestrel::cli::add_bench_command(app, commands);
  kestrel::cli::add_serve_command(app, commands);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (version) {
    std::printf("kestrel %s\nbackends: %s\n", KESTREL_VERSION,
                kestrel::compiled_backends().c_str());
    return 0;
  }
  try {
    for (const auto& command : commands) {
      if (command.app->parsed()) {
        command.run();
        return 0;
      }
    }
  } catch (const std::exception& e) {
    fail(e.what());
  }
  std::printf("%s", app.help().c_str());
  return 0;
}
