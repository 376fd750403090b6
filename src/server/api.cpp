#include "server/api.h"
#include "server/server.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/quote.h"

namespace kestrel::server {

namespace {

using nlohmann::json;

// A field given as JSON null counts as absent, as the OpenAI API treats it.
const json* field(const json& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

Status read_number(const json& body, const char* name, double lo, double hi, float* out) {
  const json* v = field(body, name);
  if (v == nullptr) return Status::ok();
  if (!v->is_number()) return Status::error(std::string(name) + " must be a number");
  const double x = v->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi) {
    return Status::error(std::string(name) + " must be in [" + json(lo).dump() + ", " +
                         json(hi).dump() + "] (got " + v->dump() + ")");
  }
  *out = float(x);
  return Status::ok();
}

Status read_integer(const json& body, const char* name, int64_t lo, int64_t hi,
                    std::optional<int64_t>* out) {
  const json* v = field(body, name);
  if (v == nullptr) return Status::ok();
  if (!v->is_number_integer()) return Status::error(std::string(name) + " must be an integer");
  // Unsigned values beyond int64 arrive as number_unsigned; compare before converting.
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(hi)) {
    return Status::error(std::string(name) + " must be at most " + std::to_string(hi));
  }
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi) {
    return Status::error(std::string(name) + " must be in [" + std::to_string(lo) + ", " +
                         std::to_string(hi) + "] (got " + std::to_string(x) + ")");
  }
  *out = x;
  return Status::ok();
}

Status read_bool(const json& body, const char* name, bool* out) {
  const json* v = field(body, name);
  if (v == nullptr) return Status::ok();
  if (!v->is_boolean()) return Status::error(std::string(name) + " must be true or false");
  *out = v->get<bool>();
  return Status::ok();
}

