// kestrel: the one command-line binary. Subcommands follow DESIGN.md's CLI surface; flags follow
// llama.cpp where one exists. Errors print one line on stderr and exit non-zero.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <set>
#include <sstream>

#include "backend/backend.h"
#include "commands.h"
#include "core/quote.h"
#include "core/thread_pool.h"
#include "kestrel/engine.h"
#include "model/loader.h"
#include "model/shard.h"

namespace kestrel::cli {

void fail(const std::string& message) {
  // Messages may carry text from files (a template's raise_exception, a config value): one line,
  // no terminal control bytes, bounded, whatever they hold.
  std::fprintf(stderr, "kestrel: error: %s\n", escape_untrusted(message, 2000).c_str());
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

namespace {

// CLI11 2.1 reads integers with strtoll and base 0, without a range check: "010" was 8,
// "0x1f90" 8080, "99999999999999999999" INT64_MAX, and an unsigned flag took "-1" as SIZE_MAX
// (a review: `--max-body -1` turned the body limit off). Kestrel's integers are decimal, as
// llama.cpp reads them: each is checked and handed on without leading zeros, so base 0 cannot
// misread it.
CLI::Validator decimal_integer(bool is_unsigned) {
  return CLI::Validator(
      [is_unsigned](std::string& text) -> std::string {
        const char* begin = text.data();
        const char* end = text.data() + text.size();
        if (begin != end && *begin == '+' && begin + 1 != end && begin[1] != '-') ++begin;
        std::string canonical;
        std::from_chars_result parsed{};
        if (is_unsigned) {
          uint64_t value = 0;
          parsed = std::from_chars(begin, end, value, 10);
          canonical = std::to_string(value);
        } else {
          int64_t value = 0;
          parsed = std::from_chars(begin, end, value, 10);
          canonical = std::to_string(value);
        }
        if (begin == end || parsed.ptr != end || parsed.ec == std::errc::invalid_argument) {
          return "'" + text + "' is not a decimal integer";
        }
        if (parsed.ec == std::errc::result_out_of_range) {
          return "'" + text + "' is out of range";
        }
        text = canonical;
        return {};
      },
      "", "");
}

}  // namespace

// Every integer option of `app` and its subcommands reads decimal only (decimal_integer).
void require_decimal_integers(CLI::App& app) {
  for (CLI::Option* option : app.get_options()) {
    // CLI11 appends each validator's description ("INT:INT in [1 - 10]").
    const std::string full = option->get_type_name();
    const std::string type = full.substr(0, full.find(':'));
    if (type == "INT") option->transform(decimal_integer(false));
    if (type == "UINT") option->transform(decimal_integer(true));
  }
  for (CLI::App* sub : app.get_subcommands([](CLI::App*) { return true; })) {
    require_decimal_integers(*sub);
  }
}

void check_range(const std::string& flag, double value, double min, double max,
                 bool min_exclusive) {
  const bool low = min_exclusive ? !(value > min) : !(value >= min);
  if (!std::isfinite(value) || low || value > max) {
    char text[160];
    std::snprintf(text, sizeof(text), "%s: %.10g is outside %s%.10g, %.10g]", flag.c_str(), value,
                  min_exclusive ? "(" : "[", min, max);
    fail(text);
  }
}

size_t parse_max_memory(const std::string& text) {
  return unwrap(kestrel::parse_max_memory(text), "--max-memory");
}

namespace {
std::atomic<std::atomic<bool>*> g_sigint_flag{nullptr};
extern "C" void on_sigint(int) {
  if (std::atomic<bool>* flag = g_sigint_flag.load()) flag->store(true);
}
}  // namespace

void catch_sigint(std::atomic<bool>* flag, bool once) {
  g_sigint_flag.store(flag);
  struct sigaction action = {};
  action.sa_handler = on_sigint;
  action.sa_flags = once ? SA_RESETHAND : 0;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
}

void check_stdout_written() {
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    fail(std::string("cannot write to standard output: ") + std::strerror(errno));
  }
}

void print_warnings(const ModelWeights& weights) {
  for (const std::string& note : weights.notes) std::fprintf(stderr, "kestrel: %s\n", note.c_str());
  for (const std::string& warning : weights.warnings) {
    std::fprintf(stderr, "kestrel: warning: %s\n", warning.c_str());
  }
}

void print_load_warnings(const Engine& engine) {
  print_warnings(engine.weights());
  const int64_t trained = engine.config().max_position_embeddings;
  if (trained > 0 && engine.max_context() > trained) {
    std::fprintf(stderr,
                 "kestrel: warning: -c %lld is past the model's trained context of %lld "
                 "positions (max_position_embeddings); quality degrades beyond it\n",
                 (long long)engine.max_context(), (long long)trained);
  }
}

void ModelFlags::add_to(CLI::App* app) {
  app->add_option("-m,--model", model, "HF model dir, converted dir, GGUF file or synthetic:NAME")
      ->required();
  app->add_option("--low-bit", low_bit,
                  "weight format: sym_int4, asym_int4, sym_int8, fp16, bf16, fp32")
      ->default_str("sym_int4");
  app->add_option("--block", block, "weights per scale for quantized formats (32 or 64)")
      ->capture_default_str();
  app->add_option("--device", device,
                  "cpu, cuda, vulkan[:N] (kestrel devices lists them), or auto: cuda when built "
                  "in and present, else cpu")
      ->capture_default_str();
  app->add_option("--kv-cache", kv_cache,
                  "KV cache entries on CUDA: fp16, fp8 (e4m3, a scale per row: half the memory), "
                  "fp32, or auto (fp32 for fp32 weights, else fp16); the CPU and Vulkan keep fp32")
      ->capture_default_str();
  app->add_option("--n-gpu-layers,--gpu-layers", gpu_layers,
                  "(-ngl N) llama.cpp habit: any N > 0 runs every layer on CUDA, 0 on the CPU");
  app->add_option("-t,--threads", threads, "CPU threads (0: all)")->capture_default_str();
  app->add_option("--tensor-parallel", tensor_parallel,
                  "(-tp N) split every layer over N ranks: N devices, or N groups of CPU threads")
      ->capture_default_str();
  app->add_option("-c,--ctx-size", context, "context length (0: min(model max, 4096))")
      ->capture_default_str();
  app->add_option("-b,--batch-size", batch, "prompt tokens per forward call")
      ->capture_default_str();
  app->add_option_function<std::string>(
         "--max-memory", [this](const std::string& text) { max_memory = text; },
         "memory the weights, KV cache and workspace may take, e.g. 8GB or 512MiB (default: "
         "free device memory, or the host's available memory on the CPU)")
      ->type_name("SIZE");
  app->add_flag("-q,--quiet", quiet, "no progress output");
}

EngineOptions ModelFlags::engine_options() const {
  EngineOptions options;
  options.model = model;
  if (!low_bit.empty()) options.format = unwrap(parse_format(low_bit), "--low-bit");
  check(
      check_block(options.format.value_or(WeightFormat::sym_int4), block).with_context("--block"));
  check_range("-t", threads, 0, kMaxThreads);
  check_range("-c", double(context), 0, std::numeric_limits<int32_t>::max());
  check_range("-b", double(batch), 0, 1 << 20, /*min_exclusive=*/true);
  check_range("--tensor-parallel", tensor_parallel, 1, kMaxTensorParallel);
  options.block = block;
  options.device = device == "auto" ? default_device() : device;
  if (gpu_layers >= 0) options.device = gpu_layers > 0 ? "cuda" : "cpu";
  options.threads = threads;
  options.tensor_parallel = tensor_parallel;
  options.max_context = context;
  options.prefill_chunk = batch;
  options.kv_cache = unwrap(parse_kv_cache(kv_cache), "--kv-cache");
  options.progress = !quiet;
  if (max_memory) {
    options.max_memory = parse_max_memory(*max_memory);
    options.max_memory_text = "--max-memory " + *max_memory;
  }
  return options;
}

// llama.cpp users type its spellings. CLI11 reads a single dash and several letters as short
// flags (-ngl as -n gl), so the ones Kestrel has a feature for are renamed to long options here,
// and the ones it has none for are refused by name, with Kestrel's nearest flag when there is one.
std::vector<std::string> translate_llama_flags(int argc, char** argv) {
  static const std::map<std::string, std::string> renamed = {
      {"-ngl", "--n-gpu-layers"},
      {"-tp", "--tensor-parallel"},
      {"-cnv", "--conversation"},
      {"-sys", "--system-prompt"},
      {"-no-cnv", ""},  // run is already one prompt, one continuation
      {"-s", "--seed"},
      {"-np", "--parallel"},
  };
  static const std::map<std::string, std::string> refused = {
      {"-fa", "(attention kernels are chosen per backend)"},
      {"--flash-attn", "(attention kernels are chosen per backend)"},
      {"-ctk", "(use --kv-cache fp16|fp8|fp32)"},
      {"--cache-type-k", "(use --kv-cache fp16|fp8|fp32)"},
      {"-ctv", "(use --kv-cache fp16|fp8|fp32)"},
      {"--cache-type-v", "(use --kv-cache fp16|fp8|fp32)"},
      {"--mlock", ""},
      {"--no-mmap", ""},
      {"-mg", "(one GPU runs on device 0; --tensor-parallel N splits over N)"},
      {"--main-gpu", "(one GPU runs on device 0; --tensor-parallel N splits over N)"},
      {"-ts", "(one GPU runs on device 0; --tensor-parallel N splits over N)"},
      {"--tensor-split", "(one GPU runs on device 0; --tensor-parallel N splits over N)"},
      {"-sm", "(use --tensor-parallel N)"},
      {"--split-mode", "(use --tensor-parallel N)"},
      {"-ub", "(use -b)"},
      {"--ubatch-size", "(use -b)"},
      {"--numa", ""},
      {"-hf", "(download the model and pass -m DIR)"},
      {"--hf-repo", "(download the model and pass -m DIR)"},
      {"-r", "(use --stop TEXT)"},
      {"--reverse-prompt", "(use --stop TEXT)"},
      {"-e", ""},
      {"--escape", ""},
      {"--color", ""},
      {"--mirostat", ""},
      {"--grammar", ""},
      {"--grammar-file", ""},
      {"--lora", ""},
      {"--keep", ""},
      {"--rope-freq-base", "(read from config.json)"},
      {"--rope-scaling", "(read from config.json)"},
      {"-cb", ""},
      {"-v", ""},
      {"--verbose", ""},
      {"--in-prefix", ""},
      {"--in-suffix", ""},
      {"--prompt-cache", ""},
      {"--logit-bias", ""},
      {"--samplers", ""},
      {"--typical", ""},
      {"-nkvo", ""},
      {"--no-kv-offload", ""},
  };
  // Values that may look like flags: the text after -p, --system, --stop.
  static const std::set<std::string> text_valued = {
      "-p", "--prompt", "--system", "--system-prompt", "-sys", "--stop"};
  std::vector<std::string> args;
  const std::string command = argc > 1 ? argv[1] : "";
  for (int i = 0; i < argc; ++i) {
    std::string arg = argv[i];
    const bool is_value = i > 0 && text_valued.count(argv[i - 1]) != 0;
    if (i > 0 && !is_value) {
      // -r is bench's --repetitions.
      if (refused.count(arg) && !(command == "bench" && arg == "-r")) {
        const std::string& hint = refused.at(arg);
        fail(arg + " is a llama.cpp flag that Kestrel does not have" +
             (hint.empty() ? std::string() : " " + hint) + "; see kestrel " + command + " --help");
      }
      const auto it = renamed.find(arg);
      if (it != renamed.end()) {
        if (!it->second.empty()) args.push_back(it->second);
        continue;
      }
    }
    args.push_back(arg);
  }
  return args;
}

}  // namespace kestrel::cli

