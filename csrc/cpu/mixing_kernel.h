// mixed_lse for fp32 inputs (the op of mixing.cpp; its spec in contrastive_kernels/triton/mixing.py):
// MoCHi's synthetic logits l_it = a_i <q_i, h_it> + c_i, h_it = v_it / max(|v_it|, 1e-12), with
//   v_it = alpha_it n_x + (1 - alpha_it) n_y     t < S   (x, y: the row's hard rows at pair[i, t])
//   v_it = w_it m_i + (1 - w_it) n_y             t >= S  (m_i: the row of mix_query)
// reduced per row and gamma to lse_gi = log sum_t e^{gamma_g l_it} with the softmax-weighted sums
// E_gi = sum_t p_git h_it and U_gi = sum_t p_git u_it that its gradient needs.
//
// In blocks of kMixBlock points, as flash-attention does: one pass over the feature dim per point
// forms v (kept in `scratch`, L1) and its two dot products |v|^2 and <q_i, v> at once; then per
// gamma the block's maximum moves the running one (rescaling s, U and E by e^{m_old - m_new}, once
// per block), the block's weights come from one vector exp, and E takes the block's points in one
// read-modify-write: E += sum_t (p_t / |v_t|) v_t. The scalar path (mixing.cpp, fp16/bf16/fp64)
// forms, normalizes, rounds and dots each point in separate passes; v is formed alike (mul, mul,
// add), the sums |v|^2 and <q, v> in another order (u and E agree to fp32 rounding). NaN logits
// make the row NaN, -inf logits weigh 0 (a row of them: lse = -inf), as there and in Triton.
// Included inside the per-ISA namespace (see vec.h), after vec.h.

template <typename V>
CK_INLINE void mix_point_rows(const MixLseArgs& A, int64_t i, int64_t t, float* w, const float** x, const float** y) {
  const int64_t* hard = A.hard + i * A.H;
  if (t < A.S) {
    *w = A.alpha[i * A.S + t];
    *x = A.neg + hard[A.pair[(i * A.S + t) * 2]] * A.D;
    *y = A.neg + hard[A.pair[(i * A.S + t) * 2 + 1]] * A.D;
  } else {
    const int64_t u = t - A.S;
    *w = A.qw[i * A.SQ + u];
    *x = A.mq + i * A.D;
    *y = A.neg + hard[A.qidx[i * A.SQ + u]] * A.D;
  }
}

// Starts loading the rows of a point a few points ahead: they are scattered over the queue.
template <typename V>
CK_INLINE void mix_prefetch(const MixLseArgs& A, int64_t i, int64_t t) {
  if (t >= A.S + A.SQ) return;
  float w;
  const float *x, *y;
  mix_point_rows<V>(A, i, t, &w, &x, &y);
  for (int64_t off = 0; off < A.D * 4; off += 64) {
    if (t < A.S) __builtin_prefetch(reinterpret_cast<const char*>(x) + off);  // else the (cached) mix row
    __builtin_prefetch(reinterpret_cast<const char*>(y) + off);
  }
}

