#include "tokenizer/gguf_tokenizer.h"

#include <nlohmann/json.hpp>

#include "core/quote.h"
#include "tokenizer/unicode.h"

namespace kestrel {
namespace {

// nlohmann::json rather than ordered_json, which looks keys up linearly: a vocabulary has 150k.
using Json = nlohmann::json;

// llama.cpp's token types (tokenizer.ggml.token_type).
enum TokenType : int64_t { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5 };

// The Split regexes of the HF tokenizer.json files of each family (Oniguruma syntax, as there).
constexpr const char* kLlama3Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
constexpr const char* kQwen2Split =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

Json byte_level(bool use_regex) {
  return {{"type", "ByteLevel"},
          {"add_prefix_space", false},
          {"trim_offsets", false},
          {"use_regex", use_regex}};
}

Result<std::string> token_string(const GgufFile& file, const std::vector<std::string>& tokens,
                                 const char* key) {
  KS_ASSIGN_OR_RETURN(const int64_t id, file.get_int(key));
  if (id < 0 || id >= int64_t(tokens.size())) {
    return Status::error(file.path() + ": metadata '" + key + "' = " + std::to_string(id) +
                         " is not a token id (the vocabulary has " + std::to_string(tokens.size()) +
                         ")");
  }
  return tokens[size_t(id)];
}

}  // namespace

bool gguf_has_tokenizer(const std::string& path) {
  if (!has_gguf_magic(path)) return false;
  auto file = GgufFile::open(path);
  return file.is_ok() && file->find("tokenizer.ggml.model") != nullptr;
}

Result<std::string> gguf_tokenizer_json(const GgufFile& file) {
  const std::string& path = file.path();
  if (file.find("tokenizer.ggml.model") == nullptr) {
    return Status::error(path +
                         ": has no tokenizer (no tokenizer.ggml.model); give one with "
                         "--tokenizer");
  }
  KS_ASSIGN_OR_RETURN(const std::string model, file.get_string("tokenizer.ggml.model"));
  if (model != "gpt2") {
    return Status::error(path + ": tokenizer model " + quote_untrusted(model, 40) +
                         " is not supported (byte-level BPE, 'gpt2', is)");
  }
  KS_ASSIGN_OR_RETURN(const std::string pre, file.get_string("tokenizer.ggml.pre"));
  const bool llama3 = pre == "llama-bpe";
  if (!llama3 && pre != "qwen2") {
    return Status::error(path + ": pre-tokenizer " + quote_untrusted(pre, 40) +
                         " is not supported (llama-bpe and qwen2 are)");
  }
  KS_ASSIGN_OR_RETURN(const std::vector<std::string>* tokens,
                      file.get_strings("tokenizer.ggml.tokens"));
  std::vector<int64_t> types(tokens->size(), kNormal);
  if (file.find("tokenizer.ggml.token_type") != nullptr) {
    KS_ASSIGN_OR_RETURN(types, file.get_int_array("tokenizer.ggml.token_type"));
    if (types.size() != tokens->size()) {
      return Status::error(path + ": tokenizer.ggml.token_type has " +
                           std::to_string(types.size()) + " entries for " +
                           std::to_string(tokens->size()) + " tokens");
    }
  }
  KS_ASSIGN_OR_RETURN(const std::vector<std::string>* merges,
                      file.get_strings("tokenizer.ggml.merges"));

  for (size_t i = 0; i < merges->size(); ++i) {
    if (auto at = unicode::find_invalid_utf8((*merges)[i])) {
      return Status::error("tokenizer.ggml.merges[" + std::to_string(i) +
                           "] is not valid UTF-8 (byte " + std::to_string(*at) + ")");
    }
  }
  Json vocab = Json::object();
  Json added = Json::array();
  for (size_t id = 0; id < tokens->size(); ++id) {
    const std::string& token = (*tokens)[id];
    // A byte-level BPE token is text (its bytes spelled as characters): JSON, and the tokenizer
    // built from it, takes UTF-8 only.
    if (auto at = unicode::find_invalid_utf8(token)) {
      return Status::error("tokenizer.ggml.tokens[" + std::to_string(id) +
                           "] is not valid UTF-8 (byte " + std::to_string(*at) + ")");
    }
    switch (types[id]) {
      case kNormal:
        vocab[token] = id;
        break;
      case kControl:
      case kUserDefined:
        added.push_back({{"id", id},
                         {"content", token},
                         {"single_word", false},
                         {"lstrip", false},
                         {"rstrip", false},
                         {"normalized", types[id] == kUserDefined},
                         {"special", types[id] == kControl}});
        break;
      case kUnused:
        break;  // the converter's padding up to the embedding's rows
      default:
        return Status::error(path + ": token " + std::to_string(id) + " has type " +
                             std::to_string(types[id]) +
                             ", which a byte-level BPE vocabulary does not use");
    }
  }

  Json j;
  j["version"] = "1.0";
  j["truncation"] = nullptr;
  j["padding"] = nullptr;
  j["added_tokens"] = std::move(added);
  j["normalizer"] = llama3 ? Json(nullptr) : Json{{"type", "NFC"}};
  Json split = {{"type", "Split"},
                {"pattern", {{"Regex", llama3 ? kLlama3Split : kQwen2Split}}},
                {"behavior", "Isolated"},
                {"invert", false}};
  j["pre_tokenizer"] = {{"type", "Sequence"},
                        {"pretokenizers", Json::array({split, byte_level(false)})}};
  // The bos token goes first when the file says so (Llama 3 does; Qwen does not).
  bool add_bos = llama3;
  if (const GgufValue* v = file.find("tokenizer.ggml.add_bos_token")) {
    if (v->type != GgufValueType::boolean) {
      return Status::error(path + ": metadata 'tokenizer.ggml.add_bos_token' must be a bool");
    }
    add_bos = v->u != 0;
  }
  if (add_bos && file.find("tokenizer.ggml.bos_token_id") != nullptr) {
    KS_ASSIGN_OR_RETURN(const std::string bos,
                        token_string(file, *tokens, "tokenizer.ggml.bos_token_id"));
    KS_ASSIGN_OR_RETURN(const int64_t bos_id, file.get_int("tokenizer.ggml.bos_token_id"));
    Json special = {{"SpecialToken", {{"id", bos}, {"type_id", 0}}}};
    Json sequence = {{"Sequence", {{"id", "A"}, {"type_id", 0}}}};
    Json sequence_b = {{"Sequence", {{"id", "B"}, {"type_id", 1}}}};
    Json special_b = {{"SpecialToken", {{"id", bos}, {"type_id", 1}}}};
    Json templ = {{"type", "TemplateProcessing"},
                  {"single", Json::array({special, sequence})},
                  {"pair", Json::array({special, sequence, special_b, sequence_b})},
                  {"special_tokens",
                   {{bos, {{"id", bos}, {"ids", Json::array({bos_id})}, {"tokens", {bos}}}}}}};
    j["post_processor"] = {{"type", "Sequence"},
                           {"processors", Json::array({byte_level(true), templ})}};
  } else {
    j["post_processor"] = byte_level(false);
  }
  j["decoder"] = byte_level(false);
  j["model"] = {{"type", "BPE"},
                {"dropout", nullptr},
                {"unk_token", nullptr},
                {"continuing_subword_prefix", nullptr},
                {"end_of_word_suffix", nullptr},
                {"fuse_unk", false},
                {"byte_fallback", false},
                {"ignore_merges", llama3},
                {"vocab", std::move(vocab)},
                {"merges", *merges}};
  return j.dump();
}

Result<ChatTemplateConfig> gguf_chat_template(const GgufFile& file) {
  ChatTemplateConfig config;
  if (file.find("tokenizer.chat_template") == nullptr) {
    return Status::error(file.path() + ": has no tokenizer.chat_template");
  }
  KS_ASSIGN_OR_RETURN(config.template_text, file.get_string("tokenizer.chat_template"));
  if (file.find("tokenizer.ggml.tokens") == nullptr) return config;
  KS_ASSIGN_OR_RETURN(const std::vector<std::string>* tokens,
                      file.get_strings("tokenizer.ggml.tokens"));
  const std::pair<const char*, const char*> roles[] = {
      {"bos_token", "tokenizer.ggml.bos_token_id"},
      {"eos_token", "tokenizer.ggml.eos_token_id"},
      {"pad_token", "tokenizer.ggml.padding_token_id"}};
  for (const auto& [role, key] : roles) {
    if (file.find(key) == nullptr) continue;
    KS_ASSIGN_OR_RETURN(config.special_tokens[role], token_string(file, *tokens, key));
  }
  return config;
}

}  // namespace kestrel
