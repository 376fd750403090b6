// Text-facing subcommands: run, chat, tokenize and template.
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "backend/backend.h"
#include "commands.h"
#include "io/config.h"
#include "model/weights.h"
#include "runtime/text_generation.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace kestrel::cli {
namespace {

void print_ids(const std::vector<int32_t>& ids) {
  std::string line = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) line += ", ";
    line += std::to_string(ids[i]);
  }
  line += "]\n";
  std::fwrite(line.data(), 1, line.size(), stdout);
}

void run_tokenize(const std::string& path, bool jsonl, bool add_special) {
  const Tokenizer tokenizer = unwrap(Tokenizer::load(path));
  if (!jsonl) {
    const std::string text((std::istreambuf_iterator<char>(std::cin)),
                           std::istreambuf_iterator<char>());
    print_ids(unwrap(tokenizer.encode(text, add_special)));
    return;
  }
  std::string line;
  int64_t line_number = 0;
  while (std::getline(std::cin, line)) {
    ++line_number;
    const auto parsed = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!parsed.is_string()) {
      fail("stdin line " + std::to_string(line_number) + ": not a JSON string");
    }
    auto ids = tokenizer.encode(parsed.get<std::string>(), add_special);
    if (!ids.is_ok())
      fail("stdin line " + std::to_string(line_number) + ": " + ids.status().message());
    print_ids(*ids);
  }
}

void run_template(const std::string& path, const std::string& messages_path,
                  bool add_generation_prompt) {
  const ChatTemplateConfig config = unwrap(load_chat_template(path));
  const std::string text = unwrap(read_text_file(messages_path));
  const auto messages = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (messages.is_discarded()) fail(messages_path + ": not valid JSON");
  // A bare list of messages, or an object {"messages": [...], other context...}.
  nlohmann::ordered_json list = messages;
  nlohmann::ordered_json extra = nlohmann::ordered_json::object();
  if (messages.is_object()) {
    if (!messages.contains("messages")) fail(messages_path + ": object without \"messages\"");
    list = messages["messages"];
    for (const auto& [key, value] : messages.items()) {
      if (key != "messages") extra[key] = value;
    }
  }
  if (!list.is_array()) fail(messages_path + ": messages must be a JSON array");
  const std::string rendered =
      unwrap(render_chat_template(config, list, add_generation_prompt, extra));
  std::fwrite(rendered.data(), 1, rendered.size(), stdout);
}

// Flags of the commands that generate text.
struct GenerateFlags {
  ModelFlags model;
  std::string tokenizer;  // defaults to the model directory
  int64_t n_predict = 128;
  SamplingParams sampling;
  std::vector<std::string> stop;

  void add_to(CLI::App* app) {
    model.add_to(app);
    app->add_option("--tokenizer", tokenizer,
                    "tokenizer.json or a directory with it (default: the model directory)");
    app->add_option("-n,--n-predict", n_predict, "maximum tokens to generate");
    app->add_option("--temp", sampling.temperature, "temperature (0: greedy)");
    app->add_option("--top-k", sampling.top_k, "keep the k most likely tokens (0: off)");
    app->add_option("--top-p", sampling.top_p, "nucleus sampling threshold (1: off)");
    app->add_option("--min-p", sampling.min_p, "drop tokens below min-p x the top probability");
    app->add_option("--repeat-penalty", sampling.repetition_penalty,
                    "HF repetition penalty (1: off)");
    app->add_option("--presence-penalty", sampling.presence_penalty, "(0: off)");
    app->add_option("--seed", sampling.seed, "sampling seed");
    app->add_option("--stop", stop, "stop string (repeatable)");
  }

  std::string tokenizer_source() const {
    if (!tokenizer.empty()) return tokenizer;
    if (model.model.rfind("synthetic:", 0) == 0) {
      fail(
          "synthetic models have no tokenizer: pass --tokenizer FILE|DIR (scripts/"
          "fetch_tokenizers.sh puts Qwen's in .cache/tokenizers/qwen3/models and Llama 3.1's "
          "in .cache/tokenizers/llama3_1/models)");
    }
    return model.model;
  }

