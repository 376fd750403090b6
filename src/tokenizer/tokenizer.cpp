#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <unordered_map>
#include <unordered_set>

#include <nlohmann/json.hpp>

#include "core/quote.h"
#include "io/config.h"
#include "io/gguf.h"
#include "tokenizer/added_tokens.h"
#include "tokenizer/bpe.h"
#include "tokenizer/gguf_tokenizer.h"
#include "tokenizer/regex.h"
#include "tokenizer/unicode.h"

namespace kestrel {

using json = nlohmann::json;

namespace {

// The regex HF's ByteLevel pre-tokenizer uses when use_regex is true (GPT-2's).
constexpr const char* kGpt2Pattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

struct PreTokenizerStep {
  enum class Kind { kSplit, kByteLevel } kind = Kind::kSplit;
  std::shared_ptr<const Regex> regex;  // Split's pattern; ByteLevel's when use_regex
  bool remove_matches = false;         // Split behavior "Removed" (else "Isolated")
  bool invert = false;
  bool add_prefix_space = false;  // ByteLevel
  // No match of this step contains a line break followed by a non-space character, and no
  // match depends on text before it (see line_splittable below).
  bool line_safe = false;
};

// The Split patterns of the supported tokenizers (Llama 3.x; Qwen2/Qwen3): every alternative
// that can hold a line break holds only spaces after it or ends with the line break, and none
// looks behind its start. So "\n" followed by a non-space character is always a boundary between
// two matches, and text cut there encodes to the same ids piece by piece as whole.
constexpr const char* kLineSafePatterns[] = {
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+",
};

std::string type_of(const json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>()
                                                                      : std::string("?");
}

bool flag(const json& j, const char* key, bool fallback) {
  return j.contains(key) && j[key].is_boolean() ? j[key].get<bool>() : fallback;
}

// Whether a document nests arrays and objects deeper than `limit`, found without recursion.
// The component parsers below recurse through Sequences, and nlohmann copies a value
// recursively: a file nested 100000 deep (200 KB) overflowed the stack in either.
bool nests_deeper_than(const json& root, int limit) {
  std::vector<std::pair<const json*, int>> stack = {{&root, 0}};
  while (!stack.empty()) {
    const auto [v, depth] = stack.back();
    stack.pop_back();
    if (!v->is_structured()) continue;
    if (depth >= limit) return true;
    for (const json& child : *v) {
      if (child.is_structured()) stack.emplace_back(&child, depth + 1);
    }
  }
  return false;
}

// Real tokenizer.json files nest a few levels (a Sequence of Splits holding patterns: 5).
constexpr int kMaxTokenizerNesting = 64;

Status parse_pre_tokenizer(const json& j, std::vector<PreTokenizerStep>& steps) {
  if (j.is_null()) return Status::ok();
  const std::string type = type_of(j);
  if (type == "Sequence") {
    if (!j.contains("pretokenizers") || !j["pretokenizers"].is_array()) {
      return Status::error("pre_tokenizer Sequence has no \"pretokenizers\" array");
    }
    for (const json& p : j["pretokenizers"]) KS_RETURN_IF_ERROR(parse_pre_tokenizer(p, steps));
    return Status::ok();
  }
  if (type == "Split") {
    PreTokenizerStep step;
    step.kind = PreTokenizerStep::Kind::kSplit;
    const json& pattern = j.value("pattern", json());
    Result<Regex> regex = Status::error("pre_tokenizer Split has no Regex or String pattern");
    if (pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string()) {
      const std::string source = pattern["Regex"].get<std::string>();
      regex = Regex::compile(source);
      for (const char* safe : kLineSafePatterns) step.line_safe |= source == safe;
    } else if (pattern.is_object() && pattern.contains("String") && pattern["String"].is_string()) {
      regex = Regex::literal(pattern["String"].get<std::string>());
    }
    if (!regex.is_ok()) return regex.status();
    step.regex = std::make_shared<const Regex>(std::move(regex).value());
    const std::string behavior = j.value("behavior", std::string("?"));
    if (behavior == "Removed") {
      step.remove_matches = true;
    } else if (behavior != "Isolated") {
      return Status::error("pre_tokenizer Split behavior " + quote_untrusted(behavior) +
                           " is not supported (Isolated and Removed are)");
    }
    step.invert = flag(j, "invert", false);
    step.line_safe &= !step.remove_matches && !step.invert;
    steps.push_back(std::move(step));
    return Status::ok();
  }
  if (type == "ByteLevel") {
    PreTokenizerStep step;
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    step.add_prefix_space = flag(j, "add_prefix_space", true);
    // GPT-2's pattern has the property too; a prefix space would be added to every piece.
    step.line_safe = !step.add_prefix_space;
    if (flag(j, "use_regex", true)) {
      KS_ASSIGN_OR_RETURN(Regex regex, Regex::compile(kGpt2Pattern));
      step.regex = std::make_shared<const Regex>(std::move(regex));
    }
    steps.push_back(std::move(step));
    return Status::ok();
  }
  return Status::error("pre_tokenizer type " + quote_untrusted(type) +
                       " is not supported (Sequence, Split and ByteLevel are)");
}

// Adds the tokens a post-processor puts around a single sequence; Sequence applies its
// processors in order, each wrapping the result of the previous one.
Status parse_post_processor(const json& j, std::vector<int32_t>& prefix,
                            std::vector<int32_t>& suffix) {
  if (j.is_null()) return Status::ok();
  const std::string type = type_of(j);
  if (type == "Sequence") {
    if (!j.contains("processors") || !j["processors"].is_array()) {
      return Status::error("post_processor Sequence has no \"processors\" array");
    }
    for (const json& p : j["processors"])
      KS_RETURN_IF_ERROR(parse_post_processor(p, prefix, suffix));
    return Status::ok();
  }
  if (type == "ByteLevel") return Status::ok();  // only adjusts offsets
  if (type == "TemplateProcessing") {
    const json& single = j.value("single", json());
    const json& specials = j.value("special_tokens", json::object());
    if (!single.is_array()) return Status::error("TemplateProcessing has no \"single\" template");
    std::vector<int32_t> before, after;
    bool seen_sequence = false;
    for (const json& piece : single) {
      if (piece.contains("Sequence")) {
        const std::string seq = piece["Sequence"].value("id", std::string("A"));
        if (seq != "A" || seen_sequence) {
          return Status::error("TemplateProcessing single template uses sequence " +
                               quote_untrusted(seq) + "; only one sequence A is possible");
        }
        seen_sequence = true;
      } else if (piece.contains("SpecialToken")) {
        const std::string name = piece["SpecialToken"].value("id", std::string());
        if (!specials.contains(name) || !specials[name].contains("ids") ||
            !specials[name]["ids"].is_array()) {
          return Status::error("TemplateProcessing uses special token " + quote_untrusted(name) +
                               " that special_tokens does not define");
        }
        for (const json& id : specials[name]["ids"]) {
          (seen_sequence ? after : before).push_back(id.get<int32_t>());
        }
      } else {
        return Status::error(
            "TemplateProcessing template piece is neither Sequence nor "
            "SpecialToken");
      }
    }
    prefix.insert(prefix.begin(), before.begin(), before.end());
    suffix.insert(suffix.end(), after.begin(), after.end());
    return Status::ok();
  }
  if (type == "BertProcessing" || type == "RobertaProcessing") {
    const json& cls = j.value("cls", json());
    const json& sep = j.value("sep", json());
    if (!cls.is_array() || cls.size() != 2 || !sep.is_array() || sep.size() != 2) {
      return Status::error(type + " needs \"cls\" and \"sep\" as [token, id]");
    }
    prefix.insert(prefix.begin(), cls[1].get<int32_t>());
    suffix.push_back(sep[1].get<int32_t>());
    return Status::ok();
  }
  return Status::error("post_processor type " + quote_untrusted(type) + " is not supported");
}

Status parse_normalizer(const json& j, bool& nfc) {
  if (j.is_null()) return Status::ok();
  const std::string type = type_of(j);
  if (type == "NFC") {
    nfc = true;
    return Status::ok();
  }
  if (type == "Sequence" && j.contains("normalizers") && j["normalizers"].is_array()) {
    for (const json& n : j["normalizers"]) KS_RETURN_IF_ERROR(parse_normalizer(n, nfc));
    return Status::ok();
  }
  return Status::error("normalizer type " + quote_untrusted(type) + " is not supported (only NFC)");
}

}  // namespace

struct Tokenizer::Impl {
  std::unique_ptr<BpeModel> model;
  bool nfc = false;
  std::vector<PreTokenizerStep> steps;
  AddedTokenMatcher raw_matcher;                       // added tokens with normalized = false
  AddedTokenMatcher normalized_matcher;                // added tokens with normalized = true
  std::unordered_map<std::string, int32_t> added_ids;  // content -> id
  std::map<int32_t, std::string> added_strings;        // id -> string used for decoding
  std::vector<int32_t> prefix_ids, suffix_ids;
  bool byte_level_decoder = true;  // false: HF joins token strings with spaces
  // [id] -> what the id decodes to (raw bytes, or the token string without a decoder)
  std::vector<std::string> decoded;
  std::vector<uint8_t> id_flags;  // kExists | kSpecial
  static constexpr uint8_t kExists = 1, kSpecial = 2;
  size_t vocab_size = 0;
  // Text may be encoded in pieces cut before the first non-space character after a line break
  // (StreamEncoder): every pre-tokenizer step is line-safe and no added token holds a line break
  // or strips the space to its left.
  bool line_splittable = false;

