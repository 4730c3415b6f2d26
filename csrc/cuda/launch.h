// Host launchers of the CUDA kernels, one explicit instantiation per input dtype in
// kernels_{f16,bf16,f32,f64}.cu (so the heavy device code compiles in parallel, one file per
// dtype, like flash-attention's per-configuration units). These units include no torch header:
// `make cuda-check` compiles exactly them for sm_80 and sm_90a. The torch glue (infonce.cu,
// topk.cu, mixing.cu) plans, allocates and calls these.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

#include "infonce_kernels.cuh"
#include "mixing_kernels.cuh"
#include "topk_kernels.cuh"

namespace ck {
namespace cuda {

enum MixKernel : int { kMixVectors = 0, kMixedDots = 1, kMixedDotsBwd = 2, kMixedLse = 3 };

template <typename TI>
size_t lse_smem_bytes(int bm, int dp, int nslots);
// bm in {64, 32, 16}; grid = (ceil(R / bm), splits)
template <typename TI>
cudaError_t launch_lse(const LseTileParams<typename LseTypes<TI>::TA>& p, bool bwd, int bm, int64_t splits,
                       size_t smem, cudaStream_t stream);

// the warp kernels (lse_warp_kernel; mode: LseWarpMode): fp16 / bf16, one gamma, no labels, at
// most kWarpMaxE exclusions; grid = (ceil(R / 64), splits, lse_warp_slices(mode, dp))
template <typename TI>
size_t lse_warp_smem_bytes(int dp);
template <typename TI>
cudaError_t launch_lse_warp(const LseTileParams<typename LseTypes<TI>::TA>& p, int mode, int64_t splits, size_t smem,
                            cudaStream_t stream);

template <typename TI>
size_t topk_smem_bytes(int dp);
// kp in {32, 64, ..., 1024}; grid = (ceil(M / kTopkBM), splits)
template <typename TI>
cudaError_t launch_topk(const TopkParams& p, int kp, int64_t splits, size_t smem, cudaStream_t stream);

template <typename TI>
cudaError_t launch_mix(const MixParams& p, int which, cudaStream_t stream);

// The blocks of a kernel configuration that one SM runs at once with `smem` bytes of dynamic shared
// memory (the occupancy calculator: registers, shared memory, threads), for planning the grid.
template <typename TI>
cudaError_t lse_blocks_per_sm(bool bwd, int bm, size_t smem, int* blocks);
template <typename TI>
cudaError_t lse_warp_blocks_per_sm(int mode, size_t smem, int* blocks);
template <typename TI>
cudaError_t topk_blocks_per_sm(int kp, size_t smem, int* blocks);

}  // namespace cuda
}  // namespace ck
