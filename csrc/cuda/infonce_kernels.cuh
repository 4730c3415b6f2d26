// lse_stats on the GPU (see contrastive_kernels/reference.py, lse_stats): score tiles on tensor
// cores (fp16/bf16) or CUDA cores (fp32/fp64), with the softmax statistics, the positives and
// the gradient weights fused in while the tile is in shared memory. Pure CUDA (no torch).
//
// One kernel template serves every pass, in an "orientation": the block's rows are either the
// queries (rows = q, columns = k) or, transposed, the keys (rows = k, columns = q). The logits
// are symmetric in form, l = rs_r cs_c <f_r, f_c> + rb_r + cb_c, so the host passes the query
// side's (a, c) or the key side's (b, d) as row / column terms; exclusions are always indexed by
// the query and labels are symmetric. Passes:
//   forward, queries as rows: per row and gamma the online (max, sum) of exp(gamma l) over the
//     block's column split, the positives' (sum of l, count) and, in row-only mode, the key sums
//     E_g += softmax_g . (b k) kept in shared memory and rescaled when the row maximum moves
//     (flash-attention style), so that backward needs no second pass over the keys;
//   forward, keys as rows (CLIP's column log-sum-exp): the same statistics with gamma = 1;
//   backward, queries as rows: G_ij (reference.lse_stats) and g_key_i += sum_j G_ij b_j k_j,
//     dc_i += sum_j G_ij; keys as rows: h_j += sum_i G_ij a_i q_i, dd_j += sum_i G_ij.
// The columns are split over gridDim.y (more blocks than row tiles alone give); every block
// writes its partial statistics and the host merges the splits (max / rescaled sums).
// The passes with one gamma, no labels and at most two exclusions per query on fp16/bf16 inputs
// have warp kernels (lse_warp_kernel, below) that keep scores and outputs in registers instead.
//
// Tiles: BM rows (64, 32 or 16, chosen by the host to fit shared memory) x 64 columns; 128
// threads; each row's 64 columns are handled by 128/BM consecutive threads, which combine row
// maxima and sums with warp shuffles.
#pragma once

#include <type_traits>

#include "device_common.cuh"

