#version 460
// out[r, :] = x[r, :] / rms(x[r, :]) * w, one workgroup per row. Grid: (rows).
#include "common.glsl"

layout(local_size_x = 256) in;
layout(push_constant) uniform Params {
  uint64_t out_;  // fp32 [rows, cols]
  uint64_t x;     // fp32 [rows, cols]
  uint64_t w;     // fp32 [cols]
  uint cols;
  float eps;
} p;

shared float sums[256];

void main() {
  const uint row = gl_WorkGroupID.x;
  const uint tid = gl_LocalInvocationID.x;
  Floats x = Floats(p.x);
  const uint base = row * p.cols;
  float s = 0.0;
  for (uint i = tid; i < p.cols; i += 256) s += x.v[base + i] * x.v[base + i];
  s = subgroupAdd(s);
  if (subgroupElect()) sums[gl_SubgroupID] = s;
  barrier();
  float total = 0.0;
  for (uint sg = 0; sg < gl_NumSubgroups; ++sg) total += sums[sg];
  // 1 / sqrt rather than inversesqrt: the latter may be approximate.
  const float scale = 1.0 / sqrt(total / float(p.cols) + p.eps);
  Floats out_ = Floats(p.out_);
  Floats w = Floats(p.w);
  for (uint i = tid; i < p.cols; i += 256) {
    precise float v = w.v[i] * (x.v[base + i] * scale);
    out_.v[base + i] = v;
  }
}