// The fields both endpoints share: sampling, stop, max_tokens, stream, n, seed.
Status parse_common(const json& body, GenerationRequest& r) {
  if (!body.is_object()) return Status::error("the request body must be a JSON object");
  if (const json* model = field(body, "model")) {
    if (!model->is_string()) return Status::error("model must be a string");
    r.model = model->get<std::string>();
  }
  r.sampling.temperature = 1.0f;
  KS_RETURN_IF_ERROR(read_number(body, "temperature", 0, 2, &r.sampling.temperature));
  KS_RETURN_IF_ERROR(read_number(body, "top_p", 0, 1, &r.sampling.top_p));
  if (r.sampling.top_p <= 0) return Status::error("top_p must be in (0, 1] (got 0)");
  KS_RETURN_IF_ERROR(read_number(body, "min_p", 0, 1, &r.sampling.min_p));
  KS_RETURN_IF_ERROR(read_number(body, "presence_penalty", -2, 2, &r.sampling.presence_penalty));
  KS_RETURN_IF_ERROR(read_number(body, "frequency_penalty", -2, 2, &r.sampling.frequency_penalty));
  // vLLM's extension, HF's rule (the sampler's): > 0, 1 for none.
  KS_RETURN_IF_ERROR(read_number(body, "repetition_penalty", 0, std::numeric_limits<float>::max(),
                                 &r.sampling.repetition_penalty));
  std::optional<int64_t> top_k;
  // vLLM takes -1 for "off" as well as 0.
  KS_RETURN_IF_ERROR(read_integer(body, "top_k", -1, std::numeric_limits<int32_t>::max(), &top_k));
  if (top_k && *top_k > 0) r.sampling.top_k = int(*top_k);
  std::optional<int64_t> seed;
  KS_RETURN_IF_ERROR(read_integer(body, "seed", std::numeric_limits<int64_t>::min(),
                                  std::numeric_limits<int64_t>::max(), &seed));
  if (seed) {
    r.sampling.seed = uint64_t(*seed);
    r.seed_given = true;
  }

  std::optional<int64_t> max_tokens;
  KS_RETURN_IF_ERROR(
      read_integer(body, "max_tokens", 1, std::numeric_limits<int64_t>::max(), &max_tokens));
  std::optional<int64_t> max_completion_tokens;
  KS_RETURN_IF_ERROR(read_integer(body, "max_completion_tokens", 1,
                                  std::numeric_limits<int64_t>::max(), &max_completion_tokens));
  // OpenAI deprecated max_tokens for max_completion_tokens; the newer field wins.
  r.max_tokens = max_completion_tokens ? max_completion_tokens : max_tokens;
  // vLLM's extension: end-of-sequence tokens are not drawn before this many tokens.
  std::optional<int64_t> min_tokens;
  KS_RETURN_IF_ERROR(
      read_integer(body, "min_tokens", 0, std::numeric_limits<int64_t>::max(), &min_tokens));
  r.min_tokens = min_tokens.value_or(0);
  if (r.max_tokens && r.min_tokens > *r.max_tokens) {
    return Status::error("min_tokens (" + std::to_string(r.min_tokens) +
                         ") must not exceed max_tokens (" + std::to_string(*r.max_tokens) + ")");
  }
  // Fields that would change the answer and that the server does not implement are refused,
  // not dropped: an answer that ignored them would look right and be wrong.
  if (const json* bias = field(body, "logit_bias")) {
    if (!bias->is_object() || !bias->empty()) return Status::error("logit_bias is not supported");
  }
  if (const json* format = field(body, "response_format")) {
    const json* type = format->is_object() ? field(*format, "type") : nullptr;
    if (type == nullptr || *type != "text") {
      return Status::error("response_format other than {\"type\": \"text\"} is not supported");
    }
  }
  for (const char* name : {"tools", "functions"}) {
    if (const json* tools = field(body, name)) {
      if (!tools->is_array() || !tools->empty()) {
        return Status::error(std::string(name) + " (tool calling) is not supported");
      }
    }
  }
  for (const char* name : {"tool_choice", "function_call"}) {
    if (const json* choice = field(body, name)) {
      if (*choice != "none") {
        return Status::error(std::string(name) + " is not supported (tool calling)");
      }
    }
  }

  std::optional<int64_t> n;
  KS_RETURN_IF_ERROR(read_integer(body, "n", 1, std::numeric_limits<int64_t>::max(), &n));
  if (n && *n != 1) return Status::error("n must be 1 (the server generates one choice)");
  std::optional<int64_t> best_of;
  KS_RETURN_IF_ERROR(
      read_integer(body, "best_of", 1, std::numeric_limits<int64_t>::max(), &best_of));
  if (best_of && *best_of != 1) return Status::error("best_of must be 1");
  // vLLM's extension: end-of-sequence tokens are ordinary tokens (benchmarks ask for exact
  // output lengths this way).
  KS_RETURN_IF_ERROR(read_bool(body, "ignore_eos", &r.ignore_eos));

  if (const json* stop = field(body, "stop")) {
    if (stop->is_string()) {
      r.stop.push_back(stop->get<std::string>());
    } else if (stop->is_array()) {
      if (stop->size() > 4) return Status::error("stop takes at most 4 strings");
      for (size_t i = 0; i < stop->size(); ++i) {
        if (!(*stop)[i].is_string()) {
          return Status::error("stop[" + std::to_string(i) + "] must be a string");
        }
        r.stop.push_back((*stop)[i].get<std::string>());
      }
    } else {
      return Status::error("stop must be a string or a list of strings");
    }
    for (const std::string& s : r.stop) {
      if (s.empty()) return Status::error("stop strings must not be empty");
    }
  }

  KS_RETURN_IF_ERROR(read_bool(body, "stream", &r.stream));
  if (const json* options = field(body, "stream_options")) {
    if (!options->is_object()) return Status::error("stream_options must be an object");
    if (!r.stream) return Status::error("stream_options is only allowed with stream: true");
    KS_RETURN_IF_ERROR(
        read_bool(*options, "include_usage", &r.include_usage).with_context("stream_options"));
  }
  return validate_sampling_params(r.sampling);
}

// A message's content: a string, or a list of {"type": "text", "text": ...} parts joined.
Result<std::string> message_text(const json& content, const std::string& where) {
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) return Status::error(where + " must be a string or a list of parts");
  std::string text;
  for (size_t j = 0; j < content.size(); ++j) {
    const json& part = content[j];
    const std::string at = where + "[" + std::to_string(j) + "]";
    if (!part.is_object()) return Status::error(at + " must be an object");
    auto type = part.find("type");
    if (type == part.end() || !type->is_string()) {
      return Status::error(at + ".type must be a string");
    }
    if (*type != "text") {
      return Status::error(at + ".type " + quote_untrusted(type->get<std::string>()) +
                           " is not supported (only text)");
    }
    auto t = part.find("text");
    if (t == part.end() || !t->is_string()) return Status::error(at + ".text must be a string");
    text += t->get<std::string>();
  }
  return text;
}

// Token ids of a completion prompt, each a non-negative int32 (the vocabulary is checked later).
Result<std::vector<int32_t>> prompt_ids(const json& list) {
  std::vector<int32_t> ids;
  for (size_t i = 0; i < list.size(); ++i) {
    const json& v = list[i];
    if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
        v.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      return Status::error("prompt[" + std::to_string(i) + "] must be a token id");
    }
    ids.push_back(int32_t(v.get<int64_t>()));
  }
  return ids;
}

}  // namespace

