// lse_stats forward and backward on the CPU: the score GEMM with the softmax statistics fused
// into each tile while it is in L1, so the B x N logits never exist. Included inside the
// per-ISA namespace after gemm_kernel.h; pure C++.
//
// Spec (contrastive_kernels/reference.py, lse_stats): l_ij = a_i b_j <q_i,k_j> + c_i + d_j,
// valid_ij = j not in exclude[i], pos_ij = valid_ij and labels shared;
//   row_lse[g,i] = log sum_{j valid} exp(gamma_g l_ij),  pos_sum[i] = sum_{j pos} l_ij,
//   pos_count[i] = #pos,  col_lse[j] = log sum_{i valid} exp(l_ij).
//
// Work split: the glue gives each thread a contiguous range of columns [c0, c1) (a "part").
// A part keeps private running statistics for every row and merges nothing itself; the glue
// merges parts (max / rescaled sums). Column statistics (col_lse, and in backward h_j and
// sum_i G_ij) are complete inside the part that owns the column, so they are written directly.
//
// Loop nest of a part: column blocks of NB (converted to T and packed into panels once) >
// row groups of RG rows > column tiles of NC. Per tile:
//   1. S^T = scores (mk_rows: MV x NR register block, reduction over D);
//   2. l = S a_i b_j + c_i + d_j in place; per-row tile maximum of gamma_g l (vector max);
//   3. online softmax per gamma (flash-attention style):
//        m' = max(m, tile max),  s' = s e^{m - m'} + sum_j e^{gamma l_ij - m'};
//      the row-only mode also keeps E_gi = sum_j e^{gamma l_ij - m} b_j k_j (rescaled by e^{m-m'}
//      when the maximum moves), accumulated by a second microkernel E^T += P^T K while the
//      K tile is still in cache, so that backward needs no second pass over the keys;
//   4. positives: pos_sum += l, pos_count += 1 where pos (and row-only: their sum of b_j k_j);
//   5. column log-sum-exp: per column, a horizontal max / sum over the tile's rows merged
//      online into the column's running (max, sum).
// With a candidate threshold (lse_topk_fwd, fp32), step 1's raw dots <q_i, k_j> (bitwise the
// top-k kernel's: the same microkernel over the same fp32 operands) are also tested against
// the row's threshold, and the passing columns listed (collect_candidates).
//
// Backward (recompute): per tile, l again, then
//   G_ij = valid (sum_g dR_gi gamma_g e^{gamma_g l_ij - R_gi} + dP_i pos_ij + dC_j e^{l_ij - C_j})
// and three reductions: g_key^T += (G b)^T K (rows, mk_rows), h_j += sum_i (G a)_ij q_i
// (columns, mk_cols), dc_i += sum_j G_ij, dd_j += sum_i G_ij.

template <class V>
int64_t lse_scratch(int64_t D, int64_t Dp) {
  using TL = Tiles<V>;
  const int64_t tile = static_cast<int64_t>(TL::NC) * TL::RG;
  // kbuf + kpanel (NB x D each), S, P slots (kMaxGammas + 1), vmask, posm, X (tiles),
  // column max / sum (NB), hbuf (NB x Dp)
  return 2 * TL::NB * D + (kMaxGammas + 5) * tile + 2 * TL::NB + TL::NB * Dp + 64;
}

template <class V>
struct LseScratch {
  using T = typename V::T;
  T *kbuf, *kpanel, *S, *P, *vmask, *posm, *X, *cmax, *csum, *hbuf;
  LseScratch(T* base, int64_t D) {
    using TL = Tiles<V>;
    const int64_t tile = static_cast<int64_t>(TL::NC) * TL::RG;
    kbuf = base;
    kpanel = kbuf + TL::NB * D;
    S = kpanel + TL::NB * D;
    P = S + tile;
    vmask = P + (kMaxGammas + 1) * tile;
    posm = vmask + tile;
    X = posm + tile;
    cmax = X + tile;
    csum = cmax + TL::NB;
    hbuf = csum + TL::NB;
  }
};

// Validity (1/0) of the tile's (column, row) pairs: rows beyond B and excluded columns are 0.
// Returns false (and writes nothing) when every pair of the tile is valid.
template <class V, typename T>
CK_INLINE bool build_valid(const LseArgs<T>& A, int64_t i0, int64_t rows, int64_t j0, int64_t nc, T* vmask) {
  constexpr int RG = Tiles<V>::RG;
  if (A.exclude == nullptr && rows == RG) return false;
  for (int64_t jj = 0; jj < nc; ++jj)
    for (int64_t i = 0; i < RG; ++i) vmask[jj * RG + i] = i < rows ? T(1) : T(0);
  if (A.exclude != nullptr) {
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t* ex = A.exclude + (i0 + i) * A.E;
      for (int64_t e = 0; e < A.E; ++e) {
        const int64_t col = ex[e];
        if (col >= j0 && col < j0 + nc) vmask[(col - j0) * RG + i] = T(0);
      }
    }
  }
  return true;
}

