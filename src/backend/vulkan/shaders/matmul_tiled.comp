#version 460
// out[t, row_offset + r] = x[t, :] · w[r, :] + bias[r] for prefill: a workgroup computes a tile
// of 64 weight rows x 64 tokens. Per 32-column step (one quantization group) 64 threads
// dequantize the tile's 64 row groups into shared memory and all 256 load the 64 tokens' 32
// inputs beside them; each thread then accumulates 4 rows x 4 tokens from shared memory, so a
// weight is read and dequantized once per 64 tokens. Grid: (ceil(rows / 64), ceil(n / 64)).
#include "common.glsl"
#include "weights.glsl"

layout(local_size_x = 16, local_size_y = 16) in;
layout(constant_id = 0) const uint FORMAT = 0;

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

const uint TILE = 64;
shared float w_tile[TILE][33];  // [row, k], padded against bank conflicts
shared float x_tile[TILE][33];  // [token, k]

void main() {
  const uint row0 = gl_WorkGroupID.x * TILE;
  const uint tok0 = gl_WorkGroupID.y * TILE;
  const uint tx = gl_LocalInvocationID.x, ty = gl_LocalInvocationID.y;
  const uint tid = ty * 16 + tx;
  Weight w = Weight(Words(p.data), Words(p.scales), Words(p.mins), p.cols, p.block);
  Floats x = Floats(p.x);
  float acc[4][4];
  for (uint i = 0; i < 4; ++i) {
    for (uint j = 0; j < 4; ++j) acc[i][j] = 0.0;
  }
  float vals[32];
  const uint n_groups = (p.cols + 31) / 32;
  for (uint g = 0; g < n_groups; ++g) {
    if (tid < TILE) {
      if (row0 + tid < p.rows) {
        weight_group(w, FORMAT, row0 + tid, g, vals);
      } else {
        for (uint k = 0; k < 32; ++k) vals[k] = 0.0;
      }
      for (uint k = 0; k < 32; ++k) w_tile[tid][k] = vals[k];
    }
    for (uint e = tid; e < TILE * 32; e += 256) {
      const uint t = e / 32, k = e % 32;
      const uint col = g * 32 + k;
      x_tile[t][k] = tok0 + t < p.n && col < p.cols ? x.v[(tok0 + t) * p.x_stride + col] : 0.0;
    }
    barrier();
    for (uint k = 0; k < 32; ++k) {
      float a[4], b[4];
      for (uint i = 0; i < 4; ++i) a[i] = w_tile[ty + 16 * i][k];
      for (uint j = 0; j < 4; ++j) b[j] = x_tile[tx + 16 * j][k];
      for (uint i = 0; i < 4; ++i) {
        for (uint j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    barrier();
  }
  Floats out_ = Floats(p.out_);
  for (uint i = 0; i < 4; ++i) {
    const uint r = row0 + ty + 16 * i;
    if (r >= p.rows) continue;
    const float bias = p.bias != 0 ? Floats(p.bias).v[r] : 0.0;
    for (uint j = 0; j < 4; ++j) {
      const uint t = tok0 + tx + 16 * j;
      if (t < p.n) out_.v[t * p.out_stride + p.row_offset + r] = acc[i][j] + bias;
    }
  }
}
