// Shared by the torch glue of every backend: argument checks with clear messages. The Python
// layer (functional.py) validates user input first; these checks keep direct calls of the ops
// (torch.ops.contrastive_kernels.*) from ever reaching a kernel with bad shapes or dtypes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <string>

namespace ck {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_features(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D (rows, dim), got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op, ": ", name,
              " must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
}

inline void check_vector(const at::Tensor& x, int64_t n, const char* op, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.size(0) == n, op, ": ", name, " must be 1-D of length ", n,
              ", got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), op, ": ", name, " must be floating point, got ",
              x.scalar_type());
}

inline void check_device(const at::Tensor& x, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " is on ", x.device(), " but the features are on ",
              ref.device());
}

inline void check_index(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", x.scalar_type());
}

// Labels of lse_stats: both or neither; int64 (B,)/(N,) compared for equality, or int64 bitsets
// (B, W)/(N, W).
inline void check_labels(const c10::optional<at::Tensor>& ql, const c10::optional<at::Tensor>& kl,
                         int64_t B, int64_t N, const char* op) {
  TORCH_CHECK(ql.has_value() == kl.has_value(), op, ": q_labels and k_labels must be given together");
  if (!ql.has_value()) return;
  check_index(*ql, op, "q_labels");
  check_index(*kl, op, "k_labels");
  TORCH_CHECK(ql->dim() == kl->dim() && (ql->dim() == 1 || ql->dim() == 2), op,
              ": labels must both be 1-D (class ids) or both 2-D (bitsets), got shapes ", ql->sizes(),
              " and ", kl->sizes());
  TORCH_CHECK(ql->size(0) == B && kl->size(0) == N, op, ": q_labels must have ", B,
              " rows and k_labels ", N, ", got shapes ", ql->sizes(), " and ", kl->sizes());
  if (ql->dim() == 2)
    TORCH_CHECK(ql->size(1) == kl->size(1), op, ": bitset labels must have the same number of words, got ",
                ql->sizes(), " and ", kl->sizes());
}

// The lse_stats arguments every backend checks the same way.
inline void check_lse_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_scale,
                           const c10::optional<at::Tensor>& col_scale, const c10::optional<at::Tensor>& row_bias,
                           const c10::optional<at::Tensor>& col_bias, at::ArrayRef<double> gammas,
                           const c10::optional<at::Tensor>& exclude, const c10::optional<at::Tensor>& q_labels,
                           const c10::optional<at::Tensor>& k_labels, int max_gammas) {
  check_features(q, op, "q");
  check_features(k, op, "k");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k must have one dtype, got ", q.scalar_type(),
              " and ", k.scalar_type());
  TORCH_CHECK(q.size(1) == k.size(1), op, ": q and k must have the same feature dimension, got ", q.sizes(),
              " and ", k.sizes());
  check_device(k, q, op, "k");
  const int64_t B = q.size(0), N = k.size(0);
  check_vector(row_scale, B, op, "row_scale");
  check_device(row_scale, q, op, "row_scale");
  if (col_scale.has_value()) {
    check_vector(*col_scale, N, op, "col_scale");
    check_device(*col_scale, q, op, "col_scale");
  }
  if (row_bias.has_value()) {
    check_vector(*row_bias, B, op, "row_bias");
    check_device(*row_bias, q, op, "row_bias");
  }
  if (col_bias.has_value()) {
    check_vector(*col_bias, N, op, "col_bias");
    check_device(*col_bias, q, op, "col_bias");
  }
  TORCH_CHECK(!gammas.empty() && static_cast<int>(gammas.size()) <= max_gammas, op, ": 1 to ", max_gammas,
              " gammas are supported, got ", gammas.size());
  if (exclude.has_value()) {
    check_index(*exclude, op, "exclude");
    TORCH_CHECK(exclude->dim() == 2 && exclude->size(0) == B, op, ": exclude must be (", B,
                ", E) column indices, got shape ", exclude->sizes());
    check_device(*exclude, q, op, "exclude");
  }
  check_labels(q_labels, k_labels, B, N, op);
  if (q_labels.has_value()) {
    check_device(*q_labels, q, op, "q_labels");
    check_device(*k_labels, q, op, "k_labels");
  }
}

