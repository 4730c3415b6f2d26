// Exact top-k similarity on the GPU: score tiles (tensor cores for fp16/bf16, CUDA cores in fp32
// otherwise, fp32 scores as the reference computes them) with a warp-level k-selection fused in.
// Pure CUDA (no torch).
//
// Layout: a block of 4 warps takes BM = 64 query rows and one column split; warp w owns rows
// 16w .. 16w+15 for the whole run, so every selection decision is the warp's own (no block-wide
// branch, no barrier but the one that hands over the next bank tile). Per bank tile of BN = 64
// rows the warp computes its 16 x 64 scores into registers, in the accumulator layout of
// mma.m16n8k16 (lane = 4 r + c holds rows r, r+8 and columns 8j + 2c + {0, 1}; the CUDA-core
// engine uses the same layout), and selects from there: nothing goes through shared memory
// unless it may enter the top-k.
//
// Selection, in the manner of FAISS's WarpSelect (filter cheaply, merge rarely, keep the sorted
// queue where a warp can merge it in registers):
//   * keys are int64, (order-preserving fp32 bits) << 32 | (0xFFFFFFFF - column), so one integer
//     comparison orders by score and breaks ties toward the lower column;
//   * fast path: each lane compares its 32 scores with its two rows' thresholds (the score of the
//     row's current k-th key; NaN, "take everything", while fewer than k are known) and one vote
//     tells the warp whether any of its 16 x 64 scores passed. After warm-up the threshold rejects
//     nearly everything (expected survivors per row ~ k (1 + ln(n/k)) over n columns), so most
//     tiles cost the product, 32 comparisons and a vote;
//   * slow path (warp-uniform): exclusions and labels are checked for the passing scores only,
//     which are then appended to their row's candidate buffer in shared memory (CAP keys per row;
//     a ballot per score position compacts the 4 lanes of each row, in a fixed order). A row
//     whose buffer is full is merged into its queue, and the scores it could not take are tested
//     again, now against the new k-th key (keys, not scores: this tile's columns may be in the
//     queue now), until none is left;
//   * a merge (one warp, one row): the buffer is bitonic-sorted across lanes and registers; each
//     key of the row's sorted queue of KP keys (KP = k rounded up to a power of two >= 32) moves
//     down by the number of candidates above it and each candidate goes to its rank in the queue
//     plus its own index (binary searches, and a walk down the buffer along a lane's run of queue
//     keys); what lands past KP drops out; the new threshold is the k-th key;
//   * the queues live in global memory (the kernel's output, per column split), touched only by
//     merges; columns are split over gridDim.y and the host merges the splits' sorted queues.
// Within a split the tiles are visited in increasing column order, so at the start of a tile every
// queued key has a lower column than the tile's: a score equal to the threshold score loses its
// tie to the k-th key and is rightly rejected by the score comparison of the fast path.
//
// Shared memory (fp16, D = 128): the query rows (17 KiB), two bank tiles (cp.async double
// buffering, 34 KiB) and the candidate buffers (64 x 64 int64, 32 KiB): 83 KiB, two blocks per
// SM on an H100 or A100.
//
// Cost (sm_90 code, fp16, D = 128, per warp and bank tile; not yet timed on a GPU): the fast path
// is about 430 instructions, 64 of them mma and 112 the tile's cp.async copies; a slow tile adds
// about 180 plus 20 per score position taken; a merge is about 850 instructions at KP = 256 and
// 1,450 at KP = 1,024 (the bitonic merge network it replaced: 1,040 and 3,080). A simulation of
// the selection on random unit vectors (one 2^19-column split, scripts/simulate_cuda_topk.py)
// gives slow paths in 71 % / 96 % of the tiles and 38 / 119 merges per row at k = 256 / 1,024.
#pragma once

#include "device_common.cuh"

