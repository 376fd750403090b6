#version 460
// dst[i] = src[i] for n 16-byte elements: the copy that measures the device's memory bandwidth
// for roofline(). Reads and writes go through the shader cores as the model's shaders do (not
// the copy engines vkCmdCopyBuffer may use). Each invocation issues its four loads before its
// four stores, so that four are in flight; grid-stride over any grid. Grid: (any, 1, 1).
#include "common.glsl"

layout(local_size_x = 256) in;
layout(buffer_reference, std430, buffer_reference_align = 16) buffer Vec4s {
  uvec4 v[];
};
layout(push_constant) uniform Params {
  uint64_t dst;  // uvec4 [n]
  uint64_t src;  // uvec4 [n]
  uint n;
} p;

void main() {
  Vec4s src = Vec4s(p.src);
  Vec4s dst = Vec4s(p.dst);
  const uint stride = gl_NumWorkGroups.x * gl_WorkGroupSize.x;
  for (uint i = gl_GlobalInvocationID.x; i < p.n; i += 4 * stride) {
    const uint i1 = i + stride, i2 = i + 2 * stride, i3 = i + 3 * stride;
    uvec4 v0 = src.v[i], v1 = uvec4(0), v2 = uvec4(0), v3 = uvec4(0);
    if (i1 < p.n) v1 = src.v[i1];
    if (i2 < p.n) v2 = src.v[i2];
    if (i3 < p.n) v3 = src.v[i3];
    dst.v[i] = v0;
    if (i1 < p.n) dst.v[i1] = v1;
    if (i2 < p.n) dst.v[i2] = v2;
    if (i3 < p.n) dst.v[i3] = v3;
  }
}
