#include "bench/prompt.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/config.h"

namespace kestrel::bench {

namespace {

bool is_word_byte(unsigned char ch) {
  // Letters, digits, apostrophes inside words, and every byte of a multi-byte UTF-8 character.
  return std::isalnum(ch) != 0 || ch == '\'' || ch >= 0x80;
}

}  // namespace

std::vector<std::string> split_pieces(const std::string& text) {
  std::vector<std::string> pieces;
  size_t i = 0;
  while (i < text.size()) {
    const size_t start = i;
    while (i < text.size() && text[i] == ' ') ++i;  // leading spaces travel with what follows
    if (i == text.size()) {
      pieces.push_back(text.substr(start));
      break;
    }
    const unsigned char ch = static_cast<unsigned char>(text[i]);
    if (is_word_byte(ch)) {
      while (i < text.size() && is_word_byte(static_cast<unsigned char>(text[i]))) ++i;
    } else {
      ++i;  // one punctuation mark or line break
    }
    pieces.push_back(text.substr(start, i - start));
  }
  return pieces;
}

int32_t piece_id(const std::string& piece, int64_t vocab_size) {
  uint64_t hash = 1469598103934665603ull;  // FNV-1a
  for (unsigned char ch : piece) hash = (hash ^ ch) * 1099511628211ull;
  return int32_t(hash % uint64_t(vocab_size));
}

Result<std::vector<int32_t>> prompt_tokens(const std::string& text, int64_t n_tokens,
                                           int64_t vocab_size, const Tokenize& tokenize) {
  if (n_tokens < 0) return Status::error("prompt length must not be negative");
  if (vocab_size <= 0) return Status::error("vocabulary size must be positive");
  std::vector<int32_t> cycle;
  if (tokenize) {
    KS_ASSIGN_OR_RETURN(cycle, tokenize(text));
    for (int32_t id : cycle) {
      if (id < 0 || id >= vocab_size) {
        return Status::error("prompt token id " + std::to_string(id) +
                             " is outside the model's vocabulary of " + std::to_string(vocab_size));
      }
    }
  } else {
    for (const std::string& piece : split_pieces(text))
      cycle.push_back(piece_id(piece, vocab_size));
  }
  if (cycle.empty() && n_tokens > 0) return Status::error("the prompt text has no tokens");
  std::vector<int32_t> ids;
  ids.reserve(size_t(n_tokens));
  while (int64_t(ids.size()) < n_tokens) {
    const size_t take =
        size_t(std::min<int64_t>(n_tokens - int64_t(ids.size()), int64_t(cycle.size())));
    ids.insert(ids.end(), cycle.begin(), cycle.begin() + std::ptrdiff_t(take));
  }
  return ids;
}

Result<std::string> load_prompt_text(const std::string& path) {
  if (path.empty()) {
    return Status::error(
        "bench/prompt.txt was not found next to the binary's source tree or in "
        "the working directory; give it with --prompt-file FILE");
  }
  Result<std::string> text = read_text_file(path);
  if (!text.is_ok()) return text.status().with_context("--prompt-file");
  return text;
}

std::string default_prompt_path(const std::string& executable) {
  namespace fs = std::filesystem;
  std::error_code ec;
  std::vector<fs::path> candidates;
  if (!executable.empty()) {
    const fs::path dir = fs::weakly_canonical(fs::path(executable), ec).parent_path();
    candidates.push_back(dir.parent_path() / "bench" / "prompt.txt");
    candidates.push_back(dir / "bench" / "prompt.txt");
  }
  candidates.push_back(fs::path("bench") / "prompt.txt");
  for (const fs::path& candidate : candidates) {
    if (fs::is_regular_file(candidate, ec)) return candidate.string();
  }
  return "";
}

}  // namespace kestrel::bench
