// CPU implementation of lse_fwd / lse_bwd: argument checks, packing, threads, merging. The
// kernels themselves (infonce_kernel.h) are compiled per instruction set; see isa.h.
//
// Threads: the N columns are cut into P contiguous parts (P = the intra-op thread count, fewer
// for small N), one per task of at::parallel_for. Each part owns its columns completely (column
// log-sum-exp, and in backward h_j and sum_i G_ij, are written directly) and keeps private
// per-row partial statistics, merged here:
//   m = max_p m_p,  s = sum_p s_p e^{m_p - m},  row_lse = m + log s,
//   E = sum_p E_p e^{m_p - m} / s   (row-only: the softmax-weighted key sums),
// which is the same online rule the kernels apply between tiles.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "glue.h"
#include "isa.h"

namespace ck {
namespace {

using at::Tensor;
using c10::optional;

struct Parts {
  int64_t count = 0;
  std::vector<int64_t> bounds;  // count + 1 column boundaries
};

// Contiguous column ranges, one per thread, aligned to the column tile.
Parts split_columns(int64_t N, int64_t align) {
  Parts p;
  if (N <= 0) return p;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t tiles = (N + align - 1) / align;
  p.count = std::min<int64_t>(threads, tiles);
  p.bounds.resize(p.count + 1);
  for (int64_t t = 0; t <= p.count; ++t) p.bounds[t] = std::min<int64_t>(N, (tiles * t / p.count) * align);
  p.bounds[p.count] = N;
  return p;
}

Tensor pad_rows(const Tensor& x, int64_t rows, at::ScalarType dtype) {
  Tensor out = at::zeros({rows}, x.options().dtype(dtype));
  out.narrow(0, 0, x.size(0)).copy_(x);
  return out;
}

template <typename T>
struct Prepared {
  cpu::LseArgs<T> args;
  int64_t rg = 1;            // rows per row group of the kernel table
  std::vector<Tensor> keep;  // tensors the raw pointers point into
};

int k_dtype_code(at::ScalarType k, at::ScalarType acc) {
  if (k == acc) return cpu::kSame;
  if (k == at::kHalf) return cpu::kHalf;
  if (k == at::kBFloat16) return cpu::kBFloat16;
  TORCH_CHECK(false, "contrastive_kernels: unsupported key dtype ", k);
}

template <typename T>
Prepared<T> prepare(const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
                    const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, at::ArrayRef<double> gammas,
                    const optional<Tensor>& exclude, const optional<Tensor>& q_labels,
                    const optional<Tensor>& k_labels, const cpu::KernelTable* tab, bool need_qrow) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const bool f64 = acc == at::kDouble;
  const int64_t B = q.size(0), N = k.size(0), D = q.size(1);
  const int64_t rg = f64 ? tab->row_group_f64 : tab->row_group_f32;
  const int64_t vw = f64 ? tab->vec_f64 : tab->vec_f32;
  Prepared<T> p;
  cpu::LseArgs<T>& a = p.args;
  a.B = B;
  a.Bp = (B + rg - 1) / rg * rg;
  p.rg = rg;
  a.N = N;
  a.D = D;
  a.Dp = (D + vw - 1) / vw * vw;
  a.G = static_cast<int>(gammas.size());
  for (int g = 0; g < a.G; ++g) a.gamma[g] = static_cast<T>(gammas[g]);
  Tensor qf = q.to(acc).contiguous();
  Tensor qt = cpu_glue::pack_row_groups(qf, a.Bp, rg);
  p.keep.push_back(qt);
  a.qt = qt.data_ptr<T>();
  if (need_qrow) {
    Tensor qrow = at::zeros({a.Bp, a.Dp}, qf.options());
    qrow.narrow(0, 0, B).narrow(1, 0, D).copy_(qf);
    p.keep.push_back(qrow);
    a.qrow = qrow.data_ptr<T>();
  }
  Tensor kc = k.contiguous();
  p.keep.push_back(kc);
  a.k = kc.data_ptr();
  a.k_dtype = k_dtype_code(kc.scalar_type(), acc);
  Tensor av = pad_rows(row_scale, a.Bp, acc);
  p.keep.push_back(av);
  a.a = av.data_ptr<T>();
  if (row_bias.has_value()) {
    Tensor cv = pad_rows(*row_bias, a.Bp, acc);
    p.keep.push_back(cv);
    a.c = cv.data_ptr<T>();
  }
  if (col_scale.has_value()) {
    Tensor bv = col_scale->to(acc).contiguous();
    p.keep.push_back(bv);
    a.b = bv.data_ptr<T>();
  }
  if (col_bias.has_value()) {
    Tensor dv = col_bias->to(acc).contiguous();
    p.keep.push_back(dv);
    a.d = dv.data_ptr<T>();
  }
  if (exclude.has_value() && exclude->size(1) > 0) {
    Tensor ex = exclude->contiguous();
    p.keep.push_back(ex);
    a.exclude = ex.data_ptr<int64_t>();
    a.E = ex.size(1);
  }
  if (q_labels.has_value()) {
    if (q_labels->dim() == 1) {
      auto dense = dense_labels(*q_labels, *k_labels);
      p.keep.push_back(dense.first);
      p.keep.push_back(dense.second);
      a.q_lab = dense.first.data_ptr<int32_t>();
      a.k_lab = dense.second.data_ptr<int32_t>();
    } else {
      Tensor qb = q_labels->contiguous(), kb = k_labels->contiguous();
      p.keep.push_back(qb);
      p.keep.push_back(kb);
      a.q_bits = qb.data_ptr<int64_t>();
      a.k_bits = kb.data_ptr<int64_t>();
      a.Wb = qb.size(1);
    }
  }
  return p;
}

// The hard-negative candidates of lse_topk_fwd: per row, every column whose raw dot passes the
// threshold, in a list of `capacity` keys per column part; merged into the n best.
struct Candidates {
  const Tensor* threshold = nullptr;  // (B,) fp32, or null: plain lse_fwd
  int64_t capacity = 0, n_best = 0;
  Tensor best;   // out: (B, n_best) int64 columns, -1 where fewer
  Tensor count;  // out: (B,) int64, columns that passed (over capacity: some were dropped)
};

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse_fwd_impl(
    const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
    const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, at::ArrayRef<double> gammas,
    const optional<Tensor>& exclude, const optional<Tensor>& q_labels, const optional<Tensor>& k_labels,
    bool want_col_lse, bool row_only, Candidates* cand = nullptr) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const bool f64 = acc == at::kDouble;
  const cpu::KernelTable* tab = cpu::kernel_table();
  Prepared<T> p = prepare<T>(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                             tab, false);
  cpu::LseArgs<T>& a = p.args;
  const int64_t B = a.B, N = a.N, D = a.D, Bp = a.Bp, G = a.G;
  const bool labels = a.has_labels();
  const int64_t slots = row_only ? G + (labels ? 1 : 0) : 0;
  a.want_col = want_col_lse;
  a.row_only = row_only;
  auto opts = q.options().dtype(acc);
  Tensor col_lse = at::empty({want_col_lse ? N : 0}, opts);
  a.col_lse = want_col_lse ? col_lse.data_ptr<T>() : nullptr;