  struct Scratch {
    std::vector<AddedSplit> raw_splits, normalized_splits;
    std::string normalized;
    std::vector<ByteSpan> spans[8];
  };

  Status pre_tokenize(size_t step, std::string_view piece, std::vector<int32_t>& ids,
                      Scratch& scratch) const;
  Status encode_normalized(std::string_view text, std::vector<int32_t>& ids,
                           Scratch& scratch) const;
  bool decodable(int32_t id, bool skip_special) const {
    return id >= 0 && static_cast<size_t>(id) < id_flags.size() && (id_flags[id] & kExists) &&
           !(skip_special && (id_flags[id] & kSpecial));
  }
};

Status Tokenizer::Impl::pre_tokenize(size_t step, std::string_view piece, std::vector<int32_t>& ids,
                                     Scratch& scratch) const {
  if (piece.empty()) return Status::ok();  // HF drops empty pieces
  if (step == steps.size()) {
    model->encode_word(piece, ids);
    return Status::ok();
  }
  const PreTokenizerStep& s = steps[step];
  std::string prefixed;
  if (s.kind == PreTokenizerStep::Kind::kByteLevel && s.add_prefix_space && piece[0] != ' ') {
    prefixed.reserve(piece.size() + 1);
    prefixed.push_back(' ');
    prefixed.append(piece);
    piece = prefixed;
  }
  if (!s.regex) return pre_tokenize(step + 1, piece, ids, scratch);

  // Matches and the gaps between them, in order; Removed drops the matches (with invert: the
  // gaps), Isolated keeps everything.
  std::vector<ByteSpan> local;
  std::vector<ByteSpan>& spans = step < std::size(scratch.spans) ? scratch.spans[step] : local;
  spans.clear();
  KS_RETURN_IF_ERROR(s.regex->find_all(piece, spans));
  const bool keep_matches = !(s.remove_matches && !s.invert);
  const bool keep_gaps = !(s.remove_matches && s.invert);
  uint32_t prev = 0;
  for (const ByteSpan& m : spans) {
    if (keep_gaps && m.begin > prev) {
      KS_RETURN_IF_ERROR(pre_tokenize(step + 1, piece.substr(prev, m.begin - prev), ids, scratch));
    }
    if (keep_matches) {
      KS_RETURN_IF_ERROR(
          pre_tokenize(step + 1, piece.substr(m.begin, m.end - m.begin), ids, scratch));
    }
    prev = m.end;
  }
  if (keep_gaps && prev < piece.size()) {
    KS_RETURN_IF_ERROR(pre_tokenize(step + 1, piece.substr(prev), ids, scratch));
  }
  return Status::ok();
}

Status Tokenizer::Impl::encode_normalized(std::string_view text, std::vector<int32_t>& ids,
                                          Scratch& scratch) const {
  if (normalized_matcher.empty()) return pre_tokenize(0, text, ids, scratch);
  auto& splits = scratch.normalized_splits;
  splits.clear();
  normalized_matcher.split(text, splits);
  for (const AddedSplit& s : splits) {
    if (s.id >= 0) {
      ids.push_back(s.id);
    } else {
      KS_RETURN_IF_ERROR(pre_tokenize(0, text.substr(s.begin, s.end - s.begin), ids, scratch));
    }
  }
  return Status::ok();
}

Result<Tokenizer> Tokenizer::load(const std::string& path) {
  namespace fs = std::filesystem;
  fs::path file = path;
  std::error_code ec;
  if (fs::is_directory(file, ec)) {
    if (fs::exists(file / "tokenizer.json", ec)) {
      file /= "tokenizer.json";
    } else if (fs::exists(file / "models" / "tokenizer.json", ec)) {
      file = file / "models" / "tokenizer.json";
    } else {
      return Status::error(path + ": directory has no tokenizer.json");
    }
  }
  if (!fs::is_directory(file, ec) && has_gguf_magic(file.string())) {
    KS_ASSIGN_OR_RETURN(const GgufFile gguf, GgufFile::open(file.string()));
    auto text = gguf_tokenizer_json(gguf);
    if (!text.is_ok()) return text.status().with_context(file.string());
    return from_json(*text, file.string());
  }
  KS_ASSIGN_OR_RETURN(const std::string text, read_text_file(file.string()));
  return from_json(text, file.string());
}

Result<Tokenizer> Tokenizer::from_json(std::string_view json_text, const std::string& origin) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    return Status::error(origin + ": not valid JSON: " + e.what());
  }
  auto fail = [&](const Status& s) { return s.with_context(origin); };
  if (!root.is_object()) return fail(Status::error("top level is not an object"));
  if (nests_deeper_than(root, kMaxTokenizerNesting)) {
    return fail(Status::error("arrays and objects nested too deeply (more than " +
                              std::to_string(kMaxTokenizerNesting) + " levels)"));
  }

  auto impl = std::make_shared<Impl>();
  try {
    auto model = BpeModel::from_json(root.value("model", json()));
    if (!model.is_ok()) return fail(model.status());
    impl->model = std::move(model).value();
    Status s = parse_normalizer(root.value("normalizer", json()), impl->nfc);
    if (s.is_ok()) s = parse_pre_tokenizer(root.value("pre_tokenizer", json()), impl->steps);
    if (s.is_ok()) {
      s = parse_post_processor(root.value("post_processor", json()), impl->prefix_ids,
                               impl->suffix_ids);
    }
    if (!s.is_ok()) return fail(s);
  } catch (const json::exception& e) {
    return fail(Status::error(std::string("unexpected JSON structure: ") + e.what()));
  }
  bool byte_level = false;
  for (const auto& step : impl->steps)
    byte_level |= step.kind == PreTokenizerStep::Kind::kByteLevel;
  if (!byte_level) {
    return fail(
        Status::error("pre_tokenizer has no ByteLevel step; only byte-level BPE "
                      "tokenizers are supported"));
  }
  const json& decoder = root.value("decoder", json());
  if (decoder.is_null()) {
    impl->byte_level_decoder = false;
  } else if (type_of(decoder) != "ByteLevel") {
    return fail(Status::error("decoder type " + quote_untrusted(type_of(decoder)) +
                              " is not supported (only ByteLevel)"));
  }

  // Added tokens get their ids the way HF's AddedVocabulary::add_tokens assigns them: an existing
  // token keeps its id, a new one takes the next id after the model vocabulary.
  const json& added_json = root.value("added_tokens", json::array());
  if (!added_json.is_array()) return fail(Status::error("\"added_tokens\" is not an array"));
  std::map<int32_t, AddedToken> added_by_id;
  std::unordered_set<std::string> special_contents;
  int32_t next_id = static_cast<int32_t>(impl->model->vocab_size());
  for (const json& t : added_json) {
    if (!t.is_object() || !t.contains("content") || !t["content"].is_string()) {
      return fail(Status::error("an added token has no \"content\" string"));
    }
    AddedToken token;
    token.content = t["content"].get<std::string>();
    token.single_word = flag(t, "single_word", false);
    token.lstrip = flag(t, "lstrip", false);
    token.rstrip = flag(t, "rstrip", false);
    token.special = flag(t, "special", false);
    token.normalized = flag(t, "normalized", !token.special);
    if (token.content.empty()) continue;
    if (unicode::find_invalid_utf8(token.content)) {
      return fail(Status::error("added token content is not valid UTF-8"));
    }
    auto existing = impl->added_ids.find(token.content);
    if (existing != impl->added_ids.end()) {
      token.id = existing->second;
    } else if (int32_t id = impl->model->token_to_id(token.content); id >= 0) {
      token.id = id;
    } else {
      token.id = next_id++;
    }
    impl->added_ids[token.content] = token.id;
    if (token.special) special_contents.insert(token.content);
    added_by_id[token.id] = token;
  }
  bool added_line_safe = true;
  for (const auto& [id, token] : added_by_id) {
    std::string pattern = token.content;
    if (token.normalized && impl->nfc) {
      pattern.clear();
      unicode::append_nfc(pattern, token.content);
    }
    impl->added_strings[id] = pattern;  // HF decodes a normalized token by its normalized form
    added_line_safe &= !token.lstrip && pattern.find_first_of("\r\n") == std::string::npos;
    (token.normalized ? impl->normalized_matcher : impl->raw_matcher).add(pattern, token);
  }

  impl->line_splittable = added_line_safe;
  for (const auto& step : impl->steps) impl->line_splittable &= step.line_safe;

  size_t overlapping = 0;
  for (const auto& [content, id] : impl->added_ids)
    overlapping += impl->model->token_to_id(content) >= 0;
  impl->vocab_size = impl->model->vocab_size() + impl->added_ids.size() - overlapping;

  int32_t id_limit = impl->model->id_limit();
  if (!added_by_id.empty()) id_limit = std::max(id_limit, added_by_id.rbegin()->first + 1);
  impl->decoded.assign(id_limit, std::string());
  impl->id_flags.assign(id_limit, 0);
  std::string bytes;
  for (int32_t id = 0; id < id_limit; ++id) {
    const std::string* token = nullptr;
    auto added = impl->added_strings.find(id);
    if (added != impl->added_strings.end()) {
      token = &added->second;
    } else {
      token = impl->model->id_to_token(id);
    }
    if (token == nullptr) continue;
    impl->id_flags[id] = Impl::kExists | (special_contents.count(*token) ? Impl::kSpecial : 0);
    // HF's ByteLevel decoder maps each character back to its byte; a token with a character
    // outside the byte alphabet (an added token like "<tool_call>" is inside it) keeps its bytes.
    if (impl->byte_level_decoder && byte_level_decode(*token, bytes)) {
      impl->decoded[id] = bytes;
    } else {
      impl->decoded[id] = *token;
    }
  }
  return Tokenizer(std::move(impl));
}

