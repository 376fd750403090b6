// Hugging Face config.json / generation_config.json for the Llama and Qwen2 families.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"

namespace kestrel {

enum class Architecture { llama, qwen2 };
const char* architecture_name(Architecture arch);  // "LlamaForCausalLM", "Qwen2ForCausalLM"

enum class RopeType { plain, llama3 };

struct RopeScaling {
  RopeType type = RopeType::plain;
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;

  bool operator==(const RopeScaling&) const = default;
};

// A pre-quantized checkpoint's `quantization_config` (AutoAWQ GEMM or AutoGPTQ layout, 4-bit).
enum class PrequantMethod { none, awq, gptq };

struct PrequantConfig {
  PrequantMethod method = PrequantMethod::none;
  int64_t group_size = 0;  // 32, 64 or 128 input columns share one scale and zero
  bool sym = false;        // GPTQ `sym`: every zero is 8, so the weights are sym_int4
  // GPTQ `checkpoint_format` "gptq" (v1, the default): qzeros hold zero - 1, as AutoGPTQ writes
  // them; "gptq_v2" holds the zero itself. AWQ always holds the zero itself.
  bool zeros_minus_one = false;

  bool operator==(const PrequantConfig&) const = default;
};
const char* prequant_method_name(PrequantMethod method);  // "awq", "gptq", "none"

struct ModelConfig {
  Architecture arch = Architecture::llama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t n_layers = 0;
  int64_t n_heads = 0;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;  // config "head_dim", else hidden_size / n_heads
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  // q/k/v projections carry a bias (always for Qwen2); a Llama with attention_bias has an o_proj
  // bias too, as in HF's LlamaAttention.
  bool attention_bias = false;
  std::string torch_dtype;  // informational
  int64_t bos_token_id = -1;
  std::vector<int64_t> eos_token_ids;  // generation_config.json wins over config.json
  PrequantConfig prequant;             // method none for an unquantized checkpoint

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }

  bool operator==(const ModelConfig&) const = default;
};

// Parses config.json text; `path` names the file in errors. Rejects unknown architectures and
// rope types, missing or non-positive sizes, heads that do not divide, and wrong JSON types,
// naming the field.
Result<ModelConfig> parse_model_config(const std::string& text, const std::string& path);

// Applies generation_config.json text (eos_token_id as int or list, bos_token_id).
Status apply_generation_config(ModelConfig& config, const std::string& text,
                               const std::string& path);

// Reads DIR/config.json and, when present, DIR/generation_config.json.
Result<ModelConfig> load_model_config(const std::string& dir);

// config.json text describing `config` (written next to converted models).
std::string model_config_to_json(const ModelConfig& config);

// Text files Kestrel reads (configs, tokenizer.json, templates, YAML) are far below this.
constexpr size_t kMaxTextFileBytes = 64u * 1024 * 1024;

// The whole of a regular file of at most `max_bytes`. FIFOs, devices and directories are refused
// without blocking on them, and so is text holding a NUL byte.
Result<std::string> read_text_file(const std::string& path, size_t max_bytes = kMaxTextFileBytes);

}  // namespace kestrel
