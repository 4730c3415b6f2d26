// MoCHi hard-negative mixing on the CPU (reference.mix_points), given the random draws:
//   h_it = normalize(alpha_it n_x + (1 - alpha_it) n_y)            t < s   (x, y from hard_index[i])
//   h_it = normalize(w_it q_i + (1 - w_it) n_y)                    t >= s  (w ~ U(0, 0.5))
// with normalize(v) = v / max(|v|, 1e-12), in the accumulation dtype (fp32, fp64 for fp64), the
// points rounded to the input dtype as the reference returns them. `mix` gathers and mixes in one
// pass and normalizes with ATen's norm (the reduction F.normalize uses: its points equal the
// reference's bit for bit, which the reproducibility contract of the draws relies on).
// mixed_dots fuses the points
// into their dot products with the query rows (u_it = <q_i, h_it>) without storing them, and its
// backward recomputes them (dq_i = sum_t g_it h_it). Memory-bound gathers: plain loops over
// rows, threaded with at::parallel_for; the inner loops auto-vectorize for the baseline ISA.
// mixed_lse on fp32 runs the kernel of the CPU's instruction set (mixing_kernel.h); the loops
// here serve fp16/bf16 (whose points are rounded to that dtype, as the reference's) and fp64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../common.h"
#include "isa.h"

