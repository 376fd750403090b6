#include "model/rope.h"

#include <cmath>

namespace kestrel {

std::vector<float> rope_inv_freq(const ModelConfig& config) {
  const int64_t dim = config.head_dim;
  std::vector<float> inv_freq(size_t(dim / 2));
  for (int64_t i = 0; i < dim / 2; ++i) {
    // HF: 1.0 / base ** (arange(0, dim, 2).float() / dim), all in fp32.
    const float exponent = float(2 * i) / float(dim);
    const float power = float(std::pow(double(config.rope_theta), double(exponent)));
    inv_freq[size_t(i)] = 1.0f / power;
  }
  const RopeScaling& s = config.rope_scaling;
  if (s.type == RopeType::llama3) {
    // Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band between
    // is interpolated smoothly.
    const float old_context = float(s.original_max_position_embeddings);
    const float low_freq_wavelen = old_context / float(s.low_freq_factor);
    const float high_freq_wavelen = old_context / float(s.high_freq_factor);
    const float factor = float(s.factor);
    for (float& f : inv_freq) {
      const float wavelen = 2.0f * float(M_PI) / f;
      float scaled = wavelen > low_freq_wavelen ? f / factor : f;
      const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
      if (medium) {
        const float smooth = (old_context / wavelen - float(s.low_freq_factor)) /
                             float(s.high_freq_factor - s.low_freq_factor);
        scaled = (1.0f - smooth) * scaled / factor + smooth * scaled;
      }
      f = scaled;
    }
  }
  return inv_freq;
}

}  // namespace kestrel
