// MoCHi hard-negative mixing on the GPU (reference.mix_points), given the random draws. One block
// per query row; threads stride over the feature dimension. Pure CUDA (no torch).
//   v_it = a x + (1 - a) y  (x, y rows of `negatives` picked through hard_index; for the query
//          mixes x = q_i and a = the query weight), products and sum rounded separately
//          (__fmul_rn / __fadd_rn: never contracted to an FMA, as the reference's elementwise ops);
//   h_it = v_it / max(|v_it|, 1e-12), rounded to the input dtype.
// mix_vectors_kernel writes v (the host normalizes it with ATen, F.normalize's own reduction, so
// the points equal the reference's bit for bit); mixed_dots_kernel computes u_it = <q_i, h_it>
// and mixed_dots_bwd_kernel dq_i = sum_t g_it h_it without storing any point.
// mixed_lse_kernel reduces the synthetic logits l_it = a_i u_it + c_i to lse_gi = log sum_t
// e^{gamma_g l_it} per gamma with an online softmax (m' = max(m, z), s' = s e^{m - m'} + e^{z - m'})
// that also keeps E_gi = sum_t p_git h_it and U_gi = sum_t p_git u_it (p = the softmax weights),
// so that the backward (dq_i = a_i sum_g w_gi E_gi, w = dL/dlse gamma; _common.mixed_lse_backward)
// gathers nothing: the CPU kernel's formula, point by point in the same order.
// Indices are clamped into range (the Python layer validates them; a bad direct call must not
// fault the device).
#pragma once

#include "device_common.cuh"