Result<GenerationRequest> parse_chat_request(const nlohmann::json& body) {
  GenerationRequest r;
  r.endpoint = Endpoint::chat;
  KS_RETURN_IF_ERROR(parse_common(body, r));
  bool logprobs = false;
  KS_RETURN_IF_ERROR(read_bool(body, "logprobs", &logprobs));
  std::optional<int64_t> top;
  KS_RETURN_IF_ERROR(read_integer(body, "top_logprobs", 0, 20, &top));
  if (top && !logprobs) return Status::error("top_logprobs needs logprobs: true");
  if (logprobs) r.top_logprobs = int(top.value_or(0));
  const json* messages = field(body, "messages");
  if (messages == nullptr) return Status::error("messages is required");
  if (!messages->is_array() || messages->empty()) {
    return Status::error("messages must be a non-empty list");
  }
  for (size_t i = 0; i < messages->size(); ++i) {
    const json& m = (*messages)[i];
    const std::string at = "messages[" + std::to_string(i) + "]";
    if (!m.is_object()) return Status::error(at + " must be an object");
    auto role = m.find("role");
    if (role == m.end() || !role->is_string()) return Status::error(at + ".role must be a string");
    const std::string r_name = role->get<std::string>();
    if (r_name != "system" && r_name != "developer" && r_name != "user" && r_name != "assistant" &&
        r_name != "tool") {
      return Status::error(at + ".role " + quote_untrusted(r_name) +
                           " is not one of system, developer, user, assistant, tool");
    }
    auto content = m.find("content");
    std::string text;
    if (content != m.end() && !content->is_null()) {
      KS_ASSIGN_OR_RETURN(text, message_text(*content, at + ".content"));
    } else if (r_name != "assistant") {
      return Status::error(at + ".content is required");
    }
    // A tool call's request or result would be dropped from the conversation: refused.
    for (const char* name : {"tool_calls", "function_call"}) {
      auto calls = m.find(name);
      if (calls != m.end() && !calls->is_null() && !(calls->is_array() && calls->empty())) {
        return Status::error(at + "." + name + " is not supported (tool calling)");
      }
    }
    // Templates know "system"; OpenAI's newer "developer" role means the same.
    r.messages.push_back({{"role", r_name == "developer" ? "system" : r_name}, {"content", text}});
  }
  return r;
}

Result<GenerationRequest> parse_completion_request(const nlohmann::json& body) {
  GenerationRequest r;
  r.endpoint = Endpoint::completion;
  KS_RETURN_IF_ERROR(parse_common(body, r));
  std::optional<int64_t> logprobs;
  KS_RETURN_IF_ERROR(read_integer(body, "logprobs", 0, 5, &logprobs));
  if (logprobs) r.top_logprobs = int(*logprobs);
  const json* prompt = field(body, "prompt");
  if (prompt == nullptr) return Status::error("prompt is required");
  // OpenAI takes a batch of prompts; a list holding one prompt is that prompt.
  const json* one = prompt;
  if (prompt->is_array() && prompt->size() == 1 &&
      ((*prompt)[0].is_string() || (*prompt)[0].is_array())) {
    one = &(*prompt)[0];
  }
  if (one->is_string()) {
    r.prompt_text = one->get<std::string>();
    if (r.prompt_text.empty()) return Status::error("prompt must not be empty");
  } else if (one->is_array()) {
    if (!one->empty() && ((*one)[0].is_string() || (*one)[0].is_array())) {
      return Status::error("prompt: a batch of several prompts is not supported (send one)");
    }
    KS_ASSIGN_OR_RETURN(r.prompt_ids, prompt_ids(*one));
    if (r.prompt_ids.empty()) return Status::error("prompt must not be empty");
    r.prompt_is_ids = true;
  } else {
    return Status::error("prompt must be a string or a list of token ids");
  }
  if (const json* echo = field(body, "echo")) {
    if (!echo->is_boolean() || echo->get<bool>()) return Status::error("echo is not supported");
  }
  if (const json* suffix = field(body, "suffix")) {
    if (!suffix->is_string() || !suffix->get<std::string>().empty()) {
      return Status::error("suffix is not supported");
    }
  }
  return r;
}

const char* finish_reason_name(FinishReason reason) {
  return reason == FinishReason::stop ? "stop" : "length";
}

nlohmann::json usage_json(const Usage& usage) {
  return {{"prompt_tokens", usage.prompt_tokens},
          {"completion_tokens", usage.completion_tokens},
          {"total_tokens", usage.prompt_tokens + usage.completion_tokens}};
}

namespace {
json base_object(Endpoint endpoint, const ResponseHeader& header, bool chunk) {
  const char* object = endpoint == Endpoint::chat
                           ? (chunk ? "chat.completion.chunk" : "chat.completion")
                           : "text_completion";
  return {{"id", header.id},
          {"object", object},
          {"created", header.created},
          {"model", header.model},
          {"system_fingerprint", nullptr}};
}
}  // namespace

