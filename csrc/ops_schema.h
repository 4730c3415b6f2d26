// The schemas of the contrastive_kernels ops, in one place: ops.cpp defines them in the
// contrastive_kernels namespace, and the CUDA emulator's test build (csrc/emu) in its own.
#pragma once

#include <torch/library.h>

namespace ck {

inline void define_ops(torch::Library& m) {
  // lse_stats forward (reference.lse_stats): -> (row_lse (G,B), pos_sum (B,), pos_count (B,),
  // col_lse (N,) or (0,), e_key (G,B,D) or (0,), p_key (B,D) or (0,)). With row_only, e_key[g,i] =
  // sum_j softmax_j(gamma_g l_ij) b_j k_j and p_key[i] = sum_{j pos} b_j k_j (backward is then O(BD)).
  m.def(
      "lse_fwd(Tensor q, Tensor k, Tensor row_scale, Tensor? col_scale, Tensor? row_bias, Tensor? col_bias, "
      "float[] gammas, Tensor? exclude, Tensor? q_labels, Tensor? k_labels, bool want_col_lse, bool row_only) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // lse_fwd and, from the same pass, the hard negatives of mixing (CPU only; fp16/bf16/fp32): ->
  // (the 6 outputs of lse_fwd, best (B, n_best) int64, count (B,) int64). count[i] = #columns j with
  // !(<q_i, k_j> <= threshold[i]) (the raw dot, no exclusions or labels); best[i] = the n_best of
  // them with the largest dots in topk's order (ties to the lower column; -1 where fewer), exact
  // when n_best <= count[i] <= capacity (more than capacity: some were dropped).
  m.def(
      "lse_topk_fwd(Tensor q, Tensor k, Tensor row_scale, Tensor? col_scale, Tensor? row_bias, Tensor? col_bias, "
      "float[] gammas, Tensor? exclude, Tensor? q_labels, Tensor? k_labels, bool want_col_lse, bool row_only, "
      "Tensor threshold, int capacity, int n_best) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // lse_stats backward by recomputation: -> (g_key (B,D) = sum_j G_ij b_j k_j, h (N,D) =
  // sum_i G_ij a_i q_i, dc (B,) = sum_j G_ij, dd (N,) = sum_i G_ij), each (0,) unless asked for.
  m.def(
      "lse_bwd(Tensor q, Tensor k, Tensor row_scale, Tensor? col_scale, Tensor? row_bias, Tensor? col_bias, "
      "float[] gammas, Tensor? exclude, Tensor? q_labels, Tensor? k_labels, Tensor row_lse, Tensor col_lse, "
      "Tensor d_row, Tensor? d_pos, Tensor? d_col, bool need_g_key, bool need_h, bool need_dc, bool need_dd) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  // exact top-k: -> (values fp32 (M,k), indices int64 (M,k)); ties to the lower index.
  m.def(
      "topk(Tensor query, Tensor bank, int k, str similarity, Tensor? exclude_index, Tensor? query_labels, "
      "Tensor? bank_labels) -> (Tensor, Tensor)");
  // hard-negative mixing with given draws (reference.mix_points): -> (B, s+s', D)
  m.def(
      "mix(Tensor query, Tensor negatives, Tensor hard_index, Tensor pair_index, Tensor alpha, "
      "Tensor query_index, Tensor query_weight) -> Tensor");
  // u_it = <q_i, h_it> for the mixed points h = mix(mix_query, ...), never stored: -> (B, s+s')
  m.def(
      "mixed_dots(Tensor q, Tensor mix_query, Tensor negatives, Tensor hard_index, Tensor pair_index, "
      "Tensor alpha, Tensor query_index, Tensor query_weight) -> Tensor");
  // its backward: dq_i = sum_t grad_it h_it -> (B, D) in the accumulation dtype
  m.def(
      "mixed_dots_bwd(Tensor grad, Tensor mix_query, Tensor negatives, Tensor hard_index, Tensor pair_index, "
      "Tensor alpha, Tensor query_index, Tensor query_weight) -> Tensor");
  // the synthetic logits l_it = row_scale_i u_it + row_bias_i reduced to the loss's terms (CPU only):
  // -> (lse (G,B) = log sum_t e^{gamma_g l_it}, e (G,B,D) = sum_t softmax_t(gamma_g l_i.) h_it,
  // su (G,B) = sum_t softmax_t(gamma_g l_i.) u_it), in the accumulation dtype; backward is O(B D).
  m.def(
      "mixed_lse(Tensor q, Tensor mix_query, Tensor negatives, Tensor hard_index, Tensor pair_index, "
      "Tensor alpha, Tensor query_index, Tensor query_weight, Tensor row_scale, Tensor? row_bias, float[] gammas) "
      "-> (Tensor, Tensor, Tensor)");
}

}  // namespace ck
