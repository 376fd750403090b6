// OpenAI request parsing and response shapes of the server (src/server/api.h), the secret
// comparison and the Prometheus histogram, without a socket.
#include <gtest/gtest.h>

#include "server/api.h"
#include "server/metrics.h"
#include "server/server.h"

namespace kestrel::server {
namespace {

using nlohmann::json;

json chat(json extra = json::object()) {
  json body = {{"messages", {{{"role", "user"}, {"content", "hi"}}}}};
  body.update(extra);
  return body;
}

std::string chat_error(const json& body) {
  auto r = parse_chat_request(body);
  EXPECT_FALSE(r.is_ok()) << body.dump();
  return r.is_ok() ? "" : r.status().message();
}

TEST(ServerApi, ChatDefaultsFollowOpenAi) {
  auto r = parse_chat_request(chat());
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ(r->sampling.temperature, 1.0f);
  EXPECT_EQ(r->sampling.top_p, 1.0f);
  EXPECT_FALSE(r->max_tokens.has_value());
  EXPECT_FALSE(r->stream);
  EXPECT_FALSE(r->seed_given);
  EXPECT_FALSE(r->ignore_eos);
  EXPECT_EQ(r->messages, (nlohmann::ordered_json::parse(R"([{"role":"user","content":"hi"}])")));
}

TEST(ServerApi, ChatFieldsAreRead) {
  auto r = parse_chat_request(chat({{"temperature", 0},
                                    {"top_p", 0.5},
                                    {"top_k", 40},
                                    {"min_p", 0.1},
                                    {"seed", -3},
                                    {"presence_penalty", 0.5},
                                    {"frequency_penalty", -0.5},
                                    {"max_tokens", 10},
                                    {"max_completion_tokens", 7},
                                    {"stop", "END"},
                                    {"stream", true},
                                    {"stream_options", {{"include_usage", true}}},
                                    {"n", 1},
                                    {"logprobs", false},
                                    {"user", "ignored"}}));
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ(r->sampling.temperature, 0.0f);
  EXPECT_EQ(r->sampling.top_p, 0.5f);
  EXPECT_EQ(r->sampling.top_k, 40);
  EXPECT_FLOAT_EQ(r->sampling.min_p, 0.1f);
  EXPECT_EQ(r->sampling.seed, uint64_t(int64_t(-3)));
  EXPECT_TRUE(r->seed_given);
  EXPECT_EQ(r->sampling.presence_penalty, 0.5f);
  EXPECT_EQ(r->sampling.frequency_penalty, -0.5f);
  EXPECT_EQ(r->max_tokens, 7);  // max_completion_tokens wins over the deprecated max_tokens
  EXPECT_EQ(r->stop, std::vector<std::string>{"END"});
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
}

TEST(ServerApi, ChatMessagesAreNormalized) {
  auto r = parse_chat_request(json::parse(R"({"messages": [
      {"role": "developer", "content": "be brief"},
      {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
      {"role": "assistant", "content": null}]})"));
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_EQ(r->messages[0]["role"], "system");
  EXPECT_EQ(r->messages[1]["content"], "ab");
  EXPECT_EQ(r->messages[2]["content"], "");
}

TEST(ServerApi, ChatErrorsNameTheField) {
  EXPECT_NE(chat_error(json::array()).find("JSON object"), std::string::npos);
  EXPECT_NE(chat_error({{"model", "m"}}).find("messages is required"), std::string::npos);
  EXPECT_NE(chat_error({{"messages", json::array()}}).find("messages"), std::string::npos);
  EXPECT_NE(chat_error({{"messages", {{{"role", "user"}}}}}).find("messages[0].content"),
            std::string::npos);
  EXPECT_NE(chat_error({{"messages", {{{"role", 3}, {"content", "x"}}}}}).find("messages[0].role"),
            std::string::npos);
  EXPECT_NE(chat_error(json::parse(R"({"messages": [{"role": "user", "content":
                [{"type": "image_url", "image_url": {}}]}]})"))
                .find("messages[0].content[0].type"),
            std::string::npos);
  EXPECT_NE(chat_error(chat({{"temperature", "hot"}})).find("temperature"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"temperature", 3}})).find("temperature"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"top_p", 0}})).find("top_p"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"top_k", 1.5}})).find("top_k"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"max_tokens", 0}})).find("max_tokens"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"max_tokens", 18446744073709551615ull}})).find("max_tokens"),
            std::string::npos);
  EXPECT_NE(chat_error(chat({{"n", 2}})).find("n must be 1"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"ignore_eos", "yes"}})).find("ignore_eos"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"stop", {"a", 1}}})).find("stop[1]"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"stop", {"a", "b", "c", "d", "e"}}})).find("stop"),
            std::string::npos);
  EXPECT_NE(chat_error(chat({{"stop", ""}})).find("stop"), std::string::npos);
  EXPECT_NE(
      chat_error(chat({{"stream_options", {{"include_usage", true}}}})).find("stream_options"),
      std::string::npos);
  EXPECT_NE(chat_error(chat({{"stream", "yes"}})).find("stream"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"logprobs", "yes"}})).find("logprobs"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"top_logprobs", 2}})).find("top_logprobs"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"logprobs", true}, {"top_logprobs", 21}})).find("top_logprobs"),
            std::string::npos);
  EXPECT_NE(chat_error(chat({{"presence_penalty", 2.5}})).find("presence_penalty"),
            std::string::npos);
}

