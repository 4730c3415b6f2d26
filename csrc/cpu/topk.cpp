// CPU implementation of topk: argument checks, packing, threads, and the merge of the parts'
// candidate buffers. The kernel (topk_kernel.h) is compiled per instruction set; see isa.h.
//
// Each thread takes a block of query rows over the whole bank, or, with too few rows, a
// contiguous range of bank rows for every query, and keeps the k best packed keys per query (see
// kernel_common.h, pack_key); the parts' keys are merged (and sorted) per query over its H * 2k
// int64 keys (glue.h, best_keys), which is exact because the key order is the result order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <string>
#include <vector>

#include "../common.h"
#include "glue.h"
#include "isa.h"

namespace ck {
namespace {

using at::Tensor;
using c10::optional;

int bank_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cpu::kFloat;
    case at::kHalf: return cpu::kHalf;
    case at::kBFloat16: return cpu::kBFloat16;
    case at::kDouble: return cpu::kDouble;
    default: TORCH_CHECK(false, "topk: unsupported bank dtype ", t);
  }
}

std::tuple<Tensor, Tensor> topk_cpu(const Tensor& query, const Tensor& bank, int64_t k, c10::string_view similarity,
                                    const optional<Tensor>& exclude_index, const optional<Tensor>& query_labels,
                                    const optional<Tensor>& bank_labels) {
  const std::string sim(similarity);
  check_topk_args("topk", query, bank, k, sim, exclude_index, query_labels, bank_labels);
  TORCH_CHECK(query.device().is_cpu() && bank.device().is_cpu(), "topk (CPU): query and bank must be on the CPU");
  const cpu::KernelTable* tab = cpu::kernel_table();
  const int64_t M = query.size(0), N = bank.size(0), D = query.size(1);
  const int64_t rg = tab->row_group_f32;
  cpu::TopkArgs a;
  a.M = M;
  a.Mp = (M + rg - 1) / rg * rg;
  a.N = N;
  a.D = D;
  a.k = k;
  std::vector<Tensor> keep;
  Tensor qf = query.to(at::kFloat).contiguous();
  Tensor qt = cpu_glue::pack_row_groups(qf, a.Mp, rg);
  keep.push_back(qt);
  a.qt = qt.data_ptr<float>();
  a.sim = sim == "dot" ? cpu::kDot : (sim == "cosine" ? cpu::kCosine : cpu::kL2);
  if (a.sim != cpu::kDot) {
    // cosine: 1 / max(|q|, eps) (F.normalize's eps); l2: |q|^2, both from the fp32 query
    Tensor sc = a.sim == cpu::kCosine ? qf.norm(2, {1}).clamp_min(1e-12).reciprocal() : qf.pow(2).sum(1);
    Tensor scp = at::zeros({a.Mp}, qf.options());
    scp.narrow(0, 0, M).copy_(sc);
    keep.push_back(scp);
    a.qscale = scp.data_ptr<float>();
  }
  Tensor bc = bank.contiguous();
  keep.push_back(bc);
  a.bank = bc.data_ptr();
  a.bank_dtype = bank_code(bc.scalar_type());
  if (exclude_index.has_value()) {
    Tensor ex = exclude_index->dim() == 1 ? exclude_index->unsqueeze(1).contiguous() : exclude_index->contiguous();
    keep.push_back(ex);
    if (ex.size(1) > 0) {
      a.exclude = ex.data_ptr<int64_t>();
      a.E = ex.size(1);
    }
  }
  if (query_labels.has_value()) {
    Tensor ql = query_labels->contiguous(), bl = bank_labels->contiguous();
    keep.push_back(ql);
    keep.push_back(bl);
    a.q_lab = ql.data_ptr<int64_t>();
    a.b_lab = bl.data_ptr<int64_t>();
  }

  // Parts, one per thread: blocks of query rows when there are enough row groups, each over the
  // whole bank, so that a row's buffer sees every column once (k (1 + ln(N/k)) insertions instead
  // of k (1 + ln(N/(P k))) in each of P column parts: 40 % fewer at k = 1024, N = 65536, P = 2);
  // else column ranges over all rows, whose buffers the merge below combines.
  const int64_t align = tab->col_align;
  const int64_t tiles = (N + align - 1) / align;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t groups = a.Mp / rg;
  const bool by_rows = groups >= threads;
  const int64_t P = by_rows ? threads : std::min<int64_t>(threads, tiles);
  const int64_t H = by_rows ? 1 : P;  // buffer sets: row parts share one (disjoint rows)
  std::vector<int64_t> bounds(P + 1);
  for (int64_t t = 0; t <= P; ++t)
    bounds[t] = by_rows ? (groups * t / P) * rg : std::min<int64_t>(N, (tiles * t / P) * align);
  bounds[P] = by_rows ? a.Mp : N;
  const int64_t C = cpu::topk_capacity(k);
  Tensor buffers = at::empty({H, M, C}, query.options().dtype(at::kLong));
  Tensor counts = at::zeros({H, M}, query.options().dtype(at::kLong));
  Tensor thr = at::empty({H, a.Mp}, qf.options());
  Tensor scratch = at::empty({P, tab->topk_scratch(D)}, qf.options());
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t h = by_rows ? 0 : t;
      cpu::TopkWork w;
      w.keys = buffers[h].data_ptr<int64_t>();
      w.count = counts[h].data_ptr<int64_t>();
      w.thr = thr[h].data_ptr<float>();
      w.scratch = scratch[t].data_ptr<float>();
      w.row0 = by_rows ? bounds[t] : 0;
      w.row1 = by_rows ? bounds[t + 1] : a.Mp;
      tab->topk(a, w, by_rows ? 0 : bounds[t], by_rows ? N : bounds[t + 1]);
    }
  });
  // merge: the k largest keys over the parts, sorted (key order = score, then lower index)
  return cpu_glue::best_keys(buffers, counts, k);
}

}  // namespace
}  // namespace ck

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) { m.impl("topk", &ck::topk_cpu); }
