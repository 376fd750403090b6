// The tensor list (model/weights.h) and the forward pass's scratch list (backend/workspace.h):
// what the builders ask for, names, bias rules, and the sizes computed from the lists.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <set>
#include <string>

#include "backend/backend.h"
#include "model/loader.h"
#include "model/weights.h"

namespace kestrel {
namespace {

// What build_weights() asks its maker for: name -> shape.
std::map<std::string, std::vector<int64_t>> requested_tensors(const ModelConfig& c) {
  std::map<std::string, std::vector<int64_t>> asked;
  TensorMaker maker;
  maker.matrix = [&](const TensorInfo& t) -> Result<QuantWeight> {
    EXPECT_TRUE(asked.emplace(t.name, std::vector<int64_t>{t.rows, t.cols}).second) << t.name;
    return QuantWeight();
  };
  maker.vector = [&](const TensorInfo& t) -> Result<Blob> {
    EXPECT_TRUE(asked.emplace(t.name, std::vector<int64_t>{t.rows}).second) << t.name;
    EXPECT_EQ(t.cols, 0) << t.name;
    return Blob();
  };
  auto built = build_weights(c, WeightFormat::fp32, 0, maker);
  EXPECT_TRUE(built.is_ok()) << built.status().message();
  return asked;
}

TEST(TensorList, QwenHasQkvBiasesAndATiedHead) {
  auto c = synthetic_config("tiny-qwen2");
  ASSERT_TRUE(c.is_ok());
  const auto asked = requested_tensors(*c);
  // Embedding, final norm; per layer 2 norms, 7 matrices and the q/k/v biases; the tied lm_head
  // builds nothing.
  EXPECT_EQ(asked.size(), size_t(2 + c->n_layers * (2 + 7 + 3)));
  EXPECT_EQ(asked.count("output"), 0u);
  EXPECT_EQ(asked.at("blk.1.wk.bias"), std::vector<int64_t>{c->kv_dim()});
  EXPECT_EQ(asked.count("blk.0.wo.bias"), 0u);
  EXPECT_EQ(asked.at("blk.0.w_down"), (std::vector<int64_t>{c->hidden_size, c->intermediate_size}));
  EXPECT_EQ(asked.at("tok_embd"), (std::vector<int64_t>{c->vocab_size, c->hidden_size}));
}

// The 70B preset (tensor parallelism's model that does not fit one GPU) has Llama-3.1-70B's
// shapes: its parameters add up to the published 70,553,706,496.
TEST(TensorList, Llama70bPresetHasTheRealParameterCount) {
  auto c = synthetic_config("llama3.1-70b");
  ASSERT_TRUE(c.is_ok());
  int64_t params = 0;
  for (const auto& [name, shape] : requested_tensors(*c)) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    params += n;
  }
  EXPECT_EQ(params, int64_t(70553706496));
  EXPECT_EQ(c->head_dim, 128);
}

TEST(TensorList, LlamaBiasFollowsAttentionBias) {
  auto c = synthetic_config("tiny-llama");
  ASSERT_TRUE(c.is_ok());
  auto asked = requested_tensors(*c);
  EXPECT_EQ(asked.size(), size_t(3 + c->n_layers * (2 + 7)));  // untied: its own lm_head
  EXPECT_EQ(asked.count("blk.0.wq.bias"), 0u);
  EXPECT_EQ(asked.count("output"), 1u);
  c->attention_bias = true;  // HF's LlamaAttention: o_proj gets one too
  asked = requested_tensors(*c);
  for (const char* name : {"wq", "wk", "wv", "wo"}) {
    EXPECT_EQ(asked.count(std::string("blk.1.") + name + ".bias"), 1u) << name;
  }
  EXPECT_EQ(asked.count("blk.1.w_up.bias"), 0u);
}

TEST(TensorList, NamesAreUniqueAndHfNamesFollowTransformers) {
  auto c = synthetic_config("tiny-llama");
  ASSERT_TRUE(c.is_ok());
  c->attention_bias = true;
  const ModelWeights skeleton = weights_skeleton(*c);
  std::set<std::string> names, hf_names;
  int64_t matrices = 0;
  ASSERT_TRUE(for_each_tensor(skeleton, [&](const TensorInfo& t, const auto&) -> Status {
                EXPECT_TRUE(names.insert(t.name).second) << t.name;
                EXPECT_TRUE(hf_names.insert(t.hf_name).second) << t.hf_name;
                if (t.bias) {
                  EXPECT_TRUE(hf_names.insert(t.bias_info().hf_name).second);
                }
                if (t.is_matrix()) ++matrices;
                return Status::ok();
              }).is_ok());
  EXPECT_EQ(matrices, 2 + 7 * c->n_layers);
  EXPECT_EQ(hf_names.count("model.embed_tokens.weight"), 1u);
  EXPECT_EQ(hf_names.count("model.layers.1.self_attn.o_proj.bias"), 1u);
  EXPECT_EQ(hf_names.count("model.layers.0.post_attention_layernorm.weight"), 1u);
  EXPECT_EQ(hf_names.count("model.norm.weight"), 1u);
  EXPECT_EQ(hf_names.count("lm_head.weight"), 1u);
  // The walk stops at the first error and returns it.
  int visited = 0;
  const Status stopped = for_each_tensor(skeleton, [&](const TensorInfo&, const auto&) -> Status {
    return ++visited == 3 ? Status::error("third") : Status::ok();
  });
  EXPECT_EQ(stopped.message(), "third");
  EXPECT_EQ(visited, 3);
}

TEST(TensorList, MatrixElementsCountTheList) {
  auto c = synthetic_config("tiny-llama");
  ASSERT_TRUE(c.is_ok());
  const int64_t layer = 2 * c->q_dim() * c->hidden_size + 2 * c->kv_dim() * c->hidden_size +
                        3 * c->intermediate_size * c->hidden_size;
  EXPECT_EQ(matrix_elements(*c, false), c->n_layers * layer);
  EXPECT_EQ(matrix_elements(*c, true), c->n_layers * layer + 2 * c->vocab_size * c->hidden_size);
  c->tie_word_embeddings = true;
  EXPECT_EQ(matrix_elements(*c, true), c->n_layers * layer + c->vocab_size * c->hidden_size);
}

TEST(ForwardScratch, WorkspaceCoversEveryScratchTensor) {
  auto c = synthetic_config("tiny-qwen2");
  ASSERT_TRUE(c.is_ok());
  namespace fs = forward_scratch;
  int64_t per_token = 0, widest = 0;
  for (int i = 0; i < fs::kTokenTensors; ++i) {
    const int64_t w = fs::width(*c, fs::Token(i));
    EXPECT_GT(w, 0) << i;
    per_token += w;
    widest = std::max(widest, w);
  }
  EXPECT_EQ(per_token,
            3 * c->hidden_size + 2 * c->q_dim() + 2 * c->kv_dim() + 2 * c->intermediate_size);
  EXPECT_EQ(fs::width(*c, fs::logits), c->vocab_size);
  const RunShape shape{2, 64, 10, 3};
  const WorkspaceLayout layout = workspace_layout(*c, shape, WorkspaceTypes{});
  EXPECT_EQ(layout.activation_elements, size_t(shape.max_batch_tokens * (per_token + widest)));
  EXPECT_EQ(layout.logits_elements,
            size_t(shape.max_logit_rows * (c->vocab_size + 2 * c->hidden_size)));
}

}  // namespace
}  // namespace kestrel
