// Host-side helpers of the CUDA glue (torch + CUDA runtime): dtype mapping, device limits.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#ifdef CK_CUDA_EMU
// the emulator build (csrc/emu) runs this glue on host tensors, registered in its own namespace
#define CK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(contrastive_kernels_cuda_emu, CPU, m)
#else
#define CK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(contrastive_kernels, CUDA, m)
#endif

namespace ck {
namespace cuda {

// the tensors the kernels may read: CUDA tensors (host tensors in the emulator build)
inline bool on_kernel_device(const at::Tensor& t) {
#ifdef CK_CUDA_EMU
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

// Calls f with a value of the kernel input type of `t` (__half, __nv_bfloat16, float, double).
template <typename F>
void dispatch_input(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    default: TORCH_CHECK(false, op, ": unsupported dtype ", t);
  }
}

inline int device_max_smem() {
  int dev = 0, v = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return v;
}

inline int device_sms() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Column splits (each >= min_cols and a whole number of bn-column tiles) for a grid of row_blocks x
// splits x slices blocks that fills the GPU's block slots (blocks_per_sm per SM) in whole waves:
// the fewest splits within 2 % of the best fill, at most 4 per wave's worth of row blocks. Each
// split costs a warm-up (staging, a top-k queue) and one more partial result per row to merge.
inline void plan_splits(int64_t row_blocks, int64_t slices, int64_t cols, int bn, int blocks_per_sm,
                        int64_t min_cols, int64_t& splits, int64_t& per_split) {
  const int64_t blocks_per_split = std::max<int64_t>(1, row_blocks * slices);
  const int64_t slots = int64_t(std::max(blocks_per_sm, 1)) * device_sms();
  const int64_t most = std::max<int64_t>(
      1, std::min(cols / std::max<int64_t>(min_cols, bn), 4 * ((slots + blocks_per_split - 1) / blocks_per_split)));
  auto fill = [&](int64_t s) {  // the busy share of the block slots over the waves of s splits
    const int64_t blocks = blocks_per_split * s, waves = (blocks + slots - 1) / slots;
    return double(blocks) / double(waves * slots);
  };
  double best = 0.0;
  for (int64_t s = 1; s <= most; ++s) best = std::max(best, fill(s));
  splits = 1;
  while (splits < most && fill(splits) < 0.98 * best) ++splits;
  per_split = std::max<int64_t>(bn, ((cols + splits - 1) / splits + bn - 1) / bn * bn);  // (no column: one empty split)
  splits = std::max<int64_t>(1, (cols + per_split - 1) / per_split);
}

// blocks_per_sm's answer (an occupancy query of launch.h), checked
inline int checked_blocks_per_sm(cudaError_t err, int blocks, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " (CUDA): occupancy query failed: ", cudaGetErrorString(err));
  TORCH_CHECK(blocks > 0, what, " (CUDA): the kernel does not fit on an SM (registers or shared memory)");
  return blocks;
}

}  // namespace cuda
}  // namespace ck
