// The schemas of the contrastive_kernels ops in the emulator's own namespace,
// torch.ops.contrastive_kernels_cuda_emu, whose CPU kernels are the CUDA glue and kernels of
// csrc/cuda run by the emulator (see ck_emu.h; tests/_cuda_emu.py), and a self-test op whose
// small faulty kernels show that the emulator reports what it claims to check.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../ops_schema.h"
#include "ck_emu.h"
#include "../cuda/glue.h"

// (in ck::cuda, where the kernels' `extern __shared__ smem[]` lives)
namespace ck {
namespace cuda {

struct Probe {
  int which = 0;
};

// 0: lanes of warp 0 at two different collectives; 1: a lane at __syncthreads while the rest of
// its warp waits at __syncwarp (a deadlock); 2: ldmatrix from a misaligned shared address;
// 3: a shuffle by a warp whose other lanes returned; 4: correct code (butterfly sums, ballot);
// races that the forward schedule (thread 0 first) hides and the others show: 5: a thread reads
// what the thread before it wrote, with no barrier between; 6: a thread reads its cp.async copy
// before waiting for it; 7: a thread returns without waiting for its cp.async copy
alignas(16) const int kProbeSource[4] = {7, 7, 7, 7};

__global__ void probe_kernel(Probe p) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  int* words = reinterpret_cast<int*>(smem);
  if (p.which == 0 && warp == 0) {
    if (lane < 16) (void)__shfl_xor_sync(0xffffffffu, lane, 1);
    else (void)__ballot_sync(0xffffffffu, 1);
  } else if (p.which == 1 && warp == 0) {
    if (lane == 0) __syncthreads();
    else __syncwarp();
  } else if (p.which == 2) {
    uint32_t r[2];
    ck_emu::ldmatrix(r, 2, false, smem + 2);
  } else if (p.which == 3 && warp == 0) {
    if (lane == 5) return;
    (void)__shfl_sync(0xffffffffu, lane, 0);
  } else if (p.which == 4) {
    int v = lane;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const unsigned odd = __ballot_sync(0xffffffffu, lane & 1);
    reinterpret_cast<int*>(smem)[threadIdx.x] = v == 496 && odd == 0xaaaaaaaau ? 1 : 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      int ok = 0;
      for (int t = 0; t < 128; ++t) ok += reinterpret_cast<int*>(smem)[t];
      if (ok != 128) ck_emu::fail("self-test: wrong shuffle or ballot results");
    }
  } else if (p.which == 5) {
    words[threadIdx.x] = 1;
    if (threadIdx.x > 0 && words[threadIdx.x - 1] != 1) ck_emu::fail("self-test: read shared memory no thread wrote yet");
    __syncthreads();
  } else if (p.which == 6 || p.which == 7) {
    ck_emu::cp_async_16(words + 4 * threadIdx.x, kProbeSource, 16);
    if (p.which == 6) {
      if (words[4 * threadIdx.x] != 7) ck_emu::fail("self-test: read a cp.async copy that had not landed");
      ck_emu::cp_async_wait_all();
    }
  }
}

}  // namespace cuda
}  // namespace ck

namespace {

// Runs case `which` (see probe_kernel) on 2 blocks of 128 threads; `smem_bytes` of dynamic
// shared memory without the opt-in attribute (over 48 KiB must fail to launch).
int64_t emulator_probe(int64_t which, int64_t smem_bytes) {
  auto kernel = ck::cuda::probe_kernel;
  CK_LAUNCH(kernel, dim3(2), dim3(128), static_cast<size_t>(smem_bytes), nullptr)(ck::cuda::Probe{static_cast<int>(which)});
  return static_cast<int64_t>(cudaGetLastError());
}

// The glue's grid planning (glue.h, plan_splits) on the emulated H100 (132 SMs): (splits, per_split).
std::tuple<int64_t, int64_t> emulator_plan_splits(int64_t row_blocks, int64_t slices, int64_t cols, int64_t bn,
                                                  int64_t blocks_per_sm, int64_t min_cols) {
  int64_t splits = 0, per_split = 0;
  ck::cuda::plan_splits(row_blocks, slices, cols, static_cast<int>(bn), static_cast<int>(blocks_per_sm), min_cols,
                        splits, per_split);
  return {splits, per_split};
}

}  // namespace

TORCH_LIBRARY(contrastive_kernels_cuda_emu, m) {
  ck::define_ops(m);
  m.def("emulator_probe(int which, int smem_bytes) -> int", &emulator_probe);
  m.def("emulator_plan_splits(int row_blocks, int slices, int cols, int bn, int blocks_per_sm, int min_cols) -> (int, int)",
        &emulator_plan_splits);
}
