// The weights of one Llama/Qwen2-family model in Kestrel's canonical names, in one format.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/blob.h"
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

// One row of the HF name table: canonical name <-> Hugging Face tensor name.
// "blk.{i}.wq" <-> "model.layers.{i}.self_attn.q_proj.weight", and so on.
std::string hf_tensor_name(const std::string& canonical);

}  // namespace kestrel
