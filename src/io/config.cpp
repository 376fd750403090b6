#include "io/config.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string_view>

#include <nlohmann/json.hpp>

#include "core/quote.h"

namespace kestrel {
namespace {

using nlohmann::json;

// Upper bounds well above every released model of these families; they keep a corrupt or
// hostile config from overflowing the size arithmetic done later with these numbers.
constexpr int64_t kMaxVocab = int64_t(1) << 22;
constexpr int64_t kMaxHidden = int64_t(1) << 18;
constexpr int64_t kMaxIntermediate = int64_t(1) << 20;
constexpr int64_t kMaxLayers = 1024;
constexpr int64_t kMaxHeads = 4096;
constexpr int64_t kMaxHeadDim = 4096;
constexpr int64_t kMaxPositions = int64_t(1) << 30;

Result<json> parse_json_object(const std::string& text, const std::string& path) {
  json root;
  try {
    root = json::parse(text);
  } catch (const json::parse_error& e) {
    return Status::error(path + ": not valid JSON (error at byte " + std::to_string(e.byte) + ")");
  } catch (const std::exception& e) {
    return Status::error(path + ": not valid JSON (" + e.what() + ")");
  }
  if (!root.is_object()) return Status::error(path + ": not a JSON object");
  return root;
}

// Typed access to the members of one JSON object; errors name the file and the field (with the
// enclosing object as a prefix, e.g. 'rope_scaling.factor'). An absent field and a null field
// are the same: HF writes null for "use the default".
class Fields {
 public:
  Fields(const json& object, const std::string& path, std::string prefix = "")
      : object_(object), path_(path), prefix_(std::move(prefix)) {}