namespace ck {
namespace cuda {

constexpr int kLseBN = 64;

template <typename TA>
struct LseTileParams {
  int64_t R = 0, C = 0, D = 0;
  const void* rows_feat = nullptr;  // R x D, input dtype
  const void* cols_feat = nullptr;  // C x D
  const TA* rs = nullptr;  // R (null = 1)
  const TA* cs = nullptr;  // C (null = 1)
  const TA* rb = nullptr;  // R (null = 0)
  const TA* cb = nullptr;  // C (null = 0)
  bool key_rows = false;
  const int64_t* exclude = nullptr;  // B x E, by query
  int E = 0;
  const int32_t* lab_r = nullptr;  // dense labels of the row side / column side
  const int32_t* lab_c = nullptr;
  const int64_t* bits_r = nullptr;  // bitset labels
  const int64_t* bits_c = nullptr;
  int Wb = 0;
  int G = 1;
  TA gamma[kMaxGammas] = {};
  int64_t cols_per_split = 0;
  // forward
  int slots = 0;        // row-only key-sum slots (G, +1 for positives); 0 = statistics only
  bool labels = false;  // positives' sum and count (forward)
  TA* out_m = nullptr;    // [split][G][R]
  TA* out_s = nullptr;    // [split][G][R]
  TA* out_pos = nullptr;  // [split][2][R]
  TA* out_acc = nullptr;  // [split][max(slots,1)][R][D]
  // backward (query-side arrays indexed by the query, key-side by the key)
  const TA* q_lse = nullptr;   // [G][B]
  const TA* q_w = nullptr;     // [G][B]: dR * gamma
  const TA* q_dpos = nullptr;  // [B] or null
  const TA* k_lse = nullptr;   // [N] or null
  const TA* k_dcol = nullptr;  // [N] or null
  int64_t q_count = 0;         // B (the stride of q_lse / q_w)
  TA* out_gsum = nullptr;      // [split][R]
  // the warp kernels' backward (one gamma): G = row_w e^{row_gamma l - row_lse} + col_w e^{col_gamma l - col_lse},
  // by row / by column (a null weight: no such term)
  const TA* row_w = nullptr;
  const TA* row_lse = nullptr;
  const TA* col_w = nullptr;
  const TA* col_lse = nullptr;
  TA row_gamma = 1, col_gamma = 1;
};

// the compute types of an input type: staging (shared memory operands), accumulation, and the
// operand type of the second product (P / G tiles)
template <typename TI>
struct LseTypes {
  using TA = std::conditional_t<std::is_same_v<TI, double>, double, float>;  // fp64 stays fp64
  using TS = TI;
  using TP = TI;
};

__host__ __device__ constexpr int64_t align16(int64_t x) { return (x + 15) / 16 * 16; }

// Shared-memory carve-up, computed identically by host (size) and device (offsets).
struct LseSmem {
  int64_t q, k0, k1, st, p, c, resc, colv, total;
  int ldF, ldS, ldP, ldC;
};

template <typename TI>
__host__ __device__ inline LseSmem lse_smem(int BM, int dp, int nslots) {
  using TS = typename LseTypes<TI>::TS;
  using TA = typename LseTypes<TI>::TA;
  using TP = typename LseTypes<TI>::TP;
  LseSmem s{};
  s.ldF = padded_stride<TS>(dp);
  s.ldS = kLseBN + (sizeof(TA) == 8 ? 1 : 4);
  s.ldP = padded_stride<TP>(kLseBN);
  s.ldC = dp + (sizeof(TA) == 8 ? 1 : 4);
  int64_t o = 0;
  s.q = o;
  o = align16(o + int64_t(BM) * s.ldF * sizeof(TS));
  s.k0 = o;
  o = align16(o + int64_t(kLseBN) * s.ldF * sizeof(TS));
  s.k1 = o;
  if (sizeof(TS) == 2) o = align16(o + int64_t(kLseBN) * s.ldF * sizeof(TS));  // double buffer (cp.async)
  s.st = o;
  o = align16(o + int64_t(BM) * s.ldS * sizeof(TA));
  s.p = o;
  o = align16(o + int64_t(nslots) * BM * s.ldP * sizeof(TP));
  s.c = o;
  o = align16(o + int64_t(nslots) * BM * s.ldC * sizeof(TA));
  s.resc = o;
  o = align16(o + int64_t(kMaxGammas) * BM * sizeof(TA));
  s.colv = o;
  o = align16(o + int64_t(8) * kLseBN * sizeof(TA));
  s.total = o;
  return s;
}

template <typename TA>
__device__ __forceinline__ bool lse_excluded(const LseTileParams<TA>& p, int64_t qi, int64_t kj) {
  const int64_t* ex = p.exclude + qi * p.E;
  for (int e = 0; e < p.E; ++e)
    if (ex[e] == kj) return true;
  return false;
}

template <typename TA>
__device__ __forceinline__ bool lse_share(const LseTileParams<TA>& p, int64_t gr, int64_t gc) {
  if (p.lab_r != nullptr) return p.lab_r[gr] == p.lab_c[gc];
  const int64_t* a = p.bits_r + gr * p.Wb;
  const int64_t* b = p.bits_c + gc * p.Wb;
  bool s = false;
  for (int w = 0; w < p.Wb; ++w) s |= (a[w] & b[w]) != 0;
  return s;
}

template <int TPR, typename T>
__device__ __forceinline__ T group_max(T v) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) {
    const T other = __shfl_xor_sync(0xffffffffu, v, o);
    v = other > v ? other : v;
  }
  return v;
}

