// Exact top-k similarity on the CPU: the score GEMM (the same microkernel as InfoNCE) with a
// per-row bounded selection fused into each tile. Included inside the per-ISA namespace after
// gemm_kernel.h; pure C++, fp32 scores (inputs upcast per block, like the reference).
//
// Selection: each part (a thread's block of query rows over all columns, or, when the rows are
// too few to go round the threads, a thread's column range over all rows) keeps, per query row,
// a buffer of C = topk_capacity(k) = 2k packed keys (pack_key: score order, then the lower column)
// and a threshold: NaN until the buffer first fills (everything passes), then the score of the
// k-th best key. A tile is filtered with one vector comparison per W scores, !(s <= threshold):
// only lanes that pass reach the scalar path, which checks the exclusions and labels and appends
// the key. When the buffer is full, a selection (nth_element) moves the k best keys to its front,
// the rest is dropped and the threshold becomes the k-th key's score: O(C) work per k appended
// keys, where a heap paid O(log k) with a mispredicted branch per level for each. (At k = 1024,
// N = 65536 the heap's updates took three quarters of the kernel's time.) Within a part, columns
// are visited in increasing order, so a later score equal to the threshold has a higher column
// and loses the tie: the strict filter is exact. The threshold lags behind the true k-th score
// between selections, which lets more keys pass, never fewer. The glue merges the first count[i]
// keys of each part's buffer by key.

inline int64_t topk_scratch_impl_elems(int64_t D, int nb, int tile) {
  return 2 * static_cast<int64_t>(nb) * D + tile + nb + 64;
}

// Keeps the k largest of the C keys in h, moved to the front; returns the k-th largest.
CK_SCALAR_INLINE int64_t keep_largest(int64_t* h, int64_t C, int64_t k) {
  std::nth_element(h, h + (k - 1), h + C, [](int64_t a, int64_t b) { return a > b; });
  return h[k - 1];
}

template <class V>
int64_t topk_scratch(int64_t D) {
  using TL = Tiles<V>;
  return topk_scratch_impl_elems(D, TL::NB, TL::NC * TL::RG);
}

template <class V>
CK_INLINE bool topk_excluded(const TopkArgs& A, int64_t i, int64_t j) {
  if (A.exclude != nullptr) {
    const int64_t* ex = A.exclude + i * A.E;
    for (int64_t e = 0; e < A.E; ++e)
      if (ex[e] == j) return true;
  }
  return A.q_lab != nullptr && A.q_lab[i] == A.b_lab[j];
}

template <class V>
void topk_part(const TopkArgs& A, const TopkWork& Wk, int64_t c0, int64_t c1) {
  using R = typename V::R;
  using TL = Tiles<V>;
  static_assert(sizeof(typename V::T) == sizeof(float), "top-k scores are fp32");
  constexpr int W = V::W, MV = V::MV, RG = TL::RG, NC = TL::NC, NB = TL::NB;
  const int64_t D = A.D, M = A.M, k = A.k, C = topk_capacity(k);
  float* kbuf = Wk.scratch;
  float* kpanel = kbuf + NB * D;
  float* S = kpanel + NB * D;
  float* kscale = S + NC * RG;

  const int64_t r0 = Wk.row0, r1 = Wk.row1;
  for (int64_t i = r0; i < ck_min<int64_t>(r1, M); ++i) {
    Wk.count[i] = 0;
    Wk.thr[i] = __builtin_nanf("");
  }
  for (int64_t i = ck_max<int64_t>(r0, M); i < r1; ++i) Wk.thr[i] = __builtin_inff();  // padding rows never pass

  for (int64_t jb = c0; jb < c1; jb += NB) {
    const int64_t nb = ck_min<int64_t>(NB, c1 - jb);
    const float* krow = stage_rows<V>(A.bank, A.bank_dtype == kFloat ? kSame : A.bank_dtype, jb, nb, D, kbuf);
    if (A.sim != kDot) {
      for (int64_t j = 0; j < nb; ++j) {
        const float* kr = krow + j * D;
        float ss = 0.0f;
        for (int64_t d = 0; d < D; ++d) ss += kr[d] * kr[d];
        kscale[j] = A.sim == kCosine ? 1.0f / ck_max(std::sqrt(ss), 1e-12f) : ss;
      }
    }
    pack_panels<V>(krow, nb, D, kpanel);
    for (int64_t i0 = r0; i0 < r1; i0 += RG) {
      R qs[MV];
      for (int m = 0; m < MV; ++m) qs[m] = A.qscale ? V::load(A.qscale + i0 + m * W) : V::zero();
      for (int64_t t0 = 0; t0 < nb; t0 += NC) {
        const int64_t nc = ck_min<int64_t>(NC, nb - t0);
        tile_scores<V>(A.qt + i0 * D, kpanel, t0, nc, D, S);
        R thr[MV];
        for (int m = 0; m < MV; ++m) thr[m] = V::load(Wk.thr + i0 + m * W);
        for (int64_t jj = 0; jj < nc; ++jj) {
          const int64_t j = jb + t0 + jj;
          const R ks = V::set1(A.sim != kDot ? kscale[t0 + jj] : 0.0f);
          for (int m = 0; m < MV; ++m) {
            R s = V::load(S + jj * RG + m * W);
            if (A.sim == kCosine) {
              s = V::mul(V::mul(s, qs[m]), ks);
            } else if (A.sim == kL2) {
              s = V::sub(V::sub(V::add(s, s), qs[m]), ks);
            }
            const auto pass = V::not_le(s, thr[m]);
            if (!V::any(pass)) continue;
            for_passing_lanes<V>(pass, s, [&](int lane, float score) {
              const int64_t i = i0 + m * W + lane;
              if (i >= M || topk_excluded<V>(A, i, j)) return;
              int64_t* h = Wk.keys + i * C;
              int64_t n = Wk.count[i];
              h[n++] = pack_key(score, j);
              if (n == C) {
                Wk.thr[i] = key_score(keep_largest(h, C, k));
                n = k;
              }
              Wk.count[i] = n;
            });
            thr[m] = V::load(Wk.thr + i0 + m * W);
          }
        }
      }
    }
  }
}