// 1/0: the pair is valid and the rows share a label.
template <class V, typename T>
CK_INLINE void build_positive(const LseArgs<T>& A, int64_t i0, int64_t rows, int64_t j0, int64_t nc,
                              bool masked, const T* vmask, T* posm) {
  constexpr int RG = Tiles<V>::RG;
  for (int64_t jj = 0; jj < nc; ++jj) {
    const int64_t j = j0 + jj;
    T* out = posm + jj * RG;
    if (A.q_lab != nullptr) {
      const int32_t kl = A.k_lab[j];
      for (int64_t i = 0; i < rows; ++i) out[i] = A.q_lab[i0 + i] == kl ? T(1) : T(0);
    } else {
      const int64_t* kb = A.k_bits + j * A.Wb;
      for (int64_t i = 0; i < rows; ++i) {
        const int64_t* qb = A.q_bits + (i0 + i) * A.Wb;
        bool share = false;
        for (int64_t w = 0; w < A.Wb; ++w) share |= (qb[w] & kb[w]) != 0;
        out[i] = share ? T(1) : T(0);
      }
    }
    for (int64_t i = rows; i < RG; ++i) out[i] = T(0);
    if (masked)
      for (int64_t i = 0; i < rows; ++i) out[i] *= vmask[jj * RG + i];
  }
}

// lse_topk_fwd: the columns of the tile whose raw dot passes the row's threshold, appended to
// the row's candidate list as packed keys (one vector comparison per W scores; the scalar path
// only for passing lanes, about n_hard (1 + margin) per row over the whole queue).
template <class V>
CK_INLINE void collect_candidates(const LseArgs<float>& A, const LseWork<float>& Wk, int64_t i0, int64_t j0,
                                  int64_t nc, const float* S) {
  using R = typename V::R;
  constexpr int W = V::W, MV = V::MV, RG = Tiles<V>::RG;
  R thr[MV];
  for (int m = 0; m < MV; ++m) thr[m] = V::load(A.cand_thr + i0 + m * W);
  for (int64_t jj = 0; jj < nc; ++jj)
    for (int m = 0; m < MV; ++m) {
      const R s = V::load(S + jj * RG + m * W);
      const auto pass = V::not_le(s, thr[m]);
      if (!V::any(pass)) continue;
      for_passing_lanes<V>(pass, s, [&](int lane, float score) {
        const int64_t i = i0 + m * W + lane;
        if (i >= A.B) return;  // a padding row (NaN scores pass any threshold)
        const int64_t n = Wk.cand_count[i]++;
        if (n < A.cand_cap) Wk.cand_keys[i * A.cand_cap + n] = pack_key(score, j0 + jj);
      });
    }
}