Status Tokenizer::encode_into(std::string_view text, bool add_special_tokens,
                              std::vector<int32_t>& ids) const {
  if (auto bad = unicode::find_invalid_utf8(text)) {
    char byte[8];
    std::snprintf(byte, sizeof(byte), "0x%02X", static_cast<unsigned>(uint8_t(text[*bad])));
    return Status::error(std::string("input is not valid UTF-8: invalid byte ") + byte +
                         " at byte offset " + std::to_string(*bad));
  }
  const Impl& impl = *impl_;
  if (add_special_tokens) ids.insert(ids.end(), impl.prefix_ids.begin(), impl.prefix_ids.end());
  Impl::Scratch scratch;
  auto encode_piece = [&](std::string_view piece) -> Status {
    if (!impl.nfc || unicode::is_nfc_quick(piece)) {
      return impl.encode_normalized(piece, ids, scratch);
    }
    scratch.normalized.clear();
    unicode::append_nfc(scratch.normalized, piece);
    return impl.encode_normalized(scratch.normalized, ids, scratch);
  };
  if (impl.raw_matcher.empty()) {
    if (!text.empty()) KS_RETURN_IF_ERROR(encode_piece(text));
  } else {
    auto& splits = scratch.raw_splits;
    impl.raw_matcher.split(text, splits);
    for (const AddedSplit& s : splits) {
      if (s.id >= 0) {
        ids.push_back(s.id);
      } else {
        KS_RETURN_IF_ERROR(encode_piece(text.substr(s.begin, s.end - s.begin)));
      }
    }
  }
  if (add_special_tokens) ids.insert(ids.end(), impl.suffix_ids.begin(), impl.suffix_ids.end());
  return Status::ok();
}