// lse_bwd: the lse_fwd arguments plus the saved statistics and the incoming gradients.
inline void check_lse_bwd_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& row_scale,
                               const c10::optional<at::Tensor>& col_scale, const c10::optional<at::Tensor>& row_bias,
                               const c10::optional<at::Tensor>& col_bias, at::ArrayRef<double> gammas,
                               const c10::optional<at::Tensor>& exclude, const c10::optional<at::Tensor>& q_labels,
                               const c10::optional<at::Tensor>& k_labels, int max_gammas, const at::Tensor& row_lse,
                               const at::Tensor& col_lse, const at::Tensor& d_row,
                               const c10::optional<at::Tensor>& d_pos, const c10::optional<at::Tensor>& d_col) {
  const char* op = "lse_bwd";
  check_lse_args(op, q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                 max_gammas);
  const int64_t B = q.size(0), N = k.size(0), G = static_cast<int64_t>(gammas.size());
  TORCH_CHECK(row_lse.dim() == 2 && row_lse.size(0) == G && row_lse.size(1) == B, op, ": row_lse must be (", G,
              ", ", B, "), got ", row_lse.sizes());
  TORCH_CHECK(d_row.dim() == 2 && d_row.size(0) == G && d_row.size(1) == B, op, ": d_row must be (", G, ", ", B,
              "), got ", d_row.sizes());
  TORCH_CHECK(col_lse.dim() == 1 && (col_lse.numel() == 0 || col_lse.numel() == N), op, ": col_lse must be (", N,
              ",) or empty, got ", col_lse.sizes());
  if (d_pos.has_value()) {
    TORCH_CHECK(d_pos->dim() == 1 && d_pos->size(0) == B, op, ": d_pos must be (", B, ",), got ", d_pos->sizes());
    check_device(*d_pos, q, op, "d_pos");
  }
  if (d_col.has_value()) {
    TORCH_CHECK(d_col->dim() == 1 && d_col->size(0) == N && col_lse.numel() == N, op, ": d_col must be (", N,
                ",) and needs col_lse, got ", d_col->sizes());
    check_device(*d_col, q, op, "d_col");
  }
  for (const at::Tensor* t : {&row_lse, &col_lse, &d_row}) check_device(*t, q, op, "a statistic");
}

// Equality labels -> dense int32 ids (equal iff equal), so kernels compare 32-bit words.
inline std::pair<at::Tensor, at::Tensor> dense_labels(const at::Tensor& ql, const at::Tensor& kl) {
  at::Tensor all = at::cat({ql.reshape(-1), kl.reshape(-1)});
  at::Tensor inverse = std::get<1>(at::_unique(all, /*sorted=*/true, /*return_inverse=*/true));
  inverse = inverse.to(at::kInt);
  return {inverse.narrow(0, 0, ql.numel()).contiguous(), inverse.narrow(0, ql.numel(), kl.numel()).contiguous()};
}