namespace {

using kestrel::cli::check;
using kestrel::cli::fail;
using kestrel::cli::ModelFlags;
using kestrel::cli::parse_ids;
using kestrel::cli::print_warnings;
using kestrel::cli::unwrap;

void cmd_logits(const ModelFlags& flags, const std::string& ids_text, const std::string& out) {
  if (out.empty()) fail("logits: -o FILE is required");
  const std::vector<int32_t> ids = parse_ids(ids_text, "--ids");
  auto engine = unwrap(kestrel::Engine::create(flags.engine_options()));
  kestrel::cli::print_load_warnings(*engine);
  const std::vector<float> logits = unwrap(engine->prompt_logits(ids));
  std::ofstream file(out, std::ios::binary | std::ios::trunc);
  file.write(reinterpret_cast<const char*>(logits.data()),
             std::streamsize(logits.size() * sizeof(float)));
  if (!file) fail(out + ": cannot write");
  std::fprintf(stderr, "wrote %zu x %lld float32 logits to %s\n", ids.size(),
               (long long)engine->config().vocab_size, out.c_str());
}

void cmd_convert(const ModelFlags& flags, const std::string& out, bool force) {
  const auto start = std::chrono::steady_clock::now();
  const bool from_dir = flags.model.rfind("synthetic:", 0) != 0;
  check(kestrel::check_convert_target(from_dir ? flags.model : "", out, force));
  const kestrel::EngineOptions options = flags.engine_options();
  kestrel::ThreadPool pool(options.threads);
  kestrel::LoadOptions load;
  load.format = options.format.value_or(kestrel::WeightFormat::sym_int4);
  load.format_explicit = options.format.has_value();
  load.block = flags.block;
  load.progress = !flags.quiet;
  const kestrel::ModelWeights weights = unwrap(kestrel::load_model(flags.model, load, pool));
  print_warnings(weights);
  check(kestrel::save_converted(weights, from_dir ? flags.model : "", out, force));
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
  // Converting runs no model: the run-time flags would be accepted and ignored.
  for (const char* name : {"--device", "--kv-cache", "--n-gpu-layers", "--tensor-parallel",
                           "--ctx-size", "--batch-size", "--max-memory"}) {
    convert->remove_option(convert->get_option(name));
  }
  convert->add_option("-o,--output", convert_out, "output directory")->required();
  bool convert_force = false;
  convert->add_flag("--force", convert_force, "replace an output directory that has files in it");

  CLI::App* devices = app.add_subcommand("devices", "list the devices Kestrel can run on");

  std::vector<kestrel::cli::Command> commands = {
      {logits, [&] { cmd_logits(logits_flags, logits_ids, logits_out); }},
      {convert, [&] { cmd_convert(convert_flags, convert_out, convert_force); }},
      {devices,
       [] {
         for (const std::string& line : kestrel::list_devices()) std::printf("%s\n", line.c_str());
       }},
  };
  kestrel::cli::add_text_commands(app, commands);
  kestrel::cli::add_bench_command(app, commands);
  kestrel::cli::add_serve_command(app, commands);
  kestrel::cli::require_decimal_integers(app);

  std::vector<std::string> args = kestrel::cli::translate_llama_flags(argc, argv);
  // CLI11 takes the arguments last to first.
  std::reverse(args.begin() + 1, args.end());
  args.erase(args.begin());
  try {
    app.parse(args);
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
        kestrel::cli::check_stdout_written();
        return 0;
      }
    }
  } catch (const std::exception& e) {
    fail(e.what());
  }
  std::printf("%s", app.help().c_str());
  return 0;
}
