#version 460
// out[t, row_offset + r] = x[t, :] · w[r, :] + bias[r] for decode-sized calls (up to 8 tokens a
// workgroup): a memory-bound matrix-vector product, written the way GPUs stream memory.
//
// A workgroup of 64 threads computes ROWS = 4 weight rows for TOKENS tokens. A row is cut into
// 16-byte units (32 int4 weights, 16 int8, 8 fp16/bf16 or 4 fp32); thread i takes units i,
// i + 64, ... of all 4 rows, so every load is one 16-byte load, the lanes of a subgroup read
// consecutive units (fully coalesced) and each thread keeps 4 independent loads in flight. A
// unit's weights are dequantized 4 at a time and multiplied with the matching 4 inputs of each
// token (a 16-byte load of x, served by the cache: every workgroup reads the same x), so each
// weight is read and dequantized once for all the workgroup's tokens. The ROWS x TOKENS partial
// sums live in registers (every loop below has compile-time bounds and is unrolled) and are
// reduced with subgroupAdd, then across the workgroup's subgroups in shared memory.
//
// SHAPE (constant 1) = TOKENS (1, 2, 4 or 8) + 16 when ALIGNED: every weight row and x row starts
// on 16 bytes (always for int4 / int8 rows, whose length is a multiple of 32; for fp32 / fp16 /
// bf16 when a row is a multiple of 16 bytes). Unaligned fp rows build each unit from 32-bit
// loads instead, padding the last unit of a row with zeros. Grid: (ceil(rows / 4), ceil(n /
// TOKENS)).
#extension GL_EXT_control_flow_attributes : require
#include "common.glsl"

layout(local_size_x = 64) in;
layout(constant_id = 0) const uint FORMAT = 0;
layout(constant_id = 1) const uint SHAPE = 1;
const uint TOKENS = SHAPE & 15u;
const bool ALIGNED = (SHAPE & 16u) != 0u;

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

layout(buffer_reference, std430, buffer_reference_align = 16) buffer Units {
  uvec4 v[];
};
layout(buffer_reference, std430, buffer_reference_align = 16) buffer Vec4s {
  vec4 v[];
};

const uint ROWS = 4;
const uint MAX_TOKENS = 8;
const uint THREADS = 64;
const bool INT4 = FORMAT == FMT_SYM_INT4 || FORMAT == FMT_ASYM_INT4;
const bool QUANTIZED = INT4 || FORMAT == FMT_SYM_INT8;
// Weights of a 16-byte unit, and its 4-weight chunks.
const uint UNIT = INT4 ? 32 : FORMAT == FMT_SYM_INT8 ? 16 : FORMAT == FMT_FP32 ? 4 : 8;
const uint CHUNKS = UNIT / 4;

// Sized by the specialization (1 KiB for one token), not the largest: on GPUs with 64 KiB of
// shared memory a compute unit then holds as many workgroups as its threads allow.
shared float partial[THREADS][ROWS * TOKENS];

// The 16 bytes of unit `unit` of row `row`.
uvec4 load_unit(uint row, uint unit) {
  if (ALIGNED) return Units(p.data).v[row * ((p.cols + UNIT - 1) / UNIT) + unit];
  // fp32 / fp16 / bf16 rows that do not start on 16 bytes: element by element.
  const uint col0 = unit * UNIT;
  const uint64_t base = uint64_t(row) * p.cols;
  Words data = Words(p.data);
  uvec4 q = uvec4(0);
  if (FORMAT == FMT_FP32) {
    [[unroll]] for (uint e = 0; e < 4; ++e) {
      if (col0 + e < p.cols) q[e] = data.v[uint(base + col0 + e)];
    }
  } else {
    [[unroll]] for (uint e = 0; e < 8; ++e) {
      if (col0 + e < p.cols) q[e / 2] |= half_bits(data, base + col0 + e) << (16 * (e % 2));
    }
  }
  return q;
}

// The scale and min (asym_int4) of the block holding unit `unit` of row `row`.
vec2 scale_and_min(uint row, uint unit) {
  if (!QUANTIZED) return vec2(1.0, 0.0);
  const uint64_t s = uint64_t(row) * (p.cols / p.block) + unit * UNIT / p.block;
  const float d = fp16_at(Words(p.scales), s);
  return vec2(d, FORMAT == FMT_ASYM_INT4 ? fp16_at(Words(p.mins), s) : 0.0);
}

