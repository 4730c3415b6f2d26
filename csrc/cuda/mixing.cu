// CUDA implementation of mix / mixed_dots / mixed_dots_bwd / mixed_lse (kernels: mixing_kernels.cuh).
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "../common.h"
#include "glue.h"
#include "launch.h"

namespace ck {
namespace cuda {
namespace {

using at::Tensor;

struct Prepared {
  Tensor query, negatives, hard, pair, alpha, qidx, qw;
  MixParams p;
};

Prepared prepare(const Tensor& query, const Tensor& negatives, const Tensor& hard_index, const Tensor& pair_index,
                 const Tensor& alpha, const Tensor& query_index, const Tensor& query_weight) {
  Prepared r;
  r.query = query.contiguous();
  r.negatives = negatives.contiguous();
  r.hard = hard_index.contiguous();
  r.pair = pair_index.contiguous();
  r.alpha = alpha.to(at::kFloat).contiguous();
  r.qidx = query_index.contiguous();
  r.qw = query_weight.to(at::kFloat).contiguous();
  MixParams& p = r.p;
  p.B = r.query.size(0);
  p.D = r.query.size(1);
  p.n_neg = r.negatives.size(0);
  p.H = r.hard.size(1);
  p.S = r.pair.size(1);
  p.SQ = r.qidx.size(1);
  p.query = r.query.data_ptr();
  p.negatives = r.negatives.data_ptr();
  p.hard = r.hard.data_ptr<int64_t>();
  p.pair = r.pair.data_ptr<int64_t>();
  p.alpha = r.alpha.data_ptr<float>();
  p.qidx = r.qidx.data_ptr<int64_t>();
  p.qw = r.qw.data_ptr<float>();
  TORCH_CHECK(p.n_neg > 0 || p.S + p.SQ == 0, "mix: negatives must not be empty");
  TORCH_CHECK(p.H > 0 || p.S + p.SQ == 0, "mix: hard_index must have at least one column");
  return r;
}

Tensor mix_cuda(const Tensor& query, const Tensor& negatives, const Tensor& hard_index, const Tensor& pair_index,
                const Tensor& alpha, const Tensor& query_index, const Tensor& query_weight) {
  check_mix_args("mix", query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  TORCH_CHECK(on_kernel_device(query), "mix (CUDA): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(query.device());
  Prepared r = prepare(query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  const at::ScalarType acc = acc_type(query.scalar_type());
  Tensor v = at::empty({r.p.B, r.p.S + r.p.SQ, r.p.D}, r.query.options().dtype(acc));
  if (v.numel() == 0) return v.to(query.scalar_type());
  r.p.out = v.data_ptr();
  dispatch_input(query.scalar_type(), "mix", [&](auto tag) {
    const cudaError_t err = launch_mix<decltype(tag)>(r.p, kMixVectors, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "mix (CUDA) launch failed: ", cudaGetErrorString(err));
  });
  // F.normalize's own reduction and division: the points equal the reference's bit for bit
  return (v / v.norm(2, {-1}, true).clamp_min(1e-12)).to(query.scalar_type());
}

Tensor mixed_dots_cuda(const Tensor& q, const Tensor& mix_query, const Tensor& negatives, const Tensor& hard_index,
                       const Tensor& pair_index, const Tensor& alpha, const Tensor& query_index,
                       const Tensor& query_weight) {
  check_mix_args("mixed_dots", mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  check_features(q, "mixed_dots", "q");
  TORCH_CHECK(q.sizes() == mix_query.sizes() && q.device() == mix_query.device() && on_kernel_device(q),
              "mixed_dots (CUDA): q and mix_query must have one shape and CUDA device");
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  const at::ScalarType acc = acc_type(mix_query.scalar_type());
  Tensor qa = q.to(acc).contiguous();
  Tensor out = at::empty({r.p.B, r.p.S + r.p.SQ}, qa.options());
  if (out.numel() == 0) return out;
  r.p.q = qa.data_ptr();
  r.p.out = out.data_ptr();
  dispatch_input(mix_query.scalar_type(), "mixed_dots", [&](auto tag) {
    const cudaError_t err = launch_mix<decltype(tag)>(r.p, kMixedDots, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "mixed_dots (CUDA) launch failed: ", cudaGetErrorString(err));
  });
  return out;
}

Tensor mixed_dots_bwd_cuda(const Tensor& grad, const Tensor& mix_query, const Tensor& negatives,
                           const Tensor& hard_index, const Tensor& pair_index, const Tensor& alpha,
                           const Tensor& query_index, const Tensor& query_weight) {
  check_mix_args("mixed_dots_bwd", mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  const int64_t B = mix_query.size(0), T = pair_index.size(1) + query_index.size(1);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == B && grad.size(1) == T && grad.is_floating_point() &&
                  grad.device() == mix_query.device(),
              "mixed_dots_bwd: grad must be floating (", B, ", ", T, ") on the features' device, got ", grad.sizes());
  TORCH_CHECK(on_kernel_device(mix_query), "mixed_dots_bwd (CUDA): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(mix_query.device());
  Prepared r = prepare(mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  const at::ScalarType acc = acc_type(mix_query.scalar_type());
  Tensor g = grad.to(acc).contiguous();
  Tensor dq = at::zeros({B, r.p.D}, g.options());
  if (B == 0 || T == 0) return dq;
  r.p.grad = g.data_ptr();
  r.p.out = dq.data_ptr();
  dispatch_input(mix_query.scalar_type(), "mixed_dots_bwd", [&](auto tag) {
    const cudaError_t err = launch_mix<decltype(tag)>(r.p, kMixedDotsBwd, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "mixed_dots_bwd (CUDA) launch failed: ", cudaGetErrorString(err));
  });
  return dq;
}

// The synthetic logits reduced to the loss's log-sum-exp per gamma, with the softmax-weighted sums
// its O(B D) backward needs (ops_schema.h; kernel: mixed_lse_kernel).
std::tuple<Tensor, Tensor, Tensor> mixed_lse_cuda(const Tensor& q, const Tensor& mix_query, const Tensor& negatives,
                                                  const Tensor& hard_index, const Tensor& pair_index,
                                                  const Tensor& alpha, const Tensor& query_index,
                                                  const Tensor& query_weight, const Tensor& row_scale,
                                                  const c10::optional<Tensor>& row_bias, at::ArrayRef<double> gammas) {
  check_mix_args("mixed_lse", mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  check_features(q, "mixed_lse", "q");
  const int64_t B = mix_query.size(0), D = mix_query.size(1);
  TORCH_CHECK(q.sizes() == mix_query.sizes(), "mixed_lse: q and mix_query must have one shape, got ", q.sizes(),
              " and ", mix_query.sizes());
  const int64_t G = static_cast<int64_t>(gammas.size());
  TORCH_CHECK(G >= 1 && G <= kMaxGammas, "mixed_lse: 1 to ", kMaxGammas, " gammas, got ", G);
  check_vector(row_scale, B, "mixed_lse", "row_scale");
  if (row_bias.has_value()) check_vector(*row_bias, B, "mixed_lse", "row_bias");
  TORCH_CHECK(on_kernel_device(q) && on_kernel_device(mix_query) && on_kernel_device(row_scale) &&
                  (!row_bias.has_value() || on_kernel_device(*row_bias)) && q.device() == mix_query.device(),
              "mixed_lse (CUDA): tensors must be on one CUDA device");
  const c10::cuda::CUDAGuard guard(q.device());
  Prepared r = prepare(mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  const at::ScalarType acc = acc_type(mix_query.scalar_type());
  Tensor qa = q.to(acc).contiguous();
  Tensor a = row_scale.to(acc).contiguous();
  Tensor c = row_bias.has_value() ? row_bias->to(acc).contiguous() : Tensor();
  Tensor lse = at::full({G, B}, -std::numeric_limits<double>::infinity(), qa.options());
  Tensor e_sum = at::zeros({G, B, D}, qa.options());
  Tensor u_sum = at::zeros({G, B}, qa.options());
  if (B == 0 || r.p.S + r.p.SQ == 0) return {lse, e_sum, u_sum};
  r.p.q = qa.data_ptr();
  r.p.row_scale = a.data_ptr();
  r.p.row_bias = c.defined() ? c.data_ptr() : nullptr;
  r.p.out = lse.data_ptr();
  r.p.e_sum = e_sum.data_ptr();
  r.p.u_sum = u_sum.data_ptr();
  r.p.G = static_cast<int>(G);
  for (int64_t g = 0; g < G; ++g) r.p.gamma[g] = gammas[g];
  dispatch_input(mix_query.scalar_type(), "mixed_lse", [&](auto tag) {
    const cudaError_t err = launch_mix<decltype(tag)>(r.p, kMixedLse, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "mixed_lse (CUDA) launch failed: ", cudaGetErrorString(err));
  });
  return {lse, e_sum, u_sum};
}

}  // namespace
}  // namespace cuda
}  // namespace ck

CK_CUDA_LIBRARY_IMPL(m) {
  m.impl("mixed_lse", &ck::cuda::mixed_lse_cuda);
  m.impl("mix", &ck::cuda::mix_cuda);
  m.impl("mixed_dots", &ck::cuda::mixed_dots_cuda);
  m.impl("mixed_dots_bwd", &ck::cuda::mixed_dots_bwd_cuda);
}
