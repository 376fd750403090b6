// The weights of one Llama/Qwen2-family model in Kestrel's canonical names, in one format.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/blob.h"
#include "core/status.h"
#include "io/config.h"
#include "quant/format.h"

namespace kestrel {

// y = x · wᵀ + bias. `bias` is fp32 [w.rows] or empty.
struct Linear {
  QuantWeight w;
  Blob bias;
  int backend_slot = -1;  // set by a backend that keeps its own copy (see Backend::upload)
};

// An fp32 vector (norm weights).
struct Vector {
  Blob data;  // fp32 [n]
  int64_t n = 0;
  int backend_slot = -1;
  const float* f32() const { return data.as<float>(); }
};

struct LayerWeights {
  Vector attn_norm;       // [hidden]
  Linear wq, wk, wv, wo;  // [q_dim, hidden], [kv_dim, hidden] x2, [hidden, q_dim]
  Vector ffn_norm;        // [hidden]
  Linear w_gate, w_up;    // [intermediate, hidden]
  Linear w_down;          // [hidden, intermediate]
};

struct ModelWeights {
  ModelConfig config;
  WeightFormat format = WeightFormat::sym_int4;
  int block = 32;
  QuantWeight tok_embd;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  Vector output_norm;  // [hidden]
  Linear output;       // [vocab, hidden]; shares tok_embd's storage when embeddings are tied
  // What the loader noticed and went past (tensors the config does not use), for the user.
  std::vector<std::string> warnings;
  // What the loader did that the user may want to know (a GGUF file's types and what became of
  // them), printed once at load.
  std::vector<std::string> notes;

  // Bytes of weights streamed by one decode step (every linear once, plus one embedding row).
  size_t decode_bytes() const;
  // Bytes held in memory (tied embeddings counted once).
  size_t resident_bytes() const;
};

// ---------------------------------------------------------------------------------------------
// The one list of a model's tensors. for_each_tensor() below names every tensor, its shape under
// the config and its bias rule; the loaders (HF, converted, synthetic), the converted-file
// writer, the memory planner, the device uploads and the tests all walk it, so adding a tensor
// is one line there plus the math that uses it (docs/ARCHITECTURE.md, "The tensor list").

// One tensor as the config shapes it.
struct TensorInfo {
  std::string name;     // canonical: "tok_embd", "blk.3.wq", "output_norm", "output"
  std::string hf_name;  // its Hugging Face name ("model.layers.3.self_attn.q_proj.weight")
  int64_t layer = -1;   // the layer it belongs to; -1 for the embedding, final norm and lm_head
  int64_t rows = 0;     // matrices are [rows, cols]; vectors are [rows] with cols 0
  int64_t cols = 0;
  bool bias = false;    // a linear whose config asks for an fp32 bias [rows] (bias_info())
  bool lookup = false;  // the embedding table: a decode step reads one row of it
  bool tied = false;    // the lm_head sharing tok_embd's storage: nothing of its own to build

