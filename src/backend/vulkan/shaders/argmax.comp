#version 460
// out[r] = index of the largest value of row r (the lowest index among ties; NaN never wins, a
// row of nothing but NaN gives 0: row_argmax of src/core/argmax.h). One workgroup per row.
// Grid: (rows).
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"

layout(local_size_x = 256) in;
layout(push_constant) uniform Params {
  uint64_t x;    // fp32 [rows, cols]
  uint64_t out_;  // int32 [rows]
  uint cols;
} p;

// By the bits: a driver without SignedZeroInfNanPreserve may fold isnan() to false.
bool is_nan(float v) { return (floatBitsToUint(v) & 0x7fffffffu) > 0x7f800000u; }

shared float best_value[256];
shared uint best_index[256];

void main() {
  const uint row = gl_WorkGroupID.x;
  const uint tid = gl_LocalInvocationID.x;
  Floats x = Floats(p.x);
  float value = -1.0 / 0.0;
  uint index = 0xffffffffu;
  const uint base = row * p.cols;
  uint i = tid;
  // 8 loads in flight a thread (one workgroup streams a whole vocabulary row), compared in
  // index order so that ties still go to the lowest index.
  for (; i + 7 * 256 < p.cols; i += 8 * 256) {
    float v[8];
    [[unroll]] for (uint u = 0; u < 8; ++u) v[u] = x.v[base + i + u * 256];
    [[unroll]] for (uint u = 0; u < 8; ++u) {
      if (!is_nan(v[u]) && (index == 0xffffffffu || v[u] > value)) {
        value = v[u];
        index = i + u * 256;
      }
    }
  }
  for (; i < p.cols; i += 256) {
    const float v = x.v[base + i];
    if (!is_nan(v) && (index == 0xffffffffu || v > value)) {
      value = v;
      index = i;
    }
  }
  best_value[tid] = value;
  best_index[tid] = index;
  barrier();
  for (uint stride = 128; stride > 0; stride /= 2) {
    if (tid < stride) {
      const float v = best_value[tid + stride];
      const uint j = best_index[tid + stride];
      const uint mine = best_index[tid];
      if (j != 0xffffffffu &&
          (mine == 0xffffffffu || v > best_value[tid] || (v == best_value[tid] && j < mine))) {
        best_value[tid] = v;
        best_index[tid] = j;
      }
    }
    barrier();
  }
  if (tid == 0) Ints(p.out_).v[row] = int(best_index[0] == 0xffffffffu ? 0 : best_index[0]);
}
