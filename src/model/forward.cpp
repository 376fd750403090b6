#include "model/forward.h"

#include <array>

#include "backend/communicator.h"

namespace kestrel {

BatchView batch_view(const Batch& batch, const BlockTables& tables) {
  BatchView view;
  view.n_tokens = batch.size();
  view.tokens = batch.tokens.data();
  view.positions = batch.positions.data();
  view.seq_ids = batch.seq_ids.data();
  view.block_tables = tables.data;
  view.block_table_stride = tables.stride;
  view.n_logit_rows = int64_t(batch.logit_rows.size());
  view.logit_rows = batch.logit_rows.data();
  return view;
}

// The whole model up to the logits of batch.logit_rows: [logit_rows.size(), vocab], or a tensor
// of no rows when none are wanted. With a communicator, `weights` are one rank's shard
// (model/shard.h): the embeddings and the outputs of the row-parallel wo and w_down are partial
// sums, all-reduced before they join the residual stream.
Result<Tensor> forward_logits(Backend& backend, const ModelWeights& weights, const Batch& batch,
                              const BlockTables& tables, Communicator* comm,
                              bool tokens_from_argmax) {
  const ModelConfig& c = weights.config;
  const int64_t n = batch.size();
  BatchView view = batch_view(batch, tables);
  view.tokens_from_argmax = tokens_from_argmax;
  KS_RETURN_IF_ERROR(backend.begin_batch(view));
  const RopeParams rope{c.head_dim, c.n_heads, c.n_kv_heads};
  const float eps = float(c.rms_norm_eps);

  // The scratch tensors, as forward_scratch lists them (the workspace is sized from that list).
  namespace fs = forward_scratch;
  std::array<Tensor, fs::kTokenTensors> s;
  for (int i = 0; i < fs::kTokenTensors; ++i) {
    KS_ASSIGN_OR_RETURN(s[size_t(i)], backend.scratch(n, fs::width(c, fs::Token(i))));
  }
  const Tensor x = s[fs::residual], h = s[fs::normed], q = s[fs::q], k = s[fs::k], v = s[fs::v],
               attn = s[fs::attn], proj = s[fs::proj], gate = s[fs::gate], up = s[fs::up];

  KS_RETURN_IF_ERROR(backend.embed(x, weights.tok_embd));
  if (comm != nullptr) KS_RETURN_IF_ERROR(backend.all_reduce_sum(x, *comm));
  if (comm == nullptr) {
    // On one backend the layers are one op (a device backend may run them as one launch).
    const LayerScratch scratch{h, q, k, v, attn, proj, gate, up};
    KS_RETURN_IF_ERROR(backend.decoder_layers(x, scratch, weights.layers, 0, rope, eps));
  } else {
    // A rank of a split model issues each layer's ops one by one: its output projections are
    // partial sums, all-reduced before they are added to the residual stream.
    auto project_into_residual = [&](Tensor in, const Linear& w) -> Status {
      KS_RETURN_IF_ERROR(backend.matmul(proj, in, w));
      KS_RETURN_IF_ERROR(backend.all_reduce_sum(proj, *comm));
      return backend.add(x, proj);
    };
    for (int64_t il = 0; il < c.n_layers; ++il) {
      const LayerWeights& l = weights.layers[size_t(il)];
      const Tensor qkv[] = {q, k, v};
      const Linear* const qkv_weights[] = {&l.wq, &l.wk, &l.wv};
      KS_RETURN_IF_ERROR(backend.norm_matmul(qkv, h, x, l.attn_norm, eps, qkv_weights));
      KS_RETURN_IF_ERROR(backend.rope_attention(attn, q, k, v, il, rope));
      KS_RETURN_IF_ERROR(project_into_residual(attn, l.wo));

      KS_RETURN_IF_ERROR(
          backend.norm_matmul_swiglu(gate, up, h, x, l.ffn_norm, eps, l.w_gate, l.w_up));
      KS_RETURN_IF_ERROR(project_into_residual(gate, l.w_down));
    }
  }

  // The final norm and lm_head run only on the rows whose logits are wanted.
  const int64_t n_out = int64_t(batch.logit_rows.size());
  if (n_out == 0) return Tensor{};
  std::array<Tensor, fs::kHeadTensors> head;
  for (int i = 0; i < fs::kHeadTensors; ++i) {
    KS_ASSIGN_OR_RETURN(head[size_t(i)], backend.scratch(n_out, fs::width(c, fs::Head(i))));
  }
  // When every row asks for logits, in order (a decode step), the rows are x itself: no gather
  // (on a GPU, one dependent launch fewer a step).
  const bool every_row = logits_of_every_row(view);
  const Tensor last = every_row ? x : head[fs::last];
  const Tensor normed = head[fs::head_normed], out = head[fs::logits];
  if (!every_row) {
    KS_RETURN_IF_ERROR(backend.gather_rows(last, x, batch.logit_rows.data(), n_out));
  }
  const Tensor logits[] = {out};
  const Linear* const lm_head[] = {&weights.output};
  KS_RETURN_IF_ERROR(backend.norm_matmul(logits, normed, last, weights.output_norm, eps, lm_head));
  return out;
}

Status forward(Backend& backend, const ModelWeights& weights, const Batch& batch,
               const BlockTables& tables, std::vector<float>* logits) {
  KS_ASSIGN_OR_RETURN(Tensor out, forward_logits(backend, weights, batch, tables, nullptr));
  if (out.rows == 0) return Status::ok();
  logits->resize(size_t(out.rows * out.cols));
  return backend.read(out, logits->data());
}

Status forward_argmax(Backend& backend, const ModelWeights& weights, const Batch& batch,
                      const BlockTables& tables, std::vector<int32_t>* tokens,
                      std::span<const int32_t> full_rows, std::vector<float>* logits,
                      std::span<const RowDraw> draws) {
  KS_ASSIGN_OR_RETURN(Tensor out, forward_logits(backend, weights, batch, tables, nullptr));
  tokens->resize(size_t(out.rows));
  if (logits != nullptr) logits->resize(full_rows.size() * size_t(out.cols));
  if (out.rows == 0) return Status::ok();
  if (draws.empty()) {
    KS_RETURN_IF_ERROR(backend.argmax_rows(out, tokens->data()));
  } else {
    KS_RETURN_IF_ERROR(backend.pick_rows(out, draws, tokens->data()));
  }
  if (logits == nullptr) return Status::ok();
  return backend.read_rows(out, full_rows, logits->data());
}

Status forward_start_argmax(Backend& backend, const ModelWeights& weights, const Batch& batch,
                            const BlockTables& tables, bool tokens_from_argmax,
                            std::span<const RowDraw> draws) {
  KS_ASSIGN_OR_RETURN(Tensor out,
                      forward_logits(backend, weights, batch, tables, nullptr, tokens_from_argmax));
  if (out.rows == 0) return Status::error("forward_start_argmax: the batch asks for no logits");
  return backend.start_argmax(out, draws);
}

}  // namespace kestrel
