#version 460
// Writes k and v [n, kv_dim] of the batch's tokens into one layer's paged caches
// [n_blocks, n_kv_heads, 16, head_dim] at their positions. Grid: (ceil(kv_dim / 256), n).
#include "common.glsl"

layout(local_size_x = 256) in;
layout(push_constant) uniform Params {
  uint64_t k;             // fp32 [n, kv_dim]
  uint64_t v;             // fp32 [n, kv_dim]
  uint64_t k_cache;       // this layer's
  uint64_t v_cache;
  uint64_t positions;     // int32 [n]
  uint64_t seq_ids;       // int32 [n]
  uint64_t block_tables;  // int32 [max_seqs, table_stride]
  uint kv_dim;
  uint head_dim;
  uint n_kv_heads;
  uint table_stride;
} p;

void main() {
  const uint t = gl_WorkGroupID.y;
  const uint e = gl_GlobalInvocationID.x;
  if (e >= p.kv_dim) return;
  const uint pos = uint(Ints(p.positions).v[t]);
  const uint seq = uint(Ints(p.seq_ids).v[t]);
  const uint block = uint(Ints(p.block_tables).v[seq * p.table_stride + pos / 16]);
  const uint head = e / p.head_dim, i = e % p.head_dim;
  const uint64_t dst = ((uint64_t(block) * p.n_kv_heads + head) * 16 + pos % 16) * p.head_dim + i;
  Floats(p.k_cache).v[uint(dst)] = Floats(p.k).v[t * p.kv_dim + e];
  Floats(p.v_cache).v[uint(dst)] = Floats(p.v).v[t * p.kv_dim + e];
}