Result<std::vector<int32_t>> Tokenizer::encode(std::string_view text,
                                               bool add_special_tokens) const {
  std::vector<int32_t> ids;
  KS_RETURN_IF_ERROR(encode_into(text, add_special_tokens, ids));
  return ids;
}

StreamEncoder::StreamEncoder(const Tokenizer& tokenizer, bool add_special_tokens,
                             size_t max_pending_bytes)
    : tokenizer_(tokenizer),
      add_special_tokens_(add_special_tokens),
      max_pending_bytes_(max_pending_bytes) {}

bool StreamEncoder::splits_lines() const {
  return tokenizer_.impl_->line_splittable;
}

Status StreamEncoder::encode_piece(std::string_view piece, std::vector<int32_t>& ids) {
  if (auto bad = unicode::find_invalid_utf8(piece)) {
    char byte[8];
    std::snprintf(byte, sizeof(byte), "0x%02X", static_cast<unsigned>(uint8_t(piece[*bad])));
    return Status::error(std::string("input is not valid UTF-8: invalid byte ") + byte +
                         " at byte offset " + std::to_string(consumed_ + *bad));
  }
  const Tokenizer::Impl& impl = *tokenizer_.impl_;
  if (add_special_tokens_ && !started_) {
    ids.insert(ids.end(), impl.prefix_ids.begin(), impl.prefix_ids.end());
  }
  started_ = true;
  KS_RETURN_IF_ERROR(tokenizer_.encode_into(piece, false, ids));
  consumed_ += piece.size();
  return Status::ok();
}

