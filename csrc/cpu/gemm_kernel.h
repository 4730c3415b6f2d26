// Register-blocked microkernels and the column-block staging shared by the InfoNCE and top-k
// kernels. Included inside the per-ISA namespace after vec.h; pure C++.
//
// Layout convention: the query rows are the vector lanes. A "row group" is RG = MV * W
// consecutive rows; Q is packed once, each row group as its transpose (D x RG, contiguous), so
// one vector load gives the d-th coordinate of W rows. Key columns are broadcast scalars. Score
// tiles are therefore stored column by column, S^T[j][i], and every per-row statistic of the
// softmax (max, sum, the positives' sum) is an element-wise vector operation, with no horizontal
// reduction.

// C[n*ldc + m*W + lane] (+)= sum_{r < kred} A[r*lda + m*W + lane] * Bm[n*bsn + r*bsk]
// for m < MV, n < NRr: MV*NRr accumulators stay in registers for the whole reduction.
//   scores     S^T = Q^T-panel x K-panel      (A = Q^T, lda = RG; Bm = packed K, bsn = 1, bsk = NR)
//   key sums   E^T += P^T x K                 (A = P^T, lda = RG; Bm = K rows, bsn = 1, bsk = ldk)
template <class V, int NRr, bool ACC>
__attribute__((noinline)) void mk_rows(int64_t kred, const typename V::T* __restrict A, int64_t lda,
                                       const typename V::T* __restrict Bm, int64_t bsn, int64_t bsk,
                                       typename V::T* __restrict C, int64_t ldc) {
  using R = typename V::R;
  constexpr int MV = V::MV, W = V::W;
  R acc[NRr][MV];
#pragma GCC unroll 16
  for (int n = 0; n < NRr; ++n)
#pragma GCC unroll 4
    for (int m = 0; m < MV; ++m) acc[n][m] = ACC ? V::load(C + n * ldc + m * W) : V::zero();
  for (int64_t r = 0; r < kred; ++r) {
    R av[MV];
#pragma GCC unroll 4
    for (int m = 0; m < MV; ++m) av[m] = V::load(A + r * lda + m * W);
    const typename V::T* bp = Bm + r * bsk;
#pragma GCC unroll 16
    for (int n = 0; n < NRr; ++n) {
      R bb = V::set1(bp[n * bsn]);
#pragma GCC unroll 4
      for (int m = 0; m < MV; ++m) acc[n][m] = V::fmadd(av[m], bb, acc[n][m]);
    }
  }
#pragma GCC unroll 16
  for (int n = 0; n < NRr; ++n)
#pragma GCC unroll 4
    for (int m = 0; m < MV; ++m) V::store(C + n * ldc + m * W, acc[n][m]);
}

// mk_rows with a run-time count of broadcast columns 1 <= nr <= V::NR (tails).
template <class V, bool ACC, int N = V::NR>
CK_INLINE void mk_rows_n(int nr, int64_t kred, const typename V::T* A, int64_t lda,
                         const typename V::T* Bm, int64_t bsn, int64_t bsk, typename V::T* C,
                         int64_t ldc) {
  if constexpr (N >= 1) {
    if (nr == N) {
      mk_rows<V, N, ACC>(kred, A, lda, Bm, bsn, bsk, C, ldc);
      return;
    }
    mk_rows_n<V, ACC, N - 1>(nr, kred, A, lda, Bm, bsn, bsk, C, ldc);
  }
}