// Column of chunk `c`'s first weight within its unit. int4 byte j of a 32-group holds weight j
// (low nibble) and j + 16 (high nibble): chunks 0-3 are the low nibbles of words 0-3, chunks 4-7
// their high nibbles.
uint chunk_column(uint c) {
  if (INT4) return (c & 3u) * 4 + (c >> 2) * 16;
  return c * 4;
}

// The 4 weights of chunk `c` of a unit.
vec4 dequantize(uvec4 q, uint c, vec2 dm) {
  if (INT4) {
    const uint word = q[c & 3u];
    const uint shift = (c >> 2) * 4;
    const vec4 code = vec4((uvec4(word) >> (uvec4(0, 8, 16, 24) + shift)) & 15u);
    if (FORMAT == FMT_SYM_INT4) return (code - 8.0) * dm.x;
    return code * dm.x + dm.y;
  }
  if (FORMAT == FMT_SYM_INT8) {
    const ivec4 code = ivec4(uvec4(q[c]) << uvec4(24, 16, 8, 0)) >> 24;  // sign-extended bytes
    return vec4(code) * dm.x;
  }
  if (FORMAT == FMT_FP16) return vec4(unpackHalf2x16(q[2 * c]), unpackHalf2x16(q[2 * c + 1]));
  if (FORMAT == FMT_BF16) {
    const uint a = q[2 * c], b = q[2 * c + 1];
    return uintBitsToFloat(uvec4(a << 16, a & 0xffff0000u, b << 16, b & 0xffff0000u));
  }
  return uintBitsToFloat(q);
}

// x[token, col .. col + 3] (zeros past the row's end).
vec4 load_x(uint token, uint col) {
  const uint i = token * p.x_stride + col;
  if (ALIGNED) return Vec4s(p.x).v[i / 4];
  Floats x = Floats(p.x);
  vec4 v = vec4(0.0);
  [[unroll]] for (uint e = 0; e < 4; ++e) {
    if (col + e < p.cols) v[e] = x.v[i + e];
  }
  return v;
}

void main() {
  const uint row0 = gl_WorkGroupID.x * ROWS;
  const uint tok0 = gl_WorkGroupID.y * TOKENS;
  const uint tid = gl_LocalInvocationID.x;
  const uint n_tok = min(TOKENS, p.n - tok0);
  const uint units = (p.cols + UNIT - 1) / UNIT;
  // Rows and tokens past the end read the last valid one; their sums are never written.
  uint row[ROWS];
  [[unroll]] for (uint r = 0; r < ROWS; ++r) row[r] = min(row0 + r, p.rows - 1);
  uint token[MAX_TOKENS];
  [[unroll]] for (uint t = 0; t < TOKENS; ++t) token[t] = tok0 + min(t, n_tok - 1);
  float acc[ROWS][MAX_TOKENS];
  [[unroll]] for (uint r = 0; r < ROWS; ++r) {
    [[unroll]] for (uint t = 0; t < TOKENS; ++t) acc[r][t] = 0.0;
  }
  for (uint u = tid; u < units; u += THREADS) {
    uvec4 q[ROWS];
    vec2 dm[ROWS];
    [[unroll]] for (uint r = 0; r < ROWS; ++r) {
      q[r] = load_unit(row[r], u);
      dm[r] = scale_and_min(row[r], u);
    }
    [[unroll]] for (uint c = 0; c < CHUNKS; ++c) {
      vec4 w[ROWS];
      [[unroll]] for (uint r = 0; r < ROWS; ++r) w[r] = dequantize(q[r], c, dm[r]);
      const uint col = u * UNIT + chunk_column(c);
      [[unroll]] for (uint t = 0; t < TOKENS; ++t) {
        const vec4 xv = load_x(token[t], col);
        [[unroll]] for (uint r = 0; r < ROWS; ++r) acc[r][t] += dot(w[r], xv);
      }
    }
  }
  [[unroll]] for (uint r = 0; r < ROWS; ++r) {
    [[unroll]] for (uint t = 0; t < TOKENS; ++t) {
      const float s = subgroupAdd(acc[r][t]);
      if (subgroupElect()) partial[gl_SubgroupID][r * TOKENS + t] = s;
    }
  }
  barrier();
  if (tid < ROWS * TOKENS) {
    const uint r = tid / TOKENS, t = tid % TOKENS;
    if (row0 + r < p.rows && t < n_tok) {
      float s = 0.0;
      for (uint sg = 0; sg < gl_NumSubgroups; ++sg) s += partial[sg][tid];
      if (p.bias != 0) s += Floats(p.bias).v[row0 + r];
      Floats(p.out_).v[(tok0 + t) * p.out_stride + p.row_offset + row0 + r] = s;
    }
  }
}
