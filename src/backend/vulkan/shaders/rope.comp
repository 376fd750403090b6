#version 460
// Rotates q and k heads in place (rotate_half: element i pairs with i + head_dim / 2) with the
// per-token cos / sin table the host computed for the batch's positions in fp32, as the CPU
// backend does. Grid: (ceil(half / 64), n_heads + n_kv_heads, n).
#include "common.glsl"

layout(local_size_x = 64) in;
layout(push_constant) uniform Params {
  uint64_t q;      // fp32 [n, q_stride]
  uint64_t k;      // fp32 [n, k_stride]
  uint64_t table;  // fp32 [n, 2, half]: cos then sin
  uint q_stride;
  uint k_stride;
  uint n_heads;
  uint head_dim;
} p;

void main() {
  const uint half_dim = p.head_dim / 2;
  const uint i = gl_GlobalInvocationID.x;
  const uint head = gl_WorkGroupID.y;
  const uint t = gl_WorkGroupID.z;
  if (i >= half_dim) return;
  Floats table = Floats(p.table);
  const float c = table.v[(t * 2) * half_dim + i];
  const float s = table.v[(t * 2 + 1) * half_dim + i];
  Floats v = head < p.n_heads ? Floats(p.q) : Floats(p.k);
  const uint base = head < p.n_heads ? t * p.q_stride + head * p.head_dim
                                     : t * p.k_stride + (head - p.n_heads) * p.head_dim;
  const float a = v.v[base + i], b = v.v[base + i + half_dim];
  precise float ra = a * c - b * s;
  precise float rb = b * c + a * s;
  v.v[base + i] = ra;
  v.v[base + i + half_dim] = rb;
}
