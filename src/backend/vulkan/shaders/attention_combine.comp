#version 460
// Combines attention.comp's splits of one (token, head): with m_s, l_s and o_s the maximum,
// denominator and unnormalized output of split s, M = max m_s,
//   out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s.
// Split 0 always holds key 0, so M is finite; empty splits (m_s = -inf) weigh 0.
// Grid: (n_heads, n).
#include "common.glsl"

layout(local_size_x = 64) in;
layout(push_constant) uniform Params {
  uint64_t out_;      // fp32 [n, out_stride]
  uint64_t partials;  // fp32 [n, n_heads, n_splits, head_dim + 2]
  uint out_stride;
  uint head_dim;
  uint n_splits;
} p;

void main() {
  const uint h = gl_WorkGroupID.x;
  const uint t = gl_WorkGroupID.y;
  const uint tid = gl_LocalInvocationID.x;
  const uint d = p.head_dim;
  const uint stride = d + 2;
  const uint base = (t * gl_NumWorkGroups.x + h) * p.n_splits * stride;
  Floats partials = Floats(p.partials);
  float m = -1.0 / 0.0;
  for (uint s = 0; s < p.n_splits; ++s) m = max(m, partials.v[base + s * stride + d]);
  float denom = 0.0;
  for (uint s = 0; s < p.n_splits; ++s) {
    denom += exp(partials.v[base + s * stride + d] - m) * partials.v[base + s * stride + d + 1];
  }
  const float inv = 1.0 / denom;
  for (uint i = tid; i < d; i += 64) {
    float acc = 0.0;
    for (uint s = 0; s < p.n_splits; ++s) {
      acc += exp(partials.v[base + s * stride + d] - m) * partials.v[base + s * stride + i];
    }
    Floats(p.out_).v[t * p.out_stride + h * d + i] = acc * inv;
  }
}
