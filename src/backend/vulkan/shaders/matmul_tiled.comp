#version 460
// out[t, row_offset + r] = x[t, :] · w[r, :] + bias[r] for prefill: a workgroup computes a tile
// of 64 weight rows x 64 tokens. Per 32-column step (one quantization group) all 256 threads
// dequantize the tile's 64 row groups into shared memory (8 weights each) and load the 64
// tokens' 32 inputs beside them, both stored k-major so that a thread reads its 4 rows and its 4
// tokens of one column as one 16-byte load each; each thread then accumulates 4 rows x 4 tokens
// in registers, so a weight is read and dequantized once per 64 tokens.
// Grid: (ceil(rows / 64), ceil(n / 64)).
#extension GL_EXT_control_flow_attributes : require
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
const uint K = 32;
// [k][row / 4] and [k][token / 4]: one padding vec4 a column keeps the 16-byte reads aligned.
shared vec4 w_tile[K][TILE / 4 + 1];
shared vec4 x_tile[K][TILE / 4 + 1];

// Weights [col0, col0 + 8) of row `row` (col0 a multiple of 8; zeros past the row's end).
void weight8(Weight w, uint row, uint col0, out float v[8]) {
  if (FORMAT == FMT_SYM_INT4 || FORMAT == FMT_ASYM_INT4) {
    // Byte j of a 32-group holds weight j (low nibble) and j + 16 (high nibble): the 8 weights
    // are the low or high nibbles of 8 consecutive bytes (2 words).
    const uint j = col0 % 32;
    const uint64_t group_word = (uint64_t(row) * w.cols + (col0 - j)) >> 3;
    const uint word = uint(group_word) + (j % 16) / 4;
    const uint shift = j >= 16 ? 4 : 0;
    const uint64_t s = uint64_t(row) * (w.cols / w.block) + col0 / w.block;
    const float d = fp16_at(w.scales, s);
    const float m = FORMAT == FMT_ASYM_INT4 ? fp16_at(w.mins, s) : 0.0;
    [[unroll]] for (uint e = 0; e < 8; ++e) {
      const uint code = (w.data.v[word + e / 4] >> (8 * (e % 4) + shift)) & 15u;
      v[e] = FORMAT == FMT_SYM_INT4 ? float(int(code) - 8) * d : float(code) * d + m;
    }
    return;
  }
  if (FORMAT == FMT_SYM_INT8) {
    const uint word = uint((uint64_t(row) * w.cols + col0) >> 2);
    const uint64_t s = uint64_t(row) * (w.cols / w.block) + col0 / w.block;
    const float d = fp16_at(w.scales, s);
    [[unroll]] for (uint e = 0; e < 8; ++e) {
      v[e] = float(bitfieldExtract(int(w.data.v[word + e / 4]), 8 * int(e % 4), 8)) * d;
    }
    return;
  }
  [[unroll]] for (uint e = 0; e < 8; ++e) {
    v[e] = col0 + e < w.cols ? weight_at(w, FORMAT, row, col0 + e) : 0.0;
  }
}

void main() {
  const uint row0 = gl_WorkGroupID.x * TILE;
  const uint tok0 = gl_WorkGroupID.y * TILE;
  const uint tx = gl_LocalInvocationID.x, ty = gl_LocalInvocationID.y;
  const uint tid = ty * 16 + tx;
  Weight w = Weight(Words(p.data), Words(p.scales), Words(p.mins), p.cols, p.block);
  Floats x = Floats(p.x);
  float acc[4][4];
  [[unroll]] for (uint i = 0; i < 4; ++i) {
    [[unroll]] for (uint j = 0; j < 4; ++j) acc[i][j] = 0.0;
  }
  // This thread's share of a step's dequantization: 8 weights of row wr.
  const uint wr = tid / 4, wq = tid % 4;
  const bool w_valid = row0 + wr < p.rows;
  const uint n_groups = (p.cols + K - 1) / K;
  for (uint g = 0; g < n_groups; ++g) {
    float v[8];
    if (w_valid) {
      weight8(w, row0 + wr, g * K + 8 * wq, v);
    } else {
      [[unroll]] for (uint e = 0; e < 8; ++e) v[e] = 0.0;
    }
    [[unroll]] for (uint e = 0; e < 8; ++e) w_tile[8 * wq + e][wr / 4][wr % 4] = v[e];
    // Inputs: consecutive threads read consecutive columns of a token (coalesced).
    [[unroll]] for (uint it = 0; it < TILE * K / 256; ++it) {
      const uint e = it * 256 + tid;
      const uint t = e / K, k = e % K;
      const uint col = g * K + k;
      x_tile[k][t / 4][t % 4] =
          tok0 + t < p.n && col < p.cols ? x.v[(tok0 + t) * p.x_stride + col] : 0.0;
    }
    barrier();
    [[unroll]] for (uint k = 0; k < K; ++k) {
      const vec4 a = w_tile[k][ty];
      const vec4 b = x_tile[k][tx];
      [[unroll]] for (uint i = 0; i < 4; ++i) {
        [[unroll]] for (uint j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
      }
    }
    barrier();
  }
  Floats out_ = Floats(p.out_);
  [[unroll]] for (uint i = 0; i < 4; ++i) {
    const uint r = row0 + ty * 4 + i;
    if (r >= p.rows) continue;
    const float bias = p.bias != 0 ? Floats(p.bias).v[r] : 0.0;
    [[unroll]] for (uint j = 0; j < 4; ++j) {
      const uint t = tok0 + tx * 4 + j;
      if (t < p.n) out_.v[t * p.out_stride + p.row_offset + r] = acc[i][j] + bias;
    }
  }
}
