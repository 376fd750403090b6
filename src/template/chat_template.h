// Chat templates: renders a Hugging Face `chat_template` (a Jinja template) exactly as
// transformers' apply_chat_template(tokenize=False) does, with a small sandboxed interpreter for
// the Jinja subset chat templates use.
//
// The interpreter reproduces transformers' environment: Jinja's ImmutableSandboxedEnvironment
// with trim_blocks=True, lstrip_blocks=True and the loopcontrols extension ({% break %},
// {% continue %}), a `tojson` filter that is json.dumps(x, ensure_ascii=False, indent=...,
// separators=..., sort_keys=...), and the globals raise_exception(msg) and strftime_now(fmt).
// Templates are untrusted input: they cannot read files or the environment, can only read dict
// keys, namespace attributes and non-mutating str/dict/list methods, and every render is bounded
// in loop iterations, macro recursion, output size and work; exceeding a bound, an unsupported
// construct, or a malformed template is an error naming the line, never a crash. (At the deepest
// nesting the limits allow, a render needs about 2 MB of stack.)
//
// Messages and context are JSON. Pass nlohmann::ordered_json to keep object keys in their
// original order (Python dicts keep insertion order, and `tojson` prints keys in that order);
// a nlohmann::json argument converts implicitly but its keys are already sorted.
#pragma once

#include <cstdint>
#include <ctime>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>

#include "core/status.h"

namespace kestrel {

struct ChatTemplateLimits {
  uint64_t max_iterations = 1'000'000;  // for-loop iterations plus macro calls, per render
  int max_recursion_depth = 200;        // nested macro calls
  size_t max_output_bytes = 16u << 20;  // rendered text; also the largest string a template builds
  uint64_t max_work_bytes = 1u << 30;   // bytes produced by string/list operations, per render
};

struct ChatTemplateOptions {
  ChatTemplateLimits limits;
  // The time strftime_now() formats (as local time); unset means the current time.
  std::optional<std::time_t> now;
};

// Renders `template_text` with `messages` (a JSON array of {"role", "content", ...} objects) and
// `add_generation_prompt`. `extra_context` (a JSON object or null) adds top-level variables:
// bos_token, eos_token, tools, documents, enable_thinking, date_string, ... As transformers does,
// `tools` and `documents` are defined (as none) when not given.
Result<std::string> render_chat_template(
    const std::string& template_text, const nlohmann::ordered_json& messages,
    bool add_generation_prompt,
    const nlohmann::ordered_json& extra_context = nlohmann::ordered_json::object(),
    const ChatTemplateOptions& options = {});

// A model's chat template and the special tokens transformers passes to it.
struct ChatTemplateConfig {
  std::string template_text;
  // The tokenizer's special tokens by role (bos_token, eos_token, unk_token, pad_token, ...,
  // additional_special_tokens), as strings; the roles that are unset are absent.
  nlohmann::ordered_json special_tokens = nlohmann::ordered_json::object();
};

// Loads the chat template from a tokenizer_config.json file, or from a model directory (its
// chat_template.jinja when present, as transformers prefers, else its tokenizer_config.json).
// `chat_template` may be a string or a list of {"name", "template"}; `name` picks one from a list
// ("default" when empty). Special tokens may be strings or {"content": ...} objects.
Result<ChatTemplateConfig> load_chat_template(const std::string& path,
                                              const std::string& name = "");

// Renders with the config's special tokens in the context, as apply_chat_template does;
// `extra_context` entries override them.
Result<std::string> render_chat_template(
    const ChatTemplateConfig& config, const nlohmann::ordered_json& messages,
    bool add_generation_prompt,
    const nlohmann::ordered_json& extra_context = nlohmann::ordered_json::object(),
    const ChatTemplateOptions& options = {});

}  // namespace kestrel