namespace ck {
namespace {

using at::Tensor;

constexpr int64_t kPrefetchAhead = 16;  // points

struct Draws {
  const int64_t* hard;
  const int64_t* pair;
  const float* alpha;
  const int64_t* qidx;
  const float* qw;
  int64_t H, S, SQ;
};

// Called on the contiguous copies (prepare): a reduction over a strided view copies it first.
void check_ranges(const Tensor& hard_index, int64_t n_neg, const Tensor& pair_index, const Tensor& query_index) {
  auto range = [](const Tensor& x, int64_t hi, const char* name) {
    if (x.numel() == 0) return;
    const auto [lo, up] = at::aminmax(x);
    const int64_t lo_v = lo.item<int64_t>(), hi_v = up.item<int64_t>();
    TORCH_CHECK(lo_v >= 0 && hi_v < hi, "mix: ", name, " must hold indices in [0, ", hi, "), found ",
                lo_v < 0 ? lo_v : hi_v);
  };
  range(hard_index, n_neg, "hard_index");
  range(pair_index, hard_index.size(1), "pair_index");
  range(query_index, hard_index.size(1), "query_index");
}

#if defined(__GNUC__) && !defined(__clang__)
#define CK_NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define CK_NO_CONTRACT
#endif

// The weight and the two rows that point (i, t) mixes: v_it = a x + (1 - a) y.
template <typename scalar_t, typename acc_t>
struct PointRows {
  acc_t a;
  const scalar_t* x;
  const scalar_t* y;
};

template <typename scalar_t, typename acc_t>
inline PointRows<scalar_t, acc_t> point_rows(const scalar_t* q, const scalar_t* neg, const Draws& dr, int64_t i,
                                             int64_t t, int64_t D) {
  const int64_t* hard = dr.hard + i * dr.H;
  if (t < dr.S)
    return {static_cast<acc_t>(dr.alpha[i * dr.S + t]), neg + hard[dr.pair[(i * dr.S + t) * 2]] * D,
            neg + hard[dr.pair[(i * dr.S + t) * 2 + 1]] * D};
  const int64_t u = t - dr.S;
  return {static_cast<acc_t>(dr.qw[i * dr.SQ + u]), q + i * D, neg + hard[dr.qidx[i * dr.SQ + u]] * D};
}

// The unnormalized point v_it = a x + (1 - a) y in acc_t, each product and the sum rounded
// separately (no FMA contraction), exactly as the reference's elementwise ops compute it.
template <typename scalar_t, typename acc_t>
CK_NO_CONTRACT inline void mixed_vector(const scalar_t* q, const scalar_t* neg, const Draws& dr, int64_t i,
                                        int64_t t, int64_t D, acc_t* out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const PointRows<scalar_t, acc_t> p = point_rows<scalar_t, acc_t>(q, neg, dr, i, t, D);
  const acc_t b = acc_t(1) - p.a;
  for (int64_t d = 0; d < D; ++d) {
    const acc_t ax = p.a * static_cast<acc_t>(p.x[d]);
    const acc_t by = b * static_cast<acc_t>(p.y[d]);
    out[d] = ax + by;
  }
}

// Starts loading the negative rows that point (i, t) mixes: the rows are scattered over the queue
// (cache misses), and prefetching a few points ahead overlaps their latency with the arithmetic.
template <typename scalar_t>
inline void prefetch_point(const scalar_t* q, const scalar_t* neg, const Draws& dr, int64_t i, int64_t t, int64_t T,
                           int64_t D) {
  if (t >= T) return;
  const PointRows<scalar_t, float> p = point_rows<scalar_t, float>(q, neg, dr, i, t, D);
  const int64_t bytes = D * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) {
    if (t < dr.S) __builtin_prefetch(reinterpret_cast<const char*>(p.x) + off);  // else x is the (cached) query row
    __builtin_prefetch(reinterpret_cast<const char*>(p.y) + off);
  }
}

// sum_d a[d] b[d] in kLanes interleaved partial sums: independent chains the compiler turns into
// vector registers (one sequential chain would be bound by the add latency, ~4 cycles an element).
template <typename acc_t>
inline acc_t dot_lanes(const acc_t* a, const acc_t* b, int64_t D) {
  constexpr int kLanes = 16;
  acc_t part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[d + l] * b[d + l];
  for (; d < D; ++d) part[0] += a[d] * b[d];
  acc_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// The point h_it = normalize(v_it) in acc_t, rounded through scalar_t (the dtype the reference
// returns it in). Used where the points are consumed at once (mixed_dots).
template <typename scalar_t, typename acc_t>
inline void mixed_point(const scalar_t* q, const scalar_t* neg, const Draws& dr, int64_t i, int64_t t, int64_t D,
                        acc_t* out) {
  mixed_vector<scalar_t, acc_t>(q, neg, dr, i, t, D, out);
  const acc_t ss = dot_lanes(out, out, D);
  const acc_t inv = acc_t(1) / std::max(std::sqrt(ss), acc_t(1e-12));
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<acc_t>(static_cast<scalar_t>(out[d] * inv));
}

Draws draws_of(const Tensor& hard, const Tensor& pair, const Tensor& alpha, const Tensor& qidx, const Tensor& qw) {
  return Draws{hard.data_ptr<int64_t>(), pair.data_ptr<int64_t>(), alpha.data_ptr<float>(), qidx.data_ptr<int64_t>(),
               qw.data_ptr<float>(), hard.size(1), pair.size(1), qidx.size(1)};
}

struct Prepared {
  Tensor hard, pair, alpha, qidx, qw;
};

Prepared prepare(const Tensor& negatives, const Tensor& hard_index, const Tensor& pair_index, const Tensor& alpha,
                 const Tensor& query_index, const Tensor& query_weight) {
  Prepared p{hard_index.contiguous(), pair_index.contiguous(), alpha.to(at::kFloat).contiguous(),
             query_index.contiguous(), query_weight.to(at::kFloat).contiguous()};
  check_ranges(p.hard, negatives.size(0), p.pair, p.qidx);
  return p;
}

// The inputs of an op that dots the points with q (mixed_dots, mixed_lse), checked and laid out.
struct DotsCall {
  Prepared p;
  Tensor mq, neg, q;  // mix_query and negatives contiguous, q in the accumulation dtype
  int64_t B, D, T;
};

DotsCall dots_call(const char* op, const Tensor& q_in, const Tensor& mix_query, const Tensor& negatives,
                   const Tensor& hard_index, const Tensor& pair_index, const Tensor& alpha,
                   const Tensor& query_index, const Tensor& query_weight) {
  check_mix_args(op, mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  check_features(q_in, op, "q");
  TORCH_CHECK(q_in.sizes() == mix_query.sizes(), op, ": q and mix_query must have one shape, got ", q_in.sizes(),
              " and ", mix_query.sizes());
  TORCH_CHECK(q_in.device().is_cpu() && mix_query.device().is_cpu(), op, " (CPU): tensors must be on the CPU");
  DotsCall c{prepare(negatives, hard_index, pair_index, alpha, query_index, query_weight), mix_query.contiguous(),
             negatives.contiguous(), q_in.to(acc_type(mix_query.scalar_type())).contiguous(), mix_query.size(0),
             mix_query.size(1), pair_index.size(1) + query_index.size(1)};
  return c;
}

Tensor mix_cpu(const Tensor& query, const Tensor& negatives, const Tensor& hard_index, const Tensor& pair_index,
               const Tensor& alpha, const Tensor& query_index, const Tensor& query_weight) {
  check_mix_args("mix", query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  TORCH_CHECK(query.device().is_cpu(), "mix (CPU): tensors must be on the CPU");
  Prepared p = prepare(negatives, hard_index, pair_index, alpha, query_index, query_weight);
  const Tensor q = query.contiguous(), neg = negatives.contiguous();
  const int64_t B = q.size(0), D = q.size(1), T = pair_index.size(1) + query_index.size(1);
  const at::ScalarType acc = acc_type(q.scalar_type());
  Tensor v = at::empty({B, T, D}, q.options().dtype(acc));
  if (v.numel() == 0) return v.to(q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mix_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Draws dr = draws_of(p.hard, p.pair, p.alpha, p.qidx, p.qw);
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* np = neg.data_ptr<scalar_t>();
    acc_t* vp = v.data_ptr<acc_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i)
        for (int64_t t = 0; t < T; ++t) mixed_vector<scalar_t, acc_t>(qp, np, dr, i, t, D, vp + (i * T + t) * D);
    });
  });
  // F.normalize's own reduction and division, so the points equal the reference bit for bit
  return (v / v.norm(2, {-1}, /*keepdim=*/true).clamp_min(1e-12)).to(q.scalar_type());
}

