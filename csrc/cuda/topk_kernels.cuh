// Exact top-k similarity on the GPU: score tiles (tensor cores for fp16/bf16, CUDA cores in fp32
// otherwise, fp32 scores as the reference computes them) with a warp-level k-selection fused in.
// Pure CUDA (no torch).
//
// Selection, in the manner of FAISS's WarpSelect (filter cheaply, merge rarely, keep the sorted
// queue where a warp can merge it in registers):
//   * keys are int64, (order-preserving fp32 bits) << 32 | (0xFFFFFFFF - column), so one integer
//     comparison orders by score and breaks ties toward the lower column;
//   * each warp owns BM/4 query rows of the block. Per tile and row, every lane tests its scores
//     against the row's threshold (the current k-th best score; NaN, i.e. "take everything",
//     while fewer than k are known) with one float comparison; survivors are compacted with a
//     ballot into a per-row candidate buffer in shared memory (the "thread queues");
//   * when a row's buffer may not take another tile, the warp merges: the buffer is loaded into
//     registers (CAP/32 keys per lane) and bitonic-sorted across lanes and registers; the row's
//     sorted queue of KP keys (KP = k rounded up to a power of two >= 32) is loaded, merged with
//     the sorted buffer by the bitonic merge rule C_e = max(Q_e, B_{KP-1-e}) (C holds the KP
//     largest of both and is bitonic) and one bitonic merge network; the new threshold is the
//     k-th key. After warm-up the threshold rejects almost everything and merges are rare
//     (expected survivors per row ~ k ln(n/k) over n columns).
//   * the queues live in global memory (the kernel's output, per column split), touched only by
//     merges; columns are split over gridDim.y and the host merges the splits' sorted queues.
// Within a split the columns are visited in increasing order, so a candidate equal to the
// threshold score always has a higher column than the queue's k-th key and is correctly rejected.
#pragma once

#include "device_common.cuh"

