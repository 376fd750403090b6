// kestrel::TextTokenizer (include/kestrel/text.h): the tokenizer and chat template without an
// Engine, as the Python AutoTokenizer uses them, on Qwen's files (scripts/setup fetches them).
#include <gtest/gtest.h>

#include <filesystem>

#include "kestrel/text.h"
#include "test_util.h"

namespace kestrel {
namespace {

const std::string kQwenDir = std::string(KESTREL_SOURCE_DIR) + "/.cache/tokenizers/qwen3/models";

TEST(TextTokenizer, EncodesDecodesAndRendersTheChatTemplate) {
  auto tok = TextTokenizer::load(kQwenDir);
  ASSERT_TRUE(tok.is_ok()) << tok.status().message();
  auto ids = (*tok)->encode("Hello world", false);
  ASSERT_TRUE(ids.is_ok());
  EXPECT_EQ(ids->size(), 2u);
  EXPECT_EQ((*tok)->decode(*ids), "Hello world");
  const int32_t im_end = (*tok)->token_to_id("<|im_end|>");
  EXPECT_EQ(im_end, 151645);
  EXPECT_TRUE((*tok)->is_special(im_end));
  EXPECT_EQ((*tok)->id_to_token(im_end), "<|im_end|>");
  EXPECT_EQ((*tok)->decode({(*ids)[0], im_end}, true), "Hello");
  EXPECT_EQ((*tok)->token_to_id("not a token"), -1);
  ASSERT_TRUE((*tok)->has_chat_template());
  auto plain = (*tok)->render_chat({{"user", "Hi"}}, true);
  auto from_json =
      (*tok)->render_chat_json(R"([{"role": "user", "content": "Hi"}])", true, R"({})");
  ASSERT_TRUE(plain.is_ok() && from_json.is_ok());
  EXPECT_EQ(*plain, *from_json);
  EXPECT_EQ(*plain, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n");
  // Template variables from JSON reach the template (Qwen3's enable_thinking).
  auto no_thinking = (*tok)->render_chat_json(R"([{"role": "user", "content": "Hi"}])", true,
                                              R"({"enable_thinking": false})");
  ASSERT_TRUE(no_thinking.is_ok());
  EXPECT_NE(*no_thinking, *plain);
}

TEST(TextTokenizer, RefusesBadJsonAndMissingTemplates) {
  auto tok = TextTokenizer::load(kQwenDir);
  ASSERT_TRUE(tok.is_ok()) << tok.status().message();
  EXPECT_FALSE((*tok)->render_chat_json("{not json", false).is_ok());
  EXPECT_FALSE((*tok)->render_chat_json(R"({"role": "user"})", false).is_ok());
  EXPECT_FALSE((*tok)->render_chat_json(R"([1, 2])", false).is_ok());
  EXPECT_FALSE((*tok)->render_chat_json("[]", false, "[1]").is_ok());
  // A tokenizer.json alone: encoding works, rendering a chat says why it cannot.
  testing::TempDir dir;
  std::filesystem::copy_file(kQwenDir + "/tokenizer.json", dir.file("tokenizer.json"));
  auto bare = TextTokenizer::load(dir.file("tokenizer.json"));
  ASSERT_TRUE(bare.is_ok()) << bare.status().message();
  EXPECT_FALSE((*bare)->has_chat_template());
  auto refused = (*bare)->render_chat({{"user", "Hi"}}, true);
  ASSERT_FALSE(refused.is_ok());
  EXPECT_NE(refused.status().message().find("tokenizer_config.json"), std::string::npos);
  EXPECT_FALSE(TextTokenizer::load(dir.file("missing")).is_ok());
}

}  // namespace
}  // namespace kestrel