TEST(ServerApi, FieldsThatWouldChangeTheAnswerAreHonouredOrRefused) {
  auto r = parse_chat_request(chat({{"repetition_penalty", 1.3}, {"min_tokens", 3}}));
  ASSERT_TRUE(r.is_ok()) << r.status().message();
  EXPECT_FLOAT_EQ(r->sampling.repetition_penalty, 1.3f);
  EXPECT_EQ(r->min_tokens, 3);
  EXPECT_NE(chat_error(chat({{"repetition_penalty", 0}})).find("repetition_penalty"),
            std::string::npos);
  EXPECT_NE(chat_error(chat({{"min_tokens", 5}, {"max_tokens", 4}})).find("min_tokens"),
            std::string::npos);
  EXPECT_NE(chat_error(chat({{"logit_bias", {{"5", -100}}}})).find("logit_bias"),
            std::string::npos);
  EXPECT_NE(
      chat_error(chat({{"response_format", {{"type", "json_object"}}}})).find("response_format"),
      std::string::npos);
  EXPECT_NE(chat_error(chat({{"tools", json::array({{{"type", "function"}}})}})).find("tools"),
            std::string::npos);
  EXPECT_NE(chat_error(chat({{"tool_choice", "auto"}})).find("tool_choice"), std::string::npos);
  EXPECT_NE(chat_error(chat({{"functions", json::array({json::object()})}})).find("functions"),
            std::string::npos);
  json call = {{"role", "assistant"},
               {"content", nullptr},
               {"tool_calls", json::array({{{"id", "1"}, {"type", "function"}}})}};
  json messages = {{{"role", "user"}, {"content", "hi"}}, call};
  EXPECT_NE(chat_error({{"messages", messages}}).find("messages[1].tool_calls"), std::string::npos);
  // Their neutral values are accepted.
  EXPECT_TRUE(parse_chat_request(chat({{"logit_bias", json::object()},
                                       {"response_format", {{"type", "text"}}},
                                       {"tools", json::array()},
                                       {"tool_choice", "none"}}))
                  .is_ok());
}

