#version 460
// out[i, :] = x[rows[i], :]. Grid: (ceil(cols / 256), n).
#include "common.glsl"

layout(local_size_x = 256) in;
layout(push_constant) uniform Params {
  uint64_t out_;  // fp32 [n, cols]
  uint64_t x;     // fp32 [?, cols]
  uint64_t rows;  // int32 [n]
  uint cols;
} p;

void main() {
  const uint i = gl_WorkGroupID.y;
  const uint c = gl_GlobalInvocationID.x;
  if (c >= p.cols) return;
  const uint row = uint(Ints(p.rows).v[i]);
  Floats(p.out_).v[i * p.cols + c] = Floats(p.x).v[row * p.cols + c];
}