inline void check_topk_args(const char* op, const at::Tensor& query, const at::Tensor& bank, int64_t k,
                            const std::string& similarity, const c10::optional<at::Tensor>& exclude,
                            const c10::optional<at::Tensor>& query_labels,
                            const c10::optional<at::Tensor>& bank_labels) {
  check_features(query, op, "query");
  check_features(bank, op, "bank");
  TORCH_CHECK(query.size(1) == bank.size(1), op, ": query and bank must have the same feature dimension, got ",
              query.sizes(), " and ", bank.sizes());
  TORCH_CHECK(k >= 1 && k <= bank.size(0), op, ": k must be in [1, ", bank.size(0), "], got ", k);
  TORCH_CHECK(bank.size(0) < (int64_t(1) << 32), op, ": banks of 2^32 rows or more are not supported");
  TORCH_CHECK(similarity == "dot" || similarity == "cosine" || similarity == "l2", op,
              ": similarity must be 'dot', 'cosine' or 'l2', got '", similarity, "'");
  if (exclude.has_value()) {
    check_index(*exclude, op, "exclude_index");
    TORCH_CHECK((exclude->dim() == 1 || exclude->dim() == 2) && exclude->size(0) == query.size(0), op,
                ": exclude_index must be (M,) or (M, E) with M = ", query.size(0), ", got shape ", exclude->sizes());
    check_device(*exclude, query, op, "exclude_index");
  }
  TORCH_CHECK(query_labels.has_value() == bank_labels.has_value(), op,
              ": query_labels and bank_labels must be given together");
  if (query_labels.has_value()) {
    check_index(*query_labels, op, "query_labels");
    check_index(*bank_labels, op, "bank_labels");
    TORCH_CHECK(query_labels->dim() == 1 && query_labels->size(0) == query.size(0), op,
                ": query_labels must be (", query.size(0), ",), got ", query_labels->sizes());
    TORCH_CHECK(bank_labels->dim() == 1 && bank_labels->size(0) == bank.size(0), op,
                ": bank_labels must be (", bank.size(0), ",), got ", bank_labels->sizes());
    check_device(*query_labels, query, op, "query_labels");
    check_device(*bank_labels, bank, op, "bank_labels");
  }
}

// Mixing draws (see contrastive_kernels/_common.py, MixingDraws).
inline void check_mix_args(const char* op, const at::Tensor& query, const at::Tensor& negatives,
                           const at::Tensor& hard_index, const at::Tensor& pair_index, const at::Tensor& alpha,
                           const at::Tensor& query_index, const at::Tensor& query_weight) {
  check_features(query, op, "query");
  check_features(negatives, op, "negatives");
  TORCH_CHECK(query.scalar_type() == negatives.scalar_type(), op, ": query and negatives must have one dtype, got ",
              query.scalar_type(), " and ", negatives.scalar_type());
  TORCH_CHECK(query.size(1) == negatives.size(1), op, ": query and negatives must have the same feature dimension");
  const int64_t B = query.size(0);
  check_index(hard_index, op, "hard_index");
  TORCH_CHECK(hard_index.dim() == 2 && hard_index.size(0) == B, op, ": hard_index must be (", B,
              ", n_hard), got ", hard_index.sizes());
  check_index(pair_index, op, "pair_index");
  TORCH_CHECK(pair_index.dim() == 3 && pair_index.size(0) == B && pair_index.size(2) == 2, op,
              ": pair_index must be (", B, ", s, 2), got ", pair_index.sizes());
  TORCH_CHECK(alpha.dim() == 2 && alpha.size(0) == B && alpha.size(1) == pair_index.size(1) &&
                  alpha.is_floating_point(), op, ": alpha must be floating (", B, ", ", pair_index.size(1),
              "), got ", alpha.sizes(), " ", alpha.scalar_type());
  check_index(query_index, op, "query_index");
  TORCH_CHECK(query_index.dim() == 2 && query_index.size(0) == B, op, ": query_index must be (", B,
              ", s'), got ", query_index.sizes());
  TORCH_CHECK(query_weight.dim() == 2 && query_weight.size(0) == B && query_weight.size(1) == query_index.size(1) &&
                  query_weight.is_floating_point(), op, ": query_weight must be floating (", B, ", ",
              query_index.size(1), "), got ", query_weight.sizes(), " ", query_weight.scalar_type());
  for (const at::Tensor* t : {&negatives, &hard_index, &pair_index, &alpha, &query_index, &query_weight})
    check_device(*t, query, op, "a mixing argument");
}

}  // namespace ck
