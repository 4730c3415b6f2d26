// Device helpers shared by the CUDA kernels: pure CUDA (no torch headers), so that `make
// cuda-check` compiles every kernel with nvcc alone (csrc/cuda/check_kernels.cu).
//
// Score tiles are computed by one of two tile-GEMM engines over operands staged in shared memory:
//   - tensor cores (fp16 / bf16 inputs): mma.sync.m16n8k16 with fp32 accumulators, operands
//     loaded with ldmatrix (A row-major; B as [n][k] for S = Q K^T, or [k][n] with .trans for
//     the P K products), sm_80 and newer;
//   - CUDA cores (fp32 / fp64 inputs): register-tiled FMA in the accumulation type, so fp32
//     inputs get fp32 products (as eager fp32 matmul without TF32) and fp64 stays fp64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#include <string.h>

namespace ck {
namespace cuda {

constexpr int kThreads = 128;  // 4 warps per block, every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kMaxGammas = 4;

__device__ __forceinline__ float neg_inf_f() { return __int_as_float(0xff800000); }
__device__ __forceinline__ double neg_inf_d() { return __longlong_as_double(0xfff0000000000000ULL); }
template <typename A>
__device__ __forceinline__ A neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() { return neg_inf_f(); }
template <>
__device__ __forceinline__ double neg_inf<double>() { return neg_inf_d(); }

__device__ __forceinline__ float ck_exp(float x) { return expf(x); }  // full-precision expf (no fast-math)
__device__ __forceinline__ double ck_exp(double x) { return exp(x); }
// ex2.approx(x log2 e): 2 instructions instead of expf's ~10, relative error ~1e-6 for x in
// [-88, 0]; for the probabilities of fp16/bf16 inputs, far below the inputs' rounding
__device__ __forceinline__ float ck_exp_fast(float x) { return __expf(x); }
__device__ __forceinline__ float ck_log(float x) { return logf(x); }
__device__ __forceinline__ double ck_log(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T zero_of() { return T(0); }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half_rn(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16_rn(0.f); }

// input element -> compute type
template <typename TS, typename TI>
__device__ __forceinline__ TS to_compute(TI x) { return static_cast<TS>(x); }
template <>
__device__ __forceinline__ float to_compute<float, __half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_compute<float, __nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <>
__device__ __forceinline__ __half to_compute<__half, __half>(__half x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 to_compute<__nv_bfloat16, __nv_bfloat16>(__nv_bfloat16 x) { return x; }

// compute/acc value -> the operand type of the second product (P or G tiles)
template <typename TO>
__device__ __forceinline__ TO from_acc(float x) { return static_cast<TO>(x); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename TO>
__device__ __forceinline__ TO from_acc(double x) { return static_cast<TO>(x); }  // fp64 stays fp64

// an accumulation-type value rounded through the input dtype (the dtype a point is returned in)
template <typename TI>
__device__ __forceinline__ TI from_acc_round(float x) { return static_cast<TI>(x); }
template <>
__device__ __forceinline__ __half from_acc_round<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc_round<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename TI>
__device__ __forceinline__ TI from_acc_round(double x) { return static_cast<TI>(x); }

template <typename T>
struct IsTensorCore {
  static constexpr bool value = false;
};
template <>
struct IsTensorCore<__half> {
  static constexpr bool value = true;
};
template <>
struct IsTensorCore<__nv_bfloat16> {
  static constexpr bool value = true;
};

// ---------------------------------------------------------------------------------------------
// tensor-core primitives (sm_80+)
// ---------------------------------------------------------------------------------------------

#ifdef CK_CUDA_EMU
// the emulator (csrc/emu) implements the PTX below with the same register layouts
__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  uint32_t r[4];
  ck_emu::ldmatrix(r, 4, false, p);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* p) {
  uint32_t r[2];
  ck_emu::ldmatrix(r, 2, false, p);
  r0 = r[0], r1 = r[1];
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* p) {
  uint32_t r[2];
  ck_emu::ldmatrix(r, 2, true, p);
  r0 = r[0], r1 = r[1];
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                  const void* p) {
  uint32_t r[4];
  ck_emu::ldmatrix(r, 4, true, p);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  ck_emu::mma_16816<T>(d, a, b0, b1);
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  ck_emu::cp_async_16(dst, src, bytes);
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() { ck_emu::cp_async_wait_all(); }
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x2(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                                  const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
#endif  // CK_CUDA_EMU

// ---------------------------------------------------------------------------------------------
// shared-memory operand staging
// ---------------------------------------------------------------------------------------------

// Row strides (in elements) that keep ldmatrix / the FMA engines free of bank conflicts.
template <typename TS>
__host__ __device__ constexpr int padded_stride(int dp) {
  return sizeof(TS) == 2 ? dp + 8 : dp + (sizeof(TS) == 4 ? 4 : 1);
}

// Visits the elements e = r * width + c (r < rows, c < width) that thread threadIdx.x takes in
// steps of kThreads, as f(r, c): stepped without an integer division per element (a division is
// ~20 instructions, as much as the copy it addresses).
template <typename F>
__device__ __forceinline__ void for_each_strided(int rows, int width, F&& f) {
  const int step_r = kThreads / width, step_c = kThreads - step_r * width;
  int r = threadIdx.x / width, c = threadIdx.x - r * width;
  while (r < rows) {
    f(r, c);
    r += step_r, c += step_c;
    if (c >= width) c -= width, ++r;  // c + step_c < 2 width: one wrap is enough
  }
}

// The number of rows of [row0, row0 + rows) below nrows.
__device__ __forceinline__ int rows_in(int64_t row0, int64_t nrows, int rows) {
  const int64_t avail = nrows - row0;
  return avail >= rows ? rows : (avail > 0 ? static_cast<int>(avail) : 0);
}

// dst[r][0..dp) = src[row0 + r][0..D) converted to TS, zero beyond `rows` valid rows or D.
template <typename TS, typename TI>
__device__ __forceinline__ void stage_rows(TS* dst, int ld, const TI* __restrict__ src, int64_t row0, int64_t nrows,
                                           int64_t D, int rows, int dp) {
  const TI* base = src + row0 * D;  // 64-bit arithmetic once; offsets within the tile fit in 32 bits
  const int valid = rows_in(row0, nrows, rows), Di = static_cast<int>(D);
  for_each_strided(rows, dp, [&](int r, int d) {
    TS v = zero_of<TS>();
    if (r < valid && d < Di) v = to_compute<TS>(base[r * Di + d]);
    dst[r * ld + d] = v;
  });
}

// Which 16-byte chunks of a [rows][dp] tile (source rows of D elements, shared-memory rows of ld)
// this thread copies: where dp / 8 divides kThreads (dp = 16, 32, ..., 1024), one column of
// chunks (rows r0, r0 + step, ..., column d) with its source and destination strides, computed
// once per kernel, not per tile (two integer divisions and 64-bit products, ~50 instructions);
// otherwise (column < 0) every kThreads-th chunk, stepped per tile.
struct AsyncPlan {
  int r0 = 0, step = 0, column = -1, s_step = 0;
  int64_t g_step = 0;
  __device__ __forceinline__ AsyncPlan(int dp, int64_t D, int ld) {
    const int chunks = dp / 8;
    if (kThreads % chunks == 0) {
      step = kThreads / chunks, r0 = threadIdx.x / chunks, column = (threadIdx.x % chunks) * 8;
      g_step = static_cast<int64_t>(step) * D, s_step = step * ld;
    }
  }
};

// Asynchronous variant (cp.async, sm_80+): 16-byte chunks, zero-filled past the valid rows or D.
// Requires TS == TI (2-byte types), D % 8 == 0 and a 16-byte aligned source; ends with a commit.
template <typename T>
__device__ __forceinline__ void stage_rows_async(T* dst, int ld, const T* __restrict__ src, int64_t row0,
                                                 int64_t nrows, int64_t D, int rows, int dp, const AsyncPlan& plan) {
  static_assert(sizeof(T) == 2, "cp.async staging is for 2-byte inputs");
  const T* base = src + row0 * D;
  const int valid = rows_in(row0, nrows, rows), Di = static_cast<int>(D);
  if (plan.column >= 0) {
    const int d = plan.column;
    const T* g = base + static_cast<int64_t>(plan.r0) * D + d;
    T* s = dst + plan.r0 * ld + d;
    if (valid == rows && d < Di) {  // a whole tile (all but a last one): no bounds per chunk
#pragma unroll 4
      for (int r = plan.r0; r < rows; r += plan.step, g += plan.g_step, s += plan.s_step) cp_async_16(s, g, 16);
    } else {
      for (int r = plan.r0; r < rows; r += plan.step, g += plan.g_step, s += plan.s_step) {
        const bool ok = r < valid && d < Di;
        cp_async_16(s, ok ? g : src, ok ? 16 : 0);
      }
    }
  } else {
    for_each_strided(rows, dp / 8, [&](int r, int chunk) {
      const int d = chunk * 8;
      const bool ok = r < valid && d < Di;
      cp_async_16(dst + r * ld + d, ok ? base + (r * Di + d) : src, ok ? 16 : 0);
    });
  }
  cp_async_commit();
}

// The key tiles of a block's column range [c_begin, c_end), BN rows [c0, c0 + BN) at a time, in two
// shared-memory buffers (one may alias the other when prefetching is impossible). With tensor
// cores (TC), rows of a multiple of 8 elements and a 16-byte aligned source, the next tile is
// fetched with cp.async while the current one is consumed; otherwise each tile is staged when it
// is acquired. Per tile c0: Ks = acquire(c0); (per-column work); __syncthreads(); prefetch_next(c0)
// before the products that read Ks; ...; advance() at the end of the iteration.
template <typename TS, typename TI, bool TC>
struct KeyTiles {
  TS* buf[2];
  int ld, BN, dp, cur;
  const TI* src;
  int64_t nrows, D, c_end;
  bool async_ok;
  AsyncPlan plan;

  __device__ __forceinline__ KeyTiles(TS* buf0, TS* buf1, int ld_, const TI* src_, int64_t nrows_, int64_t D_,
                                      int BN_, int dp_, int64_t c_begin, int64_t c_end_)
      : buf{buf0, buf1}, ld(ld_), BN(BN_), dp(dp_), cur(0), src(src_), nrows(nrows_), D(D_), c_end(c_end_),
        async_ok(false), plan(dp_, D_, ld_) {
    if constexpr (TC) {
      async_ok = (D % 8 == 0) && ((reinterpret_cast<uintptr_t>(src) & 15) == 0);
      if (async_ok && c_begin < c_end) stage_async(0, c_begin);
    }
  }
  // the tile of rows [c0, c0 + BN), visible to the block after the next __syncthreads
  __device__ __forceinline__ TS* acquire(int64_t c0) {
    if (async_ok) {
      cp_async_wait_all();
    } else {
      stage_rows<TS, TI>(buffer(cur), ld, src, c0, nrows, D, BN, dp);
    }
    return buffer(cur);
  }
  // starts fetching the tile after c0 into the other buffer (no-op without cp.async)
  __device__ __forceinline__ void prefetch_next(int64_t c0) {
    if (async_ok && c0 + BN < c_end) stage_async(cur ^ 1, c0 + BN);
  }
  __device__ __forceinline__ void advance() { cur ^= 1; }

 private:
  // a select, not buf[i]: a dynamically indexed member array would live in local memory
  __device__ __forceinline__ TS* buffer(int i) const { return i ? buf[1] : buf[0]; }
  __device__ __forceinline__ void stage_async(int b, int64_t c0) {
    if constexpr (TC)
      stage_rows_async<TS>(buffer(b), ld, reinterpret_cast<const TS*>(src), c0, nrows, D, BN, dp, plan);
  }
};

// ---------------------------------------------------------------------------------------------
// tile products. Warp w of the block takes the 16-row m-tile (w % MT) and every (kWarps/MT)-th
// n8-tile from (w / MT): all 4 warps busy for BM = 16, 32, 64.
// ---------------------------------------------------------------------------------------------

// S[BM][BN] (ldS) = A[BM][dp] (ldA) . B[BN][dp]^T (ldB), tensor cores.
template <typename T, int BM, int BN>
__device__ __forceinline__ void tile_abt_mma(const T* A, int ldA, const T* B, int ldB, int dp, float* S, int ldS) {
  constexpr int MT = BM / 16, NT = BN / 8, WN = kWarps / MT, PER = NT / WN;
  static_assert(NT % WN == 0, "tile shape");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int mt = warp % MT, n_first = warp / MT;
  float acc[PER][4];
#pragma unroll
  for (int p = 0; p < PER; ++p) acc[p][0] = acc[p][1] = acc[p][2] = acc[p][3] = 0.f;
  for (int k0 = 0; k0 < dp; k0 += 16) {
    uint32_t a[4];
    ldmatrix_x4(a[0], a[1], a[2], a[3], A + (mt * 16 + (lane & 15)) * ldA + k0 + (lane >> 4) * 8);
#pragma unroll
    for (int p = 0; p < PER; ++p) {
      const int n0 = (n_first + p * WN) * 8;
      // lanes 0-7 address rows n0.. at k0 (b0), lanes 8-15 rows n0.. at k0+8 (b1)
      uint32_t b0, b1;
      ldmatrix_x2(b0, b1, B + (n0 + (lane & 7)) * ldB + k0 + ((lane >> 3) & 1) * 8);
      mma_16816<T>(acc[p], a, b0, b1);
    }
  }
  const int r = mt * 16 + (lane >> 2), c = (lane & 3) * 2;
#pragma unroll
  for (int p = 0; p < PER; ++p) {
    const int n0 = (n_first + p * WN) * 8;
    S[r * ldS + n0 + c] = acc[p][0];
    S[r * ldS + n0 + c + 1] = acc[p][1];
    S[(r + 8) * ldS + n0 + c] = acc[p][2];
    S[(r + 8) * ldS + n0 + c + 1] = acc[p][3];
  }
}

// S[BM][BN] = A . B^T on CUDA cores in TA (float or double); thread grid 8 rows x 16 columns.
template <typename TA, typename TS, int BM, int BN>
__device__ __forceinline__ void tile_abt_simt(const TS* A, int ldA, const TS* B, int ldB, int dp, TA* S, int ldS) {
  constexpr int RI = BM / 8, CJ = BN / 16;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  TA acc[RI][CJ];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < CJ; ++j) acc[i][j] = TA(0);
  for (int k = 0; k < dp; ++k) {
    TA a[RI], b[CJ];
#pragma unroll
    for (int i = 0; i < RI; ++i) a[i] = static_cast<TA>(A[(ty + 8 * i) * ldA + k]);
#pragma unroll
    for (int j = 0; j < CJ; ++j) b[j] = static_cast<TA>(B[(tx + 16 * j) * ldB + k]);
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < CJ; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
  }
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < CJ; ++j) S[(ty + 8 * i) * ldS + tx + 16 * j] = acc[i][j];
}

// S = A . B^T on tensor cores (TC: 2-byte operands, fp32 S) or on CUDA cores in TA.
template <bool TC, typename TA, typename TS, int BM, int BN>
__device__ __forceinline__ void tile_abt(const TS* A, int ldA, const TS* B, int ldB, int dp, TA* S, int ldS) {
  if constexpr (TC) {
    tile_abt_mma<TS, BM, BN>(A, ldA, B, ldB, dp, S, ldS);
  } else {
    tile_abt_simt<TA, TS, BM, BN>(A, ldA, B, ldB, dp, S, ldS);
  }
}

// ---------------------------------------------------------------------------------------------
// warp-level tiles: a warp's 16 rows kept in registers in the mma.m16n8k16 accumulator layout
// ---------------------------------------------------------------------------------------------

// acc[j][2h + e] = Q[r + 8h] . K[8j + 2c + e] for lane = 4r + c (the mma.m16n8k16 accumulator
// layout) over a warp's 16 staged rows Q and a staged tile of 8 NT rows K ([row][dp], stride
// ld, zero-padded to dp). Tensor cores for 2-byte inputs; fp32 FMAs in increasing d otherwise.
template <bool TC, typename TS, int NT>
__device__ __forceinline__ void warp_scores(const TS* Q, const TS* K, int ld, int dp, float (&acc)[NT][4]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  if constexpr (TC) {
    for (int k0 = 0; k0 < dp; k0 += 16) {
      uint32_t a[4];
      ldmatrix_x4(a[0], a[1], a[2], a[3], Q + (lane & 15) * ld + k0 + (lane >> 4) * 8);
#pragma unroll
      for (int j = 0; j < NT; j += 2) {
        // two n8 groups per load: lanes 0-7 address bank rows 8j.. at k0 (b0 of group j), 8-15
        // the same rows at k0 + 8 (b1), 16-31 rows 8j + 8.. likewise (group j + 1)
        uint32_t b[4];
        ldmatrix_x4(b[0], b[1], b[2], b[3],
                    K + (8 * j + (lane & 7) + ((lane >> 4) & 1) * 8) * ld + k0 + ((lane >> 3) & 1) * 8);
        mma_16816<TS>(acc[j], a, b[0], b[1]);
        mma_16816<TS>(acc[j + 1], a, b[2], b[3]);
      }
    }
  } else {
    const int r = lane >> 2, c = 2 * (lane & 3);
    for (int d = 0; d < dp; d += 4) {  // dp % 16 == 0 and ld % 4 == 0: 16-byte loads
      const float4 a0 = *reinterpret_cast<const float4*>(Q + r * ld + d);
      const float4 a1 = *reinterpret_cast<const float4*>(Q + (r + 8) * ld + d);
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float4 b = *reinterpret_cast<const float4*>(K + (8 * j + c + e) * ld + d);
          float s0 = acc[j][e], s1 = acc[j][2 + e];
          s0 = fma(a0.x, b.x, s0), s1 = fma(a1.x, b.x, s1);
          s0 = fma(a0.y, b.y, s0), s1 = fma(a1.y, b.y, s1);
          s0 = fma(a0.z, b.z, s0), s1 = fma(a1.z, b.z, s1);
          s0 = fma(a0.w, b.w, s0), s1 = fma(a1.w, b.w, s1);
          acc[j][e] = s0, acc[j][2 + e] = s1;
        }
      }
    }
  }
}

// Two values rounded to T and packed in one 32-bit mma operand register (the lower k first).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  const T a = from_acc<T>(lo), b = from_acc<T>(hi);
  uint16_t ua, ub;
  memcpy(&ua, &a, 2);
  memcpy(&ub, &b, 2);
  return static_cast<uint32_t>(ua) | (static_cast<uint32_t>(ub) << 16);
}

// O[t][2h + e] += sum_n P[r + 8h][n] K[n][8t + 2c + e] (lane = 4r + c) over a staged tile of 8 NT
// rows K ([n][dp], stride ld) and the d-tiles t < dp / 8 (at most DT): P is a tile of scores in
// the accumulator layout of warp_scores, rounded to T and used as the A operand straight from the
// registers (the accumulator of two n8 groups is the A fragment of one k16 step, as in
// flash-attention), K as the B operand through ldmatrix.trans.
template <typename T, int NT, int DT>
__device__ __forceinline__ void warp_pk(const float (&P)[NT][4], const T* K, int ld, int dp, float (&O)[DT][4]) {
  static_assert(NT % 2 == 0 && DT % 2 == 0, "k16 steps, pairs of d-tiles");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    const uint32_t a[4] = {pack2<T>(P[2 * kk][0], P[2 * kk][1]), pack2<T>(P[2 * kk][2], P[2 * kk][3]),
                           pack2<T>(P[2 * kk + 1][0], P[2 * kk + 1][1]), pack2<T>(P[2 * kk + 1][2], P[2 * kk + 1][3])};
#pragma unroll
    for (int t = 0; t < DT; t += 2) {
      if (8 * t < dp) {  // dp % 16 == 0: d-tiles come in pairs
        // lanes 0-7 address bank rows 16kk.. at d-tile t (b0), 8-15 rows 16kk + 8.. (b1), 16-31
        // the same rows at d-tile t + 1
        uint32_t b[4];
        ldmatrix_x4_trans(b[0], b[1], b[2], b[3],
                          K + (16 * kk + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + 8 * t + ((lane >> 4) & 1) * 8);
        mma_16816<T>(O[t], a, b[0], b[1]);
        mma_16816<T>(O[t + 1], a, b[2], b[3]);
      }
    }
  }
}

// Acc[BM][dp] (ldC, fp32) = Acc * scale[row] (if scale) + P[BM][BN] (ldP) . K[BN][dp] (ldK),
// tensor cores; n8-tiles processed 8 at a time to bound registers.
template <typename T, int BM, int BN>
__device__ __forceinline__ void tile_ab_mma(const T* P, int ldP, const T* K, int ldK, int dp, float* C, int ldC,
                                            const float* scale) {
  constexpr int MT = BM / 16, WN = kWarps / MT, GROUP = 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int mt = warp % MT, n_first = warp / MT;
  const int NT = dp / 8;
  uint32_t a[BN / 16][4];
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk)
    ldmatrix_x4(a[kk][0], a[kk][1], a[kk][2], a[kk][3], P + (mt * 16 + (lane & 15)) * ldP + kk * 16 + (lane >> 4) * 8);
  const int r = mt * 16 + (lane >> 2), c = (lane & 3) * 2;
  const float s0 = scale ? scale[r] : 1.f, s1 = scale ? scale[r + 8] : 1.f;
  for (int g0 = n_first; g0 < NT; g0 += WN * GROUP) {
    float acc[GROUP][4];
#pragma unroll
    for (int p = 0; p < GROUP; ++p) acc[p][0] = acc[p][1] = acc[p][2] = acc[p][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int p = 0; p < GROUP; ++p) {
        const int nt = g0 + p * WN;
        if (nt < NT) {
          uint32_t b0, b1;
          // [k][n] storage, transposed: lanes 0-7 rows k0.. (b0), lanes 8-15 rows k0+8.. (b1)
          ldmatrix_x2_trans(b0, b1, K + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ldK + nt * 8);
          mma_16816<T>(acc[p], a[kk], b0, b1);
        }
      }
    }
#pragma unroll
    for (int p = 0; p < GROUP; ++p) {
      const int nt = g0 + p * WN;
      if (nt < NT) {
        float* c0 = C + r * ldC + nt * 8 + c;
        float* c1 = C + (r + 8) * ldC + nt * 8 + c;
        c0[0] = fmaf(c0[0], s0, acc[p][0]);
        c0[1] = fmaf(c0[1], s0, acc[p][1]);
        c1[0] = fmaf(c1[0], s1, acc[p][2]);
        c1[1] = fmaf(c1[1], s1, acc[p][3]);
      }
    }
  }
}