  bool is_matrix() const { return cols > 0; }
  // The bias vector of a linear: "blk.3.wq.bias", "model.layers.3.self_attn.q_proj.bias".
  TensorInfo bias_info() const;
};

namespace weights_detail {
TensorInfo tensor_info(const std::string& name, const std::string& hf_name, int64_t layer,
                       int64_t rows, int64_t cols, bool bias);
}  // namespace weights_detail

// Calls `f(info, member)` for every tensor of `w` (a ModelWeights, const or not) in build order,
// where member is the QuantWeight of the embedding, a Linear or a Vector; f returns Status and
// the walk stops at the first error. Shapes and bias rules come from w.config; w.layers must
// hold config.n_layers entries.
template <typename Weights, typename F>
Status for_each_tensor(Weights& w, F&& f) {
  using weights_detail::tensor_info;
  const ModelConfig& c = w.config;
  TensorInfo embd =
      tensor_info("tok_embd", "model.embed_tokens", -1, c.vocab_size, c.hidden_size, false);
  embd.lookup = true;
  KS_RETURN_IF_ERROR(f(embd, w.tok_embd));
  // Qwen2 has q/k/v biases; a Llama config with attention_bias has them on o_proj too (HF's
  // LlamaAttention). Bias tensors the config does not ask for are ignored, as transformers
  // ignores them.
  const bool qkv_bias = c.attention_bias;
  const bool o_bias = c.arch == Architecture::llama && c.attention_bias;
  const int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), inter = c.intermediate_size;
  for (int64_t i = 0; i < int64_t(w.layers.size()); ++i) {
    auto& l = w.layers[size_t(i)];
    const std::string p = "blk." + std::to_string(i) + ".";
    const std::string hf = "model.layers." + std::to_string(i) + ".";
    auto info = [&](const char* name, const char* hf_name, int64_t rows, int64_t cols, bool bias) {
      return tensor_info(p + name, hf + hf_name, i, rows, cols, bias);
    };
    KS_RETURN_IF_ERROR(f(info("attn_norm", "input_layernorm", h, 0, false), l.attn_norm));
    KS_RETURN_IF_ERROR(f(info("wq", "self_attn.q_proj", q, h, qkv_bias), l.wq));
    KS_RETURN_IF_ERROR(f(info("wk", "self_attn.k_proj", kv, h, qkv_bias), l.wk));
    KS_RETURN_IF_ERROR(f(info("wv", "self_attn.v_proj", kv, h, qkv_bias), l.wv));
    KS_RETURN_IF_ERROR(f(info("wo", "self_attn.o_proj", h, q, o_bias), l.wo));
    KS_RETURN_IF_ERROR(f(info("ffn_norm", "post_attention_layernorm", h, 0, false), l.ffn_norm));
    KS_RETURN_IF_ERROR(f(info("w_gate", "mlp.gate_proj", inter, h, false), l.w_gate));
    KS_RETURN_IF_ERROR(f(info("w_up", "mlp.up_proj", inter, h, false), l.w_up));
    KS_RETURN_IF_ERROR(f(info("w_down", "mlp.down_proj", h, inter, false), l.w_down));
  }
  KS_RETURN_IF_ERROR(f(tensor_info("output_norm", "model.norm", -1, h, 0, false), w.output_norm));
  TensorInfo output = tensor_info("output", "lm_head", -1, c.vocab_size, h, false);
  output.tied = c.tie_word_embeddings;
  return f(output, w.output);
}

// What the tensors of `w` weigh, given `size(info, member)`, the bytes of one untied tensor
// (a linear's bias included): what memory holds (tied embeddings once) and what one decode step
// streams (one embedding row, every other tensor, the tied lm_head as the whole table).
struct WeightBytes {
  size_t resident = 0;
  size_t decode = 0;
};
template <typename Weights, typename Size>
WeightBytes count_weight_bytes(Weights& w, Size&& size) {
  WeightBytes total;
  size_t embedding = 0;
  (void)for_each_tensor(w, [&](const TensorInfo& t, auto& member) -> Status {
    const size_t bytes = t.tied ? embedding : size_t(size(t, member));
    if (t.lookup) {
      embedding = bytes;
      total.decode += t.rows > 0 ? bytes / size_t(t.rows) : 0;
    } else {
      total.decode += bytes;
    }
    if (!t.tied) total.resident += bytes;
    return Status::ok();
  });
  return total;
}

// The weights of a model shaped by `config` with no tensor built: the skeleton that
// for_each_tensor() walks when only the list is wanted (counting, shape checks).
ModelWeights weights_skeleton(const ModelConfig& config);

// Multiply-accumulate weights of the matrices of the layers (`with_head`: and of the embedding
// and an untied lm_head), from the tensor list.
int64_t matrix_elements(const ModelConfig& config, bool with_head);

// The producers of one model's tensors. Matrices arrive in their final format; vectors (norms
// and biases) as fp32.
struct TensorMaker {
  std::function<Result<QuantWeight>(const TensorInfo& tensor)> matrix;
  std::function<Result<Blob>(const TensorInfo& tensor)> vector;
};

// Walks the tensor list of `config`, asking `maker` for every tensor.
Result<ModelWeights> build_weights(const ModelConfig& config, WeightFormat format, int block,
                                   TensorMaker& maker);

}  // namespace kestrel
