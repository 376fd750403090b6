#version 460
// out[t, row_offset + r] = x[t, :] · w[r, :] + bias[r] for a tile of ROWS weight rows and
// TOKENS tokens per workgroup (ROWS x TOKENS = 32: 32 rows x 1 token for decode up to 4 rows x 8
// tokens for prefill; the host picks TOKENS from the call's token count). Each thread takes
// (row, 32-column group) pairs of the tile (a group is one int4/int8 quantization group),
// dequantizes the group once and multiplies it with the tile's tokens, so weights are read once
// per TOKENS tokens; the partial sums are reduced within subgroups and then across them.
// Grid: (ceil(rows / ROWS), ceil(n / TOKENS)).
#include "common.glsl"
#include "weights.glsl"

layout(local_size_x = 64) in;
layout(constant_id = 0) const uint FORMAT = 0;
layout(constant_id = 1) const uint TOKENS = 8;  // 1, 2, 4 or 8

layout(push_constant) uniform Params {
  uint64_t x;       // fp32 [n, x_stride]
  uint64_t out_;    // fp32 [n, out_stride]
  uint64_t data;    // this part's weight rows
  uint64_t scales;
  uint64_t mins;
  uint64_t bias;    // fp32 [rows], 0 for none
  uint n;
  uint rows;        // rows of this part
  uint cols;
  uint block;
  uint row_offset;  // output column of the part's first row
  uint x_stride;
  uint out_stride;
} p;

const uint ROWS = 32 / TOKENS;
shared float partial[64][32];

void main() {
  const uint row0 = gl_WorkGroupID.x * ROWS;
  const uint tok0 = gl_WorkGroupID.y * TOKENS;
  const uint tid = gl_LocalInvocationID.x;
  Weight w = Weight(Words(p.data), Words(p.scales), Words(p.mins), p.cols, p.block);
  Floats x = Floats(p.x);
  float acc[32];
  for (uint i = 0; i < 32; ++i) acc[i] = 0.0;
  const uint n_groups = (p.cols + 31) / 32;
  const uint n_rows = min(ROWS, p.rows - row0);
  const uint n_tok = min(TOKENS, p.n - tok0);
  float vals[32];
  // The (row, group) pairs of the tile are spread over the threads, adjacent threads on
  // adjacent groups of a row, so that narrow matrices (few groups a row) still use them all.
  for (uint item = tid; item < n_rows * n_groups; item += gl_WorkGroupSize.x) {
    const uint r = item / n_groups, g = item % n_groups;
    const uint width = min(32u, p.cols - g * 32);
    weight_group(w, FORMAT, row0 + r, g, vals);
    for (uint t = 0; t < n_tok; ++t) {
      const uint xbase = (tok0 + t) * p.x_stride + g * 32;
      float s = 0.0;
      for (uint j = 0; j < width; ++j) s += vals[j] * x.v[xbase + j];
      acc[r * TOKENS + t] += s;
    }
  }
  for (uint i = 0; i < 32; ++i) {
    const float s = subgroupAdd(acc[i]);
    if (subgroupElect()) partial[gl_SubgroupID][i] = s;
  }
  barrier();
  if (tid < 32) {
    const uint r = tid / TOKENS, t = tid % TOKENS;
    if (r < n_rows && t < n_tok) {
      float s = 0.0;
      for (uint sg = 0; sg < gl_NumSubgroups; ++sg) s += partial[sg][tid];
      if (p.bias != 0) s += Floats(p.bias).v[row0 + r];
      Floats(p.out_).v[(tok0 + t) * p.out_stride + p.row_offset + row0 + r] = s;
    }
  }
}