  const Parts parts = split_columns(N, tab->col_align);
  const int64_t P = parts.count;
  Tensor run_max = at::full({std::max<int64_t>(P, 1), G, Bp}, -std::numeric_limits<double>::infinity(), opts);
  Tensor run_sum = at::zeros({std::max<int64_t>(P, 1), G, Bp}, opts);
  Tensor pos = at::zeros({std::max<int64_t>(P, 1), 2, Bp}, opts);
  Tensor accum = at::zeros({slots > 0 ? std::max<int64_t>(P, 1) : 0, slots, Bp / p.rg, D, p.rg}, opts);
  const int64_t scratch_n = (f64 ? tab->lse_scratch_f64 : tab->lse_scratch_f32)(D, a.Dp);
  Tensor scratch = at::empty({std::max<int64_t>(P, 1), scratch_n}, opts);
  const bool candidates = cand != nullptr && cand->threshold != nullptr;
  const int64_t cap = candidates ? cand->capacity : 0;
  Tensor cand_keys = at::empty({candidates ? std::max<int64_t>(P, 1) : 0, B, cap}, q.options().dtype(at::kLong));
  Tensor cand_count = at::zeros({candidates ? std::max<int64_t>(P, 1) : 0, B}, q.options().dtype(at::kLong));
  if (candidates) {
    Tensor thr = at::full({Bp}, std::numeric_limits<double>::infinity(), opts);
    thr.narrow(0, 0, B).copy_(*cand->threshold);
    p.keep.push_back(thr);
    a.cand_thr = thr.data_ptr<T>();
    a.cand_cap = cap;
  }
  void (*fwd)(const cpu::LseArgs<T>&, const cpu::LseWork<T>&, int64_t, int64_t);
  if constexpr (std::is_same_v<T, double>) fwd = tab->lse_fwd_f64; else fwd = tab->lse_fwd_f32;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      cpu::LseWork<T> w;
      w.run_max = run_max[t].data_ptr<T>();
      w.run_sum = run_sum[t].data_ptr<T>();
      w.pos_sum = pos[t][0].data_ptr<T>();
      w.pos_cnt = pos[t][1].data_ptr<T>();
      w.acc = slots > 0 ? accum[t].data_ptr<T>() : nullptr;
      w.scratch = scratch[t].data_ptr<T>();
      if (candidates) {
        w.cand_keys = cand_keys[t].data_ptr<int64_t>();
        w.cand_count = cand_count[t].data_ptr<int64_t>();
      }
      fwd(a, w, parts.bounds[t], parts.bounds[t + 1]);
    }
  });

  if (candidates) {
    // a part holds all of its row's candidates unless the row's total exceeds the capacity
    // (then the row is reported as such by its count, and the caller recomputes it)
    cand->count = cand_count.sum(0);
    cand->best = std::get<1>(cpu_glue::best_keys(cand_keys, cand_count, cand->n_best));
  }

  // merge the parts (see the file comment)
  Tensor m = std::get<0>(run_max.max(0));                                    // (G, Bp)
  Tensor shift = at::where(at::isinf(m) & (m < 0), at::zeros_like(m), m);
  Tensor w = at::exp(run_max - shift);                                        // (P, G, Bp)
  Tensor s = (run_sum * w).sum(0);
  Tensor row_lse = (shift + at::log(s)).narrow(1, 0, B).contiguous();
  Tensor psum = pos.select(1, 0).sum(0).narrow(0, 0, B).contiguous();
  Tensor pcnt = pos.select(1, 1).sum(0).narrow(0, 0, B).contiguous();
  Tensor e_key = at::empty({0}, opts), p_key = at::empty({0}, opts);
  if (row_only) {
    if (P > 0) {
      Tensor sums = cpu_glue::unpack_row_groups(accum);                       // (P, S, Bp, D)
      Tensor e = (sums.narrow(1, 0, G) * w.unsqueeze(3)).sum(0);              // (G, Bp, D)
      Tensor live = s > 0;
      Tensor denom = at::where(live, s, at::ones_like(s)).unsqueeze(2);
      e = at::where(live.unsqueeze(2), e / denom, at::zeros_like(e));
      e_key = e.narrow(1, 0, B).contiguous();                                 // (G, B, D)
      if (labels) p_key = sums.select(1, G).sum(0).narrow(0, 0, B).contiguous();
    } else {
      e_key = at::zeros({G, B, D}, opts);
      if (labels) p_key = at::zeros({B, D}, opts);
    }
  }
  return {row_lse, psum, pcnt, col_lse, e_key, p_key};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse_fwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
    const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, at::ArrayRef<double> gammas,
    const optional<Tensor>& exclude, const optional<Tensor>& q_labels, const optional<Tensor>& k_labels,
    bool want_col_lse, bool row_only) {
  check_lse_args("lse_fwd", q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                 cpu::kMaxGammas);
  TORCH_CHECK(q.device().is_cpu(), "lse_fwd (CPU): tensors must be on the CPU");
  if (q.scalar_type() == at::kDouble)
    return lse_fwd_impl<double>(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                                want_col_lse, row_only);
  return lse_fwd_impl<float>(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                             want_col_lse, row_only);
}