template <typename V>
void mixed_lse_rows(const MixLseArgs& A, float* scratch, int64_t i0, int64_t i1) {
  using R = typename V::R;
  constexpr int W = V::W;
  constexpr int64_t kAhead = 16;  // points
  static_assert(kMixBlock % W == 0, "a block of points is whole vectors");
  const int64_t D = A.D, T = A.S + A.SQ, B = A.B;
  const int64_t Dv = D / W * W;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = i0; i < i1; ++i) {
    const float* qi = A.q + i * D;
    const float ai = A.a[i], ci = A.c[i];
    float m[kMaxGammas], s[kMaxGammas], us[kMaxGammas];
    for (int g = 0; g < A.G; ++g) {
      m[g] = -inf;
      s[g] = us[g] = 0.0f;
    }
    for (int64_t t0 = 0; t0 < T; t0 += kMixBlock) {
      const int nt = static_cast<int>(ck_min<int64_t>(kMixBlock, T - t0));
      alignas(64) float u[kMixBlock], inv[kMixBlock], z[kMixBlock], p[kMixBlock];
      for (int j = 0; j < nt; ++j) {
        mix_prefetch<V>(A, i, t0 + j + kAhead);
        float wa;
        const float *x, *y;
        mix_point_rows<V>(A, i, t0 + j, &wa, &x, &y);
        const float wb = 1.0f - wa;
        float* v = scratch + j * D;
        const R va = V::set1(wa), vb = V::set1(wb);
        R ss = V::zero(), qv = V::zero();
        int64_t d = 0;
        for (; d < Dv; d += W) {
          const R vv = V::add(V::mul(va, V::load(x + d)), V::mul(vb, V::load(y + d)));
          V::store(v + d, vv);
          ss = V::fmadd(vv, vv, ss);
          qv = V::fmadd(V::load(qi + d), vv, qv);
        }
        float ss_s = V::hsum(ss), qv_s = V::hsum(qv);
        for (; d < D; ++d) {
          const float vv = wa * x[d] + wb * y[d];
          v[d] = vv;
          ss_s += vv * vv;
          qv_s += qi[d] * vv;
        }
        inv[j] = 1.0f / ck_max(std::sqrt(ss_s), 1e-12f);
        u[j] = qv_s * inv[j];
      }
      for (int g = 0; g < A.G; ++g) {
        float bm = -inf;
        for (int j = 0; j < nt; ++j) {
          z[j] = A.gamma[g] * (ai * u[j] + ci);
          if (z[j] > bm) bm = z[j];  // NaN never moves the maximum
        }
        float* e = A.e_sum + (g * B + i) * D;
        if (bm > m[g]) {  // rescale by e^{m_old - m_new} (0 on the first block: E, s, U are 0)
          const float r = std::exp(m[g] - bm);
          s[g] *= r;
          us[g] *= r;
          const R vr = V::set1(r);
          int64_t d = 0;
          for (; d < Dv; d += W) V::store(e + d, V::mul(vr, V::load(e + d)));
          for (; d < D; ++d) e[d] *= r;
          m[g] = bm;
        }
        for (int j = nt; j < kMixBlock; ++j) z[j] = 0.0f;  // lanes past the block: defined, unused
        const R vm = V::set1(m[g] == -inf ? 0.0f : m[g]);  // no finite point yet: a -inf logit weighs e^{-inf} = 0
        for (int j = 0; j < kMixBlock; j += W) V::store(p + j, V::exp(V::sub(V::load(z + j), vm)));
        for (int j = 0; j < nt; ++j) {
          s[g] += p[j];
          us[g] += p[j] * u[j];
          p[j] *= inv[j];  // the weight of v_t in E
        }
        int64_t d = 0;
        for (; d < Dv; d += W) {
          R acc = V::load(e + d);
          for (int j = 0; j < nt; ++j) acc = V::fmadd(V::set1(p[j]), V::load(scratch + j * D + d), acc);
          V::store(e + d, acc);
        }
        for (; d < D; ++d) {
          float acc = e[d];
          for (int j = 0; j < nt; ++j) acc += p[j] * scratch[j * D + d];
          e[d] = acc;
        }
      }
    }
    for (int g = 0; g < A.G; ++g) {
      float* e = A.e_sum + (g * B + i) * D;
      const bool live = s[g] > 0.0f;
      A.lse[g * B + i] = live ? m[g] + std::log(s[g]) : (s[g] == s[g] ? -inf : s[g]);
      if (live) {
        for (int64_t d = 0; d < D; ++d) e[d] /= s[g];
        A.u_sum[g * B + i] = us[g] / s[g];
      } else {
        A.u_sum[g * B + i] = us[g];
      }
    }
  }
}
