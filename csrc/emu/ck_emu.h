// A CUDA execution emulator for the kernels of csrc/cuda on the host (tests only, no GPU).
//
// The CUDA sources are compiled unchanged as C++ with -DCK_CUDA_EMU and csrc/emu first on the
// include path, so that <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and the two torch CUDA
// headers of the glue resolve to the shims next to this file. A launch runs every block of the
// grid in turn; the block's threads are cooperative fibers (ucontext) on one host thread, switched
// only at synchronization points, so the order of events is deterministic.
//
// Races: the order in which a block's threads run between two synchronization points is set by
// CK_EMU_SCHEDULE: "shuffle" (the default: a fresh permutation each round, seeded by CK_EMU_SEED,
// the block index and the round), "reverse" or "forward" (thread 0 first). Likewise each cp.async
// lands at its issue or at the issuing thread's wait (shuffle: drawn per copy; reverse: at the
// wait; forward: at the issue). A missing __syncthreads, __syncwarp or cp.async wait then shows as
// a result that differs from the reference (shared memory starts as NaN bytes), not only on the
// hardware. A race-free kernel gives the same bits under every schedule.
//
// Emulated: threadIdx/blockIdx/blockDim/gridDim; dynamic shared memory (one buffer, filled with
// 0xff bytes before each block, so that reading what no thread wrote gives NaN or -1, not zero);
// __syncthreads (threads that returned count as arrived, as on the hardware); the full-mask warp
// collectives __shfl_sync, __shfl_xor_sync, __ballot_sync, __syncwarp; the PTX of
// device_common.cuh: ldmatrix(.x2/.x4, .trans) and mma.sync.m16n8k16 (f16/bf16 -> f32) with
// their register-fragment layouts from the PTX ISA, and cp.async (zero-filled past the source
// size; cp.async.wait_group 0 completes a thread's copies); the opt-in shared-memory limit
// (cudaFuncSetAttribute), the occupancy calculator (shared memory and threads, not registers) and
// an H100's device properties (132 SMs, 227 KiB of shared memory per block).
//
// Checked, each an error naming the block and thread: a deadlock (no thread can make progress:
// lanes of a warp at different collectives, a __syncthreads that some threads never reach), a
// warp collective with a partial mask or with lanes that already returned, ldmatrix/cp.async
// addresses outside shared memory or not 16-byte aligned, a launch with more dynamic shared
// memory than allowed, a thread that returns with cp.async copies it never waited for. Not
// emulated: timing, the memory model beyond the orders above (a thread's plain stores are seen by
// the others at once), streams (everything is synchronous).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

// ---- CUDA keywords --------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

using std::exp;  // the float overloads, as device code has them unqualified
using std::fma;

