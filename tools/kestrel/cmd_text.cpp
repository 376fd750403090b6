// Text-facing subcommands: run, chat, tokenize and template.
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <charconv>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iostream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>

#include "backend/backend.h"
#include "commands.h"
#include "io/config.h"
#include "model/weights.h"
#include "runtime/text_generation.h"
#include "template/chat_template.h"
#include "tokenizer/gguf_tokenizer.h"
#include "tokenizer/tokenizer.h"

#if KESTREL_HAVE_LIBEDIT
#include <editline/readline.h>
#endif

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

// What is held of standard input (the prompt of -p -, a stretch of tokenize's input, one --jsonl
// line) stays under this size, so an endless stream (/dev/zero) fails with a message instead of
// growing until memory runs out.
constexpr size_t kMaxStdinBytes = 64u << 20;

std::string read_stdin(const std::string& what) {
  std::string text;
  char buffer[1 << 16];
  size_t n = 0;
  while ((n = std::fread(buffer, 1, sizeof(buffer), stdin)) > 0) {
    if (text.size() + n > kMaxStdinBytes) {
      fail(what + ": standard input is larger than the " + std::to_string(kMaxStdinBytes >> 20) +
           " MiB limit");
    }
    text.append(buffer, n);
  }
  return text;
}

// std::getline with a bound on the line's length.
bool read_line(std::istream& in, std::string& line, size_t max_bytes) {
  line.clear();
  char c = 0;
  bool any = false;
  while (in.get(c)) {
    any = true;
    if (c == '\n') return true;
    if (line.size() == max_bytes) {
      fail("standard input: a line is longer than the " + std::to_string(max_bytes >> 20) +
           " MiB limit");
    }
    line.push_back(c);
  }
  return any;
}