Tensor mixed_dots_cpu(const Tensor& q_in, const Tensor& mix_query, const Tensor& negatives, const Tensor& hard_index,
                      const Tensor& pair_index, const Tensor& alpha, const Tensor& query_index,
                      const Tensor& query_weight) {
  const DotsCall call = dots_call("mixed_dots", q_in, mix_query, negatives, hard_index, pair_index, alpha,
                                  query_index, query_weight);
  const Prepared& p = call.p;
  const Tensor &mq = call.mq, &neg = call.neg, &q = call.q;
  const int64_t B = call.B, D = call.D, T = call.T;
  Tensor out = at::empty({B, T}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mq.scalar_type(), "mixed_dots_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Draws dr = draws_of(p.hard, p.pair, p.alpha, p.qidx, p.qw);
    const scalar_t* mp = mq.data_ptr<scalar_t>();
    const scalar_t* np = neg.data_ptr<scalar_t>();
    const acc_t* qp = q.data_ptr<acc_t>();
    acc_t* op = out.data_ptr<acc_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> h(D);
      for (int64_t i = b0; i < b1; ++i)
        for (int64_t t = 0; t < T; ++t) {
          prefetch_point(mp, np, dr, i, t + kPrefetchAhead, T, D);
          mixed_point<scalar_t, acc_t>(mp, np, dr, i, t, D, h.data());
          op[i * T + t] = dot_lanes(qp + i * D, h.data(), D);
        }
    });
  });
  return out;
}

