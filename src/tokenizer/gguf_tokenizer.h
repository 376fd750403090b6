// The tokenizer and chat template stored in a GGUF file (tokenizer.ggml.*, tokenizer.chat_template)
// in the form the tokenizer.json / tokenizer_config.json paths read, so a GGUF model tokenizes
// exactly as its Hugging Face tokenizer does.
//
// Supported: tokenizer.ggml.model "gpt2" (byte-level BPE) with tokenizer.ggml.pre "llama-bpe"
// (Llama 3.x) or "qwen2" (Qwen2, Qwen2.5, Qwen3): the pre-tokenizer regex, normalizer and
// ignore_merges rule of those families' tokenizer.json. Tokens of type normal form the BPE
// vocabulary; control tokens become special added tokens and user-defined ones non-special
// added tokens (llama.cpp's converter writes them so); unused padding entries are left out.
#pragma once

#include <string>

#include "core/status.h"
#include "io/gguf.h"
#include "template/chat_template.h"

namespace kestrel {

// Whether `path` is a GGUF file that carries a tokenizer (tokenizer.ggml.model).
bool gguf_has_tokenizer(const std::string& path);

// tokenizer.json text equivalent to the file's tokenizer metadata.
Result<std::string> gguf_tokenizer_json(const GgufFile& file);

// tokenizer.chat_template with the bos/eos token strings transformers would pass it.
Result<ChatTemplateConfig> gguf_chat_template(const GgufFile& file);

}  // namespace kestrel