namespace {
json utf8_bytes(const std::string& text) {
  json bytes = json::array();
  for (unsigned char c : text) bytes.push_back(int(c));
  return bytes;
}
}  // namespace

nlohmann::json logprobs_json(Endpoint endpoint, const std::vector<TokenLogprob>& tokens,
                             const TokenText& token_text, size_t text_offset, bool wanted) {
  if (!wanted) return nullptr;
  if (endpoint == Endpoint::chat) {
    json content = json::array();
    for (const TokenLogprob& t : tokens) {
      const std::string text = token_text(t.token);
      json top = json::array();
      for (const auto& [id, lp] : t.top) {
        const std::string alt = token_text(id);
        top.push_back({{"token", alt}, {"logprob", lp}, {"bytes", utf8_bytes(alt)}});
      }
      content.push_back({{"token", text},
                         {"logprob", t.logprob},
                         {"bytes", utf8_bytes(text)},
                         {"top_logprobs", top}});
    }
    return {{"content", content}};
  }
  json out = {{"tokens", json::array()},
              {"token_logprobs", json::array()},
              {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
  for (const TokenLogprob& t : tokens) {
    const std::string text = token_text(t.token);
    json top = json::object();
    for (const auto& [id, lp] : t.top) top[token_text(id)] = lp;
    out["tokens"].push_back(text);
    out["token_logprobs"].push_back(t.logprob);
    out["top_logprobs"].push_back(top);
    out["text_offset"].push_back(text_offset);
    text_offset += text.size();
  }
  return out;
}

nlohmann::json completion_response(Endpoint endpoint, const ResponseHeader& header,
                                   const std::string& text, FinishReason reason, const Usage& usage,
                                   const nlohmann::json& logprobs) {
  json out = base_object(endpoint, header, false);
  json choice = {
      {"index", 0}, {"logprobs", logprobs}, {"finish_reason", finish_reason_name(reason)}};
  if (endpoint == Endpoint::chat) {
    choice["message"] = {{"role", "assistant"}, {"content", text}};
  } else {
    choice["text"] = text;
  }
  out["choices"] = json::array({choice});
  out["usage"] = usage_json(usage);
  return out;
}

nlohmann::json stream_chunk(Endpoint endpoint, const ResponseHeader& header, bool first,
                            const std::string& text, std::optional<FinishReason> reason,
                            bool include_usage, const nlohmann::json& logprobs) {
  json out = base_object(endpoint, header, true);
  json choice = {{"index", 0}, {"logprobs", logprobs}};
  choice["finish_reason"] = reason ? json(finish_reason_name(*reason)) : json(nullptr);
  if (endpoint == Endpoint::chat) {
    json delta = json::object();
    // The first chunk names the role, as OpenAI's stream does; the last carries no text.
    if (first) delta["role"] = "assistant";
    if (!text.empty() || (first && !reason)) delta["content"] = text;
    choice["delta"] = delta;
  } else {
    choice["text"] = text;
  }
  out["choices"] = json::array({choice});
  if (include_usage) out["usage"] = nullptr;
  return out;
}

nlohmann::json stream_usage_chunk(Endpoint endpoint, const ResponseHeader& header,
                                  const Usage& usage) {
  json out = base_object(endpoint, header, true);
  out["choices"] = json::array();
  out["usage"] = usage_json(usage);
  return out;
}

nlohmann::json error_json(int status, const std::string& message) {
  const char* type = "invalid_request_error";
  if (status == 401) type = "authentication_error";
  if (status == 404) type = "not_found_error";
  if (status == 429) type = "rate_limit_error";
  if (status >= 500) type = "server_error";
  return {{"error", {{"message", message}, {"type", type}, {"param", nullptr}, {"code", status}}}};
}

std::string json_text(const nlohmann::json& body) {
  return body.dump(-1, ' ', false, json::error_handler_t::replace);
}

std::string sse_event(const nlohmann::json& payload) {
  // dump() escapes newlines inside strings, so the event is one data line.
  return "data: " + json_text(payload) + "\n\n";
}

// Defined here, not in server.cpp, so that builds without cpp-httplib (which leave server.cpp
// out) still link the unit tests of it.
bool constant_time_equal(const std::string& a, const std::string& b) {
  // Every byte of the longer string is visited whatever the contents.
  const size_t n = std::max(a.size(), b.size());
  unsigned char diff = a.size() == b.size() ? 0 : 1;
  for (size_t i = 0; i < n; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff |= static_cast<unsigned char>(x ^ y);
  }
  return diff == 0;
}

}  // namespace kestrel::server
