#version 460
// out[t, h] = softmax(q[t, h] · Kᵀ / sqrt(d)) · V over positions 0..pos[t] of token t's
// sequence, read through its block table; one workgroup per (token, head, split). Keys go in
// chunks of 64, one per thread, with a running maximum and denominator (online softmax), so no
// score row is stored and any context length works. Each thread owns dims tid, tid + 64, ... of
// the output (head_dim <= 256). With n_splits > 1 (decode: few tokens, so few workgroups) split
// s takes keys [s * split_span, (s + 1) * split_span) only and stores its unnormalized output,
// maximum and denominator in `partials` for attention_combine.comp. Grid: (n_heads, n,
// n_splits).
#include "common.glsl"

layout(local_size_x = 64) in;
layout(push_constant) uniform Params {
  uint64_t out_;          // fp32 [n, out_stride]
  uint64_t q;             // fp32 [n, q_stride]
  uint64_t k_cache;       // this layer's [n_blocks, n_kv_heads, 16, head_dim]
  uint64_t v_cache;
  uint64_t positions;     // int32 [n]
  uint64_t seq_ids;       // int32 [n]
  uint64_t block_tables;  // int32 [max_seqs, table_stride]
  uint64_t partials;      // fp32 [n, n_heads, n_splits, head_dim + 2] when n_splits > 1
  uint q_stride;
  uint out_stride;
  uint head_dim;
  uint n_kv_heads;
  uint group;  // query heads per KV head
  uint table_stride;
  float scale;
  uint split_span;  // keys of a split: a multiple of CHUNK
  uint n_splits;
} p;

const uint CHUNK = 64;
const uint MAX_DIMS = 4;  // head_dim <= 64 * MAX_DIMS
layout(buffer_reference, std430, buffer_reference_align = 16) buffer Vec4s {
  vec4 v[];
};
shared vec4 q_shared[64];  // head_dim <= 256 floats
shared float probs[CHUNK];
shared float reduce[64];

float workgroup_max(float v) {
  v = subgroupMax(v);
  if (subgroupElect()) reduce[gl_SubgroupID] = v;
  barrier();
  float m = reduce[0];
  for (uint sg = 1; sg < gl_NumSubgroups; ++sg) m = max(m, reduce[sg]);
  barrier();
  return m;
}

float workgroup_sum(float v) {
  v = subgroupAdd(v);
  if (subgroupElect()) reduce[gl_SubgroupID] = v;
  barrier();
  float s = 0.0;
  for (uint sg = 0; sg < gl_NumSubgroups; ++sg) s += reduce[sg];
  barrier();
  return s;
}

void main() {
  const uint h = gl_WorkGroupID.x;
  const uint t = gl_WorkGroupID.y;
  const uint tid = gl_LocalInvocationID.x;
  const uint d = p.head_dim;
  const uint kv_h = h / p.group;
  const uint n_ctx = uint(Ints(p.positions).v[t]) + 1;
  const uint split = gl_WorkGroupID.z;
  const uint key_begin = p.n_splits > 1 ? split * p.split_span : 0;
  const uint key_end = p.n_splits > 1 ? min(n_ctx, key_begin + p.split_span) : n_ctx;
  const uint seq = uint(Ints(p.seq_ids).v[t]);
  Ints table = Ints(p.block_tables);
  Floats k_cache = Floats(p.k_cache);
  Floats v_cache = Floats(p.v_cache);
  for (uint i = tid; i < d; i += 64) q_shared[i / 4][i % 4] = Floats(p.q).v[t * p.q_stride + h * d + i];
  barrier();

  float running_max = -1.0 / 0.0;
  float denom = 0.0;
  float acc[MAX_DIMS];
  for (uint k = 0; k < MAX_DIMS; ++k) acc[k] = 0.0;
  // Every chunk holds at least one key, so new_max below is finite.
  for (uint chunk = key_begin; chunk < key_end; chunk += CHUNK) {
    const uint j = chunk + tid;
    float score = -1.0 / 0.0;
    if (j < key_end) {
      const uint block = uint(table.v[seq * p.table_stride + j / 16]);
      const uint base = uint(((uint64_t(block) * p.n_kv_heads + kv_h) * 16 + j % 16) * d);
      float dot_qk = 0.0;
      if (d % 4 == 0) {
        // A key row starts on 16 bytes (base is a multiple of head_dim): 16-byte loads.
        Vec4s k4 = Vec4s(p.k_cache);
        for (uint i = 0; i < d / 4; ++i) dot_qk += dot(q_shared[i], k4.v[base / 4 + i]);
      } else {
        for (uint i = 0; i < d; ++i) dot_qk += q_shared[i / 4][i % 4] * k_cache.v[base + i];
      }
      score = dot_qk * p.scale;
    }
    const float new_max = max(running_max, workgroup_max(score));
    const float correction = exp(running_max - new_max);
    const float prob = j < key_end ? exp(score - new_max) : 0.0;
    probs[tid] = prob;
    denom = denom * correction + workgroup_sum(prob);
    running_max = new_max;
    // workgroup_sum's barriers also publish probs.
    const uint n_keys = min(CHUNK, key_end - chunk);
    for (uint k = 0; k < MAX_DIMS; ++k) acc[k] *= correction;
    for (uint jj = 0; jj < n_keys; ++jj) {
      const uint key = chunk + jj;
      const uint block = uint(table.v[seq * p.table_stride + key / 16]);
      const uint base = uint(((uint64_t(block) * p.n_kv_heads + kv_h) * 16 + key % 16) * d);
      const float pj = probs[jj];
      for (uint k = 0; k < MAX_DIMS; ++k) {
        const uint i = tid + 64 * k;
        if (i < d) acc[k] += pj * v_cache.v[base + i];
      }
    }
    barrier();  // probs is rewritten by the next chunk
  }
  if (p.n_splits > 1) {
    // A split past the token's context stores maximum -inf and denominator 0: weight 0.
    const uint base = ((t * gl_NumWorkGroups.x + h) * p.n_splits + split) * (d + 2);
    Floats partials = Floats(p.partials);
    for (uint k = 0; k < MAX_DIMS; ++k) {
      const uint i = tid + 64 * k;
      if (i < d) partials.v[base + i] = acc[k];
    }
    if (tid == 0) {
      partials.v[base + d] = running_max;
      partials.v[base + d + 1] = denom;
    }
    return;
  }
  const float inv = 1.0 / denom;
  for (uint k = 0; k < MAX_DIMS; ++k) {
    const uint i = tid + 64 * k;
    if (i < d) Floats(p.out_).v[t * p.out_stride + h * d + i] = acc[k] * inv;
  }
}