// lse_fwd plus the hard negatives of mixing from the same pass (ops_schema.h). fp32 accumulation
// only: the top-k kernel scores in fp32, and the candidates must carry its scores bitwise.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse_topk_fwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
    const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, at::ArrayRef<double> gammas,
    const optional<Tensor>& exclude, const optional<Tensor>& q_labels, const optional<Tensor>& k_labels,
    bool want_col_lse, bool row_only, const Tensor& threshold, int64_t capacity, int64_t n_best) {
  check_lse_args("lse_topk_fwd", q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels,
                 k_labels, cpu::kMaxGammas);
  TORCH_CHECK(q.device().is_cpu() && threshold.device().is_cpu(), "lse_topk_fwd (CPU): tensors must be on the CPU");
  TORCH_CHECK(q.scalar_type() != at::kDouble, "lse_topk_fwd: float64 features are not supported (the top-k "
              "kernel scores in fp32); use lse_fwd and topk");
  TORCH_CHECK(threshold.dim() == 1 && threshold.size(0) == q.size(0) && threshold.scalar_type() == at::kFloat,
              "lse_topk_fwd: threshold must be float32 of shape (", q.size(0), ",), got ", threshold.scalar_type(),
              " ", threshold.sizes());
  TORCH_CHECK(n_best >= 1 && n_best <= k.size(0) && capacity >= n_best,
              "lse_topk_fwd: need 1 <= n_best <= rows of k and capacity >= n_best, got n_best=", n_best,
              ", capacity=", capacity, ", ", k.size(0), " rows");
  Candidates cand;
  cand.threshold = &threshold;
  cand.capacity = capacity;
  cand.n_best = n_best;
  auto out = lse_fwd_impl<float>(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels,
                                 k_labels, want_col_lse, row_only, &cand);
  return {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out), std::get<4>(out),
          std::get<5>(out), cand.best, cand.count};
}