void run_tokenize(const std::string& path, bool jsonl, bool add_special) {
  const Tokenizer tokenizer = unwrap(Tokenizer::load(path));
  if (!jsonl) {
    // Standard input is encoded as it arrives: the ids of each complete stretch are printed
    // before the next is read, so memory holds one stretch (bounded), not the whole input.
    StreamEncoder encoder(tokenizer, add_special, kMaxStdinBytes);
    std::vector<int32_t> ids;
    bool first = true;
    auto print_new = [&] {
      std::string text = first ? "[" : "";
      for (int32_t id : ids) {
        if (!first) text += ", ";
        first = false;
        text += std::to_string(id);
      }
      ids.clear();
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
    };
    char buffer[1 << 16];
    ssize_t n = 0;
    while ((n = ::read(STDIN_FILENO, buffer, sizeof(buffer))) != 0) {
      if (n < 0) {
        if (errno == EINTR) continue;
        fail(std::string("tokenize: cannot read standard input: ") + std::strerror(errno));
      }
      const Status fed = encoder.feed(std::string_view(buffer, size_t(n)), ids);
      if (!fed.is_ok()) {
        std::fputs("\n", stdout);
        fail("tokenize: standard input: " + fed.message());
      }
      print_new();
    }
    const Status finished = encoder.finish(ids);
    if (!finished.is_ok()) {
      std::fputs("\n", stdout);
      fail("tokenize: standard input: " + finished.message());
    }
    print_new();
    std::fputs("]\n", stdout);
    return;
  }
  std::string line;
  int64_t line_number = 0;
  while (read_line(std::cin, line, kMaxStdinBytes)) {
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
  std::string seed;  // text: "-1" (random) parses as a value, not as a flag
  bool ignore_eos = false;
  std::vector<std::string> stop;

  void add_to(CLI::App* app) {
    model.add_to(app);
    app->add_option("--tokenizer", tokenizer,
                    "tokenizer.json or a directory with it (default: the model directory)");
    app->add_option("-n,--n-predict", n_predict, "maximum tokens to generate")
        ->capture_default_str();
    app->add_option("--temp", sampling.temperature, "temperature (0: greedy)")
        ->capture_default_str();
    app->add_option("--top-k", sampling.top_k, "keep the k most likely tokens (0: off)")
        ->capture_default_str();
    app->add_option("--top-p", sampling.top_p, "nucleus sampling threshold (1: off)")
        ->capture_default_str();
    app->add_option("--min-p", sampling.min_p, "drop tokens below min-p x the top probability")
        ->capture_default_str();
    app->add_option("--repeat-penalty", sampling.repetition_penalty,
                    "HF repetition penalty (1: off)")
        ->capture_default_str();
    app->add_option("--presence-penalty", sampling.presence_penalty, "(0: off)")
        ->capture_default_str();
    app->add_option("--seed", seed, "sampling seed (-1 or none: random, printed)");
    app->add_flag("--ignore-eos", ignore_eos, "keep generating past end-of-sequence tokens");
    app->add_option("--stop", stop, "stop string (repeatable)");
  }

  // Whether text can be shown: --tokenizer, a model directory with a tokenizer.json, or a GGUF
  // file with a tokenizer.
  bool has_tokenizer() const {
    if (!tokenizer.empty()) return true;
    if (model.model.rfind("synthetic:", 0) == 0) return false;
    if (gguf_has_tokenizer(model.model)) return true;
    std::error_code ec;
    return std::filesystem::exists(std::filesystem::path(model.model) / "tokenizer.json", ec);
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
    p.sampling.seed = sampling_seed();
    p.max_new_tokens = n_predict;
    p.stop_strings = stop;
    p.stop_at_eos = !ignore_eos;
    return p;
  }

  // --seed N, or with none (or -1) a random one, printed so that the run can be repeated.
  uint64_t sampling_seed() const {
    if (!seed.empty() && seed != "-1") {
      // Decimal digits only: stoull skipped leading spaces and wrapped " -1" to 2^64 - 1.
      uint64_t value = 0;
      const auto [end, error] = std::from_chars(seed.data(), seed.data() + seed.size(), value, 10);
      if (error != std::errc() || end != seed.data() + seed.size() || seed[0] < '0' ||
          seed[0] > '9') {
        fail("--seed: '" + seed + "' is not a seed (a non-negative integer, or -1 for random)");
      }
      return value;
    }
    if (sampling.temperature == 0.0f) return 0;  // greedy draws nothing
    const uint64_t value = (uint64_t(std::random_device{}()) << 32) | std::random_device{}();
    std::fprintf(stderr, "sampling seed %llu (pass --seed to repeat)\n", (unsigned long long)value);
    return value;
  }
};

std::unique_ptr<Engine> load_engine(const ModelFlags& flags) {
  auto engine = unwrap(Engine::create(flags.engine_options()));
  const ModelWeights& w = engine->weights();
  print_load_warnings(*engine);
  if (!flags.quiet) {
    std::fprintf(stderr, "model %s: %s, %lld layers, %.2f GB in %s, loaded in %.2fs on %s\n",
                 flags.model.c_str(), architecture_name(w.config.arch),
                 (long long)w.config.n_layers, double(engine->info().weight_bytes) / 1e9,
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
               decode_tps * double(engine.info().decode_bytes) / 1e9);
}

void run_generate(const GenerateFlags& flags, const std::string& prompt_flag,
                  const std::string& prompt_file, const std::string& ids, bool print_ids) {
  if (int(!prompt_flag.empty()) + int(!prompt_file.empty()) + int(!ids.empty()) != 1) {
    fail("run: give exactly one of -p TEXT (-p - reads standard input), -f FILE or --ids 1,2,3");
  }
  std::string prompt = prompt_flag;
  if (prompt_flag == "-") prompt = read_stdin("-p -");
  if (!prompt_file.empty()) prompt = unwrap(read_text_file(prompt_file));
  if (prompt.empty() && ids.empty()) fail("run: the prompt is empty");
  const TextGenerationParams params = flags.params();
  if (!ids.empty()) {
    // Token ids in, token ids out: no tokenizer involved (greedy only).
    if (params.sampling.temperature != 0.0f) fail("run --ids: only --temp 0 (greedy) is supported");
    const std::vector<int32_t> prompt_ids = parse_ids(ids, "--ids");
    auto engine = load_engine(flags.model);
    // Without --print-ids the ids still come out when there is no tokenizer to show text.
    const bool show_ids = print_ids || !flags.has_tokenizer();
    if (!print_ids && show_ids && !flags.model.quiet) {
      std::fprintf(stderr, "run --ids: no tokenizer for %s; printing token ids\n",
                   flags.model.model.c_str());
    }
    std::optional<Tokenizer> tokenizer;
    if (!show_ids) tokenizer = unwrap(Tokenizer::load(flags.tokenizer_source()));
    std::optional<StreamDecoder> decoder;
    if (tokenizer) decoder.emplace(*tokenizer, /*skip_special_tokens=*/true);
    auto result = unwrap(engine->generate_greedy(
        prompt_ids, params.max_new_tokens, params.stop_at_eos, [&](int32_t token) {
          if (show_ids) {
            std::printf("%d ", token);
          } else {
            const std::string text = decoder->feed(token);
            std::fwrite(text.data(), 1, text.size(), stdout);
          }
          std::fflush(stdout);
        }));
    if (decoder) {
      const std::string rest = decoder->finish();
      std::fwrite(rest.data(), 1, rest.size(), stdout);
    }
    std::printf("\n");
    check_stdout_written();
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
    for (int32_t id : stats.tokens) std::printf("%d ", id);
    std::printf("\n");
  }
  check_stdout_written();
  print_speed(*engine, stats.prompt_tokens, stats.prefill_seconds, stats.generated_tokens,
              stats.decode_seconds);
}

std::atomic<bool> g_chat_interrupt{false};

// The user's lines: with libedit on a terminal (line editing, and the session's history on the
// arrow keys), plain reads otherwise. read() is false at the end of input, and when Ctrl-C
// interrupted the read (the caller's flag says which).
class LineReader {
 public:
  explicit LineReader(bool terminal) : editing_(terminal && kHaveLineEditing) {
#if KESTREL_HAVE_LIBEDIT
    if (editing_) {
      rl_readline_name = "kestrel";
      using_history();
      stifle_history(1000);
    }
#endif
  }
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;
  ~LineReader() {
#if KESTREL_HAVE_LIBEDIT
    if (editing_) clear_history();
#endif
  }

  bool read(const char* prompt, std::string& line) {
#if KESTREL_HAVE_LIBEDIT
    if (editing_) {
      std::fflush(stdout);
      char* text = readline(prompt);
      if (text == nullptr) return false;
      line.assign(text);
      std::free(text);
      if (!line.empty()) add_history(line.c_str());
      return true;
    }
#endif
    std::fputs(prompt, stdout);
    std::fflush(stdout);
    if (std::getline(std::cin, line)) return true;
    std::cin.clear();
    clearerr(stdin);
    return false;
  }

 private:
#if KESTREL_HAVE_LIBEDIT
  static constexpr bool kHaveLineEditing = true;
#else
  static constexpr bool kHaveLineEditing = false;
#endif
  bool editing_;
};

// When the conversation and the reply no longer fit the context, the oldest turns go (a user
// message and the reply to it), the system prompt stays, as llama.cpp's context shift keeps its
// first tokens. Returns the rendered ids and how many messages were dropped; fails when even the
// system prompt and the newest message do not fit.
struct FittedConversation {
  std::vector<int32_t> ids;
  int64_t dropped = 0;
};

FittedConversation fit_conversation(nlohmann::ordered_json& messages,
                                    const ChatTemplateConfig& chat_template,
                                    const Tokenizer& tokenizer, int64_t max_new_tokens,
                                    int64_t context) {
  FittedConversation fitted;
  for (;;) {
    const std::string rendered = unwrap(render_chat_template(chat_template, messages, true));
    fitted.ids = unwrap(tokenizer.encode(rendered, false));
    if (max_new_tokens <= context - int64_t(fitted.ids.size())) return fitted;
    // The oldest message after the system prompt, and the replies that follow it, up to the
    // next user message; never the newest message.
    size_t first = 0;
    while (first < messages.size() && messages[first].value("role", "") == "system") ++first;
    if (first + 1 >= messages.size()) return fitted;  // nothing left to drop: generate() says so
    size_t end = first + 1;
    while (end + 1 < messages.size() && messages[end].value("role", "") != "user") ++end;
    fitted.dropped += int64_t(end - first);
    messages.erase(messages.begin() + long(first), messages.begin() + long(end));
  }
}

// Interactive chat: each line of stdin is a user turn; the conversation is rendered with the
// model's chat template and only the new tokens of each turn are prefilled.
void run_chat(const GenerateFlags& flags, const std::string& system_prompt) {
  const std::string source = flags.tokenizer_source();
  const Tokenizer tokenizer = unwrap(Tokenizer::load(source));
  const ChatTemplateConfig chat_template = unwrap(load_chat_template(source));
  auto engine = load_engine(flags.model);
  TextGenerationParams params = flags.params();
  params.interrupt = &g_chat_interrupt;
  TextSession session(*engine, tokenizer);
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  if (!system_prompt.empty()) messages.push_back({{"role", "system"}, {"content", system_prompt}});
  const bool interactive = isatty(STDIN_FILENO) != 0;
  LineReader reader(interactive);
  if (interactive) {
    // Ctrl-C stops the reply being written, not the program; at the prompt the read returns.
    catch_sigint(&g_chat_interrupt, /*once=*/false);
    std::fprintf(stderr,
                 "chat: type a message and press Enter; Ctrl-C stops a reply; /reset clears the "
                 "history, /help lists the commands, /exit, Ctrl-D or Ctrl-C twice quits\n");
  }
  std::string line;
  int64_t failed_turns = 0;
  bool interrupted_at_prompt = false;
  for (;;) {
    if (!reader.read("> ", line)) {
      if (!g_chat_interrupt.exchange(false)) break;  // end of input
      std::printf("\n");
      if (interrupted_at_prompt) break;
      interrupted_at_prompt = true;
      std::printf("(Ctrl-C again quits; /help lists the commands)\n");
      continue;
    }
    interrupted_at_prompt = false;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/help") {
      std::printf("/reset clears the conversation (the system prompt stays), /exit quits\n");
      continue;
    }
    if (line == "/reset") {
      messages = nlohmann::ordered_json::array();
      if (!system_prompt.empty())
        messages.push_back({{"role", "system"}, {"content", system_prompt}});
      std::printf("(history cleared)\n");
      continue;
    }
    if (line.empty()) continue;
    messages.push_back({{"role", "user"}, {"content", line}});
    const FittedConversation fitted = fit_conversation(
        messages, chat_template, tokenizer, params.max_new_tokens, engine->max_context());
    const std::vector<int32_t>& ids = fitted.ids;
    if (fitted.dropped > 0) {
      std::printf(
          "(context full: the %lld oldest messages were dropped to fit the context of %lld "
          "tokens; the system prompt stays)\n",
          (long long)fitted.dropped, (long long)engine->max_context());
    }
    g_chat_interrupt.store(false);
    auto stats = session.generate(ids, params, [](const std::string& text) {
      std::fwrite(text.data(), 1, text.size(), stdout);
      std::fflush(stdout);
    });
    if (g_chat_interrupt.exchange(false)) std::printf(" (stopped)");
    std::printf("\n");
    if (!stats.is_ok()) {
      // The turn failed (e.g. the context is full); the conversation stays usable after /reset.
      std::fprintf(stderr, "kestrel: error: %s\n", stats.status().message().c_str());
      if (params.max_new_tokens > engine->max_context() - int64_t(ids.size())) {
        std::fprintf(stderr,
                     "this message and the reply of up to %lld tokens do not fit the context of "
                     "%lld tokens, even without the older turns: raise -c or lower -n\n",
                     (long long)params.max_new_tokens, (long long)engine->max_context());
      }
      messages.erase(messages.end() - 1);
      ++failed_turns;
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
  // Each failure was reported when it happened; the status tells a script that one did.
  if (failed_turns > 0) std::exit(1);
}

}  // namespace

void add_text_commands(CLI::App& app, std::vector<Command>& commands) {
  static GenerateFlags run_flags;
  static std::string run_prompt;
  static std::string run_prompt_file;
  static std::string run_ids;
  static std::string run_system;
  static bool run_print_ids = false;
  static bool run_conversation = false;
  CLI::App* run = app.add_subcommand("run", "generate a continuation of a prompt");
  run_flags.add_to(run);
  run->add_option("-p,--prompt", run_prompt, "prompt text (-: read standard input)");
  run->add_option("-f,--file", run_prompt_file, "read the prompt from a file");
  run->add_option("--ids", run_ids, "prompt token ids, comma-separated (instead of -p)");
  run->add_flag("--print-ids", run_print_ids, "print the generated token ids");
  run->add_flag("-i,--interactive,--conversation", run_conversation,
                "llama.cpp habit: chat instead (as kestrel chat; -p becomes the system prompt)");
  run->add_option("--system,--system-prompt", run_system, "system prompt (implies --conversation)");
  commands.push_back({run, [] {
                        if (run_conversation || !run_system.empty()) {
                          if (!run_ids.empty() || !run_prompt_file.empty()) {
                            fail("run --conversation: --ids and -f have no meaning in a chat");
                          }
                          run_chat(run_flags, run_system.empty() ? run_prompt : run_system);
                          return;
                        }
                        run_generate(run_flags, run_prompt, run_prompt_file, run_ids,
                                     run_print_ids);
                      }});

  static GenerateFlags chat_flags;
  static std::string system_prompt;
  static bool chat_conversation = false;
  CLI::App* chat = app.add_subcommand("chat", "interactive chat with the model's chat template");
  chat_flags.add_to(chat);
  chat->add_option("--system,--system-prompt", system_prompt, "system prompt");
  chat->add_flag("-i,--interactive,--conversation", chat_conversation,
                 "llama.cpp habit: chat is always a conversation");
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
