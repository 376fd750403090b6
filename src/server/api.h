// The OpenAI API as Kestrel's server speaks it: request bodies parsed and validated into one
// GenerationRequest (every error names the field, and is the client's fault: HTTP 400), and the
// response bodies built from generated text. No HTTP and no engine here, so all of it is tested
// without a socket.
#pragma once

#include <cstdint>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "sample/sampler.h"

namespace kestrel::server {

enum class Endpoint : uint8_t { chat, completion };

struct GenerationRequest {
  Endpoint endpoint = Endpoint::chat;
  std::string model;  // as the client named it; echoed in responses
  // chat: the messages as the chat template reads them ({role, content} with text content).
  nlohmann::ordered_json messages = nlohmann::ordered_json::array();
  // completion: a text prompt, or token ids when prompt_is_ids.
  std::string prompt_text;
  std::vector<int32_t> prompt_ids;
  bool prompt_is_ids = false;
  std::optional<int64_t> max_tokens;  // unset: whatever the context leaves (within the server cap)
  int64_t min_tokens = 0;             // vLLM's extension: no end-of-sequence token before this many
  SamplingParams sampling;            // OpenAI defaults: temperature 1, top_p 1
  bool seed_given = false;
  std::vector<std::string> stop;
  bool ignore_eos = false;  // vLLM's extension: generate past end-of-sequence tokens
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  // -1: no logprobs. Else each generated token's log-probability with this many alternatives
  // (chat: logprobs true + top_logprobs 0..20; completions: logprobs 0..5).
  int top_logprobs = -1;
};

// A generated token's log-probability under the model (log-softmax of the raw logits, before
// penalties and temperature, as vLLM reports them) and the most likely alternatives.
struct TokenLogprob {
  int32_t token = 0;
  float logprob = 0;
  std::vector<std::pair<int32_t, float>> top;  // most likely first
};
using TokenText = std::function<std::string(int32_t)>;

// POST /v1/chat/completions.
Result<GenerationRequest> parse_chat_request(const nlohmann::json& body);
// POST /v1/completions.
Result<GenerationRequest> parse_completion_request(const nlohmann::json& body);

// What the server knows about a finished generation.
enum class FinishReason : uint8_t { stop, length };
const char* finish_reason_name(FinishReason reason);

struct Usage {
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
};

// The identity every response of one request repeats.
struct ResponseHeader {
  std::string id;  // "chatcmpl-..." or "cmpl-..."
  std::string model;
  int64_t created = 0;  // Unix seconds
};

nlohmann::json usage_json(const Usage& usage);
// A choice's "logprobs" object: chat {"content": [...]}, completions {"tokens",
// "token_logprobs", "top_logprobs", "text_offset"}; `text_offset` is where the first token's text
// starts in the choice's text. Null when logprobs were not asked for.
nlohmann::json logprobs_json(Endpoint endpoint, const std::vector<TokenLogprob>& tokens,
                             const TokenText& token_text, size_t text_offset, bool wanted);
// The whole non-streamed response; `logprobs` is logprobs_json's result.
nlohmann::json completion_response(Endpoint endpoint, const ResponseHeader& header,
                                   const std::string& text, FinishReason reason, const Usage& usage,
                                   const nlohmann::json& logprobs = nullptr);
// One streamed chunk: `text` as the delta; `reason` set on the last chunk of a choice. With
// include_usage every chunk carries "usage": null, as OpenAI's do.
nlohmann::json stream_chunk(Endpoint endpoint, const ResponseHeader& header, bool first,
                            const std::string& text, std::optional<FinishReason> reason,
                            bool include_usage, const nlohmann::json& logprobs = nullptr);
// The usage chunk after the last choice chunk (stream_options.include_usage): no choices.
nlohmann::json stream_usage_chunk(Endpoint endpoint, const ResponseHeader& header,
                                  const Usage& usage);

// An OpenAI error object: {"error": {"message", "type", "param", "code"}}; the type follows the
// HTTP status (invalid_request_error, authentication_error, ...).
nlohmann::json error_json(int status, const std::string& message);

// A response body's text on one line. Invalid UTF-8 (from a request, or a token budget that ended
// mid-character) is replaced with U+FFFD, never thrown on.
std::string json_text(const nlohmann::json& body);

// "data: JSON\n\n", one server-sent event.
std::string sse_event(const nlohmann::json& payload);

}  // namespace kestrel::server