template <typename T>
std::tuple<Tensor, Tensor, Tensor, Tensor> lse_bwd_impl(
    const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
    const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, at::ArrayRef<double> gammas,
    const optional<Tensor>& exclude, const optional<Tensor>& q_labels, const optional<Tensor>& k_labels,
    const Tensor& row_lse, const Tensor& col_lse, const Tensor& d_row, const optional<Tensor>& d_pos,
    const optional<Tensor>& d_col, bool need_g_key, bool need_h, bool need_dc, bool need_dd) {
  const at::ScalarType acc = c10::CppTypeToScalarType<T>::value;
  const bool f64 = acc == at::kDouble;
  const cpu::KernelTable* tab = cpu::kernel_table();
  Prepared<T> p = prepare<T>(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                             tab, need_h);
  cpu::LseArgs<T>& a = p.args;
  const int64_t B = a.B, N = a.N, D = a.D, Bp = a.Bp, G = a.G;
  auto opts = q.options().dtype(acc);
  // row statistics padded to Bp; d_row pre-multiplied by gamma
  Tensor rl = at::zeros({G, Bp}, opts);
  rl.narrow(1, 0, B).copy_(row_lse);
  Tensor gam = at::tensor(std::vector<double>(gammas.begin(), gammas.end()), opts.dtype(at::kDouble)).to(acc);
  Tensor wr = at::zeros({G, Bp}, opts);
  wr.narrow(1, 0, B).copy_(d_row.to(acc) * gam.unsqueeze(1));
  p.keep.push_back(rl);
  p.keep.push_back(wr);
  a.row_lse = rl.data_ptr<T>();
  a.d_row = wr.data_ptr<T>();
  if (d_pos.has_value() && a.has_labels()) {
    Tensor dp = pad_rows(*d_pos, Bp, acc);
    p.keep.push_back(dp);
    a.d_pos = dp.data_ptr<T>();
  }
  if (d_col.has_value() && col_lse.numel() == N && N > 0) {
    Tensor cl = col_lse.to(acc).contiguous(), dc = d_col->to(acc).contiguous();
    p.keep.push_back(cl);
    p.keep.push_back(dc);
    a.col_lse_in = cl.data_ptr<T>();
    a.d_col = dc.data_ptr<T>();
  }
  a.need_gkey = need_g_key;
  a.need_h = need_h;
  a.need_dc = need_dc;
  a.need_dd = need_dd;
  Tensor h = need_h ? at::zeros({N, D}, opts) : at::empty({0}, opts);
  Tensor dd = need_dd ? at::zeros({N}, opts) : at::empty({0}, opts);
  a.h = need_h ? h.data_ptr<T>() : nullptr;
  a.dd = need_dd ? dd.data_ptr<T>() : nullptr;

  const Parts parts = split_columns(N, tab->col_align);
  const int64_t P = parts.count;
  Tensor gk = at::zeros({need_g_key ? std::max<int64_t>(P, 1) : 0, Bp / p.rg, D, p.rg}, opts);
  Tensor dcp = at::zeros({std::max<int64_t>(P, 1), Bp}, opts);
  const int64_t scratch_n = (f64 ? tab->lse_scratch_f64 : tab->lse_scratch_f32)(D, a.Dp);
  Tensor scratch = at::empty({std::max<int64_t>(P, 1), scratch_n}, opts);
  void (*bwd)(const cpu::LseArgs<T>&, const cpu::LseWork<T>&, int64_t, int64_t);
  if constexpr (std::is_same_v<T, double>) bwd = tab->lse_bwd_f64; else bwd = tab->lse_bwd_f32;
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      cpu::LseWork<T> w;
      w.acc = need_g_key ? gk[t].data_ptr<T>() : nullptr;
      w.dc = dcp[t].data_ptr<T>();
      w.scratch = scratch[t].data_ptr<T>();
      bwd(a, w, parts.bounds[t], parts.bounds[t + 1]);
    }
  });
  Tensor g_key = need_g_key ? cpu_glue::unpack_row_groups(gk.sum(0)).narrow(0, 0, B).contiguous()
                             : at::empty({0}, opts);
  Tensor dc = need_dc ? dcp.sum(0).narrow(0, 0, B).contiguous() : at::empty({0}, opts);
  return {g_key, h, dc, dd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lse_bwd_cpu(
    const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
    const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, at::ArrayRef<double> gammas,
    const optional<Tensor>& exclude, const optional<Tensor>& q_labels, const optional<Tensor>& k_labels,
    const Tensor& row_lse, const Tensor& col_lse, const Tensor& d_row, const optional<Tensor>& d_pos,
    const optional<Tensor>& d_col, bool need_g_key, bool need_h, bool need_dc, bool need_dd) {
  check_lse_bwd_args(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                     cpu::kMaxGammas, row_lse, col_lse, d_row, d_pos, d_col);
  TORCH_CHECK(q.device().is_cpu(), "lse_bwd (CPU): tensors must be on the CPU");
  if (q.scalar_type() == at::kDouble)
    return lse_bwd_impl<double>(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                                row_lse, col_lse, d_row, d_pos, d_col, need_g_key, need_h, need_dc, need_dd);
  return lse_bwd_impl<float>(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                             row_lse, col_lse, d_row, d_pos, d_col, need_g_key, need_h, need_dc, need_dd);
}

}  // namespace
}  // namespace ck

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("lse_fwd", &ck::lse_fwd_cpu);
  m.impl("lse_topk_fwd", &ck::lse_topk_fwd_cpu);
  m.impl("lse_bwd", &ck::lse_bwd_cpu);
}