TEST(ServerApi, CompletionPromptForms) {
  auto text = parse_completion_request({{"prompt", "Once"}});
  ASSERT_TRUE(text.is_ok());
  EXPECT_EQ(text->prompt_text, "Once");
  EXPECT_FALSE(text->prompt_is_ids);
  auto ids = parse_completion_request({{"prompt", {1, 2, 3}}});
  ASSERT_TRUE(ids.is_ok());
  EXPECT_TRUE(ids->prompt_is_ids);
  EXPECT_EQ(ids->prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  auto no_eos = parse_completion_request({{"prompt", "Once"}, {"ignore_eos", true}});
  ASSERT_TRUE(no_eos.is_ok());
  EXPECT_TRUE(no_eos->ignore_eos);
  auto one_of_batch = parse_completion_request({{"prompt", {"Once"}}});
  ASSERT_TRUE(one_of_batch.is_ok());
  EXPECT_EQ(one_of_batch->prompt_text, "Once");
  auto nested = parse_completion_request({{"prompt", {{4, 5}}}});
  ASSERT_TRUE(nested.is_ok());
  EXPECT_EQ(nested->prompt_ids, (std::vector<int32_t>{4, 5}));

  for (const json& bad :
       {json{{"prompt", ""}}, json{{"prompt", json::array()}}, json{{"prompt", {"a", "b"}}},
        json{{"prompt", {1, -2}}}, json{{"prompt", 5}}, json{{"prompt", "x"}, {"echo", true}},
        json{{"prompt", "x"}, {"best_of", 2}}, json::object()}) {
    EXPECT_FALSE(parse_completion_request(bad).is_ok()) << bad.dump();
  }
}

TEST(ServerApi, LogprobsAreAskedForPerEndpoint) {
  EXPECT_EQ(parse_chat_request(chat())->top_logprobs, -1);
  EXPECT_EQ(parse_chat_request(chat({{"logprobs", true}}))->top_logprobs, 0);
  EXPECT_EQ(parse_chat_request(chat({{"logprobs", true}, {"top_logprobs", 3}}))->top_logprobs, 3);
  EXPECT_EQ(parse_completion_request({{"prompt", "x"}})->top_logprobs, -1);
  EXPECT_EQ(parse_completion_request({{"prompt", "x"}, {"logprobs", 0}})->top_logprobs, 0);
  EXPECT_EQ(parse_completion_request({{"prompt", "x"}, {"logprobs", 5}})->top_logprobs, 5);
  EXPECT_FALSE(parse_completion_request({{"prompt", "x"}, {"logprobs", 6}}).is_ok());

  const std::vector<TokenLogprob> tokens = {{7, -0.5f, {{7, -0.5f}, {8, -1.5f}}},
                                            {8, -0.25f, {{8, -0.25f}, {7, -2.0f}}}};
  const TokenText text = [](int32_t id) { return id == 7 ? std::string("ab") : std::string("c"); };
  EXPECT_TRUE(logprobs_json(Endpoint::chat, tokens, text, 0, false).is_null());
  const json chat_lp = logprobs_json(Endpoint::chat, tokens, text, 0, true);
  EXPECT_EQ(chat_lp["content"][0]["token"], "ab");
  EXPECT_EQ(chat_lp["content"][0]["bytes"], json({97, 98}));
  EXPECT_EQ(chat_lp["content"][1]["logprob"], -0.25);
  EXPECT_EQ(chat_lp["content"][1]["top_logprobs"][1]["token"], "ab");
  const json comp_lp = logprobs_json(Endpoint::completion, tokens, text, 10, true);
  EXPECT_EQ(comp_lp["tokens"], json({"ab", "c"}));
  EXPECT_EQ(comp_lp["token_logprobs"], json({-0.5, -0.25}));
  EXPECT_EQ(comp_lp["text_offset"], json({10, 12}));
  EXPECT_EQ(comp_lp["top_logprobs"][0]["c"], -1.5);
}

TEST(ServerApi, ResponsesHaveOpenAiShapes) {
  ResponseHeader h{"chatcmpl-1", "m", 5};
  const Usage usage{3, 2};
  json whole = completion_response(Endpoint::chat, h, "hi", FinishReason::length, usage);
  EXPECT_EQ(whole["object"], "chat.completion");
  EXPECT_EQ(whole["choices"][0]["message"]["content"], "hi");
  EXPECT_EQ(whole["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(whole["usage"]["total_tokens"], 5);

  json first = stream_chunk(Endpoint::chat, h, true, "a", std::nullopt, true);
  EXPECT_EQ(first["object"], "chat.completion.chunk");
  EXPECT_EQ(first["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(first["choices"][0]["delta"]["content"], "a");
  EXPECT_TRUE(first["choices"][0]["finish_reason"].is_null());
  EXPECT_TRUE(first.contains("usage") && first["usage"].is_null());
  json last = stream_chunk(Endpoint::chat, h, false, "", FinishReason::stop, false);
  EXPECT_EQ(last["choices"][0]["delta"], json::object());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  EXPECT_FALSE(last.contains("usage"));
  json usage_chunk = stream_usage_chunk(Endpoint::completion, h, usage);
  EXPECT_EQ(usage_chunk["choices"], json::array());
  EXPECT_EQ(usage_chunk["object"], "text_completion");

  EXPECT_EQ(error_json(401, "x")["error"]["type"], "authentication_error");
  EXPECT_EQ(error_json(429, "x")["error"]["type"], "rate_limit_error");
  EXPECT_EQ(error_json(400, "x")["error"]["code"], 400);
  // One event is one data line whatever the text holds; bad UTF-8 is replaced, not thrown on.
  const std::string event = sse_event({{"text", "a\nb\xff"}});
  EXPECT_EQ(event.rfind("data: ", 0), 0u);
  EXPECT_EQ(event.find('\n'), event.size() - 2);
}

TEST(ServerApi, SecretsCompareExactly) {
  EXPECT_TRUE(constant_time_equal("secret", "secret"));
  EXPECT_FALSE(constant_time_equal("secret", "secreT"));
  EXPECT_FALSE(constant_time_equal("secret", "secret2"));
  EXPECT_FALSE(constant_time_equal("", "a"));
  EXPECT_TRUE(constant_time_equal("", ""));
}

TEST(ServerMetrics, HistogramIsCumulative) {
  Histogram h({0.1, 1});
  h.observe(0.05);
  h.observe(0.5);
  h.observe(5);
  std::string out;
  h.render("t", out);
  EXPECT_NE(out.find("t_bucket{le=\"0.1\"} 1\n"), std::string::npos) << out;
  EXPECT_NE(out.find("t_bucket{le=\"1\"} 2\n"), std::string::npos) << out;
  EXPECT_NE(out.find("t_bucket{le=\"+Inf\"} 3\n"), std::string::npos) << out;
  EXPECT_NE(out.find("t_count 3\n"), std::string::npos) << out;
}

}  // namespace
}  // namespace kestrel::server