Tensor mixed_dots_bwd_cpu(const Tensor& grad_in, const Tensor& mix_query, const Tensor& negatives,
                          const Tensor& hard_index, const Tensor& pair_index, const Tensor& alpha,
                          const Tensor& query_index, const Tensor& query_weight) {
  check_mix_args("mixed_dots_bwd", mix_query, negatives, hard_index, pair_index, alpha, query_index, query_weight);
  const int64_t B = mix_query.size(0), D = mix_query.size(1), T = pair_index.size(1) + query_index.size(1);
  TORCH_CHECK(grad_in.dim() == 2 && grad_in.size(0) == B && grad_in.size(1) == T && grad_in.is_floating_point(),
              "mixed_dots_bwd: grad must be floating (", B, ", ", T, "), got ", grad_in.sizes());
  TORCH_CHECK(grad_in.device().is_cpu() && mix_query.device().is_cpu(), "mixed_dots_bwd (CPU): tensors must be on the CPU");
  Prepared p = prepare(negatives, hard_index, pair_index, alpha, query_index, query_weight);
  const Tensor mq = mix_query.contiguous(), neg = negatives.contiguous();
  const at::ScalarType acc = acc_type(mq.scalar_type());
  const Tensor g = grad_in.to(acc).contiguous();
  Tensor dq = at::zeros({B, D}, g.options());
  if (B == 0 || T == 0) return dq;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mq.scalar_type(), "mixed_dots_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Draws dr = draws_of(p.hard, p.pair, p.alpha, p.qidx, p.qw);
    const scalar_t* mp = mq.data_ptr<scalar_t>();
    const scalar_t* np = neg.data_ptr<scalar_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    acc_t* op = dq.data_ptr<acc_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> h(D);
      for (int64_t i = b0; i < b1; ++i)
        for (int64_t t = 0; t < T; ++t) {
          prefetch_point(mp, np, dr, i, t + kPrefetchAhead, T, D);
          mixed_point<scalar_t, acc_t>(mp, np, dr, i, t, D, h.data());
          const acc_t w = gp[i * T + t];
          for (int64_t d = 0; d < D; ++d) op[i * D + d] += w * h[d];
        }
    });
  });
  return dq;
}