namespace ck {
namespace cuda {

constexpr int kTopkBM = 64;                 // query rows per block: 16 per warp
constexpr int kTopkBN = 64;                 // bank rows per tile
constexpr int kTopkNT = kTopkBN / 8;        // n8 column groups per tile
constexpr int kTopkCap = 64;                // candidate buffer per row (a power of two >= 32)
static_assert(kTopkBM == 16 * kWarps, "one m16 row tile per warp");

struct TopkParams {
  int64_t M = 0, N = 0, D = 0;
  int k = 0;
  const void* query = nullptr;   // M x D
  const void* bank = nullptr;    // N x D
  int sim = 0;                   // 0 dot, 1 cosine, 2 l2
  const float* qscale = nullptr; // M: 1/|q| (cosine) or |q|^2 (l2)
  const float* kscale = nullptr; // N: 1/|k| (cosine) or |k|^2 (l2)
  const int64_t* exclude = nullptr;  // M x E
  int E = 0;
  const int64_t* q_lab = nullptr;  // M
  const int64_t* b_lab = nullptr;  // N
  int64_t cols_per_split = 0;      // a multiple of kTopkBN
  int64_t* queues = nullptr;  // [split][M][KP], sorted descending; INT64_MIN = empty
};

__host__ __device__ __forceinline__ int64_t pack_key_bits(int32_t bits, int64_t column) {
  const int32_t ordered = bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
  return static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(ordered)) << 32) |
                              (0xFFFFFFFFull - static_cast<uint64_t>(column)));
}

// -0.0 -> +0.0; every NaN -> +nan (above +inf, as torch.sort ranks it)
__device__ __forceinline__ int64_t pack_key(float score, int64_t column) {
  return pack_key_bits(score != score ? 0x7FC00000 : __float_as_int(score + 0.0f), column);
}

__device__ __forceinline__ float key_score(int64_t key) {
  int32_t ordered = static_cast<int32_t>(key >> 32);
  int32_t bits = ordered >= 0 ? ordered : (ordered ^ 0x7FFFFFFF);
  return __int_as_float(bits);
}

constexpr int64_t kEmptyKey = static_cast<int64_t>(0x8000000000000000ull);

template <typename TI>
struct TopkTypes {
  using TS = float;  // fp32 and fp64 inputs: fp32 scores on CUDA cores
};
template <>
struct TopkTypes<__half> {
  using TS = __half;
};
template <>
struct TopkTypes<__nv_bfloat16> {
  using TS = __nv_bfloat16;
};

struct TopkSmem {
  int64_t q, k0, k1, buf, total;
  int ldF;
};

template <typename TI>
__host__ __device__ inline TopkSmem topk_smem(int dp) {
  using TS = typename TopkTypes<TI>::TS;
  constexpr bool TC = IsTensorCore<TI>::value;
  TopkSmem s{};
  s.ldF = padded_stride<TS>(dp);
  auto al = [](int64_t x) { return (x + 15) / 16 * 16; };
  int64_t o = 0;
  s.q = o;
  o = al(o + int64_t(kTopkBM) * s.ldF * sizeof(TS));
  s.k0 = o;
  o = al(o + int64_t(kTopkBN) * s.ldF * sizeof(TS));
  s.k1 = TC ? o : s.k0;  // the second bank tile only where cp.async prefetches into it
  if (TC) o = al(o + int64_t(kTopkBN) * s.ldF * sizeof(TS));
  s.buf = o;
  o = al(o + int64_t(kTopkBM) * kTopkCap * sizeof(int64_t));
  s.total = o;
  return s;
}
// One compare-exchange stage of a bitonic network over N = 32 * R keys held as v[i] = element
// i*32 + lane: elements e and e ^ stride end up in descending order where (e & size) == 0 and in
// ascending order elsewhere (size 0: descending everywhere).
template <int R>
__device__ __forceinline__ void warp_bitonic_stage(int64_t (&v)[R], int size, int stride) {
  const int lane = threadIdx.x & 31;
  if (stride >= 32) {  // partners in the same lane: registers i and i | rs
    const int rs = stride / 32;
#pragma unroll
    for (int i = 0; i < R; ++i) {
      if ((i & rs) == 0) {
        const int j = i | rs;
        const bool desc = (((i * 32 + lane) & size) == 0);
        const int64_t a = v[i], b = v[j];
        const bool swap = desc ? (a < b) : (a > b);
        v[i] = swap ? b : a;
        v[j] = swap ? a : b;
      }
    }
  } else {  // partners in lanes lane ^ stride
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const int e = i * 32 + lane;
      const int64_t other = __shfl_xor_sync(0xffffffffu, v[i], stride);
      const bool desc = ((e & size) == 0);
      const bool lower = (e & stride) == 0;
      // descending pair: the lower index keeps the larger key
      const bool keep_max = (lower == desc);
      v[i] = keep_max ? (other > v[i] ? other : v[i]) : (other < v[i] ? other : v[i]);
    }
  }
}

