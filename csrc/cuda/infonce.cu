// CUDA implementation of lse_fwd / lse_bwd: checks, planning (row tile, column splits), launches
// on the current stream inside the device guard, and the merge of the splits' partial statistics
// (the online rule: m = max_p m_p, s = sum_p s_p e^{m_p - m}). Kernels: infonce_kernels.cuh.
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "../common.h"
#include "glue.h"
#include "launch.h"

namespace ck {
namespace cuda {
namespace {

using at::Tensor;
using c10::optional;

constexpr int kGeneral = -1;  // a Plan's warp mode: the general kernel

struct Plan {
  int bm = 64;
  int warp_mode = kGeneral;  // or a LseWarpMode: that warp kernel
  int64_t splits = 1, per_split = 0;
  size_t smem = 0;
};

template <typename TI>
Plan plan_lse(int64_t R, int64_t C, int64_t D, int nslots, bool bwd) {
  Plan p;
  const int dp = static_cast<int>((D + 15) / 16 * 16);
  const int64_t limit = device_max_smem();
  for (int bm : {64, 32, 16}) {
    p.bm = bm;
    p.smem = lse_smem_bytes<TI>(bm, dp, nslots);
    if (static_cast<int64_t>(p.smem) <= limit) break;
  }
  TORCH_CHECK(static_cast<int64_t>(p.smem) <= limit, "lse (CUDA): feature dimension ", D,
              " needs more shared memory than this GPU has; use backend='chunked' or 'triton'");
  int blocks = 0;
  const cudaError_t err = lse_blocks_per_sm<TI>(bwd, p.bm, p.smem, &blocks);
  plan_splits((R + p.bm - 1) / p.bm, 1, C, kLseBN, checked_blocks_per_sm(err, blocks, "lse"), 16 * kLseBN, p.splits,
              p.per_split);
  return p;
}

// The passes with one gamma, no labels and at most kWarpMaxE exclusions per query on fp16/bf16
// inputs (InfoNCE against a bank or queue, CLIP, NT-Xent) run the warp kernels (lse_warp_kernel:
// flash-attention style, scores and outputs in registers) where their shared memory fits;
// CK_CUDA_WARP_KERNELS=0 keeps every pass on the general kernel (to compare).
//
// The plan of a pass with the parameters p (oriented, gammas set): the warp kernel in `mode` where
// the pass qualifies and its shared memory fits, else the general kernel with nslots key-sum slots.
template <typename TI>
Plan plan_pass(const LseTileParams<typename LseTypes<TI>::TA>& p, int nslots, int mode) {
  static const bool enabled = [] {
    const char* v = std::getenv("CK_CUDA_WARP_KERNELS");
    return v == nullptr || std::string(v) != "0";
  }();
  const bool labels = p.lab_r != nullptr || p.bits_r != nullptr;
  Plan plan;
  if (enabled && IsTensorCore<TI>::value && p.G == 1 && !labels && p.E <= kWarpMaxE) {
    const int dp = static_cast<int>((p.D + 15) / 16 * 16);
    plan.smem = lse_warp_smem_bytes<TI>(dp);
    if (static_cast<int64_t>(plan.smem) <= device_max_smem()) {
      plan.warp_mode = mode;
      int blocks = 0;
      const cudaError_t err = lse_warp_blocks_per_sm<TI>(mode, plan.smem, &blocks);
      plan_splits((p.R + 63) / 64, lse_warp_slices(mode, dp), p.C, kLseBN, checked_blocks_per_sm(err, blocks, "lse"),
                  16 * kLseBN, plan.splits, plan.per_split);
      return plan;
    }
  }
  return plan_lse<TI>(p.R, p.C, p.D, nslots, mode == kWarpGrad);
}

template <typename TI, bool BWD>
void launch(const LseTileParams<typename LseTypes<TI>::TA>& prm, const Plan& plan) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = plan.warp_mode != kGeneral
                              ? launch_lse_warp<TI>(prm, plan.warp_mode, plan.splits, plan.smem, stream)
                              : launch_lse<TI>(prm, BWD, plan.bm, plan.splits, plan.smem, stream);
  TORCH_CHECK(err == cudaSuccess, "lse (CUDA) launch failed: ", cudaGetErrorString(err));
}

template <typename T>
const T* ptr_or_null(const optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

struct Common {
  Tensor q, k, a, b, c, d, exclude, qlab, klab, qbits, kbits;
  at::ScalarType acc;
};

Common prepare(const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
               const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, const optional<Tensor>& exclude,
               const optional<Tensor>& q_labels, const optional<Tensor>& k_labels) {
  Common c;
  c.acc = acc_type(q.scalar_type());
  c.q = q.contiguous();
  c.k = k.contiguous();
  c.a = row_scale.to(c.acc).contiguous();
  if (col_scale.has_value()) c.b = col_scale->to(c.acc).contiguous();
  if (row_bias.has_value()) c.c = row_bias->to(c.acc).contiguous();
  if (col_bias.has_value()) c.d = col_bias->to(c.acc).contiguous();
  if (exclude.has_value() && exclude->size(1) > 0) c.exclude = exclude->contiguous();
  if (q_labels.has_value()) {
    if (q_labels->dim() == 1) {
      auto dense = dense_labels(*q_labels, *k_labels);
      c.qlab = dense.first;
      c.klab = dense.second;
    } else {
      c.qbits = q_labels->contiguous();
      c.kbits = k_labels->contiguous();
    }
  }
  return c;
}

template <typename TA>
const TA* opt_ptr(const Tensor& t) {
  return t.defined() ? t.data_ptr<TA>() : nullptr;
}

// rows = queries (key_rows false) or keys (true): the affine terms and labels of each side
template <typename TA>
LseTileParams<TA> orient(const Common& c, bool key_rows) {
  LseTileParams<TA> p;
  const Tensor& rows = key_rows ? c.k : c.q;
  const Tensor& cols = key_rows ? c.q : c.k;
  p.R = rows.size(0);
  p.C = cols.size(0);
  p.D = rows.size(1);
  p.rows_feat = rows.data_ptr();
  p.cols_feat = cols.data_ptr();
  p.rs = key_rows ? opt_ptr<TA>(c.b) : opt_ptr<TA>(c.a);
  p.cs = key_rows ? opt_ptr<TA>(c.a) : opt_ptr<TA>(c.b);
  p.rb = key_rows ? opt_ptr<TA>(c.d) : opt_ptr<TA>(c.c);
  p.cb = key_rows ? opt_ptr<TA>(c.c) : opt_ptr<TA>(c.d);
  p.key_rows = key_rows;
  if (c.exclude.defined()) {
    p.exclude = c.exclude.data_ptr<int64_t>();
    p.E = static_cast<int>(c.exclude.size(1));
  }
  if (c.qlab.defined()) {
    p.lab_r = (key_rows ? c.klab : c.qlab).data_ptr<int32_t>();
    p.lab_c = (key_rows ? c.qlab : c.klab).data_ptr<int32_t>();
  } else if (c.qbits.defined()) {
    p.bits_r = (key_rows ? c.kbits : c.qbits).data_ptr<int64_t>();
    p.bits_c = (key_rows ? c.qbits : c.kbits).data_ptr<int64_t>();
    p.Wb = static_cast<int>(c.qbits.size(1));
  }
  return p;
}

// The merged row statistics of a forward pass: (row_lse (G,R), log-weights w (S,G,R), sums (G,R)).
std::tuple<Tensor, Tensor, Tensor> merge_stats(const Tensor& m, const Tensor& s) {
  Tensor mx = std::get<0>(m.max(0));
  Tensor shift = at::where(at::isinf(mx) & (mx < 0), at::zeros_like(mx), mx);
  Tensor w = at::exp(m - shift);
  Tensor total = (s * w).sum(0);
  return {shift + at::log(total), w, total};
}

template <typename TI>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse_fwd_typed(
    const Common& c, at::ArrayRef<double> gammas, bool want_col_lse, bool row_only) {
  using TA = typename LseTypes<TI>::TA;
  const int64_t B = c.q.size(0), N = c.k.size(0), D = c.q.size(1);
  const int G = static_cast<int>(gammas.size());
  const bool labels = c.qlab.defined() || c.qbits.defined();
  const int slots = row_only ? G + (labels ? 1 : 0) : 0;
  auto opts = c.q.options().dtype(c.acc);

  LseTileParams<TA> p = orient<TA>(c, false);
  p.G = G;
  for (int g = 0; g < G; ++g) p.gamma[g] = static_cast<TA>(gammas[g]);
  p.slots = slots;
  p.labels = labels;
  const Plan plan = plan_pass<TI>(p, slots, row_only ? kWarpSums : kWarpStats);
  p.cols_per_split = plan.per_split;
  const int64_t S = plan.splits;
  Tensor m = at::empty({S, G, B}, opts), s = at::empty({S, G, B}, opts);
  Tensor pos = labels ? at::zeros({S, 2, B}, opts) : Tensor();
  Tensor acc = slots > 0 ? at::empty({S, slots, B, D}, opts) : Tensor();
  p.out_m = m.data_ptr<TA>();
  p.out_s = s.data_ptr<TA>();
  p.out_pos = labels ? pos.data_ptr<TA>() : nullptr;
  p.out_acc = slots > 0 ? acc.data_ptr<TA>() : nullptr;
  launch<TI, false>(p, plan);

  Tensor row_lse, w, total;
  std::tie(row_lse, w, total) = merge_stats(m, s);
  Tensor pos_sum = labels ? pos.select(1, 0).sum(0) : at::zeros({B}, opts);
  Tensor pos_cnt = labels ? pos.select(1, 1).sum(0) : at::zeros({B}, opts);
  Tensor e_key = at::empty({0}, opts), p_key = at::empty({0}, opts);
  if (row_only) {
    Tensor e = (acc.narrow(1, 0, G) * w.unsqueeze(-1)).sum(0);  // (G, B, D)
    Tensor live = total > 0;
    Tensor denom = at::where(live, total, at::ones_like(total)).unsqueeze(-1);
    e_key = at::where(live.unsqueeze(-1), e / denom, at::zeros_like(e)).contiguous();
    if (labels) p_key = acc.select(1, G).sum(0).contiguous();
  }
  Tensor col_lse = at::empty({want_col_lse ? N : 0}, opts);
  if (want_col_lse && N > 0) {
    LseTileParams<TA> pc = orient<TA>(c, true);
    pc.G = 1;
    pc.gamma[0] = TA(1);
    const Plan cplan = plan_pass<TI>(pc, 0, kWarpStats);
    pc.cols_per_split = cplan.per_split;
    Tensor cm = at::empty({cplan.splits, 1, N}, opts), cs = at::empty({cplan.splits, 1, N}, opts);
    pc.out_m = cm.data_ptr<TA>();
    pc.out_s = cs.data_ptr<TA>();
    launch<TI, false>(pc, cplan);
    col_lse = std::get<0>(merge_stats(cm, cs)).select(0, 0).contiguous();
  }
  return {row_lse.contiguous(), pos_sum.contiguous(), pos_cnt.contiguous(), col_lse, e_key, p_key};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lse_fwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
    const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, at::ArrayRef<double> gammas,
    const optional<Tensor>& exclude, const optional<Tensor>& q_labels, const optional<Tensor>& k_labels,
    bool want_col_lse, bool row_only) {
  check_lse_args("lse_fwd", q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels,
                 kMaxGammas);
  TORCH_CHECK(on_kernel_device(q), "lse_fwd (CUDA): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(q.device());
  Common c = prepare(q, k, row_scale, col_scale, row_bias, col_bias, exclude, q_labels, k_labels);
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> out;
  dispatch_input(q.scalar_type(), "lse_fwd", [&](auto tag) {
    using TI = decltype(tag);
    out = lse_fwd_typed<TI>(c, gammas, want_col_lse, row_only);
  });
  return out;
}

template <typename TI>
std::tuple<Tensor, Tensor, Tensor, Tensor> lse_bwd_typed(const Common& c, at::ArrayRef<double> gammas,
                                                         const Tensor& row_lse, const Tensor& col_lse,
                                                         const Tensor& d_row, const optional<Tensor>& d_pos,
                                                         const optional<Tensor>& d_col, bool need_g_key,
                                                         bool need_h, bool need_dc, bool need_dd) {
  using TA = typename LseTypes<TI>::TA;
  const int64_t B = c.q.size(0), N = c.k.size(0), D = c.q.size(1);
  const int G = static_cast<int>(gammas.size());
  auto opts = c.q.options().dtype(c.acc);
  const bool labels = c.qlab.defined() || c.qbits.defined();
  Tensor gam = at::tensor(std::vector<double>(gammas.begin(), gammas.end()), opts.dtype(at::kDouble)).to(c.acc);
  Tensor q_lse = row_lse.to(c.acc).contiguous();
  Tensor q_w = (d_row.to(c.acc) * gam.unsqueeze(1)).contiguous();
  Tensor q_dpos = (labels && d_pos.has_value()) ? d_pos->to(c.acc).contiguous() : Tensor();
  const bool col = d_col.has_value() && col_lse.numel() == N && N > 0;
  Tensor k_lse = col ? col_lse.to(c.acc).contiguous() : Tensor();
  Tensor k_dcol = col ? d_col->to(c.acc).contiguous() : Tensor();
  Tensor g_key = at::empty({0}, opts), h = at::empty({0}, opts), dc = at::empty({0}, opts), dd = at::empty({0}, opts);

  auto pass = [&](bool key_rows, Tensor& acc_out, Tensor& gsum_out, bool want_acc, bool want_gsum) {
    LseTileParams<TA> p = orient<TA>(c, key_rows);
    p.G = G;
    for (int g = 0; g < G; ++g) p.gamma[g] = static_cast<TA>(gammas[g]);
    p.q_lse = q_lse.data_ptr<TA>();
    p.q_w = q_w.data_ptr<TA>();
    p.q_dpos = q_dpos.defined() ? q_dpos.data_ptr<TA>() : nullptr;
    p.k_lse = col ? k_lse.data_ptr<TA>() : nullptr;
    p.k_dcol = col ? k_dcol.data_ptr<TA>() : nullptr;
    p.q_count = B;
    // the warp kernel's form of the same G: the query side's term by row or by column
    const TA* q_term_w = gammas[0] != 0.0 ? p.q_w : nullptr;
    p.row_w = key_rows ? p.k_dcol : q_term_w;
    p.row_lse = key_rows ? p.k_lse : p.q_lse;
    p.row_gamma = key_rows ? TA(1) : p.gamma[0];
    p.col_w = key_rows ? q_term_w : p.k_dcol;
    p.col_lse = key_rows ? p.q_lse : p.k_lse;
    p.col_gamma = key_rows ? p.gamma[0] : TA(1);
    const int64_t R = p.R;
    const Plan plan = plan_pass<TI>(p, 1, kWarpGrad);
    p.cols_per_split = plan.per_split;
    Tensor acc = at::empty({plan.splits, 1, R, D}, opts);
    Tensor gs = at::empty({plan.splits, R}, opts);
    p.out_acc = acc.data_ptr<TA>();
    p.out_gsum = gs.data_ptr<TA>();
    launch<TI, true>(p, plan);
    if (want_acc) acc_out = acc.sum(0).select(0, 0).contiguous();
    if (want_gsum) gsum_out = gs.sum(0).contiguous();
  };
  if (B > 0 && N > 0) {
    if (need_g_key || need_dc) pass(false, g_key, dc, need_g_key, need_dc);
    if (need_h || need_dd) pass(true, h, dd, need_h, need_dd);
  } else {
    if (need_g_key) g_key = at::zeros({B, D}, opts);
    if (need_dc) dc = at::zeros({B}, opts);
    if (need_h) h = at::zeros({N, D}, opts);
    if (need_dd) dd = at::zeros({N}, opts);
  }
  return {g_key, h, dc, dd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> lse_bwd_cuda(
    const Tensor& q, const Tensor& k, const Tensor& row_scale, const optional<Tensor>& col_scale,
    const optional<Tensor>& row_bias, const optional<Tensor>& col_bias, at::ArrayRef<double> gammas,
    const optional<Tensor>& exclude, const optional<Tensor>& q_labels, const optional<Tensor>& k_labels,
    const Tensor& row_lse, const Tensor& col_lse, const Tensor& d_row, const optional<Tensor>& d_pos,
    const optional<Tensor>& d_col, bool need_g_key, bool need_h, bool need_dc, bool need_dd) {
  check_lse_bwd_args(q, k, row_scale, col_scale, row_bias, col_bias, gammas, exclude, q_labels, k_labels, kMaxGammas,
                     row_lse, col_lse, d_row, d_pos, d_col);
  TORCH_CHECK(on_kernel_device(q), "lse_bwd (CUDA): tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(q.device());
  Common c = prepare(q, k, row_scale, col_scale, row_bias, col_bias, exclude, q_labels, k_labels);
  std::tuple<Tensor, Tensor, Tensor, Tensor> out;
  dispatch_input(q.scalar_type(), "lse_bwd", [&](auto tag) {
    using TI = decltype(tag);
    out = lse_bwd_typed<TI>(c, gammas, row_lse, col_lse, d_row, d_pos, d_col, need_g_key, need_h, need_dc, need_dd);
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace ck

CK_CUDA_LIBRARY_IMPL(m) {
  m.impl("lse_fwd", &ck::cuda::lse_fwd_cuda);
  m.impl("lse_bwd", &ck::cuda::lse_bwd_cuda);
}