  const json* find(const char* name) const {
    const auto it = object_.find(name);
    if (it == object_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  std::string field(const char* name) const {
    return "field '" + (prefix_.empty() ? std::string(name) : prefix_ + "." + name) + "'";
  }

  Status error(const char* name, const std::string& what) const {
    return Status::error(path_ + ": " + field(name) + " " + what);
  }

  Status missing(const char* name) const {
    return Status::error(path_ + ": missing " + field(name));
  }

  // Leaves `out` unchanged when the field is absent and not required.
  Status integer(const char* name, int64_t& out, bool required) const {
    const json* v = find(name);
    if (v == nullptr) return required ? missing(name) : Status::ok();
    if (!v->is_number_integer()) return error(name, "must be an integer");
    if (v->is_number_unsigned() &&
        v->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())) {
      return error(name, "is out of range");
    }
    out = v->get<int64_t>();
    return Status::ok();
  }

  Status number(const char* name, double& out, bool required) const {
    const json* v = find(name);
    if (v == nullptr) return required ? missing(name) : Status::ok();
    if (!v->is_number()) return error(name, "must be a number");
    out = v->get<double>();
    return Status::ok();
  }

  Status boolean(const char* name, bool& out) const {
    const json* v = find(name);
    if (v == nullptr) return Status::ok();
    if (!v->is_boolean()) return error(name, "must be true or false");
    out = v->get<bool>();
    return Status::ok();
  }

  Status string(const char* name, std::string& out) const {
    const json* v = find(name);
    if (v == nullptr) return Status::ok();
    if (!v->is_string()) return error(name, "must be a string");
    out = v->get<std::string>();
    return Status::ok();
  }

  // Token ids are int32 wherever they are used; one past that range would be cut to another id.
  static constexpr int64_t kMaxTokenId = std::numeric_limits<int32_t>::max();

  Status token_id(const char* name, int64_t& out) const {
    int64_t id = out;
    KS_RETURN_IF_ERROR(integer(name, id, false));
    if (id < 0 && find(name) != nullptr) return error(name, "must not be negative");
    if (id > kMaxTokenId) return error(name, "must be at most " + std::to_string(kMaxTokenId));
    out = id;
    return Status::ok();
  }

  // eos_token_id is an integer or a list of integers; `present` reports whether it was given.
  Status token_ids(const char* name, std::vector<int64_t>& out, bool& present) const {
    const json* v = find(name);
    present = v != nullptr;
    if (v == nullptr) return Status::ok();
    std::vector<int64_t> ids;
    auto add = [&](const json& item) {
      if (!item.is_number_integer()) return false;
      if (item.is_number_unsigned()) {
        if (item.get<uint64_t>() > uint64_t(kMaxTokenId)) return false;
      } else if (item.get<int64_t>() < 0 || item.get<int64_t>() > kMaxTokenId) {
        return false;
      }
      ids.push_back(item.get<int64_t>());
      return true;
    };
    bool ok = true;
    if (v->is_array()) {
      for (const json& item : *v) ok = ok && add(item);
    } else {
      ok = add(*v);
    }
    if (!ok) {
      return error(
          name, "must be a token id (0 to " + std::to_string(kMaxTokenId) + ") or a list of them");
    }
    out = std::move(ids);
    return Status::ok();
  }

 private:
  const json& object_;
  const std::string& path_;
  std::string prefix_;
};

Result<Architecture> parse_architecture(const Fields& top, const std::string& path) {
  if (const json* archs = top.find("architectures")) {
    if (!archs->is_array() || archs->empty() || !(*archs)[0].is_string()) {
      return top.error("architectures", "must be a non-empty list of strings");
    }
    const std::string& name = (*archs)[0].get_ref<const std::string&>();
    if (name == "LlamaForCausalLM") return Architecture::llama;
    if (name == "Qwen2ForCausalLM") return Architecture::qwen2;
    return Status::error(path + ": unsupported architecture " + quote_untrusted(name) +
                         " (supported: LlamaForCausalLM, Qwen2ForCausalLM)");
  }
  std::string model_type;
  KS_RETURN_IF_ERROR(top.string("model_type", model_type));
  if (model_type.empty()) {
    return Status::error(path + ": neither 'architectures' nor 'model_type' is given");
  }
  if (model_type == "llama") return Architecture::llama;
  if (model_type == "qwen2") return Architecture::qwen2;
  return Status::error(path + ": unsupported model_type " + quote_untrusted(model_type) +
                       " (supported: llama, qwen2)");
}

// rope_theta and rope_scaling (transformers v4), or rope_parameters holding both (v5).
Status parse_rope(const Fields& top, const std::string& path, ModelConfig& config) {
  KS_RETURN_IF_ERROR(top.number("rope_theta", config.rope_theta, false));
  config.rope_scaling = RopeScaling{};
  const json* params = top.find("rope_parameters");
  const bool v5 = params != nullptr;
  const char* key = v5 ? "rope_parameters" : "rope_scaling";
  if (!v5) params = top.find(key);
  if (params == nullptr) return Status::ok();
  if (!params->is_object()) return top.error(key, "must be an object or null");

  const Fields rope(*params, path, key);
  if (v5) KS_RETURN_IF_ERROR(rope.number("rope_theta", config.rope_theta, false));
  std::string type;
  KS_RETURN_IF_ERROR(rope.string("rope_type", type));
  if (type.empty()) KS_RETURN_IF_ERROR(rope.string("type", type));
  if (type.empty()) {
    // Without a type this could be v5's per-attention-type form ({"full_attention": {...}}),
    // which these architectures never use; refuse it rather than guess.
    for (const auto& item : params->items()) {
      if (item.value().is_object()) {
        return Status::error(path + ": " + key + " with per-layer-type entries is not supported");
      }
    }
    // Scaling parameters with no type would run unscaled; transformers refuses them too.
    for (const auto& item : params->items()) {
      if (item.key() != "rope_theta" && !item.value().is_null()) {
        return Status::error(path + ": " + key + " has " + quote_untrusted(item.key(), 40) +
                             " but no rope_type");
      }
    }
    return Status::ok();
  }
  if (type == "default") return Status::ok();
  if (type != "llama3") {
    return Status::error(path + ": unsupported " + key + " type " + quote_untrusted(type));
  }

  RopeScaling& s = config.rope_scaling;
  s.type = RopeType::llama3;
  KS_RETURN_IF_ERROR(rope.number("factor", s.factor, true));
  KS_RETURN_IF_ERROR(rope.number("low_freq_factor", s.low_freq_factor, true));
  KS_RETURN_IF_ERROR(rope.number("high_freq_factor", s.high_freq_factor, true));
  KS_RETURN_IF_ERROR(
      rope.integer("original_max_position_embeddings", s.original_max_position_embeddings, true));
  if (!(s.factor > 0)) return rope.error("factor", "must be positive");
  if (!(s.low_freq_factor > 0)) return rope.error("low_freq_factor", "must be positive");
  // The llama3 formula interpolates between the two wavelengths over high - low.
  if (!(s.high_freq_factor > s.low_freq_factor)) {
    return rope.error("high_freq_factor", "must be greater than low_freq_factor");
  }
  if (s.original_max_position_embeddings <= 0 ||
      s.original_max_position_embeddings > kMaxPositions) {
    return rope.error("original_max_position_embeddings", "must be in [1, 2^30]");
  }
  return Status::ok();
}

Status check_range(const Fields& top, const char* name, int64_t value, int64_t max) {
  if (value <= 0) return top.error(name, "must be positive (got " + std::to_string(value) + ")");
  if (value > max) {
    return top.error(
        name, "is " + std::to_string(value) + ", larger than the supported " + std::to_string(max));
  }
  return Status::ok();
}

Status validate(const Fields& top, const std::string& path, const ModelConfig& c,
                bool head_dim_given) {
  KS_RETURN_IF_ERROR(check_range(top, "vocab_size", c.vocab_size, kMaxVocab));
  KS_RETURN_IF_ERROR(check_range(top, "hidden_size", c.hidden_size, kMaxHidden));
  KS_RETURN_IF_ERROR(check_range(top, "intermediate_size", c.intermediate_size, kMaxIntermediate));
  KS_RETURN_IF_ERROR(check_range(top, "num_hidden_layers", c.n_layers, kMaxLayers));
  KS_RETURN_IF_ERROR(check_range(top, "num_attention_heads", c.n_heads, kMaxHeads));
  KS_RETURN_IF_ERROR(check_range(top, "num_key_value_heads", c.n_kv_heads, kMaxHeads));
  KS_RETURN_IF_ERROR(
      check_range(top, "max_position_embeddings", c.max_position_embeddings, kMaxPositions));
  if (!head_dim_given && c.hidden_size % c.n_heads != 0) {
    return Status::error(path + ": hidden_size " + std::to_string(c.hidden_size) +
                         " is not a multiple of num_attention_heads " + std::to_string(c.n_heads) +
                         " and no head_dim is given");
  }
  KS_RETURN_IF_ERROR(check_range(top, "head_dim", c.head_dim, kMaxHeadDim));
  // Rotary embeddings rotate pairs of dimensions.
  if (c.head_dim % 2 != 0) {
    return Status::error(path + ": head_dim " + std::to_string(c.head_dim) + " must be even");
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return Status::error(path + ": num_attention_heads " + std::to_string(c.n_heads) +
                         " is not a multiple of num_key_value_heads " +
                         std::to_string(c.n_kv_heads));
  }
  if (!(c.rms_norm_eps > 0 && c.rms_norm_eps < 1)) {
    return top.error("rms_norm_eps", "must be in (0, 1)");
  }
  if (!(c.rope_theta > 0) || !std::isfinite(c.rope_theta)) {
    return top.error("rope_theta", "must be positive");
  }
  return Status::ok();
}

constexpr const char* kPrequantSupported =
    "Kestrel reads 4-bit AWQ (version gemm, zero_point true) and GPTQ (desc_act false) "
    "checkpoints with group_size 32, 64 or 128";

Result<PrequantConfig> parse_prequant_config(const json& q, const std::string& path) {
  if (!q.is_object()) {
    return Status::error(path + ": field 'quantization_config' must be an object");
  }
  const Fields f(q, path, "quantization_config");
  std::string method;
  KS_RETURN_IF_ERROR(f.string("quant_method", method));
  PrequantConfig p;
  if (method == "awq") {
    p.method = PrequantMethod::awq;
  } else if (method == "gptq") {
    p.method = PrequantMethod::gptq;
  } else {
    return Status::error(path + ": a pre-quantized checkpoint (quantization_config, quant_method " +
                         quote_untrusted(method.empty() ? "missing" : method, 40) +
                         ") is not supported; " + kPrequantSupported +
                         ", or the original fp32/fp16/bf16 checkpoint, which Kestrel quantizes "
                         "itself (--low-bit)");
  }
  const bool awq = p.method == PrequantMethod::awq;
  // AutoAWQ's own quant_config spells bits and group_size w_bit and q_group_size.
  int64_t bits = 4;
  KS_RETURN_IF_ERROR(f.integer(f.find("bits") || !awq ? "bits" : "w_bit", bits, false));
  p.group_size = 128;
  KS_RETURN_IF_ERROR(
      f.integer(f.find("group_size") || !awq ? "group_size" : "q_group_size", p.group_size, false));
  const std::string what = path + ": " + method + " checkpoint with ";
  if (bits != 4) {
    return Status::error(what + "bits " + std::to_string(bits) + " is not supported; " +
                         kPrequantSupported);
  }
  if (p.group_size != 32 && p.group_size != 64 && p.group_size != 128) {
    return Status::error(what + "group_size " + std::to_string(p.group_size) +
                         " is not supported; " + kPrequantSupported);
  }
  if (awq) {
    std::string version = "gemm";
    KS_RETURN_IF_ERROR(f.string("version", version));
    std::string lower = version;
    for (char& ch : lower) ch = char(std::tolower(static_cast<unsigned char>(ch)));
    if (lower != "gemm") {
      return Status::error(what + "version " + quote_untrusted(version, 40) +
                           " is not supported (its packing differs); " + kPrequantSupported);
    }
    bool zero_point = true;
    KS_RETURN_IF_ERROR(f.boolean("zero_point", zero_point));
    if (!zero_point) {
      return Status::error(what + "zero_point false is not supported; " + kPrequantSupported);
    }
    return p;
  }
  bool desc_act = false;
  KS_RETURN_IF_ERROR(f.boolean("desc_act", desc_act));
  if (desc_act) {
    return Status::error(what +
                         "desc_act true (act-order: a permuted group index per input column) is "
                         "not supported; " +
                         kPrequantSupported);
  }
  p.sym = true;
  KS_RETURN_IF_ERROR(f.boolean("sym", p.sym));
  std::string format = "gptq";
  KS_RETURN_IF_ERROR(f.string("checkpoint_format", format));
  if (format != "gptq" && format != "gptq_v2") {
    return Status::error(what + "checkpoint_format " + quote_untrusted(format, 40) +
                         " is not supported (Kestrel reads gptq and gptq_v2); " +
                         kPrequantSupported);
  }
  p.zeros_minus_one = format == "gptq";
  return p;
}

}  // namespace

const char* prequant_method_name(PrequantMethod method) {
  switch (method) {
    case PrequantMethod::awq:
      return "awq";
    case PrequantMethod::gptq:
      return "gptq";
    case PrequantMethod::none:
      return "none";
  }
  return "?";
}

const char* architecture_name(Architecture arch) {
  switch (arch) {
    case Architecture::llama:
      return "LlamaForCausalLM";
    case Architecture::qwen2:
      return "Qwen2ForCausalLM";
  }
  return "?";
}

Result<ModelConfig> parse_model_config(const std::string& text, const std::string& path) {
  KS_ASSIGN_OR_RETURN(const json root, parse_json_object(text, path));
  const Fields top(root, path);
  ModelConfig c;
  KS_ASSIGN_OR_RETURN(c.arch, parse_architecture(top, path));
  // AWQ and GPTQ checkpoints store packed integer tensors under other names; everything about
  // them Kestrel does not read is refused here, before any tensor is touched.
  if (const json* q = top.find("quantization_config")) {
    KS_ASSIGN_OR_RETURN(c.prequant, parse_prequant_config(*q, path));
  }

  KS_RETURN_IF_ERROR(top.integer("vocab_size", c.vocab_size, true));
  KS_RETURN_IF_ERROR(top.integer("hidden_size", c.hidden_size, true));
  KS_RETURN_IF_ERROR(top.integer("intermediate_size", c.intermediate_size, true));
  KS_RETURN_IF_ERROR(top.integer("num_hidden_layers", c.n_layers, true));
  KS_RETURN_IF_ERROR(top.integer("num_attention_heads", c.n_heads, true));
  c.n_kv_heads = c.n_heads;
  KS_RETURN_IF_ERROR(top.integer("num_key_value_heads", c.n_kv_heads, false));
  const bool head_dim_given = top.find("head_dim") != nullptr;
  KS_RETURN_IF_ERROR(top.integer("head_dim", c.head_dim, false));
  if (!head_dim_given && c.n_heads > 0) c.head_dim = c.hidden_size / c.n_heads;
  // The HF config classes' defaults, for configs that leave these out.
  c.max_position_embeddings = c.arch == Architecture::qwen2 ? 32768 : 2048;
  KS_RETURN_IF_ERROR(top.integer("max_position_embeddings", c.max_position_embeddings, false));
  KS_RETURN_IF_ERROR(top.number("rms_norm_eps", c.rms_norm_eps, false));
  KS_RETURN_IF_ERROR(parse_rope(top, path, c));
  KS_RETURN_IF_ERROR(top.boolean("tie_word_embeddings", c.tie_word_embeddings));
  if (c.arch == Architecture::qwen2) {
    c.attention_bias = true;  // Qwen2 always has q/k/v biases; its config has no switch.
  } else {
    KS_RETURN_IF_ERROR(top.boolean("attention_bias", c.attention_bias));
  }
  KS_RETURN_IF_ERROR(top.string("torch_dtype", c.torch_dtype));
  if (c.torch_dtype.empty()) KS_RETURN_IF_ERROR(top.string("dtype", c.torch_dtype));
  KS_RETURN_IF_ERROR(top.token_id("bos_token_id", c.bos_token_id));
  bool eos_given = false;
  KS_RETURN_IF_ERROR(top.token_ids("eos_token_id", c.eos_token_ids, eos_given));

  // Variations the forward pass does not implement: refuse them instead of computing garbage.
  std::string hidden_act = "silu";
  KS_RETURN_IF_ERROR(top.string("hidden_act", hidden_act));
  if (hidden_act != "silu") {
    return Status::error(path + ": unsupported hidden_act " + quote_untrusted(hidden_act) +
                         " (supported: silu)");
  }
  bool mlp_bias = false;
  KS_RETURN_IF_ERROR(top.boolean("mlp_bias", mlp_bias));
  if (mlp_bias) return Status::error(path + ": mlp_bias true is not supported");
  bool sliding_window = false;
  KS_RETURN_IF_ERROR(top.boolean("use_sliding_window", sliding_window));
  if (sliding_window) return Status::error(path + ": use_sliding_window true is not supported");

  KS_RETURN_IF_ERROR(validate(top, path, c, head_dim_given));
  return c;
}

Status apply_generation_config(ModelConfig& config, const std::string& text,
                               const std::string& path) {
  KS_ASSIGN_OR_RETURN(const json root, parse_json_object(text, path));
  const Fields top(root, path);
  int64_t bos = config.bos_token_id;
  KS_RETURN_IF_ERROR(top.token_id("bos_token_id", bos));
  std::vector<int64_t> eos;
  bool eos_given = false;
  KS_RETURN_IF_ERROR(top.token_ids("eos_token_id", eos, eos_given));
  config.bos_token_id = bos;
  if (eos_given) config.eos_token_ids = std::move(eos);
  return Status::ok();
}

Result<ModelConfig> load_model_config(const std::string& dir) {
  namespace fs = std::filesystem;
  const std::string config_path = (fs::path(dir) / "config.json").string();
  const std::string generation_path = (fs::path(dir) / "generation_config.json").string();
  std::error_code ec;
  if (!fs::exists(config_path, ec)) return Status::error(config_path + ": not found");
  KS_ASSIGN_OR_RETURN(const std::string text, read_text_file(config_path));
  KS_ASSIGN_OR_RETURN(ModelConfig config, parse_model_config(text, config_path));
  if (fs::exists(generation_path, ec)) {
    KS_ASSIGN_OR_RETURN(const std::string generation, read_text_file(generation_path));
    KS_RETURN_IF_ERROR(apply_generation_config(config, generation, generation_path));
  }
  return config;
}

std::string model_config_to_json(const ModelConfig& c) {
  nlohmann::ordered_json j;
  j["architectures"] = {architecture_name(c.arch)};
  j["model_type"] = c.arch == Architecture::qwen2 ? "qwen2" : "llama";
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.n_layers;
  j["num_attention_heads"] = c.n_heads;
  j["num_key_value_heads"] = c.n_kv_heads;
  j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling.type == RopeType::llama3) {
    j["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", c.rope_scaling.factor},
        {"low_freq_factor", c.rope_scaling.low_freq_factor},
        {"high_freq_factor", c.rope_scaling.high_freq_factor},
        {"original_max_position_embeddings", c.rope_scaling.original_max_position_embeddings}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  if (c.arch == Architecture::llama) j["attention_bias"] = c.attention_bias;
  if (!c.torch_dtype.empty()) j["torch_dtype"] = c.torch_dtype;
  if (c.bos_token_id >= 0) j["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids.front();
  } else if (!c.eos_token_ids.empty()) {
    j["eos_token_id"] = c.eos_token_ids;
  }
  return j.dump(2) + "\n";
}

Result<std::string> read_text_file(const std::string& path, size_t max_bytes) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; the type
  // check below refuses it before any read.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) return Status::error(path + ": cannot open: " + std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::error(path + ": not a regular file");
  }
  if (uint64_t(st.st_size) > max_bytes) {
    ::close(fd);
    return Status::error(path + ": " + std::to_string(st.st_size) + " bytes is larger than the " +
                         std::to_string(max_bytes >> 20) + " MiB limit for this file");
  }
  std::string text(size_t(st.st_size), '\0');
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::read(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const std::string why = std::strerror(errno);
      ::close(fd);
      return Status::error(path + ": cannot read: " + why);
    }
    if (n == 0) break;  // the file shrank while we read it
    done += size_t(n);
  }
  ::close(fd);
  text.resize(done);
  // JSON, YAML and templates never hold a raw NUL; parsers that stop at one would silently
  // ignore the rest of the file.
  const size_t nul = text.find('\0');
  if (nul != std::string::npos) {
    return Status::error(path + ": NUL byte at offset " + std::to_string(nul) +
                         " (not a text file)");
  }
  return text;
}

}  // namespace kestrel