// The synthetic logits l_it = a_i <q_i, h_it> + c_i reduced to the loss's log-sum-exp per gamma,
// with the softmax-weighted sums its gradient needs (ops_schema.h), in one pass over the points:
// online softmax per gamma (flash-attention style), m' = max(m, z), s' = s e^{m - m'} + e^{z - m'},
// E and U rescaled alike. Backward is then O(B D) (_ext.py), with no second gather of the points.
std::tuple<Tensor, Tensor, Tensor> mixed_lse_cpu(const Tensor& q_in, const Tensor& mix_query, const Tensor& negatives,
                                                 const Tensor& hard_index, const Tensor& pair_index,
                                                 const Tensor& alpha, const Tensor& query_index,
                                                 const Tensor& query_weight, const Tensor& row_scale,
                                                 const c10::optional<Tensor>& row_bias, at::ArrayRef<double> gammas) {
  const DotsCall call = dots_call("mixed_lse", q_in, mix_query, negatives, hard_index, pair_index, alpha,
                                  query_index, query_weight);
  const Prepared& p = call.p;
  const Tensor &mq = call.mq, &neg = call.neg, &q = call.q;
  const int64_t B = call.B, D = call.D, T = call.T;
  const int64_t G = static_cast<int64_t>(gammas.size());
  TORCH_CHECK(G >= 1 && G <= 4, "mixed_lse: 1 to 4 gammas, got ", G);
  check_vector(row_scale, B, "mixed_lse", "row_scale");
  if (row_bias.has_value()) check_vector(*row_bias, B, "mixed_lse", "row_bias");
  TORCH_CHECK(row_scale.device().is_cpu() && (!row_bias.has_value() || row_bias->device().is_cpu()),
              "mixed_lse (CPU): tensors must be on the CPU");
  const at::ScalarType acc = q.scalar_type();
  const Tensor a = row_scale.to(acc).contiguous();
  const Tensor c = row_bias.has_value() ? row_bias->to(acc).contiguous() : at::zeros({B}, q.options());
  Tensor lse = at::empty({G, B}, q.options());
  Tensor e_sum = at::zeros({G, B, D}, q.options());
  Tensor u_sum = at::zeros({G, B}, q.options());
  if (B == 0) return {lse, e_sum, u_sum};
  if (mq.scalar_type() == at::kFloat) {  // the vectorized kernel of this CPU's instruction set
    cpu::MixLseArgs args;
    args.B = B, args.D = D, args.H = p.hard.size(1), args.S = p.pair.size(1), args.SQ = p.qidx.size(1);
    args.G = static_cast<int>(G);
    for (int64_t g = 0; g < G; ++g) args.gamma[g] = static_cast<float>(gammas[g]);
    args.q = q.data_ptr<float>(), args.mq = mq.data_ptr<float>(), args.neg = neg.data_ptr<float>();
    args.hard = p.hard.data_ptr<int64_t>(), args.pair = p.pair.data_ptr<int64_t>();
    args.alpha = p.alpha.data_ptr<float>(), args.qidx = p.qidx.data_ptr<int64_t>(), args.qw = p.qw.data_ptr<float>();
    args.a = a.data_ptr<float>(), args.c = c.data_ptr<float>();
    args.lse = lse.data_ptr<float>(), args.e_sum = e_sum.data_ptr<float>(), args.u_sum = u_sum.data_ptr<float>();
    const cpu::KernelTable* tab = cpu::kernel_table();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<float> scratch(cpu::kMixBlock * D);
      tab->mixed_lse_f32(args, scratch.data(), b0, b1);
    });
    return {lse, e_sum, u_sum};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mq.scalar_type(), "mixed_lse_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Draws dr = draws_of(p.hard, p.pair, p.alpha, p.qidx, p.qw);
    const scalar_t* mp = mq.data_ptr<scalar_t>();
    const scalar_t* np = neg.data_ptr<scalar_t>();
    const acc_t* qp = q.data_ptr<acc_t>();
    const acc_t* ap = a.data_ptr<acc_t>();
    const acc_t* cp = c.data_ptr<acc_t>();
    acc_t* lp = lse.data_ptr<acc_t>();
    acc_t* ep = e_sum.data_ptr<acc_t>();
    acc_t* up = u_sum.data_ptr<acc_t>();
    at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> h(D);
      for (int64_t i = b0; i < b1; ++i) {
        acc_t m[4], s[4];
        for (int64_t g = 0; g < G; ++g) {
          m[g] = -std::numeric_limits<acc_t>::infinity();
          s[g] = acc_t(0);
        }
        for (int64_t t = 0; t < T; ++t) {
          prefetch_point(mp, np, dr, i, t + kPrefetchAhead, T, D);
          mixed_point<scalar_t, acc_t>(mp, np, dr, i, t, D, h.data());
          const acc_t u = dot_lanes(qp + i * D, h.data(), D);
          const acc_t l = ap[i] * u + cp[i];
          for (int64_t g = 0; g < G; ++g) {
            const acc_t z = static_cast<acc_t>(gammas[g]) * l;
            acc_t* e = ep + (g * B + i) * D;
            if (z > m[g]) {  // the maximum moves: rescale (e^{-inf} = 0 on the first point)
              const acc_t r = std::exp(m[g] - z);
              s[g] *= r;
              up[g * B + i] *= r;
              for (int64_t d = 0; d < D; ++d) e[d] *= r;
              m[g] = z;
            }
            // no finite point yet (m = -inf): e^{z - 0}, so a -inf logit weighs 0, not e^{NaN};
            // NaN logits make the row NaN
            const acc_t m_ref = m[g] == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m[g];
            const acc_t w = std::exp(z - m_ref);
            s[g] += w;
            up[g * B + i] += w * u;
            for (int64_t d = 0; d < D; ++d) e[d] += w * h[d];
          }
        }
        for (int64_t g = 0; g < G; ++g) {
          acc_t* e = ep + (g * B + i) * D;
          const bool live = s[g] > acc_t(0);
          lp[g * B + i] = live ? m[g] + std::log(s[g]) : (s[g] == s[g] ? -std::numeric_limits<acc_t>::infinity() : s[g]);
          if (live) {
            for (int64_t d = 0; d < D; ++d) e[d] /= s[g];
            up[g * B + i] /= s[g];
          }
        }
      }
    });
  });
  return {lse, e_sum, u_sum};
}

}  // namespace
}  // namespace ck

TORCH_LIBRARY_IMPL(contrastive_kernels, CPU, m) {
  m.impl("mixed_lse", &ck::mixed_lse_cpu);
  m.impl("mix", &ck::mix_cpu);
  m.impl("mixed_dots", &ck::mixed_dots_cpu);
  m.impl("mixed_dots_bwd", &ck::mixed_dots_bwd_cpu);
}
