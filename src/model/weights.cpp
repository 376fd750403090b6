#include "model/weights.h"

#include <array>
#include <utility>

namespace kestrel {

size_t ModelWeights::decode_bytes() const {
  auto linear = [](const Linear& l) { return l.w.total_bytes() + l.bias.size(); };
  size_t bytes = tok_embd.total_bytes() / size_t(tok_embd.rows > 0 ? tok_embd.rows : 1);
  for (const LayerWeights& l : layers) {
    bytes += linear(l.wq) + linear(l.wk) + linear(l.wv) + linear(l.wo) + linear(l.w_gate) +
             linear(l.w_up) + linear(l.w_down) + l.attn_norm.data.size() + l.ffn_norm.data.size();
  }
  return bytes + output_norm.data.size() + linear(output);
}

size_t ModelWeights::resident_bytes() const {
  size_t bytes =
      decode_bytes() - tok_embd.total_bytes() / size_t(tok_embd.rows > 0 ? tok_embd.rows : 1);
  if (!config.tie_word_embeddings) bytes += tok_embd.total_bytes();
  return bytes;
}

std::string hf_tensor_name(const std::string& canonical) {
  static const std::array<std::pair<const char*, const char*>, 13> kLayerNames = {{
      {"attn_norm", "input_layernorm.weight"},
      {"wq", "self_attn.q_proj.weight"},
      {"wk", "self_attn.k_proj.weight"},
      {"wv", "self_attn.v_proj.weight"},
      {"wq.bias", "self_attn.q_proj.bias"},
      {"wk.bias", "self_attn.k_proj.bias"},
      {"wv.bias", "self_attn.v_proj.bias"},
      {"wo", "self_attn.o_proj.weight"},
      {"wo.bias", "self_attn.o_proj.bias"},
      {"ffn_norm", "post_attention_layernorm.weight"},
      {"w_gate", "mlp.gate_proj.weight"},
      {"w_up", "mlp.up_proj.weight"},
      {"w_down", "mlp.down_proj.weight"},
  }};
  if (canonical == "tok_embd") return "model.embed_tokens.weight";
  if (canonical == "output_norm") return "model.norm.weight";
  if (canonical == "output") return "lm_head.weight";
  // "blk.{i}.{name}"
  if (canonical.rfind("blk.", 0) == 0) {
    const size_t dot = canonical.find('.', 4);
    if (dot != std::string::npos) {
      const std::string layer = canonical.substr(4, dot - 4);
      const std::string name = canonical.substr(dot + 1);
      for (const auto& [ours, theirs] : kLayerNames) {
        if (name == ours) return "model.layers." + layer + "." + theirs;
      }
    }
  }
  return "";
}

}  // namespace kestrel
