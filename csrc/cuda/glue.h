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

// Column splits so that row tiles x splits fill the GPU about twice, each split >= min_cols.
inline void plan_splits(int64_t rows, int64_t cols, int bm, int bn, int64_t min_cols, int64_t& splits,
                        int64_t& per_split) {
  const int64_t row_blocks = (rows + bm - 1) / bm;
  int64_t want = (2 * device_sms() + row_blocks - 1) / std::max<int64_t>(row_blocks, 1);
  const int64_t most = std::max<int64_t>(1, cols / std::max<int64_t>(min_cols, bn));
  splits = std::max<int64_t>(1, std::min(want, most));
  per_split = (cols + splits - 1) / splits;
  per_split = std::max<int64_t>(bn, (per_split + bn - 1) / bn * bn);
  splits = std::max<int64_t>(1, (cols + per_split - 1) / per_split);
}

template <typename K>
void set_smem(K kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace ck