struct uint3 {
  unsigned x, y, z;
};
struct __attribute__((aligned(16))) float4 {
  float x, y, z, w;
};
struct __attribute__((aligned(16))) longlong2 {
  long long x, y;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// ---- runtime API subset -----------------------------------------------------------------------
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

namespace ck_emu {

constexpr int kSms = 132;                      // H100 SXM
constexpr size_t kSmemDefault = 48 * 1024;     // without the opt-in attribute
constexpr size_t kSmemOptin = 227 * 1024;      // cudaDevAttrMaxSharedMemoryPerBlockOptin
constexpr size_t kSmemPerSm = 228 * 1024;      // cudaDevAttrMaxSharedMemoryPerMultiprocessor
constexpr size_t kStackBytes = 256 * 1024;     // per emulated thread

[[noreturn]] void fail(const std::string& what);

// Context switching: a few instructions of x86-64 assembly (swapcontext's signal-mask system call
// would cost 10x more than the emulated work between two switches), ucontext elsewhere.
#if defined(__x86_64__) && defined(__linux__)
#define CK_EMU_FAST_SWITCH 1
#endif

struct Context {
#ifdef CK_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t uc;
#endif
};

// a cp.async whose 16 bytes have not landed in shared memory yet
struct PendingCopy {
  unsigned char* dst;
  unsigned char bytes[16];
};

enum class Schedule { kForward, kReverse, kShuffle };

struct Fiber {
  Context ctx;
  std::vector<PendingCopy> pending;
  uint3 tid{0, 0, 0};
  int linear = 0;
  enum State { kReady, kAtBlockBarrier, kAtWarpCollective, kDone } state = kReady;
  uint64_t wait_gen = 0;
  const char* where = "";
};

// deposit / result slots of one warp collective, double-buffered by the collective's parity: a
// lane reads the result of collective n while faster lanes deposit for n+1 (n+2 cannot complete
// before every lane arrived at n+1, i.e. read its result of n)
struct Warp {
  int alive = 32, arrived = 0;
  uint64_t gen = 0;
  const char* kind = nullptr;
  uint64_t in[2][32][10];
  uint64_t out[2][32][4];
};

struct Block {
  uint3 bidx{0, 0, 0};
  dim3 grid, block;
  int nthreads = 0, alive = 0;
  int bar_arrived = 0;
  uint64_t bar_gen = 0;
  uint64_t rng = 0;  // the block's schedule draws (splitmix64 state)
  std::vector<Fiber> fibers;
  std::vector<int> order;  // the threads in the order of the current round
  std::vector<Warp> warps;
  void (*body)(const void*) = nullptr;
  const void* args = nullptr;
  std::string error;
};

struct State {
  Context scheduler;
  Block* block = nullptr;
  Fiber* fiber = nullptr;
  std::vector<char> stacks;
  size_t smem_bytes = 0;  // dynamic shared memory of the current launch (ck::cuda::smem)
  Schedule schedule = Schedule::kShuffle;
  uint64_t seed = 0;
  std::map<const void*, int> smem_optin;
  cudaError_t last_error = cudaSuccess;
};
State& state();

inline Block& block() { return *state().block; }
inline Fiber& fiber() { return *state().fiber; }

std::string who();
void yield_to_scheduler();
void syncthreads();
void run(void (*body)(const void*), const void* args, dim3 grid, dim3 block_dim, size_t smem_bytes);

// One full-mask collective of the calling lane's warp. `deposit` writes the lane's inputs into
// in[lane]; the last lane to arrive runs `compute(in, out)` for all 32 lanes; each lane then
// reads out[lane] with `collect`.
template <typename Deposit, typename Compute, typename Collect>
inline void warp_collective(const char* kind, unsigned mask, Deposit&& deposit, Compute&& compute,
                            Collect&& collect) {
  Block& b = block();
  Fiber& f = fiber();
  const int lane = f.linear & 31;
  Warp& w = b.warps[f.linear >> 5];
  if (mask != 0xffffffffu) fail(std::string(kind) + " with a partial mask (only full-warp masks are emulated)");
  if (w.alive != 32) fail(std::string(kind) + " in a warp whose other lanes already returned");
  if (w.arrived == 0) {
    w.kind = kind;
  } else if (std::strcmp(w.kind, kind) != 0) {
    fail(std::string("lanes of one warp at different collectives: ") + kind + " and " + w.kind);
  }
  const int par = static_cast<int>(w.gen & 1);
  deposit(w.in[par][lane]);
  if (++w.arrived == 32) {
    compute(w.in[par], w.out[par]);
    w.arrived = 0;
    ++w.gen;
  } else {
    f.state = Fiber::kAtWarpCollective;
    f.wait_gen = w.gen;
    f.where = kind;
    yield_to_scheduler();
  }
  collect(w.out[par][lane]);
}

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "at most 64-bit values");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// shared-memory operand checks of ldmatrix / cp.async
const unsigned char* smem_ptr(const void* p, size_t bytes, const char* what);

void ldmatrix(uint32_t* r, int nmat, bool trans, const void* p);
template <typename T>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void cp_async_16(void* dst, const void* src, int src_bytes);
void cp_async_wait_all();

// the dynamic shared memory a kernel may launch with (48 KiB unless opted in)
template <typename P>
size_t smem_allowed(void (*kernel)(P)) {
  auto found = state().smem_optin.find(reinterpret_cast<const void*>(kernel));
  return found == state().smem_optin.end() ? kSmemDefault : static_cast<size_t>(found->second);
}

template <typename P>
struct Launcher {
  void (*kernel)(P);
  dim3 grid, block_dim;
  size_t smem;
  static void body(const void* args) {
    const auto* self = static_cast<const std::pair<void (*)(P), const P*>*>(args);
    self->first(*self->second);
  }
  void operator()(const P& p) const {
    if (smem > smem_allowed(kernel) || smem > kSmemOptin) {
      state().last_error = cudaErrorInvalidValue;
      return;
    }
    if (grid.y > 65535 || grid.z > 65535 || block_dim.x * block_dim.y * block_dim.z > 1024) {
      state().last_error = cudaErrorInvalidConfiguration;
      return;
    }
    const std::pair<void (*)(P), const P*> args{kernel, &p};
    run(&body, &args, grid, block_dim, smem);
  }
};

template <typename P>
inline Launcher<P> launcher(void (*kernel)(P), dim3 grid, dim3 block_dim, size_t smem) {
  return Launcher<P>{kernel, grid, block_dim, smem};
}

}  // namespace ck_emu

