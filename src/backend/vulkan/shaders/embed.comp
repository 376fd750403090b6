#version 460
// out[t, :] = row tokens[t] of the embedding table, for the tokens whose row lies in this part
// of the table ([row_begin, row_begin + rows)). Grid: (ceil(cols / 256), n).
#include "common.glsl"
#include "weights.glsl"

layout(local_size_x = 256) in;
layout(constant_id = 0) const uint FORMAT = 0;

layout(push_constant) uniform Params {
  uint64_t out_;  // fp32 [n, cols]
  uint64_t data;
  uint64_t scales;
  uint64_t mins;
  uint64_t tokens;  // int32 [n]
  uint cols;
  uint block;
  uint row_begin;
  uint rows;
} p;

void main() {
  const uint t = gl_WorkGroupID.y;
  const uint col = gl_GlobalInvocationID.x;
  const int token = Ints(p.tokens).v[t];
  if (col >= p.cols || token < int(p.row_begin) || token >= int(p.row_begin + p.rows)) return;
  Weight w = Weight(Words(p.data), Words(p.scales), Words(p.mins), p.cols, p.block);
  Floats(p.out_).v[t * p.cols + col] = weight_at(w, FORMAT, uint(token) - p.row_begin, col);
}