// H[j*ldh + v*W + lane] += sum_{i < kred} X[j*ldx + i] * Q[i*ldq + v*W + lane]
// for j < MJr, v < NDr: the column-vectorized form (lanes along the feature dimension), used for
// the key-side gradient h_j = sum_i G_ij a_i q_i, whose reduction runs over the rows.
template <class V, int MJr, int NDr>
__attribute__((noinline)) void mk_cols(int64_t kred, const typename V::T* __restrict X, int64_t ldx,
                                       const typename V::T* __restrict Q, int64_t ldq,
                                       typename V::T* __restrict H, int64_t ldh) {
  using R = typename V::R;
  constexpr int W = V::W;
  R acc[MJr][NDr];
#pragma GCC unroll 8
  for (int j = 0; j < MJr; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < NDr; ++v) acc[j][v] = V::load(H + j * ldh + v * W);
  for (int64_t i = 0; i < kred; ++i) {
    R qv[NDr];
#pragma GCC unroll 8
    for (int v = 0; v < NDr; ++v) qv[v] = V::load(Q + i * ldq + v * W);
#pragma GCC unroll 8
    for (int j = 0; j < MJr; ++j) {
      R x = V::set1(X[j * ldx + i]);
#pragma GCC unroll 8
      for (int v = 0; v < NDr; ++v) acc[j][v] = V::fmadd(x, qv[v], acc[j][v]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < MJr; ++j)
#pragma GCC unroll 8
    for (int v = 0; v < NDr; ++v) V::store(H + j * ldh + v * W, acc[j][v]);
}

template <class V, int NDr, int MJr = V::MJ>
CK_INLINE void mk_cols_j(int mj, int64_t kred, const typename V::T* X, int64_t ldx,
                         const typename V::T* Q, int64_t ldq, typename V::T* H, int64_t ldh) {
  if constexpr (MJr >= 1) {
    if (mj == MJr) {
      mk_cols<V, MJr, NDr>(kred, X, ldx, Q, ldq, H, ldh);
      return;
    }
    mk_cols_j<V, NDr, MJr - 1>(mj, kred, X, ldx, Q, ldq, H, ldh);
  }
}

template <class V, int NDr = V::NDV>
CK_INLINE void mk_cols_n(int mj, int nd, int64_t kred, const typename V::T* X, int64_t ldx,
                         const typename V::T* Q, int64_t ldq, typename V::T* H, int64_t ldh) {
  if constexpr (NDr >= 1) {
    if (nd == NDr) {
      mk_cols_j<V, NDr>(mj, kred, X, ldx, Q, ldq, H, ldh);
      return;
    }
    mk_cols_n<V, NDr - 1>(mj, nd, kred, X, ldx, Q, ldq, H, ldh);
  }
}

// Tile sizes: a score tile is RG rows x NC columns (NC = 4 NR: the K panel of a tile,
// NC x D, stays in L1 with the group's Q^T panel); a column block of NB = 6 NC columns is
// converted / packed once and reused by every row group (it lives in L2).
template <class V>
struct Tiles {
  static constexpr int W = V::W;
  static constexpr int RG = V::MV * V::W;
  static constexpr int NR = V::NR;
  static constexpr int NC = 4 * V::NR;
  static constexpr int NB = 6 * NC;
};

// Rows [j0, j0 + nb) of a key matrix in its storage dtype -> a pointer to them in T: the matrix
// itself when it already is T, else `buf` (nb x D) after conversion.
template <class V>
CK_INLINE const typename V::T* stage_rows(const void* k, int dtype, int64_t j0, int64_t nb, int64_t D,
                                          typename V::T* buf) {
  using T = typename V::T;
  if (dtype == kSame) return static_cast<const T*>(k) + j0 * D;
  if (dtype == kHalf) {
    V::from_half(static_cast<const uint16_t*>(k) + j0 * D, buf, nb * D);
  } else if (dtype == kBFloat16) {
    V::from_bf16(static_cast<const uint16_t*>(k) + j0 * D, buf, nb * D);
  } else if (dtype == kFloat) {
    const float* src = static_cast<const float*>(k) + j0 * D;
    for (int64_t i = 0; i < nb * D; ++i) buf[i] = static_cast<T>(src[i]);
  } else {  // a double bank scored in fp32 (top-k upcasts to fp32 like the reference)
    const double* src = static_cast<const double*>(k) + j0 * D;
    for (int64_t i = 0; i < nb * D; ++i) buf[i] = static_cast<T>(src[i]);
  }
  return buf;
}

// Packs nb rows of K (ld = D) into NR-column panels: panel p holds, for each d, the NR values
// K[p*NR + n][d] contiguously (zeros beyond nb), so the score microkernel broadcasts from one
// moving pointer.
template <class V>
CK_INLINE void pack_panels(const typename V::T* krow, int64_t nb, int64_t D, typename V::T* out) {
  constexpr int NR = V::NR;
  for (int64_t p = 0; p * NR < nb; ++p) {
    typename V::T* dst = out + p * NR * D;
    const int64_t nv = ck_min<int64_t>(NR, nb - p * NR);
    for (int64_t n = 0; n < nv; ++n) {
      const typename V::T* src = krow + (p * NR + n) * D;
      for (int64_t d = 0; d < D; ++d) dst[d * NR + n] = src[d];
    }
    for (int64_t n = nv; n < NR; ++n)
      for (int64_t d = 0; d < D; ++d) dst[d * NR + n] = 0;
  }
}

// f(lane, score) for each lane of the vector s whose comparison `pass` holds, lanes in increasing
// order (the scalar path of the top-k filters: only passing lanes reach it).
template <class V, class F>
CK_INLINE void for_passing_lanes(typename V::M pass, typename V::R s, F&& f) {
  alignas(64) typename V::T lanes[V::W];
  V::store(lanes, s);
  unsigned bits = V::bits(pass);
  while (bits) {
    const int lane = __builtin_ctz(bits);
    bits &= bits - 1;
    f(lane, lanes[lane]);
  }
}

// Scores of one tile: S^T[j][RG rows] for the ceil(nc/NR) panels of columns t0.. of the block;
// qt_group: the row group's D x RG panel (see pack_row_groups in glue.h).
template <class V>
CK_INLINE void tile_scores(const typename V::T* qt_group, const typename V::T* kpanel, int64_t t0, int64_t nc,
                           int64_t D, typename V::T* S) {
  constexpr int NR = V::NR, RG = Tiles<V>::RG;
  for (int64_t p = 0; p * NR < nc; ++p)
    mk_rows<V, NR, false>(D, qt_group, RG, kpanel + (t0 + p * NR) * D, 1, NR, S + p * NR * RG, RG);
}
