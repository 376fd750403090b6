// Runs a tiny synthetic model through the installed API and checks what a user would rely on.
#include <kestrel/engine.h>

#include <cstdio>
#include <string>

int main() {
  kestrel::EngineOptions options;
  options.model = "synthetic:tiny-qwen2";
  options.threads = 2;
  options.progress = false;
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
