// CUDA implementation of topk: checks, planning, launch, and the merge of the column splits'
// sorted key queues (one top-k over splits * KP int64 keys per query: the key order is the result
// order). Kernel: topk_kernels.cuh. k <= 1024 (the Python backend streams larger k elsewhere).
#include <torch/library.h>

#include <limits>
#include <string>

#include "../common.h"
#include "glue.h"
#include "launch.h"

namespace ck {
namespace cuda {
namespace {

using at::Tensor;
using c10::optional;

constexpr int kTopkMaxK = 1024;

// squared norms (l2) or inverse norms (cosine) in fp32 from the upcast rows, in chunks so that a
// bf16 bank is never copied whole to fp32
Tensor row_scale(const Tensor& x, bool cosine) {
  Tensor out = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  const int64_t step = 1 << 18;
  for (int64_t i0 = 0; i0 < x.size(0); i0 += step) {
    const int64_t n = std::min(step, x.size(0) - i0);
    Tensor xf = x.narrow(0, i0, n).to(at::kFloat);
    Tensor v = cosine ? xf.norm(2, {1}).clamp_min(1e-12).reciprocal() : xf.pow(2).sum(1);
    out.narrow(0, i0, n).copy_(v);
  }
  return out;
}

std::tuple<Tensor, Tensor> topk_cuda(const Tensor& query, const Tensor& bank, int64_t k, c10::string_view similarity,
                                     const optional<Tensor>& exclude_index, const optional<Tensor>& query_labels,
                                     const optional<Tensor>& bank_labels) {
  const std::string sim(similarity);
  check_topk_args("topk", query, bank, k, sim, exclude_index, query_labels, bank_labels);
  TORCH_CHECK(on_kernel_device(query) && bank.device() == query.device(), "topk (CUDA): query and bank must be on one CUDA device");
  TORCH_CHECK(query.scalar_type() == bank.scalar_type(), "topk (CUDA): query and bank must have one dtype, got ",
              query.scalar_type(), " and ", bank.scalar_type());
  TORCH_CHECK(k <= kTopkMaxK, "topk (CUDA): k <= ", kTopkMaxK, " is supported, got ", k);
  const c10::cuda::CUDAGuard guard(query.device());
  const int64_t M = query.size(0), N = bank.size(0), D = query.size(1);
  const Tensor q = query.contiguous(), b = bank.contiguous();
  TopkParams p;
  p.M = M;
  p.N = N;
  p.D = D;
  p.k = static_cast<int>(k);
  p.query = q.data_ptr();
  p.bank = b.data_ptr();
  p.sim = sim == "dot" ? 0 : (sim == "cosine" ? 1 : 2);
  Tensor qs, ks;
  if (p.sim != 0) {
    qs = row_scale(q, p.sim == 1);
    ks = row_scale(b, p.sim == 1);
    p.qscale = qs.data_ptr<float>();
    p.kscale = ks.data_ptr<float>();
  }
  Tensor ex;
  if (exclude_index.has_value()) {
    ex = exclude_index->dim() == 1 ? exclude_index->unsqueeze(1).contiguous() : exclude_index->contiguous();
    if (ex.size(1) > 0) {
      p.exclude = ex.data_ptr<int64_t>();
      p.E = static_cast<int>(ex.size(1));
    }
  }
  Tensor ql, bl;
  if (query_labels.has_value()) {
    ql = query_labels->contiguous();
    bl = bank_labels->contiguous();
    p.q_lab = ql.data_ptr<int64_t>();
    p.b_lab = bl.data_ptr<int64_t>();
  }
  int kp = 32;
  while (kp < k) kp <<= 1;
  const int dp = static_cast<int>((D + 15) / 16 * 16);
  const int64_t limit = device_max_smem();
  Tensor values, indices;
  dispatch_input(q.scalar_type(), "topk", [&](auto tag) {
    using TI = decltype(tag);
    const size_t smem = topk_smem_bytes<TI>(dp);
    TORCH_CHECK(static_cast<int64_t>(smem) <= limit, "topk (CUDA): feature dimension ", D,
                " needs more shared memory than this GPU has");
    int blocks = 0;
    const cudaError_t occ = topk_blocks_per_sm<TI>(kp, smem, &blocks);
    int64_t splits, per_split;
    plan_splits((M + kTopkBM - 1) / kTopkBM, 1, N, kTopkBN, checked_blocks_per_sm(occ, blocks, "topk"),
                std::max<int64_t>(8192, 8 * kp), splits, per_split);
    p.cols_per_split = per_split;
    Tensor queues = at::full({splits, M, kp}, std::numeric_limits<int64_t>::min(), q.options().dtype(at::kLong));
    p.queues = queues.data_ptr<int64_t>();
    const cudaError_t err = launch_topk<TI>(p, kp, splits, smem, at::cuda::getCurrentCUDAStream());
    TORCH_CHECK(err == cudaSuccess, "topk (CUDA) launch failed: ", cudaGetErrorString(err));
    Tensor keys = splits == 1 ? queues.select(0, 0).narrow(1, 0, k)
                              : std::get<0>(queues.permute({1, 0, 2}).reshape({M, splits * kp}).topk(k, 1, true, true));
    Tensor ordered = keys.__rshift__(32);
    Tensor bits = at::where(ordered >= 0, ordered, ordered.bitwise_xor(0x7FFFFFFF)).to(at::kInt);
    values = bits.view(at::kFloat).clone();
    indices = 0xFFFFFFFFLL - keys.bitwise_and(0xFFFFFFFFLL);
    Tensor missing = keys == std::numeric_limits<int64_t>::min();
    values.masked_fill_(missing, -std::numeric_limits<float>::infinity());
    indices.masked_fill_(missing, -1);
  });
  return {values, indices};
}

}  // namespace
}  // namespace cuda
}  // namespace ck

CK_CUDA_LIBRARY_IMPL(m) { m.impl("topk", &ck::cuda::topk_cuda); }