Status StreamEncoder::feed(std::string_view bytes, std::vector<int32_t>& ids) {
  const size_t old_size = pending_.size();
  pending_.append(bytes);
  if (splits_lines()) {
    // The last line break followed by a non-space character: everything before that character
    // encodes now. Only the new bytes can hold one (the old ones were searched already).
    size_t cut = std::string::npos;
    for (size_t i = pending_.size(); i-- > std::max<size_t>(old_size, 1);) {
      const char c = pending_[i];
      const char prev = pending_[i - 1];
      // A printable ASCII character: not a space under any definition of \s.
      if ((prev == '\n' || prev == '\r') && c > ' ' && c < 0x7f) {
        cut = i;
        break;
      }
    }
    if (cut != std::string::npos) {
      KS_RETURN_IF_ERROR(encode_piece(std::string_view(pending_).substr(0, cut), ids));
      pending_.erase(0, cut);
    }
  }
  if (pending_.size() > max_pending_bytes_) {
    return Status::error(
        std::string(splits_lines() ? "a stretch of input without a line break starting a new "
                                     "word"
                                   : "the input (this tokenizer encodes it whole)") +
        " is longer than the " +
        (max_pending_bytes_ % (1u << 20) == 0 ? std::to_string(max_pending_bytes_ >> 20) + " MiB"
                                              : std::to_string(max_pending_bytes_) + " bytes") +
        " limit");
  }
  return Status::ok();
}