// Acc[BM][dp] = Acc * scale[row] + P[BM][BN] . K[BN][dp] on CUDA cores; columns in chunks of 64.
template <typename TA, typename TS, int BM, int BN>
__device__ __forceinline__ void tile_ab_simt(const TA* P, int ldP, const TS* K, int ldK, int dp, TA* C, int ldC,
                                             const TA* scale) {
  constexpr int RI = BM / 8, CJ = 4;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  for (int c0 = 0; c0 < dp; c0 += 16 * CJ) {
    TA acc[RI][CJ];
#pragma unroll
    for (int i = 0; i < RI; ++i)
#pragma unroll
      for (int j = 0; j < CJ; ++j) acc[i][j] = TA(0);
    for (int k = 0; k < BN; ++k) {
      TA p[RI], b[CJ];
#pragma unroll
      for (int i = 0; i < RI; ++i) p[i] = P[(ty + 8 * i) * ldP + k];
#pragma unroll
      for (int j = 0; j < CJ; ++j) {
        const int col = c0 + tx + 16 * j;
        b[j] = col < dp ? static_cast<TA>(K[k * ldK + col]) : TA(0);
      }
#pragma unroll
      for (int i = 0; i < RI; ++i)
#pragma unroll
        for (int j = 0; j < CJ; ++j) acc[i][j] = fma(p[i], b[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < RI; ++i) {
      const int row = ty + 8 * i;
      const TA s = scale ? scale[row] : TA(1);
#pragma unroll
      for (int j = 0; j < CJ; ++j) {
        const int col = c0 + tx + 16 * j;
        if (col < dp) C[row * ldC + col] = fma(C[row * ldC + col], s, acc[i][j]);
      }
    }
  }
}

}  // namespace cuda
}  // namespace ck
