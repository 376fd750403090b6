#include "template/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "io/config.h"
#include "io/gguf.h"
#include "template/jinja_ast.h"
#include "template/jinja_interp.h"
#include "template/jinja_value.h"
#include "tokenizer/gguf_tokenizer.h"

namespace kestrel {
namespace {

// A special token as tokenizer_config.json writes it: a string, or an AddedToken object
// {"content": "...", ...}; null when unset.
std::optional<std::string> token_text(const nlohmann::ordered_json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) {
    return j["content"].get<std::string>();
  }
  return std::nullopt;
}

}  // namespace

Result<std::string> render_chat_template(const std::string& template_text,
                                         const nlohmann::ordered_json& messages,
                                         bool add_generation_prompt,
                                         const nlohmann::ordered_json& extra_context,
                                         const ChatTemplateOptions& options) {
  using jinja::Value;
  if (!messages.is_array()) return Status::error("chat template: messages must be a JSON array");
  if (!extra_context.is_null() && !extra_context.is_object()) {
    return Status::error("chat template: extra context must be a JSON object");
  }
  auto parsed = jinja::parse_template(template_text);
  if (!parsed.is_ok()) return parsed.status().with_context("chat template");

  std::vector<std::pair<std::string, Value>> context;
  bool has_tools = false, has_documents = false;
  if (extra_context.is_object()) {
    for (auto it = extra_context.begin(); it != extra_context.end(); ++it) {
      if (it.key() == "messages" || it.key() == "add_generation_prompt") continue;
      auto v = jinja::from_json(it.value(), jinja::kMaxValueDepth);
      if (!v.is_ok()) return v.status().with_context("chat template: context '" + it.key() + "'");
      has_tools = has_tools || it.key() == "tools";
      has_documents = has_documents || it.key() == "documents";
      context.emplace_back(it.key(), std::move(v).value());
    }
  }
  if (!has_tools) context.emplace_back("tools", Value::none());
  if (!has_documents) context.emplace_back("documents", Value::none());
  auto msgs = jinja::from_json(messages, jinja::kMaxValueDepth);
  if (!msgs.is_ok()) return msgs.status().with_context("chat template: messages");
  context.emplace_back("messages", std::move(msgs).value());
  context.emplace_back("add_generation_prompt", Value::boolean(add_generation_prompt));

  jinja::Limits limits;
  limits.max_iterations = options.limits.max_iterations;
  limits.max_recursion_depth = options.limits.max_recursion_depth;
  limits.max_output_bytes = options.limits.max_output_bytes;
  limits.max_work_bytes = options.limits.max_work_bytes;
  jinja::Interpreter interpreter(limits, options.now.value_or(std::time(nullptr)));
  auto out = interpreter.render(*parsed.value(), std::move(context));
  if (!out.is_ok()) return out.status().with_context("chat template");
  return out;
}

Result<ChatTemplateConfig> load_chat_template(const std::string& path, const std::string& name) {
  namespace fs = std::filesystem;
  fs::path config_path = path;
  std::optional<std::string> jinja_file_text;
  std::error_code ec;
  if (!fs::is_directory(config_path, ec) && has_gguf_magic(path)) {
    KS_ASSIGN_OR_RETURN(const GgufFile gguf, GgufFile::open(path));
    return gguf_chat_template(gguf);
  }
  // Given the tokenizer.json (as --tokenizer takes it), the template sits beside it.
  if (config_path.filename() == "tokenizer.json") config_path = config_path.parent_path();
  if (config_path.empty()) config_path = ".";
  if (fs::is_directory(config_path, ec)) {
    const fs::path jinja_path = config_path / "chat_template.jinja";
    if (fs::exists(jinja_path, ec)) {
      KS_ASSIGN_OR_RETURN(std::string text, read_text_file(jinja_path.string()));
      jinja_file_text = std::move(text);
    }
    config_path /= "tokenizer_config.json";
  }
  ChatTemplateConfig config;
  nlohmann::ordered_json j = nlohmann::ordered_json::object();
  if (!jinja_file_text || fs::exists(config_path, ec)) {
    KS_ASSIGN_OR_RETURN(std::string text, read_text_file(config_path.string()));
    j = nlohmann::ordered_json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      return Status::error(config_path.string() + ": not a JSON object");
    }
  }

  static const char* kTokenRoles[] = {"bos_token", "eos_token", "unk_token", "sep_token",
                                      "pad_token", "cls_token", "mask_token"};
  for (const char* role : kTokenRoles) {
    if (!j.contains(role)) continue;
    if (auto t = token_text(j[role])) config.special_tokens[role] = *t;
  }
  if (j.contains("additional_special_tokens") && j["additional_special_tokens"].is_array()) {
    nlohmann::ordered_json extra = nlohmann::ordered_json::array();
    for (const auto& t : j["additional_special_tokens"]) {
      if (auto s = token_text(t)) extra.push_back(*s);
    }
    config.special_tokens["additional_special_tokens"] = std::move(extra);
  }

  if (jinja_file_text) {
    config.template_text = std::move(*jinja_file_text);
    return config;
  }
  if (!j.contains("chat_template") || j["chat_template"].is_null()) {
    return Status::error(config_path.string() + ": has no chat_template");
  }
  const auto& ct = j["chat_template"];
  if (ct.is_string()) {
    if (!name.empty() && name != "default") {
      return Status::error(config_path.string() + ": has a single chat template, not one named '" +
                           name + "'");
    }
    config.template_text = ct.get<std::string>();
    return config;
  }
  if (!ct.is_array()) {
    return Status::error(config_path.string() + ": chat_template must be a string or a list");
  }
  const std::string wanted = name.empty() ? "default" : name;
  std::string available;
  for (const auto& entry : ct) {
    if (!entry.is_object() || !entry.contains("name") || !entry.contains("template") ||
        !entry["name"].is_string() || !entry["template"].is_string()) {
      return Status::error(config_path.string() +
                           ": chat_template list entries must be {\"name\", \"template\"}");
    }
    const std::string entry_name = entry["name"].get<std::string>();
    if (entry_name == wanted) {
      config.template_text = entry["template"].get<std::string>();
      return config;
    }
    available += (available.empty() ? "" : ", ") + entry_name;
  }
  return Status::error(config_path.string() + ": no chat template named '" + wanted +
                       "' (available: " + available + ")");
}

Result<std::string> render_chat_template(const ChatTemplateConfig& config,
                                         const nlohmann::ordered_json& messages,
                                         bool add_generation_prompt,
                                         const nlohmann::ordered_json& extra_context,
                                         const ChatTemplateOptions& options) {
  nlohmann::ordered_json context = config.special_tokens;
  if (extra_context.is_object()) {
    for (auto it = extra_context.begin(); it != extra_context.end(); ++it) {
      context[it.key()] = it.value();
    }
  } else if (!extra_context.is_null()) {
    return Status::error("chat template: extra context must be a JSON object");
  }
  return render_chat_template(config.template_text, messages, add_generation_prompt, context,
                              options);
}

}  // namespace kestrel