template <int TPR, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int o = TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename TI, int BM, bool BWD>
__global__ void __launch_bounds__(kThreads) lse_tile_kernel(LseTileParams<typename LseTypes<TI>::TA> p) {
  using TA = typename LseTypes<TI>::TA;
  using TS = typename LseTypes<TI>::TS;
  using TP = typename LseTypes<TI>::TP;
  constexpr int BN = kLseBN, TPR = kThreads / BM, CPT = BN / TPR;
  constexpr bool TC = IsTensorCore<TI>::value;
  extern __shared__ __align__(16) unsigned char smem[];

  const int64_t r0 = int64_t(blockIdx.x) * BM;
  const int64_t c_begin = int64_t(blockIdx.y) * p.cols_per_split;
  const int64_t c_end = c_begin + p.cols_per_split < p.C ? c_begin + p.cols_per_split : p.C;
  const int dp = static_cast<int>((p.D + 15) / 16 * 16);
  const int nslots = BWD ? 1 : p.slots;
  const LseSmem L = lse_smem<TI>(BM, dp, nslots > 0 ? nslots : 0);
  TS* Qs = reinterpret_cast<TS*>(smem + L.q);
  TA* St = reinterpret_cast<TA*>(smem + L.st);
  TP* Ps = reinterpret_cast<TP*>(smem + L.p);
  TA* Cs = reinterpret_cast<TA*>(smem + L.c);
  TA* resc = reinterpret_cast<TA*>(smem + L.resc);
  TA* colv = reinterpret_cast<TA*>(smem + L.colv);  // [8][BN] per-column terms of the tile

  const TI* rows_feat = static_cast<const TI*>(p.rows_feat);
  const TI* cols_feat = static_cast<const TI*>(p.cols_feat);

  stage_rows<TS, TI>(Qs, L.ldF, rows_feat, r0, p.R, p.D, BM, dp);
  for (int e = threadIdx.x; e < nslots * BM * L.ldC; e += kThreads) Cs[e] = TA(0);

  const int tid = threadIdx.x;
  const int r = tid / TPR, sub = tid % TPR;
  const int64_t gr = r0 + r;
  const bool row_ok = gr < p.R;
  const TA rs_r = (row_ok && p.rs) ? p.rs[gr] : TA(1);
  const TA rb_r = (row_ok && p.rb) ? p.rb[gr] : TA(0);
  const TA ninf = neg_inf<TA>();

  // per-row state
  TA m[kMaxGammas], s[kMaxGammas];
  TA psum = 0, pcnt = 0, gsum = 0;
  TA rq_lse[kMaxGammas], rq_w[kMaxGammas], rq_dpos = 0, rk_lse = 0, rk_dcol = 0;
#pragma unroll
  for (int g = 0; g < kMaxGammas; ++g) {
    m[g] = ninf;
    s[g] = 0;
    rq_lse[g] = 0;
    rq_w[g] = 0;
  }
  if (BWD && row_ok) {
    if (!p.key_rows) {
  #pragma unroll
      for (int g = 0; g < kMaxGammas; ++g)
        if (g < p.G) {
          rq_lse[g] = p.q_lse[g * p.q_count + gr];
          rq_w[g] = p.q_w[g * p.q_count + gr];
        }
      if (p.q_dpos) rq_dpos = p.q_dpos[gr];
    } else if (p.k_lse) {
      rk_lse = p.k_lse[gr];
      rk_dcol = p.k_dcol[gr];
    }
  }

  KeyTiles<TS, TI, TC> tiles(reinterpret_cast<TS*>(smem + L.k0), reinterpret_cast<TS*>(smem + (TC ? L.k1 : L.k0)),
                             L.ldF, cols_feat, p.C, p.D, BN, dp, c_begin, c_end);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += BN) {
    const TS* Ks = tiles.acquire(c0);
    // per-column terms of this tile
    for (int cc = tid; cc < BN; cc += kThreads) {
      const int64_t gc = c0 + cc;
      const bool ok = gc < c_end;
      colv[0 * BN + cc] = (ok && p.cs) ? p.cs[gc] : TA(1);
      colv[1 * BN + cc] = (ok && p.cb) ? p.cb[gc] : TA(0);
      if (BWD && ok) {
        if (!p.key_rows) {
          colv[2 * BN + cc] = p.k_lse ? p.k_lse[gc] : TA(0);
          colv[3 * BN + cc] = p.k_lse ? p.k_dcol[gc] : TA(0);
        } else {
          for (int g = 0; g < p.G && g < 2; ++g) {
            colv[(2 + 2 * g) * BN + cc] = p.q_lse[g * p.q_count + gc];
            colv[(3 + 2 * g) * BN + cc] = p.q_w[g * p.q_count + gc];
          }
          colv[6 * BN + cc] = p.q_dpos ? p.q_dpos[gc] : TA(0);
        }
      }
    }
    __syncthreads();
    tiles.prefetch_next(c0);  // the next tile arrives while this one is consumed
    tile_abt<TC, TA, TS, BM, BN>(Qs, L.ldF, Ks, L.ldF, dp, St, L.ldS);
    __syncthreads();

    // ---- elementwise phase: row r, columns [sub*CPT, sub*CPT + CPT)
    TA* Srow = St + r * L.ldS;
    if (!BWD) {
      TA tmax[kMaxGammas];
#pragma unroll
      for (int g = 0; g < kMaxGammas; ++g) tmax[g] = ninf;
      for (int j = 0; j < CPT; ++j) {
        const int cc = sub * CPT + j;
        const int64_t gc = c0 + cc;
        bool ok = row_ok && gc < c_end;
        if (ok && p.E > 0) ok = !lse_excluded(p, p.key_rows ? gc : gr, p.key_rows ? gr : gc);
        const TA l = Srow[cc] * (rs_r * colv[cc]) + (rb_r + colv[BN + cc]);
        Srow[cc] = ok ? l : ninf;
        if (ok) {
#pragma unroll
          for (int g = 0; g < kMaxGammas; ++g)
            if (g < p.G) {
              const TA z = p.gamma[g] * l;
              tmax[g] = z > tmax[g] ? z : tmax[g];
            }
          if (p.labels && lse_share(p, gr, gc)) {
            psum += l;
            pcnt += TA(1);
            if (p.slots > p.G) Ps[p.G * BM * L.ldP + r * L.ldP + cc] = from_acc<TP>(colv[cc]);
          } else if (p.slots > p.G) {
            Ps[p.G * BM * L.ldP + r * L.ldP + cc] = zero_of<TP>();
          }
        } else if (p.slots > p.G) {
          Ps[p.G * BM * L.ldP + r * L.ldP + cc] = zero_of<TP>();
        }
      }
#pragma unroll
      for (int g = 0; g < kMaxGammas; ++g) {
        if (g >= p.G) break;
        const TA tm = group_max<TPR>(tmax[g]);
        const TA nm = tm > m[g] ? tm : m[g];
        const TA shift = nm == ninf ? TA(0) : nm;
        const TA rescale = ck_exp(m[g] - shift);
        s[g] *= rescale;
        m[g] = nm;
        if (g < p.slots && sub == 0) resc[g * BM + r] = rescale;
        TA part = 0;
        for (int j = 0; j < CPT; ++j) {
          const int cc = sub * CPT + j;
          const TA l = Srow[cc];
          const TA e = l == ninf ? TA(0) : ck_exp(p.gamma[g] * l - shift);
          part += e;
          if (g < p.slots) Ps[g * BM * L.ldP + r * L.ldP + cc] = from_acc<TP>(e * colv[cc]);
        }
        s[g] += group_sum<TPR>(part);
      }
      if (p.slots > 0) {
        if (p.slots > p.G && sub == 0) resc[p.G * BM + r] = TA(1);
        __syncthreads();
        for (int sl = 0; sl < p.slots; ++sl) {
          if constexpr (TC) {
            tile_ab_mma<TP, BM, BN>(Ps + sl * BM * L.ldP, L.ldP, Ks, L.ldF, dp, Cs + sl * BM * L.ldC, L.ldC,
                                    resc + sl * BM);
          } else {
            tile_ab_simt<TA, TS, BM, BN>(Ps + sl * BM * L.ldP, L.ldP, Ks, L.ldF, dp, Cs + sl * BM * L.ldC, L.ldC,
                                         resc + sl * BM);
          }
        }
      }
    } else {
      TA part = 0;
      for (int j = 0; j < CPT; ++j) {
        const int cc = sub * CPT + j;
        const int64_t gc = c0 + cc;
        bool ok = row_ok && gc < c_end;
        if (ok && p.E > 0) ok = !lse_excluded(p, p.key_rows ? gc : gr, p.key_rows ? gr : gc);
        TA gv = 0;
        if (ok) {
          const TA l = Srow[cc] * (rs_r * colv[cc]) + (rb_r + colv[BN + cc]);
          if (!p.key_rows) {
#pragma unroll
            for (int g = 0; g < kMaxGammas; ++g)
              if (g < p.G && p.gamma[g] != TA(0)) gv += rq_w[g] * ck_exp(p.gamma[g] * l - rq_lse[g]);
            if (p.k_lse) gv += colv[3 * BN + cc] * ck_exp(l - colv[2 * BN + cc]);
            if (p.q_dpos && lse_share(p, gr, gc)) gv += rq_dpos;
          } else {
            for (int g = 0; g < p.G; ++g)
              if (p.gamma[g] != TA(0)) {
                const TA lse_q = g < 2 ? colv[(2 + 2 * g) * BN + cc] : p.q_lse[g * p.q_count + gc];
                const TA w_q = g < 2 ? colv[(3 + 2 * g) * BN + cc] : p.q_w[g * p.q_count + gc];
                gv += w_q * ck_exp(p.gamma[g] * l - lse_q);
              }
            if (p.k_lse) gv += rk_dcol * ck_exp(l - rk_lse);
            if (p.q_dpos && lse_share(p, gr, gc)) gv += colv[6 * BN + cc];
          }
        }
        part += gv;
        Ps[r * L.ldP + cc] = from_acc<TP>(gv * colv[cc]);
      }
      gsum += group_sum<TPR>(part);
      __syncthreads();
      if constexpr (TC) {
        tile_ab_mma<TP, BM, BN>(Ps, L.ldP, Ks, L.ldF, dp, Cs, L.ldC, nullptr);
      } else {
        tile_ab_simt<TA, TS, BM, BN>(Ps, L.ldP, Ks, L.ldF, dp, Cs, L.ldC, nullptr);
      }
    }
    __syncthreads();
    tiles.advance();
  }

  // ---- partial results of this (row tile, column split)
  __syncthreads();  // Cs complete (and zero-initialized by every thread, also for an empty split)
  const int64_t split = blockIdx.y;
  if (!BWD && p.labels) {  // per-thread partials: reduce over the row's threads (every thread takes part)
    psum = group_sum<TPR>(psum);
    pcnt = group_sum<TPR>(pcnt);
  }
  if (row_ok && sub == 0) {
    if (!BWD) {
#pragma unroll
      for (int g = 0; g < kMaxGammas; ++g)
        if (g < p.G) {
          p.out_m[(split * p.G + g) * p.R + gr] = m[g];
          p.out_s[(split * p.G + g) * p.R + gr] = s[g];
        }
      if (p.labels) {
        p.out_pos[(split * 2 + 0) * p.R + gr] = psum;
        p.out_pos[(split * 2 + 1) * p.R + gr] = pcnt;
      }
    } else {
      p.out_gsum[split * p.R + gr] = gsum;
    }
  }
  if (nslots > 0) {
    for (int e = tid; e < nslots * BM * dp; e += kThreads) {
      const int sl = e / (BM * dp), rem = e - sl * BM * dp, rr = rem / dp, d = rem - rr * dp;
      const int64_t grr = r0 + rr;
      if (grr < p.R && d < p.D) p.out_acc[((split * nslots + sl) * p.R + grr) * p.D + d] = Cs[sl * BM * L.ldC + rr * L.ldC + d];
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Warp kernels: the passes with one gamma, no labels and at most kWarpMaxE exclusions per query on
// fp16/bf16 inputs (MoCo and frozen banks, CLIP, SimCLR's NT-Xent), flash-attention style. Each
// warp owns 16 rows of the block's 64; its scores of a 64-column tile stay in the mma
// accumulators, with the logits
//   l_ij = rs_i cs_j S_ij + rb_i + cb_j   (-inf off the tile's valid columns or past R)
// Exclusions: a tile holding an excluded (row, column) pair is flagged while its column terms are
// staged (a block-uniform test), and only then are the pairs masked, element by element.
// Modes (the outputs are lse_tile_kernel's, per column split, so the host merges them alike):
//   kWarpStats (forward statistics; CLIP's row and column log-sum-exps), with z = gamma l:
//     m_i' = max(m_i, max_j z_ij),  r = exp(m_i - m_i'),  s_i' = r s_i + sum_j exp(z_ij - m_i')
//   kWarpSums (row-only forward: InfoNCE against a bank without gradient), in addition
//     O_i' = r O_i + sum_j (P_ij cs_j) c_j  with P_ij = exp(z_ij - m_i') (the key sums E)
//   kWarpGrad (backward, rows = queries or keys):
//     G_ij = rw_i exp(rg l_ij - rl_i) + cw_j exp(cg l_ij - cl_j)  (either term absent: null w)
//     O_i += sum_j (G_ij cs_j) c_j,  gsum_i += sum_j G_ij
// where c_j are the column features. The probabilities / gradient weights (rounded to the input
// dtype) are the A operand of the second product straight from the registers; O (16 rows x 128
// columns, fp32) lives in registers, so a block covers a slice of 128 of O's columns
// (blockIdx.z) and wider features recompute the scores once per slice. Row sums are kept per
// lane and summed over the row's 4 lanes at the end; exponentials by ex2.approx.
// ---------------------------------------------------------------------------------------------

enum LseWarpMode : int { kWarpStats = 0, kWarpSums = 1, kWarpGrad = 2 };
constexpr int kLseWarpSlice = 128;  // O's columns per block: 16 x 128 fp32 per warp, 64 registers per thread
constexpr int kWarpMaxE = 2;        // exclusions per query the warp kernels take

struct LseWarpSmem {
  int64_t q, k0, k1, colv, colx, xflag, total;
  int ldF;
};

template <typename TI>
__host__ __device__ inline LseWarpSmem lse_warp_smem(int dp) {
  LseWarpSmem s{};
  s.ldF = padded_stride<TI>(dp);
  int64_t o = 0;
  s.q = o;
  o = align16(o + int64_t(64) * s.ldF * sizeof(TI));
  s.k0 = o;
  o = align16(o + int64_t(kLseBN) * s.ldF * sizeof(TI));
  s.k1 = o;
  o = align16(o + int64_t(kLseBN) * s.ldF * sizeof(TI));
  s.colv = o;  // [2 tiles][cs, cb, cw, cl][BN]
  o = align16(o + int64_t(8) * kLseBN * sizeof(float));
  s.colx = o;  // [2 tiles][kWarpMaxE][BN]: keys as rows, the block row each column excludes (-1: none)
  o = align16(o + int64_t(2 * kWarpMaxE) * kLseBN * sizeof(int));
  s.xflag = o;  // [2 tiles]: the tile's number when some pair of it is excluded
  o = align16(o + int64_t(2) * sizeof(int));
  s.total = o;
  return s;
}

// the blocks of a warp kernel's grid along z: slices of O's columns
__host__ __device__ inline int lse_warp_slices(int mode, int dp) {
  return mode == kWarpStats ? 1 : (dp + kLseWarpSlice - 1) / kLseWarpSlice;
}

// Sets the excluded elements of a warp's tile values v (accumulator layout) to `masked`: queries as
// rows, the lane's rows' excluded columns against the tile's c0 + c; keys as rows, the block row
// that column c excludes (cx, staged with the tile) against the lane's rows (wrow0: the warp's
// first row, wfirst its index in the block).
template <int NT>
__device__ __forceinline__ void mask_excluded(const LseTileParams<float>& p, const int* cx, int64_t c0, int64_t wrow0,
                                              int wfirst, float masked, float (&v)[NT][4]) {
  const int lane = threadIdx.x & 31, lr = lane >> 2, lc = lane & 3;
  int64_t rex[2][kWarpMaxE];
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < kWarpMaxE; ++e) {
      const int64_t gr = wrow0 + lr + 8 * h;
      rex[h][e] = !p.key_rows && e < p.E && gr < p.R ? p.exclude[gr * p.E + e] - c0 : -1;
    }
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int e2 = 0; e2 < 2; ++e2) {
      const int c = 8 * j + 2 * lc + e2;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        bool x = false;
#pragma unroll
        for (int e = 0; e < kWarpMaxE; ++e)
          if (e < p.E) x |= p.key_rows ? cx[e * kLseBN + c] == wfirst + lr + 8 * h : rex[h][e] == c;
        if (x) v[j][2 * h + e2] = masked;
      }
    }
}

