// Runs a tiny synthetic model through the installed API and checks what a user would rely on.
// With a tokenizer directory as its argument (Qwen's, which matches tiny-qwen2's vocabulary), the
// text path too.
#include <kestrel/engine.h>
#include <kestrel/generate.h>
#include <kestrel/text.h>

#include <cstdio>
#include <string>

namespace {

int check_text_path(kestrel::Engine& engine, const std::string& tokenizer_dir) {
  auto text = kestrel::TextGenerator::create(engine, tokenizer_dir);
  if (!text.is_ok()) {
    std::fprintf(stderr, "FAIL text: %s\n", text.status().message().c_str());
    return 1;
  }
  auto ids = (*text)->encode("Hello world", false);
  if (!ids.is_ok() || ids->empty() || (*text)->decode(*ids) != "Hello world") {
    std::fprintf(stderr, "FAIL encode/decode round trip\n");
    return 1;
  }
  auto rendered = (*text)->render_chat({{"user", "Hi"}}, true);
  if (!rendered.is_ok() || rendered->find("Hi") == std::string::npos) {
    std::fprintf(stderr, "FAIL render_chat: %s\n",
                 rendered.is_ok() ? rendered->c_str() : rendered.status().message().c_str());
    return 1;
  }
  kestrel::TextGenerationParams params;
  params.max_new_tokens = 5;
  params.sampling.temperature = 0.8f;
  params.sampling.seed = 7;
  std::string streamed;
  auto stats =
      (*text)->chat({{"user", "Hi"}}, params, [&](const std::string& piece) { streamed += piece; });
  if (!stats.is_ok() || stats->generated_tokens < 1 || stats->generated_tokens > 5 ||
      streamed != stats->text) {
    std::fprintf(
        stderr, "FAIL chat: %s\n",
        stats.is_ok() ? "stats disagree with the stream" : stats.status().message().c_str());
    return 1;
  }
  std::printf("ok text path: %lld tokens, stopped by %s\n", (long long)stats->generated_tokens,
              kestrel::stop_reason_name(stats->stop_reason));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  kestrel::EngineOptions options;
  options.model = "synthetic:tiny-qwen2";
  options.threads = 2;
  options.progress = false;
  options.max_seqs = 2;
  auto engine = kestrel::Engine::create(options);
  if (!engine.is_ok()) {
    std::fprintf(stderr, "FAIL create: %s\n", engine.status().message().c_str());
    return 1;
  }
  const kestrel::ModelInfo info = (*engine)->info();
  if (info.architecture != "Qwen2ForCausalLM" || info.vocab_size <= 0 ||
      info.format != kestrel::WeightFormat::sym_int4) {
    std::fprintf(stderr, "FAIL info: %s, vocab %lld, %s\n", info.architecture.c_str(),
                 (long long)info.vocab_size, kestrel::format_name(info.format));
    return 1;
  }
  auto result = (*engine)->generate_greedy({1, 2, 3}, 4);
  if (!result.is_ok() || result->tokens.size() != 4) {
    std::fprintf(stderr, "FAIL generate: %s\n",
                 result.is_ok() ? "wrong token count" : result.status().message().c_str());
    return 1;
  }
  for (int32_t id : result->tokens) {
    if (id < 0 || id >= info.vocab_size) {
      std::fprintf(stderr, "FAIL generate: token %d outside the vocabulary\n", id);
      return 1;
    }
  }
  // Two different prompts generated together; the first continues as it does alone.
  kestrel::TokenGenerationParams params;
  params.max_new_tokens = 4;
  params.stop_at_eos = false;
  auto together = kestrel::generate_tokens(**engine, {{1, 2, 3}, {4, 5}}, params);
  if (!together.is_ok() || together->tokens.size() != 2 || together->tokens[0] != result->tokens) {
    std::fprintf(
        stderr, "FAIL generate_tokens: %s\n",
        together.is_ok() ? "differs from generate_greedy" : together.status().message().c_str());
    return 1;
  }
  if (argc > 1 && check_text_path(**engine, argv[1]) != 0) return 1;
  // Library errors speak in the API's terms, not the command line's.
  options.device = "tpu";
  auto refused = kestrel::Engine::create(options);
  if (refused.is_ok() || refused.status().message().find("--") != std::string::npos) {
    std::fprintf(stderr, "FAIL bad device: '%s'\n", refused.status().message().c_str());
    return 1;
  }
  std::printf("ok consumer: %s, %lld layers, 4 tokens generated; bad device: %s\n",
              info.architecture.c_str(), (long long)info.n_layers,
              refused.status().message().c_str());
  return 0;
}
