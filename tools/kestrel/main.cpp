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

}  // namespace kestrel::cli

namespace {

using kestrel::cli::check;
using kestrel::cli::fail;
using kestrel::cli::unwrap;

// "1,2,3" -> ids; every element must be a non-negative integer.
std::vector<int32_t> parse_ids(const std::string& text) {
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
      fail("--ids: '" + item + "' is not a token id (expected comma-separated integers)");
    }
    ids.push_back(int32_t(value));
  }
  if (ids.empty()) fail("--ids: no token ids given");
  return ids;
}

// Model, format and device flags shared by the subcommands.
struct ModelFlags {
  std::string model;
  std::string low_bit;
  int block = 32;
  std::string device = "cpu";
  int threads = 0;
  int64_t context = 0;
  bool quiet = false;

  void add_to(CLI::App* app) {
    app->add_option("-m,--model", model, "HF model dir, converted dir or synthetic:NAME")
        ->required();
    app->add_option("--low-bit", low_bit,
                    "weight format: sym_int4 (default), asym_int4, sym_int8, fp16, bf16, fp32");
    app->add_option("--block", block, "weights per scale for quantized formats (32 or 64)");
    app->add_option("--device", device, "cpu or cuda");
    app->add_option("-t,--threads", threads, "CPU threads (0: all)");
    app->add_option("-c,--ctx-size", context, "context length (0: min(model max, 4096))");
    app->add_flag("-q,--quiet", quiet, "no progress output");
  }

  kestrel::EngineOptions engine_options() const {
    kestrel::EngineOptions options;
    options.model = model;
    if (!low_bit.empty()) {
      options.format = unwrap(kestrel::parse_format(low_bit));
      options.format_explicit = true;
    }
    options.block = block;
    options.device = device;
    options.threads = threads;
    options.max_context = context;
    options.progress = !quiet;
    return options;
  }
};

void cmd_run(const ModelFlags& flags, const std::string& ids_text, int64_t n_new, float temp,
             bool print_ids) {
  if (ids_text.empty()) fail("run: give the prompt with --ids 1,2,3");
  if (temp != 0.0f) fail("run: only greedy decoding (--temp 0) is available with --ids");
  const std::vector<int32_t> prompt = parse_ids(ids_text);
  auto engine = unwrap(kestrel::Engine::create(flags.engine_options()));
  const auto& weights = engine->weights();
  std::fprintf(stderr,
               "model %s: %s, %lld layers, %.2f GB of weights in %s, loaded in %.2fs on %s\n",
               flags.model.c_str(), kestrel::architecture_name(weights.config.arch),
               (long long)weights.config.n_layers, double(weights.resident_bytes()) / 1e9,
               kestrel::format_name(weights.format), engine->load_seconds(),
               engine->backend().name().c_str());
  auto result = unwrap(engine->generate_greedy(prompt, n_new, false, [&](int32_t token) {
    if (print_ids) {
      std::printf("%d ", token);
      std::fflush(stdout);
    }
  }));
  if (print_ids) std::printf("\n");
  const double prefill_tps = double(prompt.size()) / result.prefill_seconds;
  const double decode_tps =
      result.decode_steps > 0 ? double(result.decode_steps) / result.decode_seconds : 0.0;
  const double gbps = decode_tps * double(weights.decode_bytes()) / 1e9;
  std::fprintf(stderr,
               "prompt %zu tokens: %.1f tok/s (first token %.1f ms) | decode %lld tokens: %.2f "
               "tok/s, %.1f GB/s of weights\n",
               prompt.size(), prefill_tps, result.prefill_seconds * 1e3,
               (long long)result.decode_steps, decode_tps, gbps);
}

void cmd_logits(const ModelFlags& flags, const std::string& ids_text, const std::string& out) {
  if (out.empty()) fail("logits: -o FILE is required");
  const std::vector<int32_t> ids = parse_ids(ids_text);
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

  ModelFlags run_flags;
  std::string run_ids;
  int64_t run_n = 32;
  float run_temp = 0.0f;
  bool run_print_ids = false;
  CLI::App* run = app.add_subcommand("run", "generate a continuation");
  run_flags.add_to(run);
  run->add_option("--ids", run_ids, "prompt token ids, comma-separated");
  run->add_option("-n,--n-predict", run_n, "tokens to generate");
  run->add_option("--temp", run_temp, "temperature (0: greedy)");
  run->add_flag("--print-ids", run_print_ids, "print the generated token ids");

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
      {run, [&] { cmd_run(run_flags, run_ids, run_n, run_temp, run_print_ids); }},
      {logits, [&] { cmd_logits(logits_flags, logits_ids, logits_out); }},
      {convert, [&] { cmd_convert(convert_flags, convert_out); }},
  };
  kestrel::cli::add_bench_command(app, commands);

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