template <typename TI, int MODE>
__global__ void __launch_bounds__(kThreads, MODE == kWarpStats ? 4 : 3) lse_warp_kernel(LseTileParams<float> p) {
  static_assert(IsTensorCore<TI>::value, "fp16 / bf16 inputs");
  constexpr int BN = kLseBN, NT = BN / 8, DT = kLseWarpSlice / 8;
  constexpr bool FWD = MODE != kWarpGrad, OUT = MODE != kWarpStats;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lr = lane >> 2, lc = lane & 3;
  const int64_t r0 = int64_t(blockIdx.x) * 64, split = blockIdx.y;
  const int64_t c_begin = split * p.cols_per_split;
  const int64_t c_end = c_begin + p.cols_per_split < p.C ? c_begin + p.cols_per_split : p.C;
  const int dp = static_cast<int>((p.D + 15) / 16 * 16);
  const int d0 = static_cast<int>(blockIdx.z) * kLseWarpSlice;  // this block's slice of O
  const int dslice = dp - d0 < kLseWarpSlice ? dp - d0 : kLseWarpSlice;
  const bool first_slice = blockIdx.z == 0;  // writes the per-row statistics
  const LseWarpSmem L = lse_warp_smem<TI>(dp);
  TI* Qs = reinterpret_cast<TI*>(smem + L.q);
  float* colv = reinterpret_cast<float*>(smem + L.colv);
  int* colx = reinterpret_cast<int*>(smem + L.colx);
  int* xflag = reinterpret_cast<int*>(smem + L.xflag);
  stage_rows<TI, TI>(Qs, L.ldF, static_cast<const TI*>(p.rows_feat), r0, p.R, p.D, 64, dp);
  // queries as rows: thread t < 64 E watches exclusion t % E of the block's row t / E
  int64_t watched = -1;
  if (p.E > 0) {
    if (!p.key_rows && threadIdx.x < 64 * p.E && r0 + threadIdx.x / p.E < p.R)
      watched = p.exclude[(r0 + threadIdx.x / p.E) * p.E + threadIdx.x % p.E];
    if (threadIdx.x < 2) xflag[threadIdx.x] = -1;
    __syncthreads();  // the flags' initial values before any tile sets one
  }

  const int64_t wrow0 = r0 + 16 * warp;
  const float ninf = neg_inf_f(), gamma = p.gamma[0];
  const bool col_terms = p.cs != nullptr || p.cb != nullptr || (!FWD && p.col_w != nullptr);
  bool live[2];
  float rs[2], rb[2], m[2], s[2], rw[2], rl[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t gr = wrow0 + lr + 8 * h;
    live[h] = gr < p.R;
    rs[h] = live[h] && p.rs ? p.rs[gr] : 1.f;
    rb[h] = live[h] && p.rb ? p.rb[gr] : 0.f;
    m[h] = ninf;
    s[h] = 0.f;  // forward: the row's sum of exponentials; backward: of G
    rw[h] = !FWD && live[h] && p.row_w ? p.row_w[gr] : 0.f;
    rl[h] = !FWD && live[h] && p.row_w ? p.row_lse[gr] : 0.f;
  }
  float O[DT][4];
#pragma unroll
  for (int t = 0; t < DT; ++t) O[t][0] = O[t][1] = O[t][2] = O[t][3] = 0.f;

  KeyTiles<TI, TI, true> tiles(reinterpret_cast<TI*>(smem + L.k0), reinterpret_cast<TI*>(smem + L.k1), L.ldF,
                               static_cast<const TI*>(p.cols_feat), p.C, p.D, BN, dp, c_begin, c_end);
  int parity = 0, tile = 0;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += BN, parity ^= 1, ++tile) {
    const TI* Ks = tiles.acquire(c0);
    // the tile's column terms, double-buffered like the key tiles (one barrier per tile)
    float* cv = colv + parity * 4 * BN;
    int* cx = colx + parity * kWarpMaxE * BN;
    if (p.E > 0) {  // flag the tile if it holds an excluded pair (a stamp: no reset needed)
      if (!p.key_rows) {
        if (watched >= c0 && watched < c0 + BN) xflag[parity] = tile;
      } else {
        for (int cc = threadIdx.x; cc < BN; cc += kThreads) {
          const int64_t gc = c0 + cc;
#pragma unroll
          for (int e = 0; e < kWarpMaxE; ++e) {
            const int64_t rel = e < p.E && gc < c_end ? p.exclude[gc * p.E + e] - r0 : -1;
            const bool in = rel >= 0 && rel < 64;
            cx[e * BN + cc] = in ? static_cast<int>(rel) : -1;
            if (in) xflag[parity] = tile;
          }
        }
      }
    }
    if (col_terms) {
      for (int cc = threadIdx.x; cc < BN; cc += kThreads) {
        const int64_t gc = c0 + cc;
        const bool ok = gc < c_end;
        cv[cc] = ok && p.cs ? p.cs[gc] : 1.f;
        cv[BN + cc] = ok && p.cb ? p.cb[gc] : 0.f;
        if (!FWD) {
          cv[2 * BN + cc] = ok && p.col_w ? p.col_w[gc] : 0.f;
          cv[3 * BN + cc] = ok && p.col_w ? p.col_lse[gc] : 0.f;
        }
      }
    }
    __syncthreads();
    tiles.prefetch_next(c0);
    float z[NT][4];
    warp_scores<true, TI, NT>(Qs + 16 * warp * L.ldF, Ks, L.ldF, dp, z);
    const int valid = c_end - c0 < BN ? static_cast<int>(c_end - c0) : BN;
    // the logits, in place, and this lane's column scales (of the logits and the second product)
    float csv[NT][2];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int c = 8 * j + 2 * lc + e;
        csv[j][e] = col_terms ? cv[c] : 1.f;
        const float cbv = col_terms ? cv[BN + c] : 0.f;
#pragma unroll
        for (int h = 0; h < 2; ++h) z[j][2 * h + e] = z[j][2 * h + e] * (rs[h] * csv[j][e]) + (rb[h] + cbv);
      }
    if constexpr (FWD) {
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            z[j][2 * h + e] = 8 * j + 2 * lc + e < valid && live[h] ? gamma * z[j][2 * h + e] : ninf;
      if (p.E > 0 && xflag[parity] == tile) mask_excluded(p, cx, c0, wrow0, 16 * warp, ninf, z);
      float shift[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float tmax = ninf;
#pragma unroll
        for (int j = 0; j < NT; ++j) tmax = fmaxf(tmax, fmaxf(z[j][2 * h], z[j][2 * h + 1]));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float nm = tmax > m[h] ? tmax : m[h];
        shift[h] = nm == ninf ? 0.f : nm;
        const float rescale = ck_exp_fast(m[h] - shift[h]);
        s[h] *= rescale;
        m[h] = nm;
        if constexpr (OUT) {
#pragma unroll
          for (int t = 0; t < DT; ++t) O[t][2 * h] *= rescale, O[t][2 * h + 1] *= rescale;
        }
      }
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float zz = z[j][2 * h + e];
            const float ev = zz == ninf ? 0.f : ck_exp_fast(zz - shift[h]);
            s[h] += ev;
            z[j][2 * h + e] = ev * csv[j][e];
          }
        }
    } else {
      const float cg = p.col_gamma, rg = p.row_gamma;
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = 8 * j + 2 * lc + e;
          const float cw = col_terms ? cv[2 * BN + c] : 0.f, cl = col_terms ? cv[3 * BN + c] : 0.f;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float l = z[j][2 * h + e];
            float g = rw[h] != 0.f ? rw[h] * ck_exp_fast(rg * l - rl[h]) : 0.f;
            if (cw != 0.f) g += cw * ck_exp_fast(cg * l - cl);
            z[j][2 * h + e] = c < valid && live[h] ? g : 0.f;
          }
        }
      if (p.E > 0 && xflag[parity] == tile) mask_excluded(p, cx, c0, wrow0, 16 * warp, 0.f, z);
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            s[h] += z[j][2 * h + e];
            z[j][2 * h + e] *= csv[j][e];
          }
    }
    if constexpr (OUT) warp_pk<TI, NT, DT>(z, Ks + d0, L.ldF, dslice, O);
    if (!tiles.async_ok) __syncthreads();  // the one key buffer is restaged next
    tiles.advance();
  }

#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float tot = s[h];
    tot += __shfl_xor_sync(0xffffffffu, tot, 1);
    tot += __shfl_xor_sync(0xffffffffu, tot, 2);
    const int64_t gr = wrow0 + lr + 8 * h;
    if (!live[h]) continue;
    if (lc == 0 && first_slice) {
      if constexpr (FWD) {
        p.out_m[split * p.G * p.R + gr] = m[h];
        p.out_s[split * p.G * p.R + gr] = tot;
      } else {
        p.out_gsum[split * p.R + gr] = tot;
      }
    }
    if constexpr (OUT) {
      float* acc = p.out_acc + (split * (FWD ? p.slots : 1) * p.R + gr) * p.D;
#pragma unroll
      for (int t = 0; t < DT; ++t)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int d = d0 + 8 * t + 2 * lc + e;
          if (8 * t < dslice && d < p.D) acc[d] = O[t][2 * h + e];
        }
    }
  }
}

}  // namespace cuda
}  // namespace ck
