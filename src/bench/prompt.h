// Benchmark prompts of an exact token length, cut from one fixed public-domain text, so that
// every run and every engine sees the same input. bench/prompt.txt holds chapters 1-6 of Jane
// Austen's Pride and Prejudice (1813, public domain), written out for this project: about 7700
// words, 9700 stand-in tokens, enough for the 8192-token prompts of the sweep without repeating.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel::bench {

// Text -> token ids, e.g. a model's tokenizer.
using Tokenize = std::function<Result<std::vector<int32_t>>(const std::string& text)>;

// The text's pieces in order: each word with its leading spaces, each punctuation mark, each
// line break. What a byte-level BPE would split first, one token each here.
std::vector<std::string> split_pieces(const std::string& text);

// Stand-in token id of a piece: a hash of its bytes below `vocab_size`. The same piece always
// maps to the same id, so repeated words repeat ids as real text does.
int32_t piece_id(const std::string& piece, int64_t vocab_size);

// Exactly `n_tokens` ids below `vocab_size`: the text's tokens from its start, read again from
// the start as often as needed. With `tokenize` the ids are the tokenizer's (ids not below
// `vocab_size` are an error); without it each piece of split_pieces() is one token (piece_id).
Result<std::vector<int32_t>> prompt_tokens(const std::string& text, int64_t n_tokens,
                                           int64_t vocab_size, const Tokenize& tokenize = {});

// Reads the prompt text; an error names the file and the flag that chooses another.
Result<std::string> load_prompt_text(const std::string& path);

// bench/prompt.txt of the source tree the binary at `executable` was built in (build/kestrel
// -> bench/prompt.txt), else of the working directory; empty when neither exists.
std::string default_prompt_path(const std::string& executable);

}  // namespace kestrel::bench