template <class V>
void lse_fwd_part(const LseArgs<typename V::T>& A, const LseWork<typename V::T>& Wk, int64_t c0, int64_t c1) {
  using T = typename V::T;
  using R = typename V::R;
  using M = typename V::M;
  using TL = Tiles<V>;
  constexpr int W = V::W, MV = V::MV, RG = TL::RG, NR = TL::NR, NC = TL::NC, NB = TL::NB;
  const int64_t D = A.D, Bp = A.Bp, B = A.B;
  const int G = A.G;
  const bool labels = A.has_labels();
  const int slots = A.row_only ? G + (labels ? 1 : 0) : 0;
  const int64_t tile = static_cast<int64_t>(NC) * RG;
  LseScratch<V> sc(Wk.scratch, D);
  const R neg_inf = V::set1(-__builtin_inf());
  const R zero = V::zero();

  for (int64_t jb = c0; jb < c1; jb += NB) {
    const int64_t nb = ck_min<int64_t>(NB, c1 - jb);
    const T* krow = stage_rows<V>(A.k, A.k_dtype, jb, nb, D, sc.kbuf);
    pack_panels<V>(krow, nb, D, sc.kpanel);
    if (A.want_col)
      for (int64_t j = 0; j < nb; ++j) {
        sc.cmax[j] = -__builtin_inf();
        sc.csum[j] = T(0);
      }
    for (int64_t i0 = 0; i0 < Bp; i0 += RG) {
      const int64_t rows = ck_min<int64_t>(RG, B - i0);
      R av[MV], cv[MV];
      for (int m = 0; m < MV; ++m) {
        av[m] = V::load(A.a + i0 + m * W);
        cv[m] = A.c ? V::load(A.c + i0 + m * W) : zero;
      }
      for (int64_t t0 = 0; t0 < nb; t0 += NC) {
        const int64_t nc = ck_min<int64_t>(NC, nb - t0);
        const int64_t j0 = jb + t0;
        T* S = sc.S;
        tile_scores<V>(A.qt + i0 * D, sc.kpanel, t0, nc, D, S);
        if constexpr (std::is_same_v<T, float>)
          if (A.cand_thr != nullptr) collect_candidates<V>(A, Wk, i0, j0, nc, S);
        const bool masked = build_valid<V>(A, i0, rows, j0, nc, sc.vmask);
        if (labels) build_positive<V>(A, i0, rows, j0, nc, masked, sc.vmask, sc.posm);

        // pass 1: logits in place, tile maxima of gamma_g l over valid pairs
        R tmax[kMaxGammas][MV];
        for (int g = 0; g < G; ++g)
          for (int m = 0; m < MV; ++m) tmax[g][m] = neg_inf;
        for (int64_t jj = 0; jj < nc; ++jj) {
          const R bj = V::set1(A.b ? A.b[j0 + jj] : T(1));
          const R dj = V::set1(A.d ? A.d[j0 + jj] : T(0));
          for (int m = 0; m < MV; ++m) {
            T* sp = S + jj * RG + m * W;
            const R l = V::fmadd(V::load(sp), V::mul(av[m], bj), V::add(cv[m], dj));
            V::store(sp, l);
            const M ok = masked ? V::ne(V::load(sc.vmask + jj * RG + m * W), zero) : M();
            for (int g = 0; g < G; ++g) {
              R z = A.gamma[g] == T(1) ? l : V::mul(V::set1(A.gamma[g]), l);
              if (masked) z = V::select(ok, z, neg_inf);
              tmax[g][m] = V::max(z, tmax[g][m]);
            }
          }
        }
        // pass 2: online softmax per gamma
        for (int g = 0; g < G; ++g) {
          const R gam = V::set1(A.gamma[g]);
          T* rmax = Wk.run_max + g * Bp + i0;
          T* rsum = Wk.run_sum + g * Bp + i0;
          R shift[MV], tsum[MV];
          for (int m = 0; m < MV; ++m) {
            const R old = V::load(rmax + m * W);
            const R nm = V::max(tmax[g][m], old);
            shift[m] = V::select(V::eq(nm, neg_inf), zero, nm);
            if (V::any(V::ne(old, nm))) {
              const R rescale = V::exp(V::sub(old, shift[m]));
              V::store(rsum + m * W, V::mul(V::load(rsum + m * W), rescale));
              if (A.row_only) {
                T* e = Wk.acc + static_cast<int64_t>(g) * D * Bp + i0 * D + m * W;
                for (int64_t d = 0; d < D; ++d) V::store(e + d * RG, V::mul(V::load(e + d * RG), rescale));
              }
            }
            V::store(rmax + m * W, nm);
            tsum[m] = zero;
          }
          T* P = sc.P + g * tile;
          for (int64_t jj = 0; jj < nc; ++jj) {
            const R bj = V::set1(A.b ? A.b[j0 + jj] : T(1));
            for (int m = 0; m < MV; ++m) {
              const R l = V::load(S + jj * RG + m * W);
              R z = A.gamma[g] == T(1) ? l : V::mul(gam, l);
              if (masked) z = V::select(V::ne(V::load(sc.vmask + jj * RG + m * W), zero), z, neg_inf);
              const R p = V::exp(V::sub(z, shift[m]));
              tsum[m] = V::add(tsum[m], p);
              if (A.row_only) V::store(P + jj * RG + m * W, V::mul(p, bj));
            }
          }
          for (int m = 0; m < MV; ++m) V::store(rsum + m * W, V::add(V::load(rsum + m * W), tsum[m]));
        }
        // positives
        if (labels) {
          T* Pp = sc.P + G * tile;
          R psum[MV], pcnt[MV];
          for (int m = 0; m < MV; ++m) {
            psum[m] = V::load(Wk.pos_sum + i0 + m * W);
            pcnt[m] = V::load(Wk.pos_cnt + i0 + m * W);
          }
          for (int64_t jj = 0; jj < nc; ++jj) {
            const R bj = V::set1(A.b ? A.b[j0 + jj] : T(1));
            for (int m = 0; m < MV; ++m) {
              const R pm = V::load(sc.posm + jj * RG + m * W);
              const R l = V::load(S + jj * RG + m * W);
              psum[m] = V::add(psum[m], V::select(V::ne(pm, zero), l, zero));
              pcnt[m] = V::add(pcnt[m], pm);
              if (A.row_only) V::store(Pp + jj * RG + m * W, V::mul(pm, bj));
            }
          }
          for (int m = 0; m < MV; ++m) {
            V::store(Wk.pos_sum + i0 + m * W, psum[m]);
            V::store(Wk.pos_cnt + i0 + m * W, pcnt[m]);
          }
        }
        // column log-sum-exp over this group's rows, merged online
        if (A.want_col) {
          for (int64_t jj = 0; jj < nc; ++jj) {
            R lv[MV];
            R mx = neg_inf;
            for (int m = 0; m < MV; ++m) {
              lv[m] = V::load(S + jj * RG + m * W);
              if (masked) lv[m] = V::select(V::ne(V::load(sc.vmask + jj * RG + m * W), zero), lv[m], neg_inf);
              mx = V::max(lv[m], mx);
            }
            const T cm = V::hmax(mx);
            if (!(cm > -__builtin_inf()) && cm == cm) continue;  // no valid row here
            R s = zero;
            const R cmv = V::set1(cm);
            for (int m = 0; m < MV; ++m) s = V::add(s, V::exp(V::sub(lv[m], cmv)));
            const T cs = V::hsum(s);
            T& om = sc.cmax[t0 + jj];
            T& os = sc.csum[t0 + jj];
            if (cm > om) {
              os = os * std::exp(om - cm) + cs;
              om = cm;
            } else {
              os += cs * std::exp(cm - om);
            }
            if (cm != cm) om = cm;  // NaN scores make the column NaN
          }
        }
        // row-only: E^T_s += P_s^T K for every slot, K rows still in cache
        if (A.row_only) {
          const T* ktile = krow + t0 * D;
          for (int s = 0; s < slots; ++s) {
            const T* P = sc.P + s * tile;
            T* e = Wk.acc + static_cast<int64_t>(s) * D * Bp + i0 * D;
            for (int64_t d0 = 0; d0 < D; d0 += NR) {
              const int nr = static_cast<int>(ck_min<int64_t>(NR, D - d0));
              mk_rows_n<V, true>(nr, nc, P, RG, ktile + d0, 1, D, e + d0 * RG, RG);
            }
          }
        }
      }
    }
    if (A.want_col)
      for (int64_t j = 0; j < nb; ++j) {
        const T s = sc.csum[j];
        A.col_lse[jb + j] = s > T(0) ? sc.cmax[j] + std::log(s) : (s == s ? -__builtin_inf() : s);
      }
  }
}