  TextGenerationParams params() const {
    check(validate_sampling_params(sampling));
    if (n_predict <= 0) fail("-n must be positive");
    TextGenerationParams p;
    p.sampling = sampling;
    p.max_new_tokens = n_predict;
    p.stop_strings = stop;
    return p;
  }
};

std::unique_ptr<Engine> load_engine(const ModelFlags& flags) {
  auto engine = unwrap(Engine::create(flags.engine_options()));
  const ModelWeights& w = engine->weights();
  if (!flags.quiet) {
    std::fprintf(stderr, "model %s: %s, %lld layers, %.2f GB in %s, loaded in %.2fs on %s\n",
                 flags.model.c_str(), architecture_name(w.config.arch),
                 (long long)w.config.n_layers, double(w.resident_bytes()) / 1e9,
                 format_name(w.format), engine->load_seconds(), engine->backend().name().c_str());
  }
  return engine;
}

void print_speed(const Engine& engine, int64_t prompt_tokens, double prefill_seconds,
                 int64_t generated, double decode_seconds) {
  // The first generated token comes out of the prefill; the rest are decode steps.
  const int64_t steps = generated > 0 ? generated - 1 : 0;
  const double decode_tps = steps > 0 && decode_seconds > 0 ? double(steps) / decode_seconds : 0;
  std::fprintf(stderr,
               "prompt %lld tokens: %.1f tok/s (first token %.1f ms) | decode %lld tokens: %.2f "
               "tok/s, %.1f GB/s of weights\n",
               (long long)prompt_tokens, double(prompt_tokens) / prefill_seconds,
               prefill_seconds * 1e3, (long long)steps, decode_tps,
               decode_tps * double(engine.weights().decode_bytes()) / 1e9);
}

void run_generate(const GenerateFlags& flags, const std::string& prompt, const std::string& ids,
                  bool print_ids) {
  if (prompt.empty() == ids.empty()) fail("run: give exactly one of -p TEXT or --ids 1,2,3");
  const TextGenerationParams params = flags.params();
  if (!ids.empty()) {
    // Token ids in, token ids out: no tokenizer involved (greedy only).
    if (params.sampling.temperature != 0.0f) fail("run --ids: only --temp 0 (greedy) is supported");
    const std::vector<int32_t> prompt_ids = parse_ids(ids, "--ids");
    auto engine = load_engine(flags.model);
    auto result = unwrap(
        engine->generate_greedy(prompt_ids, params.max_new_tokens, false, [&](int32_t token) {
          if (!print_ids) return;
          std::printf("%d ", token);
          std::fflush(stdout);
        }));
    if (print_ids) std::printf("\n");
    print_speed(*engine, int64_t(prompt_ids.size()), result.prefill_seconds,
                int64_t(result.tokens.size()), result.decode_seconds);
    return;
  }
  const Tokenizer tokenizer = unwrap(Tokenizer::load(flags.tokenizer_source()));
  auto engine = load_engine(flags.model);
  const std::vector<int32_t> prompt_ids = unwrap(tokenizer.encode(prompt, true));
  TextSession session(*engine, tokenizer);
  std::vector<int32_t> generated_ids;
  const TextGenerationStats stats =
      unwrap(session.generate(prompt_ids, params, [](const std::string& text) {
        std::fwrite(text.data(), 1, text.size(), stdout);
        std::fflush(stdout);
      }));
  std::printf("\n");
  std::fflush(stdout);
  if (print_ids) {
    const auto& cached = session.cached_tokens();
    for (size_t i = prompt_ids.size(); i < cached.size(); ++i) std::printf("%d ", cached[i]);
    std::printf("\n");
  }
  print_speed(*engine, stats.prompt_tokens, stats.prefill_seconds, stats.generated_tokens,
              stats.decode_seconds);
}