namespace ck {
namespace cuda {

constexpr int kTopkBN = 64;
constexpr int kTopkCap = 128;  // candidate buffer per row (>= 2 tiles of survivors)

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
  int64_t cols_per_split = 0;
  int64_t* queues = nullptr;  // [split][M][KP], sorted descending; INT64_MIN = empty
};

__device__ __forceinline__ int64_t pack_key(float score, int64_t column) {
  int32_t bits = __float_as_int(score + 0.0f);  // -0.0 -> +0.0
  int32_t ordered = bits >= 0 ? bits : (bits ^ 0x7FFFFFFF);
  return static_cast<int64_t>((static_cast<uint64_t>(static_cast<uint32_t>(ordered)) << 32) |
                              (0xFFFFFFFFull - static_cast<uint64_t>(column)));
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
  int64_t q, k0, k1, st, buf, cnt, thr, thrf, total;
  int ldF, ldS;
};

template <typename TI>
__host__ __device__ inline TopkSmem topk_smem(int BM, int dp) {
  using TS = typename TopkTypes<TI>::TS;
  TopkSmem s{};
  s.ldF = padded_stride<TS>(dp);
  s.ldS = kTopkBN + 4;
  auto al = [](int64_t x) { return (x + 15) / 16 * 16; };
  int64_t o = 0;
  s.q = o;
  o = al(o + int64_t(BM) * s.ldF * sizeof(TS));
  s.k0 = o;
  o = al(o + int64_t(kTopkBN) * s.ldF * sizeof(TS));
  s.k1 = o;
  if (sizeof(TS) == 2) o = al(o + int64_t(kTopkBN) * s.ldF * sizeof(TS));
  s.st = o;
  o = al(o + int64_t(BM) * s.ldS * sizeof(float));
  s.buf = o;
  o = al(o + int64_t(BM) * kTopkCap * sizeof(int64_t));
  s.cnt = o;
  o = al(o + int64_t(BM) * sizeof(int));
  s.thr = o;
  o = al(o + int64_t(BM) * sizeof(int64_t));
  s.thrf = o;
  o = al(o + int64_t(BM) * sizeof(float));
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

// Sorts a bitonic sequence of N = 32 * R keys into descending order (half-cleaners).
template <int R>
__device__ __forceinline__ void warp_bitonic_merge_desc(int64_t (&v)[R]) {
#pragma unroll
  for (int stride = 16 * R; stride > 0; stride >>= 1) warp_bitonic_stage<R>(v, 0, stride);
}

// Merge a row's candidate buffer into its sorted queue (one warp); returns the new k-th key.
template <int KP>
__device__ __forceinline__ int64_t warp_merge_row(int64_t* queue, const int64_t* cand, int count, int k) {
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
#pragma unroll
  for (int i = 0; i < QR; ++i) q[i] = queue[i * 32 + lane];
  // C_e = max(Q_e, B_{KP-1-e}): element KP-1-e of B lives in register QR-1-i of lane 31-lane
#pragma unroll
  for (int i = 0; i < QR; ++i) {
    const int src = QR - 1 - i;
    int64_t other = kEmptyKey;
    if (src < CR) other = __shfl_sync(0xffffffffu, b[src < CR ? src : 0], 31 - lane);
    q[i] = other > q[i] ? other : q[i];
  }
  warp_bitonic_merge_desc<QR>(q);
#pragma unroll
  for (int i = 0; i < QR; ++i) queue[i * 32 + lane] = q[i];
  // the k-th key: element k-1
  int64_t kth = kEmptyKey;
#pragma unroll
  for (int i = 0; i < QR; ++i)
    if (i == (k - 1) / 32) kth = q[i];
  return __shfl_sync(0xffffffffu, kth, (k - 1) % 32);
}

template <typename TI, int BM, int KP>
__global__ void __launch_bounds__(kThreads) topk_tile_kernel(TopkParams p) {
  using TS = typename TopkTypes<TI>::TS;
  constexpr int BN = kTopkBN, ROWS_PER_WARP = BM / kWarps;
  constexpr bool TC = IsTensorCore<TI>::value;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t r0 = int64_t(blockIdx.x) * BM;
  const int64_t split = blockIdx.y;
  const int64_t c_begin = split * p.cols_per_split;
  const int64_t c_end = c_begin + p.cols_per_split < p.N ? c_begin + p.cols_per_split : p.N;
  const int dp = static_cast<int>((p.D + 15) / 16 * 16);
  const TopkSmem L = topk_smem<TI>(BM, dp);
  TS* Qs = reinterpret_cast<TS*>(smem + L.q);
  float* St = reinterpret_cast<float*>(smem + L.st);
  int64_t* cand = reinterpret_cast<int64_t*>(smem + L.buf);
  int* cnt = reinterpret_cast<int*>(smem + L.cnt);
  float* thrf = reinterpret_cast<float*>(smem + L.thrf);
  const TI* qsrc = static_cast<const TI*>(p.query);
  const TI* bsrc = static_cast<const TI*>(p.bank);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  stage_rows<TS, TI>(Qs, L.ldF, qsrc, r0, p.M, p.D, BM, dp);
  for (int r = threadIdx.x; r < BM; r += kThreads) {
    cnt[r] = 0;
    thrf[r] = __int_as_float(0x7fc00000);  // NaN: everything passes until k are known
  }
  int64_t* my_queue_base = p.queues + split * p.M * KP;
  __syncthreads();  // cnt / thrf initialized (also for an empty split)

  KeyTiles<TS, TI, TC> tiles(reinterpret_cast<TS*>(smem + L.k0), reinterpret_cast<TS*>(smem + (TC ? L.k1 : L.k0)),
                             L.ldF, bsrc, p.N, p.D, BN, dp, c_begin, c_end);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += BN) {
    const TS* Ks = tiles.acquire(c0);
    __syncthreads();
    tiles.prefetch_next(c0);
    tile_abt<TC, float, TS, BM, BN>(Qs, L.ldF, Ks, L.ldF, dp, St, L.ldS);
    __syncthreads();
    // filter + compaction: warp `warp` owns rows warp*ROWS_PER_WARP ..
#pragma unroll 1
    for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
      const int r = warp * ROWS_PER_WARP + rr;
      const int64_t gr = r0 + r;
      if (gr >= p.M) break;  // warp-uniform
      const float thr = thrf[r];
      const float qs = p.qscale ? p.qscale[gr] : 0.f;
      int c = cnt[r];
#pragma unroll
      for (int h = 0; h < BN / 32; ++h) {
        const int cc = h * 32 + lane;
        const int64_t gc = c0 + cc;
        bool pass = false;
        float s = 0.f;
        if (gc < c_end) {
          s = St[r * L.ldS + cc];
          if (p.sim == 1) {
            s = s * qs * p.kscale[gc];
          } else if (p.sim == 2) {
            s = (s + s - qs) - p.kscale[gc];
          }
          pass = !(s <= thr);
          if (pass && p.E > 0)
            for (int e = 0; e < p.E; ++e) pass &= p.exclude[gr * p.E + e] != gc;
          if (pass && p.q_lab) pass = p.q_lab[gr] != p.b_lab[gc];
        }
        const unsigned ballot = __ballot_sync(0xffffffffu, pass);
        if (pass) cand[r * kTopkCap + c + __popc(ballot & ((1u << lane) - 1))] = pack_key(s, gc);
        c += __popc(ballot);
      }
      if (c > kTopkCap - BN) {
        __syncwarp();
        const int64_t kth = warp_merge_row<KP>(my_queue_base + gr * KP, cand + r * kTopkCap, c, p.k);
        c = 0;
        if (lane == 0) thrf[r] = kth == kEmptyKey ? __int_as_float(0x7fc00000) : key_score(kth);
      }
      __syncwarp();
      if (lane == 0) cnt[r] = c;
      __syncwarp();
    }
    __syncthreads();
    tiles.advance();
  }
  // flush the remaining candidates
#pragma unroll 1
  for (int rr = 0; rr < ROWS_PER_WARP; ++rr) {
    const int r = warp * ROWS_PER_WARP + rr;
    const int64_t gr = r0 + r;
    if (gr >= p.M) break;
    const int c = cnt[r];
    if (c > 0) warp_merge_row<KP>(my_queue_base + gr * KP, cand + r * kTopkCap, c, p.k);
  }
}

}  // namespace cuda
}  // namespace ck