// Bitonic sort (descending) of N = 32 * R keys held as v[i] = element i*32 + lane.
template <int R>
__device__ __forceinline__ void warp_bitonic_sort_desc(int64_t (&v)[R]) {
  constexpr int N = 32 * R;
#pragma unroll
  for (int size = 2; size <= N; size <<= 1)
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) warp_bitonic_stage<R>(v, size, stride);
}

// The number of keys greater than x in a descending array of N keys (N a power of two), by a
// branch-free binary search.
template <int N>
__device__ __forceinline__ int count_greater(const int64_t* sorted, int64_t x) {
  int r = 0;
#pragma unroll
  for (int step = N / 2; step >= 1; step >>= 1)
    if (sorted[r + step - 1] > x) r += step;
  // sorted[r] <= x here, unless r = N - 1 (the steps add up to N - 1): then that one decides
  return r == N - 1 && sorted[N - 1] > x ? N : r;
}

// Merge a row's candidate buffer into its sorted queue (one warp); returns the new k-th key.
// By ranks: the buffer B is sorted (bitonic, across lanes and registers) and written back; queue
// key Q_e moves to e + #(B > Q_e) and candidate B_i to i + #(Q > B_i), and whatever lands at KP
// or beyond drops out. Lane l holds the queue's keys l*QR .. l*QR + QR - 1, so their shifts are
// one binary search and a walk down B (non-decreasing along the lane's keys); the candidates'
// ranks are binary searches in the queue. Keys are distinct but for the empty key, and empties
// land after every real key (empty candidates past KP), so the new positions below KP are a
// permutation: each written once. Every read of the queue precedes every write.
template <int KP>
__device__ __forceinline__ int64_t warp_merge_row(int64_t* queue, int64_t* cand, int count, int k) {
  constexpr int QR = KP / 32, CR = kTopkCap / 32;
  const int lane = threadIdx.x & 31;
  int64_t b[CR];
#pragma unroll
  for (int i = 0; i < CR; ++i) {
    const int e = i * 32 + lane;
    b[i] = e < count ? cand[e] : kEmptyKey;
  }
  warp_bitonic_sort_desc<CR>(b);
  int64_t q[QR];
  if constexpr (QR % 2 == 0) {  // 16-byte loads
    const longlong2* src = reinterpret_cast<const longlong2*>(queue + lane * QR);
#pragma unroll
    for (int i = 0; i < QR / 2; ++i) {
      const longlong2 v = src[i];
      q[2 * i] = v.x, q[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < QR; ++i) q[i] = queue[lane * QR + i];
  }
  int bpos[CR];
#pragma unroll
  for (int i = 0; i < CR; ++i)
    bpos[i] = b[i] == kEmptyKey ? KP : i * 32 + lane + count_greater<KP>(queue, b[i]);
  __syncwarp();  // every lane has read the buffer and the queue
#pragma unroll
  for (int i = 0; i < CR; ++i) cand[i * 32 + lane] = b[i];
  __syncwarp();  // the sorted buffer is visible
  int shift = count_greater<kTopkCap>(cand, q[0]);
#pragma unroll
  for (int i = 0; i < QR; ++i) {
    while (shift < kTopkCap && cand[shift] > q[i]) ++shift;
    const int pos = lane * QR + i + shift;
    if (shift > 0 && pos < KP) queue[pos] = q[i];
  }
#pragma unroll
  for (int i = 0; i < CR; ++i)
    if (bpos[i] < KP) queue[bpos[i]] = b[i];
  __syncwarp();  // the merged queue is visible
  return queue[k - 1];
}

// ---------------------------------------------------------------------------------------------
// the warp's scores and selection
// ---------------------------------------------------------------------------------------------

// OR of a 32-bit value over the warp's lanes
__device__ __forceinline__ uint32_t warp_or(uint32_t v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v |= __shfl_xor_sync(0xffffffffu, v, s);
  return v;
}

// The selection state of one lane's two rows (h = 0: the warp's row lane / 4, h = 1: that + 8),
// the same in the 4 lanes of a row.
struct TopkRows {
  float thr[2];    // the score of the k-th key (NaN while the queue holds fewer than k)
  int64_t kth[2];  // the k-th key (kEmptyKey while fewer than k)
  int cnt[2];      // keys in the row's candidate buffer
};

// Bit b of a lane's pending mask is its score acc[j][2h + e] with h = b / 16, j = (b / 2) % 8,
// e = b % 2: row lane / 4 + 8h of the warp, column 8j + 2 (lane % 4) + e of the tile.
__host__ __device__ constexpr int topk_bit(int h, int j, int e) { return h * 16 + j * 2 + e; }

// The pending bits of this lane's columns below `valid` (the last tile of a split may be partial).
__device__ __forceinline__ uint32_t tile_columns_mask(int valid) {
  const int lc = threadIdx.x & 3;
  uint32_t m = 0;
#pragma unroll
  for (int j = 0; j < kTopkNT; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e)
      if (8 * j + 2 * lc + e < valid) m |= (1u << topk_bit(0, j, e)) | (1u << topk_bit(1, j, e));
  return m;
}

// Lane-mask of the warp's rows for which pred0 (rows 0-7) / pred1 (rows 8-15) holds: bit 4r is
// row r, bit 4r + 1 is row r + 8.
__device__ __forceinline__ uint32_t rows_ballot(bool pred0, bool pred1) {
  const int lc = threadIdx.x & 3;
  return __ballot_sync(0xffffffffu, lc == 0 ? pred0 : (lc == 1 ? pred1 : false));
}

// Merges the candidate buffers of the warp's rows in `rows` (a rows_ballot mask) into their
// queues and updates the rows' thresholds.
template <int KP>
__device__ __forceinline__ void merge_rows(uint32_t rows, int64_t* cand, int64_t* queue, int k, TopkRows& st) {
  const int lr = (threadIdx.x & 31) >> 2;
  __syncwarp();  // the lanes' candidate stores are visible to the whole warp
  while (rows) {
    const int bit = __ffs(rows) - 1;
    rows &= rows - 1;
    const int r = bit >> 2, h = bit & 1, rl = r + 8 * h;
    const int count = __shfl_sync(0xffffffffu, h ? st.cnt[1] : st.cnt[0], 4 * r);
    const int64_t kth = warp_merge_row<KP>(queue + int64_t(rl) * KP, cand + rl * kTopkCap, count, k);
    const float thr = kth == kEmptyKey ? __int_as_float(0x7fc00000) : key_score(kth);
    if (lr == r) {
      if (h) {
        st.thr[1] = thr, st.kth[1] = kth, st.cnt[1] = 0;
      } else {
        st.thr[0] = thr, st.kth[0] = kth, st.cnt[0] = 0;
      }
    }
    __syncwarp();  // the buffer is read before it is refilled
  }
}

// The slow path of one tile (warp-uniform: some lane has pending scores): checks exclusions and
// labels of the passing scores, appends them to their rows' buffers and merges full buffers,
// until every passing score is either in a buffer or rejected by its row's new k-th key.
template <int KP>
__device__ __forceinline__ void take_candidates(const TopkParams& p, const float (&acc)[kTopkNT][4], uint32_t pend,
                                                int64_t c0, int64_t wrow0, int64_t* cand, int64_t* queue,
                                                TopkRows& st) {
  const int lane = threadIdx.x & 31, lr = lane >> 2, lc = lane & 3;
  if (p.E > 0 || p.q_lab) {
#pragma unroll
    for (int b = 0; b < 32; ++b) {
      if ((pend >> b) & 1) {
        const int64_t gr = wrow0 + lr + 8 * (b >> 4), gc = c0 + 8 * ((b >> 1) % kTopkNT) + 2 * lc + (b & 1);
        bool ok = !p.q_lab || p.q_lab[gr] != p.b_lab[gc];
        for (int e = 0; e < p.E; ++e) ok &= p.exclude[gr * p.E + e] != gc;
        if (!ok) pend &= ~(1u << b);
      }
    }
  }
  for (uint32_t any = warp_or(pend); any != 0; any = warp_or(pend)) {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int j = 0; j < kTopkNT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int b = topk_bit(h, j, e);
          if (!((any >> b) & 1)) continue;  // warp-uniform
          const bool want = (pend >> b) & 1;
          // the 4 lanes of this lane's row, in lane order
          const uint32_t group = (__ballot_sync(0xffffffffu, want) >> (lane & ~3)) & 0xFu;
          const int pos = st.cnt[h] + __popc(group & ((1u << lc) - 1));
          if (want && pos < kTopkCap) {
            cand[(lr + 8 * h) * kTopkCap + pos] = pack_key(acc[j][2 * h + e], c0 + 8 * j + 2 * lc + e);
            pend &= ~(1u << b);
          }
          const int filled = st.cnt[h] + __popc(group);
          st.cnt[h] = filled < kTopkCap ? filled : kTopkCap;
        }
    // what is still pending found its row's buffer full
    const uint32_t full = rows_ballot(st.cnt[0] == kTopkCap, st.cnt[1] == kTopkCap);
    if (full == 0) break;  // everything was taken
    merge_rows<KP>(full, cand, queue, p.k, st);
    // the new k-th key may be one of this tile's columns: compare keys
#pragma unroll
    for (int b = 0; b < 32; ++b) {
      if ((pend >> b) & 1) {
        const int h = b >> 4, j = (b >> 1) % kTopkNT, e = b & 1;
        if (pack_key(acc[j][2 * h + e], c0 + 8 * j + 2 * lc + e) <= (h ? st.kth[1] : st.kth[0])) pend &= ~(1u << b);
      }
    }
  }
}