Status StreamEncoder::finish(std::vector<int32_t>& ids) {
  KS_RETURN_IF_ERROR(encode_piece(pending_, ids));
  pending_.clear();
  if (add_special_tokens_) {
    const Tokenizer::Impl& impl = *tokenizer_.impl_;
    ids.insert(ids.end(), impl.suffix_ids.begin(), impl.suffix_ids.end());
  }
  return Status::ok();
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& impl = *impl_;
  std::string joined;
  bool first = true;
  for (int32_t id : ids) {
    if (!impl.decodable(id, skip_special_tokens)) continue;
    if (!impl.byte_level_decoder && !first) joined.push_back(' ');
    joined += impl.decoded[id];
    first = false;
  }
  if (!impl.byte_level_decoder) return joined;
  std::string text;
  text.reserve(joined.size());
  unicode::append_utf8_lossy(text, joined);
  return text;
}

int32_t Tokenizer::token_to_id(std::string_view token) const {
  auto it = impl_->added_ids.find(std::string(token));
  if (it != impl_->added_ids.end()) return it->second;
  return impl_->model->token_to_id(token);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  auto it = impl_->added_strings.find(id);
  if (it != impl_->added_strings.end()) return it->second;
  const std::string* token = impl_->model->id_to_token(id);
  return token ? *token : std::string();
}