// Interactive chat: each line of stdin is a user turn; the conversation is rendered with the
// model's chat template and only the new tokens of each turn are prefilled.
void run_chat(const GenerateFlags& flags, const std::string& system_prompt) {
  const std::string source = flags.tokenizer_source();
  const Tokenizer tokenizer = unwrap(Tokenizer::load(source));
  const ChatTemplateConfig chat_template = unwrap(load_chat_template(source));
  auto engine = load_engine(flags.model);
  const TextGenerationParams params = flags.params();
  TextSession session(*engine, tokenizer);
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  if (!system_prompt.empty()) messages.push_back({{"role", "system"}, {"content", system_prompt}});
  const bool interactive = isatty(STDIN_FILENO) != 0;
  if (interactive) {
    std::fprintf(stderr,
                 "chat: type a message and press Enter; /reset clears the history, "
                 "/exit or Ctrl-D quits\n");
  }
  std::string line;
  for (;;) {
    std::printf("> ");
    std::fflush(stdout);
    if (!std::getline(std::cin, line)) break;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      messages = nlohmann::ordered_json::array();
      if (!system_prompt.empty())
        messages.push_back({{"role", "system"}, {"content", system_prompt}});
      std::printf("(history cleared)\n");
      continue;
    }
    if (line.empty()) continue;
    messages.push_back({{"role", "user"}, {"content", line}});
    const std::string rendered = unwrap(render_chat_template(chat_template, messages, true));
    const std::vector<int32_t> ids = unwrap(tokenizer.encode(rendered, false));
    auto stats = session.generate(ids, params, [](const std::string& text) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
    });
    std::printf("\n");
    if (!stats.is_ok()) {
      // The turn failed (e.g. the context is full); the conversation stays usable after /reset.
      std::fprintf(stderr, "kestrel: error: %s\n", stats.status().message().c_str());
      messages.erase(messages.end() - 1);
      continue;
    }
    messages.push_back({{"role", "assistant"}, {"content", stats->text}});
    if (!flags.model.quiet) {
      std::fprintf(stderr,
                   "[%lld new prompt tokens (%lld reused), %lld generated, %.1f tok/s, %s]\n",
                   (long long)stats->prompt_tokens, (long long)stats->reused_tokens,
                   (long long)stats->generated_tokens,
                   stats->generated_tokens > 1 && stats->decode_seconds > 0
                       ? double(stats->generated_tokens - 1) / stats->decode_seconds
                       : 0.0,
                   stop_reason_name(stats->stop_reason));
    }
  }
}

}  // namespace

void add_text_commands(CLI::App& app, std::vector<Command>& commands) {
  static GenerateFlags run_flags;
  static std::string run_prompt;
  static std::string run_ids;
  static bool run_print_ids = false;
  CLI::App* run = app.add_subcommand("run", "generate a continuation of a prompt");
  run_flags.add_to(run);
  run->add_option("-p,--prompt", run_prompt, "prompt text");
  run->add_option("--ids", run_ids, "prompt token ids, comma-separated (instead of -p)");
  run->add_flag("--print-ids", run_print_ids, "print the generated token ids");
  commands.push_back({run, [] { run_generate(run_flags, run_prompt, run_ids, run_print_ids); }});

  static GenerateFlags chat_flags;
  static std::string system_prompt;
  CLI::App* chat = app.add_subcommand("chat", "interactive chat with the model's chat template");
  chat_flags.add_to(chat);
  chat->add_option("--system", system_prompt, "system prompt");
  commands.push_back({chat, [] { run_chat(chat_flags, system_prompt); }});

  static std::string tokenizer_path;
  static bool jsonl = false;
  static bool add_special = false;
  CLI::App* tokenize = app.add_subcommand("tokenize", "stdin text to token ids");
  tokenize->add_option("--tokenizer", tokenizer_path, "tokenizer.json or a model directory")
      ->required();
  tokenize->add_flag("--jsonl", jsonl, "each input line is a JSON string; one id array per line");
  tokenize->add_flag("--add-special", add_special,
                     "add the tokenizer's special tokens (e.g. Llama 3's BOS)");
  commands.push_back({tokenize, [] { run_tokenize(tokenizer_path, jsonl, add_special); }});

  static std::string template_path;
  static std::string messages_path;
  static bool add_generation_prompt = false;
  CLI::App* tmpl = app.add_subcommand("template", "render a chat template");
  tmpl->add_option("-m,--model", template_path, "model directory or tokenizer_config.json")
      ->required();
  tmpl->add_option("--messages", messages_path, "JSON file: a list of messages")->required();
  tmpl->add_flag("--add-generation-prompt", add_generation_prompt,
                 "end with the assistant's turn header");
  commands.push_back(
      {tmpl, [] { run_template(template_path, messages_path, add_generation_prompt); }});
}

}  // namespace kestrel::cli