template <typename TI, int KP>
__global__ void __launch_bounds__(kThreads, 2) topk_tile_kernel(TopkParams p) {
  using TS = typename TopkTypes<TI>::TS;
  constexpr int BN = kTopkBN;
  constexpr bool TC = IsTensorCore<TI>::value;
  extern __shared__ __align__(16) unsigned char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, lr = lane >> 2, lc = lane & 3;
  const int64_t r0 = int64_t(blockIdx.x) * kTopkBM;
  const int64_t split = blockIdx.y;
  const int64_t c_begin = split * p.cols_per_split;
  const int64_t c_end = c_begin + p.cols_per_split < p.N ? c_begin + p.cols_per_split : p.N;
  const int dp = static_cast<int>((p.D + 15) / 16 * 16);
  const TopkSmem L = topk_smem<TI>(dp);
  TS* Qs = reinterpret_cast<TS*>(smem + L.q);
  const TI* qsrc = static_cast<const TI*>(p.query);
  const TI* bsrc = static_cast<const TI*>(p.bank);
  stage_rows<TS, TI>(Qs, L.ldF, qsrc, r0, p.M, p.D, kTopkBM, dp);

  // the warp's 16 rows: its slice of the candidate buffers and of the split's queues
  const int64_t wrow0 = r0 + 16 * warp;
  int64_t* cand = reinterpret_cast<int64_t*>(smem + L.buf) + 16 * warp * kTopkCap;
  int64_t* queue = p.queues + (split * p.M + wrow0) * KP;
  TopkRows st;
  float qs[2];
  uint32_t live_mask = 0;  // the pending bits of this lane's rows that exist
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t gr = wrow0 + lr + 8 * h;
    const bool live = gr < p.M;
    if (live) live_mask |= 0xFFFFu << (16 * h);
    qs[h] = live && p.qscale ? p.qscale[gr] : 0.f;
    // NaN: everything passes until k are known; +inf: a row past M never takes the slow path
    st.thr[h] = live ? __int_as_float(0x7fc00000) : __int_as_float(0x7f800000);
    st.kth[h] = kEmptyKey;
    st.cnt[h] = 0;
  }
  __syncthreads();  // the query rows are staged

  KeyTiles<TS, TI, TC> tiles(reinterpret_cast<TS*>(smem + L.k0), reinterpret_cast<TS*>(smem + L.k1), L.ldF, bsrc,
                             p.N, p.D, BN, dp, c_begin, c_end);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += BN) {
    const TS* Ks = tiles.acquire(c0);
    __syncthreads();
    tiles.prefetch_next(c0);
    float acc[kTopkNT][4];
    warp_scores<TC, TS, kTopkNT>(Qs + 16 * warp * L.ldF, Ks, L.ldF, dp, acc);
    // the scores as the reference computes them (one branch per tile, not per score)
    const int valid = c_end - c0 < BN ? static_cast<int>(c_end - c0) : BN;  // columns of this tile
    if (p.sim != 0) {
#pragma unroll
      for (int j = 0; j < kTopkNT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = 8 * j + 2 * lc + e;
          const float ks = c < valid ? p.kscale[c0 + c] : 0.f;
          if (p.sim == 1) {
            acc[j][e] = acc[j][e] * qs[0] * ks, acc[j][2 + e] = acc[j][2 + e] * qs[1] * ks;
          } else {
            acc[j][e] = (acc[j][e] + acc[j][e] - qs[0]) - ks;
            acc[j][2 + e] = (acc[j][2 + e] + acc[j][2 + e] - qs[1]) - ks;
          }
        }
    }
    // the fast test: does any score of the warp pass its row's threshold? (one predicate per
    // score; the mask of which ones is built only when some does)
    bool any = false;
#pragma unroll
    for (int j = 0; j < kTopkNT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) any |= !(acc[j][i] <= st.thr[i >> 1]);
    if (__ballot_sync(0xffffffffu, any) != 0) {
      uint32_t pend = 0;
#pragma unroll
      for (int j = 0; j < kTopkNT; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int h = 0; h < 2; ++h)
            if (!(acc[j][2 * h + e] <= st.thr[h])) pend |= 1u << topk_bit(h, j, e);
      if (valid < BN) pend &= tile_columns_mask(valid);
      pend &= live_mask;
      take_candidates<KP>(p, acc, pend, c0, wrow0, cand, queue, st);
    }
    if (!tiles.async_ok) __syncthreads();  // the one bank buffer is restaged next
    tiles.advance();
  }
  // the candidates still buffered
  merge_rows<KP>(rows_ballot(st.cnt[0] > 0, st.cnt[1] > 0), cand, queue, p.k, st);
}

}  // namespace cuda
}  // namespace ck
