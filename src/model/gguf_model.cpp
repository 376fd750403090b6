#include "model/gguf_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/half.h"
#include "core/quote.h"
#include "model/rope.h"

namespace kestrel {
namespace {

constexpr int kGroup = 32;  // Kestrel's int4 nibble group and the block every copy uses

const GgmlType kReadable[] = {GgmlType::f32,  GgmlType::f16,    GgmlType::bf16,  GgmlType::q8_0,
                              GgmlType::q4_0, GgmlType::q4_1,   GgmlType::q5_0,  GgmlType::q5_1,
                              GgmlType::q2_k, GgmlType::q3_k,   GgmlType::q4_k,  GgmlType::q5_k,
                              GgmlType::q6_k, GgmlType::iq4_nl, GgmlType::iq4_xs};
constexpr const char* kReadableList =
    "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL and IQ4_XS";

// IQ4_NL and IQ4_XS: a nibble indexes this non-linear codebook (the format's own values), times
// the block's scale.
constexpr int8_t kIq4Values[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                   1,    13,   25,  38,  53,  69,  89,  113};

bool readable(GgmlType type) {
  return std::find(std::begin(kReadable), std::end(kReadable), type) != std::end(kReadable);
}

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

uint16_t to_half_clamped(float v) {
  return float_to_fp16(std::clamp(v, -65504.0f, 65504.0f));
}

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K super-block's 12 scale bytes.
void q4_k_scale_min(int j, const uint8_t* s, int& scale, int& min) {
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// The nibbles of sub-block j of a Q4_K / Q5_K super-block's 128 bytes `qs`: chunk k (64 weights)
// holds sub-block 2k in the low nibbles of its 32 bytes and sub-block 2k + 1 in the high ones.
void k4_codes(const uint8_t* qs, int j, uint8_t* codes) {
  const uint8_t* chunk = qs + 32 * (j / 2);
  const int shift = (j % 2) * 4;
  for (int l = 0; l < 32; ++l) codes[l] = (chunk[l] >> shift) & 0x0f;
}

// Q5_0 / Q5_1: the fifth bit of weight j (0..31) of a block is bit j of its 4 qh bytes (little
// endian); weights 0..15 take the low nibbles of qs, 16..31 the high ones.
void q5_codes(const uint8_t* qh_bytes, const uint8_t* qs, int* codes) {
  uint32_t qh = 0;
  std::memcpy(&qh, qh_bytes, 4);
  for (int j = 0; j < 16; ++j) {
    codes[j] = (qs[j] & 0x0f) | int(((qh >> j) & 1) << 4);
    codes[j + 16] = (qs[j] >> 4) | int(((qh >> (j + 16)) & 1) << 4);
  }
}

// Q3_K's 16 six-bit scales (stored + 32) from its 12 bytes: scale i's low four bits are the low
// (i < 8) or high (i >= 8) nibble of byte i % 8, its high two bits bits 2 (i / 4) .. + 1 of byte
// 8 + i % 4.
int q3_k_scale(const uint8_t* s, int i) {
  const int low = i < 8 ? s[i] & 0x0f : s[i - 8] >> 4;
  const int high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
  return (low | (high << 4)) - 32;
}

// The 2-bit field of weight e (0..255) of a Q2_K / Q3_K super-block: each 128-weight half h
// takes qs[32 h ..], and its 32-weight group g (0..3) the bit pair 2g of those 32 bytes.
int k_2bit(const uint8_t* qs, int e) {
  const int h = e / 128, g = (e % 128) / 32, l = e % 32;
  return (qs[32 * h + l] >> (2 * g)) & 3;
}

void dequantize_blocks(GgmlType type, const uint8_t* in, int64_t n, float* out) {
  switch (type) {
    case GgmlType::f32:
      std::memcpy(out, in, size_t(n) * 4);
      return;
    case GgmlType::f16:
      for (int64_t i = 0; i < n; ++i) out[i] = fp16_to_float(load_u16(in + 2 * i));
      return;
    case GgmlType::bf16:
      for (int64_t i = 0; i < n; ++i) out[i] = bf16_to_float(load_u16(in + 2 * i));
      return;
    case GgmlType::q8_0:
      for (int64_t b = 0; b < n / 32; ++b, in += 34) {
        const float d = fp16_to_float(load_u16(in));
        for (int i = 0; i < 32; ++i) out[b * 32 + i] = float(int8_t(in[2 + i])) * d;
      }
      return;
    case GgmlType::q4_0:
      for (int64_t b = 0; b < n / 32; ++b, in += 18) {
        const float d = fp16_to_float(load_u16(in));
        for (int i = 0; i < 16; ++i) {
          out[b * 32 + i] = float(int(in[2 + i] & 0x0f) - 8) * d;
          out[b * 32 + i + 16] = float(int(in[2 + i] >> 4) - 8) * d;
        }
      }
      return;
    case GgmlType::q4_1:  // d, m (fp16), 16 bytes of nibbles: d q + m
      for (int64_t b = 0; b < n / 32; ++b, in += 20) {
        const float d = fp16_to_float(load_u16(in));
        const float m = fp16_to_float(load_u16(in + 2));
        for (int i = 0; i < 16; ++i) {
          out[b * 32 + i] = float(in[4 + i] & 0x0f) * d + m;
          out[b * 32 + i + 16] = float(in[4 + i] >> 4) * d + m;
        }
      }
      return;
    case GgmlType::q5_0:  // d (fp16), qh[4], qs[16]: d (q - 16)
      for (int64_t b = 0; b < n / 32; ++b, in += 22) {
        const float d = fp16_to_float(load_u16(in));
        int codes[32];
        q5_codes(in + 2, in + 6, codes);
        for (int i = 0; i < 32; ++i) out[b * 32 + i] = float(codes[i] - 16) * d;
      }
      return;
    case GgmlType::q5_1:  // d, m (fp16), qh[4], qs[16]: d q + m
      for (int64_t b = 0; b < n / 32; ++b, in += 24) {
        const float d = fp16_to_float(load_u16(in));
        const float m = fp16_to_float(load_u16(in + 2));
        int codes[32];
        q5_codes(in + 4, in + 8, codes);
        for (int i = 0; i < 32; ++i) out[b * 32 + i] = float(codes[i]) * d + m;
      }
      return;
    case GgmlType::q2_k:
      // scales[16] (low nibble the scale, high the min, a 16-weight sub-block each), qs[64],
      // d, dmin (fp16): d sc q - dmin m.
      for (int64_t b = 0; b < n / 256; ++b, in += 84) {
        const float d = fp16_to_float(load_u16(in + 80));
        const float dmin = fp16_to_float(load_u16(in + 82));
        for (int e = 0; e < 256; ++e) {
          const uint8_t sc = in[e / 16];
          const float dl = d * float(sc & 0x0f);
          const float ml = dmin * float(sc >> 4);
          out[b * 256 + e] = dl * float(k_2bit(in + 16, e)) - ml;
        }
      }
      return;
    case GgmlType::q3_k:
      // hmask[32], qs[64], scales[12], d (fp16): d (scale - 32) (q - 4), q's third bit in hmask
      // (weight e: byte e % 32, bit e / 32), 16-weight sub-blocks.
      for (int64_t b = 0; b < n / 256; ++b, in += 110) {
        const uint8_t* hmask = in;
        const float d = fp16_to_float(load_u16(in + 108));
        for (int e = 0; e < 256; ++e) {
          const float dl = d * float(q3_k_scale(in + 96, e / 16));
          const int high = (hmask[e % 32] >> (e / 32)) & 1;
          out[b * 256 + e] = dl * float(k_2bit(in + 32, e) - (high ? 0 : 4));
        }
      }
      return;
    case GgmlType::iq4_nl:  // d (fp16), qs[16]: d value[nibble], weights i and i + 16 in byte i
      for (int64_t b = 0; b < n / 32; ++b, in += 18) {
        const float d = fp16_to_float(load_u16(in));
        for (int i = 0; i < 16; ++i) {
          out[b * 32 + i] = d * float(kIq4Values[in[2 + i] & 0x0f]);
          out[b * 32 + i + 16] = d * float(kIq4Values[in[2 + i] >> 4]);
        }
      }
      return;
    case GgmlType::iq4_xs:
      // d (fp16), scales_h (16 bits), scales_l[4], qs[128]: sub-block j (32 weights) scales by
      // d (s - 32), s's low four bits the nibble j % 2 of scales_l[j / 2], its high two bits 2j of
      // scales_h; its nibbles are IQ4_NL's, in qs[16 j ..].
      for (int64_t b = 0; b < n / 256; ++b, in += 136) {
        const float d = fp16_to_float(load_u16(in));
        const int scales_h = load_u16(in + 2);
        for (int j = 0; j < 8; ++j) {
          const int s =
              ((in[4 + j / 2] >> (4 * (j % 2))) & 0x0f) | (((scales_h >> (2 * j)) & 3) << 4);
          const float dl = d * float(s - 32);
          const uint8_t* qs = in + 8 + 16 * j;
          for (int i = 0; i < 16; ++i) {
            out[b * 256 + j * 32 + i] = dl * float(kIq4Values[qs[i] & 0x0f]);
            out[b * 256 + j * 32 + i + 16] = dl * float(kIq4Values[qs[i] >> 4]);
          }
        }
      }
      return;
    case GgmlType::q4_k:
    case GgmlType::q5_k: {
      // d, dmin (fp16), 12 scale bytes, then Q4_K: qs[128]; Q5_K: qh[32], qs[128], the fifth bit
      // of weight l of sub-block j in bit j of qh[l].
      const bool five = type == GgmlType::q5_k;
      for (int64_t b = 0; b < n / 256; ++b, in += five ? 176 : 144) {
        const float d = fp16_to_float(load_u16(in));
        const float dmin = fp16_to_float(load_u16(in + 2));
        const uint8_t* qh = in + 16;
        uint8_t codes[32];
        for (int j = 0; j < 8; ++j) {
          int sc = 0, m = 0;
          q4_k_scale_min(j, in + 4, sc, m);
          const float scale = d * float(sc);
          const float min = dmin * float(m);
          k4_codes(in + (five ? 48 : 16), j, codes);
          for (int l = 0; l < 32; ++l) {
            const int q = codes[l] | (five ? ((qh[l] >> j) & 1) << 4 : 0);
            out[b * 256 + j * 32 + l] = scale * float(q) - min;
          }
        }
      }
      return;
    }
    case GgmlType::q6_k:
      // ql[128] low 4 bits, qh[64] high 2 bits, scales int8[16] (one per 16 weights), d fp16.
      // Half h (128 weights) takes ql[64h..], qh[32h..]; its four 32-weight quarters are the low
      // and high nibbles of ql's two 32-byte runs, with qh's bit pairs 0-1, 2-3, 4-5, 6-7.
      for (int64_t b = 0; b < n / 256; ++b, in += 210) {
        const uint8_t* ql = in;
        const uint8_t* qh = in + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(in + 192);
        const float d = fp16_to_float(load_u16(in + 208));
        float* y = out + b * 256;
        for (int h = 0; h < 2; ++h) {
          for (int l = 0; l < 32; ++l) {
            const int base = 128 * h;
            const uint8_t lo0 = ql[64 * h + l];
            const uint8_t lo1 = ql[64 * h + 32 + l];
            const uint8_t hi = qh[32 * h + l];
            const int q[4] = {(lo0 & 0x0f) | ((hi & 3) << 4), (lo1 & 0x0f) | (((hi >> 2) & 3) << 4),
                              (lo0 >> 4) | (((hi >> 4) & 3) << 4),
                              (lo1 >> 4) | (((hi >> 6) & 3) << 4)};
            for (int k = 0; k < 4; ++k) {
              const int at = base + 32 * k + l;
              y[at] = d * float(sc[at / 16]) * float(q[k] - 32);
            }
          }
        }
      }
      return;
    default:
      return;  // refused by GgufModel::tensor
  }
}

size_t row_bytes_of(const GgufTensor& t) {
  const GgmlTypeTraits traits = ggml_type_traits(uint32_t(t.type));
  return size_t(t.dims[0] / traits.block * traits.block_bytes);
}

// The requested format a ggml type copies into (block 32), for the default choice.
WeightFormat native_format_of(GgmlType type) {
  switch (type) {
    case GgmlType::q4_0:
      return WeightFormat::sym_int4;
    case GgmlType::q4_1:
    case GgmlType::q4_k:
      return WeightFormat::asym_int4;
    case GgmlType::q8_0:
    case GgmlType::q5_0:  // its codes less 16 are the int8 codes
    case GgmlType::q5_1:  // five bits do not fit four: requantized to eight
    case GgmlType::q5_k:
    case GgmlType::q6_k:
    // Q2_K and Q3_K scale each 16 weights: two of Kestrel's 4-bit groups' worth of different
    // scales in one group of 32 cost 0.45-0.5 of the logits (the fixtures' measure); in 8 bits
    // the values keep their precision, at 2.5-3x the file's bytes (--low-bit asym_int4 asks
    // for the smaller load).
    case GgmlType::q3_k:
    case GgmlType::q2_k:
    // A non-linear codebook has no linear 4-bit twin.
    case GgmlType::iq4_nl:
    case GgmlType::iq4_xs:
      return WeightFormat::sym_int8;
    case GgmlType::f16:
      return WeightFormat::fp16;
    case GgmlType::bf16:
      return WeightFormat::bf16;
    default:
      return WeightFormat::fp32;
  }
}

bool is_matrix_name(const std::string& name) {
  return name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0 &&
         name.find("norm") == std::string::npos && name != "rope_freqs.weight";
}

// Llama 3.1 rope scaling, which llama.cpp's converter stores as per-frequency divisors
// (rope_freqs.weight) rather than as parameters: the parameters are recovered by finding the
// original context length for which HF's llama3 formula (low_freq_factor 1, high_freq_factor 4,
// as every Llama 3.x release uses) gives the same frequencies, to a relative 1e-5.
Status recover_llama3_rope(const GgufFile& file, ModelConfig& c) {
  const GgufTensor* t = file.find_tensor("rope_freqs.weight");
  if (t == nullptr) return Status::ok();
  const std::string where = file.path() + ": tensor 'rope_freqs.weight'";
  if (t->type != GgmlType::f32 || t->dims.size() != 1 || t->dims[0] * 2 != c.head_dim) {
    return Status::error(
        where + " must be F32 of head_dim / 2 = " + std::to_string(c.head_dim / 2) + " values");
  }
  std::vector<float> factors(size_t(t->dims[0]));
  std::memcpy(factors.data(), t->data, factors.size() * 4);
  float factor = 1.0f;
  for (float f : factors) {
    if (!(f >= 1.0f) || !std::isfinite(f)) {
      return Status::error(where + " holds a divisor below 1 or not finite");
    }
    factor = std::max(factor, f);
  }
  if (factor == 1.0f) return Status::ok();
  ModelConfig plain = c;
  plain.rope_scaling = RopeScaling{};
  const std::vector<float> inv = rope_inv_freq(plain);
  std::vector<int64_t> candidates;
  for (size_t i = 0; i < factors.size(); ++i) {
    if (factors[i] > 1.0f && factors[i] < factor) {
      const double s = (1.0 / factors[i] - 1.0 / factor) / (1.0 - 1.0 / factor);
      const double wavelen = 2.0 * M_PI / double(inv[i]);
      candidates.push_back(std::llround(wavelen * (s * 3.0 + 1.0)));
    }
  }
  for (int64_t p = 16; p <= (int64_t(1) << 22); p *= 2) candidates.push_back(p);
  for (int64_t original : candidates) {
    if (original <= 0 || original > (int64_t(1) << 30)) continue;
    c.rope_scaling = RopeScaling{RopeType::llama3, double(factor), 1.0, 4.0, original};
    const std::vector<float> scaled = rope_inv_freq(c);
    bool same = true;
    for (size_t i = 0; i < factors.size() && same; ++i) {
      const double want = double(inv[i]) / double(factors[i]);
      same = std::fabs(double(scaled[i]) - want) <= 1e-5 * want;
    }
    if (same) return Status::ok();
  }
  return Status::error(where +
                       " does not match Llama 3 rope scaling (low_freq_factor 1, "
                       "high_freq_factor 4); other per-frequency rope factors are not supported");
}

Result<ModelConfig> config_from_gguf(const GgufFile& f) {
  KS_ASSIGN_OR_RETURN(const std::string arch, f.get_string("general.architecture"));
  ModelConfig c;
  if (arch == "llama") {
    c.arch = Architecture::llama;
  } else if (arch == "qwen2") {
    c.arch = Architecture::qwen2;
  } else {
    return Status::error(f.path() + ": architecture " + quote_untrusted(arch, 40) +
                         " is not supported (Kestrel runs llama and qwen2)");
  }
  auto key = [&](const char* suffix) { return arch + "." + suffix; };
  auto optional_int = [&](const std::string& k, int64_t fallback) -> Result<int64_t> {
    return f.find(k) == nullptr ? Result<int64_t>(fallback) : f.get_int(k);
  };
  KS_ASSIGN_OR_RETURN(c.n_layers, f.get_int(key("block_count")));
  KS_ASSIGN_OR_RETURN(c.hidden_size, f.get_int(key("embedding_length")));
  KS_ASSIGN_OR_RETURN(c.intermediate_size, f.get_int(key("feed_forward_length")));
  KS_ASSIGN_OR_RETURN(c.n_heads, f.get_int(key("attention.head_count")));
  KS_ASSIGN_OR_RETURN(c.n_kv_heads, optional_int(key("attention.head_count_kv"), c.n_heads));
  KS_ASSIGN_OR_RETURN(c.max_position_embeddings, f.get_int(key("context_length")));
  // A float key, finite: the JSON form the checks below read would turn NaN and infinities into
  // null, i.e. absent, and the defaults would stand in for them unseen.
  auto finite_float = [&](const std::string& k) -> Result<double> {
    KS_ASSIGN_OR_RETURN(const double v, f.get_float(k));
    if (!std::isfinite(v)) return Status::error(f.path() + ": " + k + " is not a finite number");
    return v;
  };
  KS_ASSIGN_OR_RETURN(c.rms_norm_eps, finite_float(key("attention.layer_norm_rms_epsilon")));
  if (f.find(key("rope.freq_base")) != nullptr) {
    KS_ASSIGN_OR_RETURN(c.rope_theta, finite_float(key("rope.freq_base")));
  }
  const int64_t even_split = c.n_heads > 0 ? c.hidden_size / c.n_heads : 0;
  KS_ASSIGN_OR_RETURN(c.head_dim, optional_int(key("attention.key_length"), even_split));
  KS_ASSIGN_OR_RETURN(const int64_t value_length,
                      optional_int(key("attention.value_length"), c.head_dim));
  KS_ASSIGN_OR_RETURN(const int64_t rotary, optional_int(key("rope.dimension_count"), c.head_dim));
  if (value_length != c.head_dim || rotary != c.head_dim) {
    return Status::error(f.path() + ": key length " + std::to_string(c.head_dim) +
                         ", value length " + std::to_string(value_length) +
                         " and rotary dimensions " + std::to_string(rotary) +
                         " differ; Kestrel needs them equal");
  }
  if (const GgufValue* scaling = f.find(key("rope.scaling.type"))) {
    if (scaling->type != GgufValueType::string || scaling->str != "none") {
      return Status::error(f.path() + ": rope scaling " +
                           quote_untrusted(scaling->str.empty() ? "?" : scaling->str, 40) +
                           " is not supported (Llama 3 scaling via rope_freqs is)");
    }
  }
  const GgufTensor* embd = f.find_tensor("token_embd.weight");
  if (embd == nullptr || embd->dims.size() != 2) {
    return Status::error(f.path() + ": tensor 'token_embd.weight' is missing or not a matrix");
  }
  c.vocab_size = embd->dims[1];
  c.tie_word_embeddings = f.find_tensor("output.weight") == nullptr;
  c.attention_bias = c.arch == Architecture::qwen2 || f.find_tensor("blk.0.attn_q.bias") != nullptr;
  KS_ASSIGN_OR_RETURN(c.bos_token_id, optional_int("tokenizer.ggml.bos_token_id", -1));
  // Llama 3 ends a turn with eot (<|eot_id|>) and a tool call with eom; both stop generation.
  for (const char* stop : {"tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                           "tokenizer.ggml.eom_token_id"}) {
    KS_ASSIGN_OR_RETURN(const int64_t id, optional_int(stop, -1));
    if (id >= 0 &&
        std::find(c.eos_token_ids.begin(), c.eos_token_ids.end(), id) == c.eos_token_ids.end()) {
      c.eos_token_ids.push_back(id);
    }
  }
  if (c.head_dim > 0 && c.head_dim % 2 == 0 && c.head_dim <= 4096) {
    KS_RETURN_IF_ERROR(recover_llama3_rope(f, c));
  }
  // The same checks a config.json gets (sizes positive and bounded, heads dividing, ...).
  return parse_model_config(model_config_to_json(c), f.path() + " (its metadata as config.json)");
}

}  // namespace

std::string gguf_tensor_name(const std::string& canonical) {
  static const std::map<std::string, std::string> kLayer = {
      {"attn_norm", "attn_norm"}, {"wq", "attn_q"},      {"wk", "attn_k"},
      {"wv", "attn_v"},           {"wo", "attn_output"}, {"ffn_norm", "ffn_norm"},
      {"w_gate", "ffn_gate"},     {"w_up", "ffn_up"},    {"w_down", "ffn_down"}};
  if (canonical == "tok_embd") return "token_embd.weight";
  if (canonical == "output_norm" || canonical == "output") return canonical + ".weight";
  if (canonical.rfind("blk.", 0) != 0) return canonical;
  const size_t dot = canonical.find('.', 4);
  if (dot == std::string::npos) return canonical;
  std::string rest = canonical.substr(dot + 1);
  std::string suffix = ".weight";
  if (rest.size() > 5 && rest.compare(rest.size() - 5, 5, ".bias") == 0) {
    rest.resize(rest.size() - 5);
    suffix = ".bias";
  }
  const auto it = kLayer.find(rest);
  return canonical.substr(0, dot + 1) + (it == kLayer.end() ? rest : it->second) + suffix;
}

bool is_gguf_source(const std::string& source) {
  std::error_code ec;
  if (std::filesystem::is_directory(source, ec)) return false;
  return std::filesystem::path(source).extension() == ".gguf" || has_gguf_magic(source);
}

Result<GgufModel> GgufModel::open(const std::string& path) {
  GgufModel m;
  KS_ASSIGN_OR_RETURN(m.file_, GgufFile::open(path));
  KS_ASSIGN_OR_RETURN(m.config_, config_from_gguf(m.file_));
  return m;
}

std::pair<WeightFormat, int> GgufModel::load_format(WeightFormat requested, bool format_explicit,
                                                    int block) const {
  if (format_explicit) return {requested, block};
  std::map<GgmlType, int64_t> elements;
  for (const GgufTensor& t : file_.tensors()) {
    if (is_matrix_name(t.name)) elements[t.type] += t.numel();
  }
  GgmlType most = GgmlType::f32;
  int64_t best = -1;
  for (const auto& [type, n] : elements) {
    if (n > best) {
      best = n;
      most = type;
    }
  }
  return {native_format_of(most), kGroup};
}

Result<const GgufTensor*> GgufModel::tensor(const std::string& name, int64_t rows,
                                            int64_t cols) const {
  const std::string gguf_name = gguf_tensor_name(name);
  const GgufTensor* t = file_.find_tensor(gguf_name);
  if (t == nullptr) {
    return Status::error(file_.path() + ": missing tensor " + quote_untrusted(gguf_name));
  }
  const std::vector<int64_t> want = rows == 1 && t->dims.size() == 1
                                        ? std::vector<int64_t>{cols}
                                        : std::vector<int64_t>{cols, rows};
  if (t->dims != want) {
    std::string got;
    for (int64_t d : t->dims) got += (got.empty() ? "" : ", ") + std::to_string(d);
    std::string expected;
    for (int64_t d : want) expected += (expected.empty() ? "" : ", ") + std::to_string(d);
    return Status::error(file_.path() + ": tensor " + quote_untrusted(gguf_name) +
                         " has ggml dims [" + got + "], the metadata implies [" + expected + "]");
  }
  if (!readable(t->type)) {
    return Status::error(file_.path() + ": tensor " + quote_untrusted(gguf_name) + " has type " +
                         ggml_type_name(t->type) + "; Kestrel reads " + kReadableList);
  }
  return t;
}

int64_t GgufModel::source_row(const std::string& name, int64_t row) const {
  if (config_.arch != Architecture::llama) return row;
  const bool q = name.find(".wq") != std::string::npos;
  const bool k = name.find(".wk") != std::string::npos;
  if (!q && !k) return row;
  // llama.cpp stores each head's rows as pairs (i, i + head_dim/2) next to each other.
  const int64_t hd = config_.head_dim;
  const int64_t head = row / hd;
  const int64_t j = row % hd;
  const int64_t half = hd / 2;
  return head * hd + (j < half ? 2 * j : 2 * (j - half) + 1);
}

bool GgufModel::copies_into(GgmlType type, WeightFormat format, int block) {
  switch (format) {
    case WeightFormat::fp32:
      return type == GgmlType::f32;
    case WeightFormat::fp16:
      return type == GgmlType::f16;
    case WeightFormat::bf16:
      return type == GgmlType::bf16;
    case WeightFormat::sym_int8:
      return (type == GgmlType::q8_0 || type == GgmlType::q5_0) && block == kGroup;
    case WeightFormat::sym_int4:
      return type == GgmlType::q4_0 && block == kGroup;
    case WeightFormat::asym_int4:
      return (type == GgmlType::q4_k || type == GgmlType::q4_1) && block == kGroup;
  }
  return false;
}

void GgufModel::dequantize_row(const std::string& name, const GgufTensor& t, int64_t row,
                               float* out) const {
  if (t.dims.size() == 1) {  // a vector: its elements are what the permutation moves
    std::vector<float> all(size_t(t.dims[0]));
    dequantize_blocks(t.type, t.data, t.dims[0], all.data());
    for (int64_t i = 0; i < t.dims[0]; ++i) out[i] = all[size_t(source_row(name, i))];
    return;
  }
  const size_t bytes = row_bytes_of(t);
  dequantize_blocks(t.type, t.data + size_t(source_row(name, row)) * bytes, t.dims[0], out);
}

void GgufModel::copy_row(const std::string& name, const GgufTensor& t, int64_t row,
                         QuantWeight& w) const {
  const int64_t cols = t.dims[0];
  const uint8_t* in = t.data + size_t(source_row(name, row)) * row_bytes_of(t);
  uint8_t* data = w.data.mutable_data() + size_t(row) * w.data_row_bytes();
  if (!is_quantized(w.format)) {
    std::memcpy(data, in, w.data_row_bytes());
    return;
  }
  const int64_t blocks = cols / kGroup;
  uint16_t* scales = w.scales.as_mutable<uint16_t>() + row * blocks;
  switch (t.type) {
    case GgmlType::q4_0:
      for (int64_t b = 0; b < blocks; ++b, in += 18) {
        scales[b] = load_u16(in);
        std::memcpy(data + b * 16, in + 2, 16);
      }
      return;
    case GgmlType::q8_0:
      for (int64_t b = 0; b < blocks; ++b, in += 34) {
        scales[b] = load_u16(in);
        std::memcpy(data + b * 32, in + 2, 32);
      }
      return;
    case GgmlType::q5_0:
      for (int64_t b = 0; b < blocks; ++b, in += 22) {
        scales[b] = load_u16(in);
        int codes[32];
        q5_codes(in + 2, in + 6, codes);
        for (int i = 0; i < 32; ++i) data[b * 32 + i] = uint8_t(int8_t(codes[i] - 16));
      }
      return;
    case GgmlType::q4_1: {
      uint16_t* mins = w.mins.as_mutable<uint16_t>() + row * blocks;
      for (int64_t b = 0; b < blocks; ++b, in += 20) {
        // d q + m: Kestrel's scale and min, and its nibbles (weights i and i + 16 in byte i).
        scales[b] = load_u16(in);
        mins[b] = load_u16(in + 2);
        std::memcpy(data + b * 16, in + 4, 16);
      }
      return;
    }
    case GgmlType::q4_k: {
      uint16_t* mins = w.mins.as_mutable<uint16_t>() + row * blocks;
      for (int64_t s = 0; s < cols / 256; ++s, in += 144) {
        const float d = fp16_to_float(load_u16(in));
        const float dmin = fp16_to_float(load_u16(in + 2));
        for (int j = 0; j < 8; ++j) {
          int sc = 0, m = 0;
          q4_k_scale_min(j, in + 4, sc, m);
          const int64_t b = s * 8 + j;
          // A non-finite super-scale stays non-finite, so the loader's finiteness check refuses
          // the tensor instead of clamping it into a wrong finite scale.
          const float scale = d * float(sc);
          const float min = -(dmin * float(m));
          scales[b] = std::isfinite(scale) ? to_half_clamped(scale) : float_to_fp16(scale);
          mins[b] = std::isfinite(min) ? to_half_clamped(min) : float_to_fp16(min);
          uint8_t codes[32];
          k4_codes(in + 16, j, codes);
          uint8_t* group = data + b * 16;
          for (int i = 0; i < 16; ++i) group[i] = uint8_t(codes[i] | (codes[i + 16] << 4));
        }
      }
      return;
    }
    default:
      return;
  }
}

std::string GgufModel::load_report(WeightFormat format, int block) const {
  std::map<GgmlType, int> matrices;
  std::map<GgmlType, int> vectors;
  for (const GgufTensor& t : file_.tensors()) {
    if (t.name == "rope_freqs.weight") continue;
    (is_matrix_name(t.name) ? matrices : vectors)[t.type] += 1;
  }
  std::string out;
  for (const auto& [type, n] : matrices) {
    out += out.empty() ? "" : ", ";
    out += std::string(ggml_type_name(type)) + " x " + std::to_string(n) + " -> " +
           format_name(format);
    const bool float_type =
        type == GgmlType::f32 || type == GgmlType::f16 || type == GgmlType::bf16;
    if (copies_into(type, format, block)) {
      out += type == GgmlType::q4_k ? " (copied; scales and mins rounded to fp16)" : " (copied)";
    } else if (format == WeightFormat::fp32) {
      out += float_type ? " (exact)" : " (dequantized exactly)";
    } else if (!is_quantized(format)) {
      out += float_type ? " (rounded)" : " (dequantized, rounded)";
    } else {
      out += float_type ? " (quantized)" : " (requantized: precision lost)";
    }
  }
  for (const auto& [type, n] : vectors) {
    out += std::string(", ") + ggml_type_name(type) + " x " + std::to_string(n) +
           " -> fp32 (norms and biases)";
  }
  return out;
}

}  // namespace kestrel
