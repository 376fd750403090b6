// Byte-level BPE tokenizer loaded from a Hugging Face tokenizer.json, giving the same ids as HF
// `tokenizers` (Llama 3.x and Qwen2/Qwen3 files; see docs/TOKENIZER.md for what is supported).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "core/status.h"

namespace kestrel {

class Tokenizer {
 public:
  // `path` is a tokenizer.json file, or a directory holding tokenizer.json (or
  // models/tokenizer.json, the layout of the npm tokenizer packages).
  static Result<Tokenizer> load(const std::string& path);
  // Parses the contents of a tokenizer.json; `origin` names it in error messages.
  static Result<Tokenizer> from_json(std::string_view json_text,
                                     const std::string& origin = "tokenizer.json");

  // Text to ids as HF's Tokenizer.encode(text, add_special_tokens). With add_special_tokens the
  // post-processor's tokens are added (Llama 3: <|begin_of_text|> first; Qwen: nothing). Text
  // that is not valid UTF-8 is rejected with the offset of the first bad byte: HF only accepts
  // Python str, which cannot hold such bytes.
  Result<std::vector<int32_t>> encode(std::string_view text, bool add_special_tokens) const;
  // Appends to `ids` instead of returning a new vector.
  Status encode_into(std::string_view text, bool add_special_tokens,
                     std::vector<int32_t>& ids) const;

  // Ids to text as HF's Tokenizer.decode: unknown ids are dropped, bytes that do not form valid
  // UTF-8 become U+FFFD. With skip_special_tokens, tokens marked special are left out.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  // Id of a token given as HF shows it (byte-level form for model tokens, "Ġthe"), or -1.
  int32_t token_to_id(std::string_view token) const;
  // The token string of `id` (byte-level form for model tokens), or "" when there is none.
  std::string id_to_token(int32_t id) const;
  // Number of distinct tokens, added tokens included (HF's get_vocab_size(True)).
  size_t vocab_size() const;
  // Whether `id` is an added token marked special (what skip_special_tokens leaves out).
  bool is_special(int32_t id) const;

 private:
  friend class StreamDecoder;
  friend class StreamEncoder;
  struct Impl;
  explicit Tokenizer(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// Encodes text that arrives in pieces (standard input), giving exactly the ids of encoding the
// whole text at once. For the supported tokenizers (Llama 3.x, Qwen2/Qwen3) text is encoded up
// to each line break that a printable character follows, a boundary of their pre-tokenizers, so
// memory holds one stretch between such breaks; a tokenizer without that property holds the
// whole text until finish(). Either way what is held is bounded by `max_pending_bytes`.
class StreamEncoder {
 public:
  StreamEncoder(const Tokenizer& tokenizer, bool add_special_tokens, size_t max_pending_bytes);
  // Takes the next bytes and appends the ids of the text that is complete now; fails when the
  // text held back passes the limit, or when the input is not valid UTF-8 (with its offset).
  Status feed(std::string_view bytes, std::vector<int32_t>& ids);
  // The ids of what is held back, then the post-processor's closing tokens.
  Status finish(std::vector<int32_t>& ids);
  // Whether this tokenizer's text is encoded line by line (else whole, at finish()).
  bool splits_lines() const;

 private:
  Status encode_piece(std::string_view piece, std::vector<int32_t>& ids);

  Tokenizer tokenizer_;
  bool add_special_tokens_;
  size_t max_pending_bytes_;
  std::string pending_;
  size_t consumed_ = 0;  // bytes encoded so far (error offsets count from the input's start)
  bool started_ = false;
};

// Incremental decoding for streaming output: feed ids one at a time and get back the text they
// complete. Bytes of a UTF-8 character split across tokens are held back until the character is
// complete, so the concatenation of all feed() results and finish() equals
// Tokenizer::decode(all ids) exactly. Shares the tokenizer's data, so it may outlive the
// Tokenizer object it was made from.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false);

  // Returns the newly completed text (possibly empty).
  std::string feed(int32_t id);
  // Flushes held-back bytes (an unfinished character becomes U+FFFD) and resets the decoder.
  std::string finish();

 private:
  std::shared_ptr<const Tokenizer::Impl> impl_;
  bool skip_special_tokens_;
  bool first_token_ = true;
  std::string pending_;  // bytes of an unfinished UTF-8 character (at most 3)
};

}  // namespace kestrel