namespace ck {
namespace cuda {

struct MixParams {
  int64_t B = 0, D = 0, n_neg = 0, H = 0, S = 0, SQ = 0;
  const void* query = nullptr;      // B x D (the mixing query)
  const void* negatives = nullptr;  // n_neg x D
  const int64_t* hard = nullptr;    // B x H
  const int64_t* pair = nullptr;    // B x S x 2
  const float* alpha = nullptr;     // B x S
  const int64_t* qidx = nullptr;    // B x SQ
  const float* qw = nullptr;        // B x SQ
  void* out = nullptr;              // mix: B x (S+SQ) x D (acc); dots: B x (S+SQ) (acc); bwd: B x D (acc);
                                    // lse: G x B (acc)
  const void* q = nullptr;          // dots, lse: B x D (acc)
  const void* grad = nullptr;       // bwd: B x (S+SQ) (acc)
  // mixed_lse only
  const void* row_scale = nullptr;  // B (acc)
  const void* row_bias = nullptr;   // B (acc) or null
  void* e_sum = nullptr;            // G x B x D (acc), zero on entry
  void* u_sum = nullptr;            // G x B (acc)
  int G = 0;
  double gamma[kMaxGammas] = {};
};

__device__ __forceinline__ int64_t clamp_index(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// x, y rows and the weight a of point t of row i
template <typename TI, typename TA>
__device__ __forceinline__ void point_sources(const MixParams& p, int64_t i, int64_t t, const TI*& x, const TI*& y,
                                              TA& a) {
  const TI* q = static_cast<const TI*>(p.query);
  const TI* neg = static_cast<const TI*>(p.negatives);
  const int64_t* hard = p.hard + i * p.H;
  if (t < p.S) {
    a = static_cast<TA>(p.alpha[i * p.S + t]);
    x = neg + clamp_index(hard[clamp_index(p.pair[(i * p.S + t) * 2], p.H)], p.n_neg) * p.D;
    y = neg + clamp_index(hard[clamp_index(p.pair[(i * p.S + t) * 2 + 1], p.H)], p.n_neg) * p.D;
  } else {
    const int64_t u = t - p.S;
    a = static_cast<TA>(p.qw[i * p.SQ + u]);
    x = q + i * p.D;
    y = neg + clamp_index(hard[clamp_index(p.qidx[i * p.SQ + u], p.H)], p.n_neg) * p.D;
  }
}

template <typename TA>
__device__ __forceinline__ TA block_sum(TA v, TA* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  TA total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

template <typename TI, typename TA>
__global__ void __launch_bounds__(kThreads) mix_vectors_kernel(MixParams p) {
  const int64_t i = blockIdx.x;
  const int64_t T = p.S + p.SQ;
  TA* out = static_cast<TA*>(p.out);
  for (int64_t t = 0; t < T; ++t) {
    const TI *x, *y;
    TA a;
    point_sources<TI, TA>(p, i, t, x, y, a);
    const TA b = TA(1) - a;
    for (int64_t d = threadIdx.x; d < p.D; d += kThreads)
      out[(i * T + t) * p.D + d] =
          add_rn(mul_rn(a, to_compute<TA>(x[d])), mul_rn(b, to_compute<TA>(y[d])));
  }
}

// h_it into shared memory (D values, acc type, rounded through TI); returns nothing
template <typename TI, typename TA>
__device__ __forceinline__ void mixed_point_smem(const MixParams& p, int64_t i, int64_t t, TA* h, TA* red) {
  const TI *x, *y;
  TA a;
  point_sources<TI, TA>(p, i, t, x, y, a);
  const TA b = TA(1) - a;
  TA ss = 0;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) {
    const TA v = add_rn(mul_rn(a, to_compute<TA>(x[d])), mul_rn(b, to_compute<TA>(y[d])));
    h[d] = v;
    ss += v * v;
  }
  const TA norm = sqrt(block_sum<TA>(ss, red));
  const TA inv = TA(1) / (norm > TA(1e-12) ? norm : TA(1e-12));
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) h[d] = to_compute<TA>(from_acc_round<TI>(h[d] * inv));
}

// u_it = <q_i, h_it> (every thread gets it), with h_it left in shared memory; red: 2 kWarps slots
template <typename TI, typename TA>
__device__ __forceinline__ TA mixed_point_dot(const MixParams& p, int64_t i, int64_t t, const TA* q, TA* h, TA* red) {
  mixed_point_smem<TI, TA>(p, i, t, h, red);
  TA dot = 0;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) dot += q[d] * h[d];
  return block_sum<TA>(dot, red + kWarps);
}

template <typename TI, typename TA>
__global__ void __launch_bounds__(kThreads) mixed_dots_kernel(MixParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  TA* h = reinterpret_cast<TA*>(smem);
  const int64_t i = blockIdx.x;
  const int64_t T = p.S + p.SQ;
  const TA* q = static_cast<const TA*>(p.q) + i * p.D;
  TA* out = static_cast<TA*>(p.out);
  for (int64_t t = 0; t < T; ++t) {
    const TA dot = mixed_point_dot<TI, TA>(p, i, t, q, h, h + p.D);
    if (threadIdx.x == 0) out[i * T + t] = dot;
    __syncthreads();
  }
}

template <typename TI, typename TA>
__global__ void __launch_bounds__(kThreads) mixed_dots_bwd_kernel(MixParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  TA* h = reinterpret_cast<TA*>(smem);
  TA* red = h + p.D;
  const int64_t i = blockIdx.x;
  const int64_t T = p.S + p.SQ;
  const TA* g = static_cast<const TA*>(p.grad) + i * T;
  TA* dq = static_cast<TA*>(p.out) + i * p.D;
  for (int64_t d = threadIdx.x; d < p.D; d += kThreads) dq[d] = TA(0);
  for (int64_t t = 0; t < T; ++t) {
    mixed_point_smem<TI, TA>(p, i, t, h, red);
    const TA w = g[t];
    for (int64_t d = threadIdx.x; d < p.D; d += kThreads) dq[d] += w * h[d];
    __syncthreads();
  }
}

// One block per row; E accumulates in e_sum (each thread owns its features, no synchronization);
// the running (m, s, U) per gamma are block-uniform (block_sum gives every thread the same total).
template <typename TI, typename TA>
__global__ void __launch_bounds__(kThreads) mixed_lse_kernel(MixParams p) {
  extern __shared__ __align__(16) unsigned char smem[];
  TA* h = reinterpret_cast<TA*>(smem);
  const int64_t i = blockIdx.x;
  const int64_t T = p.S + p.SQ;
  const TA* q = static_cast<const TA*>(p.q) + i * p.D;
  const TA a = static_cast<const TA*>(p.row_scale)[i];
  const TA c = p.row_bias ? static_cast<const TA*>(p.row_bias)[i] : TA(0);
  TA* lse = static_cast<TA*>(p.out);
  TA* e_sum = static_cast<TA*>(p.e_sum);
  TA* u_sum = static_cast<TA*>(p.u_sum);
  TA m[kMaxGammas], s[kMaxGammas], us[kMaxGammas];
  for (int g = 0; g < p.G; ++g) {
    m[g] = neg_inf<TA>();
    s[g] = TA(0);
    us[g] = TA(0);
  }
  for (int64_t t = 0; t < T; ++t) {
    const TA u = mixed_point_dot<TI, TA>(p, i, t, q, h, h + p.D);
    const TA l = a * u + c;
    for (int g = 0; g < p.G; ++g) {
      const TA z = static_cast<TA>(p.gamma[g]) * l;
      TA* e = e_sum + (g * p.B + i) * p.D;
      if (z > m[g]) {  // the maximum moves: rescale (e^{-inf} = 0 on the first point)
        const TA r = ck_exp(m[g] - z);
        s[g] *= r;
        us[g] *= r;
        for (int64_t d = threadIdx.x; d < p.D; d += kThreads) e[d] *= r;
        m[g] = z;
      }
      // no finite point yet (m = -inf): e^{z - 0}, so a -inf logit weighs 0, not e^{NaN};
      // NaN logits make the row NaN
      const TA m_ref = m[g] == neg_inf<TA>() ? TA(0) : m[g];
      const TA w = ck_exp(z - m_ref);
      s[g] += w;
      us[g] += w * u;
      for (int64_t d = threadIdx.x; d < p.D; d += kThreads) e[d] += w * h[d];
    }
    __syncthreads();  // h is rewritten by the next point
  }
  for (int g = 0; g < p.G; ++g) {
    TA* e = e_sum + (g * p.B + i) * p.D;
    const bool live = s[g] > TA(0);
    if (threadIdx.x == 0) {
      lse[g * p.B + i] = live ? m[g] + ck_log(s[g]) : (s[g] == s[g] ? neg_inf<TA>() : s[g]);
      u_sum[g * p.B + i] = live ? us[g] / s[g] : us[g];
    }
    if (live)
      for (int64_t d = threadIdx.x; d < p.D; d += kThreads) e[d] /= s[g];
  }
}

}  // namespace cuda
}  // namespace ck
