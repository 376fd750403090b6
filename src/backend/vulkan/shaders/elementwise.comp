#version 460
// Elementwise ops over n contiguous floats; OP picks the op:
//   0 swiglu: out = silu(a) * b     1 add: out = a + b (out may be a)
// Grid-stride loop, so any n runs on a bounded grid.
#include "common.glsl"

layout(local_size_x = 256) in;
layout(constant_id = 0) const uint OP = 0;
layout(push_constant) uniform Params {
  uint64_t out_;
  uint64_t a;
  uint64_t b;
  uint n;
} p;

void main() {
  Floats out_ = Floats(p.out_);
  Floats a = Floats(p.a);
  Floats b = Floats(p.b);
  const uint stride = gl_NumWorkGroups.x * 256;
  for (uint i = gl_GlobalInvocationID.x; i < p.n; i += stride) {
    const float x = a.v[i];
    if (OP == 0) {
      precise float v = x / (1.0 + exp(-x)) * b.v[i];
      out_.v[i] = v;
    } else {
      precise float v = x + b.v[i];
      out_.v[i] = v;
    }
  }
}