template <class V>
void lse_bwd_part(const LseArgs<typename V::T>& A, const LseWork<typename V::T>& Wk, int64_t c0, int64_t c1) {
  using T = typename V::T;
  using R = typename V::R;
  using TL = Tiles<V>;
  constexpr int W = V::W, MV = V::MV, RG = TL::RG, NR = TL::NR, NC = TL::NC, NB = TL::NB;
  constexpr int MJ = V::MJ, NDV = V::NDV;
  const int64_t D = A.D, Dp = A.Dp, Bp = A.Bp, B = A.B;
  const int G = A.G;
  const bool labels = A.has_labels();
  const bool col = A.col_lse_in != nullptr && A.d_col != nullptr;
  LseScratch<V> sc(Wk.scratch, D);
  const R zero = V::zero();

  for (int64_t jb = c0; jb < c1; jb += NB) {
    const int64_t nb = ck_min<int64_t>(NB, c1 - jb);
    const T* krow = stage_rows<V>(A.k, A.k_dtype, jb, nb, D, sc.kbuf);
    pack_panels<V>(krow, nb, D, sc.kpanel);
    if (A.need_h)
      for (int64_t x = 0; x < nb * Dp; ++x) sc.hbuf[x] = T(0);
    if (A.need_dd)
      for (int64_t j = 0; j < nb; ++j) A.dd[jb + j] = T(0);
    for (int64_t i0 = 0; i0 < Bp; i0 += RG) {
      const int64_t rows = ck_min<int64_t>(RG, B - i0);
      R av[MV], cv[MV], rl[kMaxGammas][MV], wr[kMaxGammas][MV], dp[MV], dcacc[MV];
      for (int m = 0; m < MV; ++m) {
        av[m] = V::load(A.a + i0 + m * W);
        cv[m] = A.c ? V::load(A.c + i0 + m * W) : zero;
        for (int g = 0; g < G; ++g) {
          rl[g][m] = V::load(A.row_lse + g * Bp + i0 + m * W);
          wr[g][m] = V::load(A.d_row + g * Bp + i0 + m * W);
        }
        dp[m] = (labels && A.d_pos) ? V::load(A.d_pos + i0 + m * W) : zero;
        dcacc[m] = zero;
      }
      for (int64_t t0 = 0; t0 < nb; t0 += NC) {
        const int64_t nc = ck_min<int64_t>(NC, nb - t0);
        const int64_t j0 = jb + t0;
        T* S = sc.S;
        tile_scores<V>(A.qt + i0 * D, sc.kpanel, t0, nc, D, S);
        const bool masked = build_valid<V>(A, i0, rows, j0, nc, sc.vmask);
        const bool pos = labels && A.d_pos != nullptr;
        if (pos) build_positive<V>(A, i0, rows, j0, nc, masked, sc.vmask, sc.posm);
        for (int64_t jj = 0; jj < nc; ++jj) {
          const int64_t j = j0 + jj;
          const T bjs = A.b ? A.b[j] : T(1);
          const R bj = V::set1(bjs);
          const R dj = V::set1(A.d ? A.d[j] : T(0));
          const R cj = V::set1(col ? A.col_lse_in[j] : T(0));
          const R dcj = V::set1(col ? A.d_col[j] : T(0));
          R ddv = zero;
          for (int m = 0; m < MV; ++m) {
            const R l = V::fmadd(V::load(S + jj * RG + m * W), V::mul(av[m], bj), V::add(cv[m], dj));
            R gv = zero;
            for (int g = 0; g < G; ++g) {
              if (A.gamma[g] == T(0)) continue;
              const R z = A.gamma[g] == T(1) ? l : V::mul(V::set1(A.gamma[g]), l);
              gv = V::fmadd(wr[g][m], V::exp(V::sub(z, rl[g][m])), gv);
            }
            if (col) gv = V::fmadd(dcj, V::exp(V::sub(l, cj)), gv);
            if (pos) gv = V::fmadd(dp[m], V::load(sc.posm + jj * RG + m * W), gv);
            if (masked) gv = V::select(V::ne(V::load(sc.vmask + jj * RG + m * W), zero), gv, zero);
            dcacc[m] = V::add(dcacc[m], gv);
            ddv = V::add(ddv, gv);
            if (A.need_gkey) V::store(sc.P + jj * RG + m * W, V::mul(gv, bj));
            if (A.need_h) V::store(sc.X + jj * RG + m * W, V::mul(gv, av[m]));
          }
          if (A.need_dd) A.dd[j] += V::hsum(ddv);
        }
        if (A.need_gkey) {
          const T* ktile = krow + t0 * D;
          for (int64_t d0 = 0; d0 < D; d0 += NR) {
            const int nr = static_cast<int>(ck_min<int64_t>(NR, D - d0));
            mk_rows_n<V, true>(nr, nc, sc.P, RG, ktile + d0, 1, D, Wk.acc + i0 * D + d0 * RG, RG);
          }
        }
        if (A.need_h) {
          const int64_t nvec = Dp / W;
          for (int64_t jj0 = 0; jj0 < nc; jj0 += MJ) {
            const int mj = static_cast<int>(ck_min<int64_t>(MJ, nc - jj0));
            for (int64_t v0 = 0; v0 < nvec; v0 += NDV) {
              const int nd = static_cast<int>(ck_min<int64_t>(NDV, nvec - v0));
              mk_cols_n<V>(mj, nd, rows, sc.X + jj0 * RG, RG, A.qrow + i0 * Dp + v0 * W, Dp,
                           sc.hbuf + (t0 + jj0) * Dp + v0 * W, Dp);
            }
          }
        }
      }
      if (A.need_dc)
        for (int m = 0; m < MV; ++m) V::store(Wk.dc + i0 + m * W, V::add(V::load(Wk.dc + i0 + m * W), dcacc[m]));
    }
    if (A.need_h)
      for (int64_t j = 0; j < nb; ++j)
        for (int64_t d = 0; d < D; ++d) A.h[(jb + j) * D + d] = sc.hbuf[j * Dp + d];
  }
}