#define threadIdx (::ck_emu::fiber().tid)
#define blockIdx (::ck_emu::block().bidx)
#define blockDim (::ck_emu::block().block)
#define gridDim (::ck_emu::block().grid)

// the kernels' `extern __shared__ unsigned char smem[]` (one buffer: blocks run one at a time)
namespace ck {
namespace cuda {
extern unsigned char smem[];
}  // namespace cuda
}  // namespace ck

inline void __syncthreads() { ck_emu::syncthreads(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ck_emu::warp_collective("__syncwarp", mask, [](uint64_t*) {}, [](uint64_t (*)[10], uint64_t (*)[4]) {},
                          [](const uint64_t*) {});
}

namespace ck_emu {
// __shfl_sync (source lane `arg`) and __shfl_xor_sync (source lane = own lane ^ `arg`)
template <typename T>
inline T shuffle(const char* kind, unsigned mask, T v, int arg, bool by_xor, int width) {
  if (width != 32) fail(std::string(kind) + " with width != 32 is not emulated");
  T r{};
  warp_collective(
      kind, mask,
      [&](uint64_t* in) {
        in[0] = to_bits(v);
        in[1] = static_cast<uint64_t>(arg & 31);
        in[2] = by_xor;
      },
      [](uint64_t (*in)[10], uint64_t (*out)[4]) {
        for (int l = 0; l < 32; ++l) {
          const int a = static_cast<int>(in[l][1]);
          out[l][0] = in[in[l][2] ? (l ^ a) : a][0];
        }
      },
      [&](const uint64_t* out) { r = from_bits<T>(out[0]); });
  return r;
}
}  // namespace ck_emu

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return ck_emu::shuffle("__shfl_sync", mask, v, src, false, width);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ck_emu::shuffle("__shfl_xor_sync", mask, v, lane_mask, true, width);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  unsigned r = 0;
  ck_emu::warp_collective(
      "__ballot_sync", mask, [&](uint64_t* in) { in[0] = pred ? 1u : 0u; },
      [](uint64_t (*in)[10], uint64_t (*out)[4]) {
        uint64_t bits = 0;
        for (int l = 0; l < 32; ++l) bits |= in[l][0] << l;
        for (int l = 0; l < 32; ++l) out[l][0] = bits;
      },
      [&](const uint64_t* out) { r = static_cast<unsigned>(out[0]); });
  return r;
}

// ---- intrinsics -------------------------------------------------------------------------------
inline float __int_as_float(int x) { return ck_emu::from_bits<float>(static_cast<uint32_t>(x)); }
inline int __float_as_int(float x) { return static_cast<int>(ck_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return ck_emu::from_bits<double>(static_cast<uint64_t>(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline float __expf(float x) { return std::exp(x); }  // the approximation is not emulated
// round-to-nearest single operations (the build uses -ffp-contract=off, so none is fused)
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// ---- runtime API ------------------------------------------------------------------------------
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
  }
  return "unknown error (emulated)";
}
inline cudaError_t cudaGetLastError() {
  const cudaError_t e = ck_emu::state().last_error;
  ck_emu::state().last_error = cudaSuccess;
  return e;
}
inline cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *v = static_cast<int>(ck_emu::kSmemOptin);
  else if (attr == cudaDevAttrMultiProcessorCount) *v = ck_emu::kSms;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
// An H100's limits per SM (2048 threads, 228 KiB of shared memory, 1 KiB of it reserved per
// block); registers are not modelled (the kernels' __launch_bounds__ keep them off the limit).
template <typename P>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, void (*kernel)(P), int block_size,
                                                                 size_t smem) {
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  const size_t by_smem = smem > ck_emu::smem_allowed(kernel) ? 0 : ck_emu::kSmemPerSm / (smem + 1024);
  *blocks = static_cast<int>(std::min<size_t>(by_smem, 2048 / block_size));
  return cudaSuccess;
}
template <typename P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > ck_emu::kSmemOptin)
    return cudaErrorInvalidValue;
  ck_emu::state().smem_optin[reinterpret_cast<const void*>(kernel)] = value;
  return cudaSuccess;
}

// `kernel<<<grid, block, smem, stream>>>(args)` of the CUDA build (launch_impl.cuh)
#define CK_LAUNCH(kernel, grid, block, smem, stream) ::ck_emu::launcher(kernel, dim3(grid), dim3(block), smem)