size_t Tokenizer::vocab_size() const {
  return impl_->vocab_size;
}

bool Tokenizer::is_special(int32_t id) const {
  return impl_->decodable(id, false) && (impl_->id_flags[id] & Impl::kSpecial);
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : impl_(tokenizer.impl_), skip_special_tokens_(skip_special_tokens) {}

std::string StreamDecoder::feed(int32_t id) {
  if (!impl_->decodable(id, skip_special_tokens_)) return std::string();
  const std::string& piece = impl_->decoded[id];
  std::string out;
  if (!impl_->byte_level_decoder) {
    if (!first_token_) out.push_back(' ');
    first_token_ = false;
    out += piece;
    return out;
  }
  first_token_ = false;
  pending_ += piece;
  // Emit everything up to a trailing unfinished character, which waits for the next token.
  size_t i = 0;
  while (i < pending_.size()) {
    const unicode::Utf8Step step = unicode::utf8_step(std::string_view(pending_).substr(i));
    if (step.kind == unicode::Utf8Step::kIncomplete) break;
    if (step.kind == unicode::Utf8Step::kValid) {
      out.append(pending_, i, step.length);
    } else {
      out.append("\xEF\xBF\xBD");
    }
    i += step.length;
  }
  pending_.erase(0, i);
  return out;
}

std::string StreamDecoder::finish() {
  std::string out;
  unicode::append_utf8_lossy(out, pending_);
  pending_.clear();
  first_token_ = true;
  return out;
}

}  // namespace kestrel
