// Definitions of the launchers of launch.h, included by each kernels_<dtype>.cu with CK_TI set to
// that unit's input type. Pure CUDA.
#pragma once

#include "launch.h"

#ifndef CK_CUDA_EMU  // the emulator (csrc/emu/ck_emu.h) defines its own
#define CK_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#endif

namespace ck {
namespace cuda {

template <typename K>
inline cudaError_t allow_smem(K kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename TI>
size_t lse_smem_bytes(int bm, int dp, int nslots) {
  return static_cast<size_t>(lse_smem<TI>(bm, dp, nslots).total);
}

template <typename TI, int BM, bool BWD>
cudaError_t launch_lse_cfg(const LseTileParams<typename LseTypes<TI>::TA>& p, int64_t splits, size_t smem,
                           cudaStream_t stream) {
  auto kernel = lse_tile_kernel<TI, BM, BWD>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  dim3 grid(static_cast<unsigned>((p.R + BM - 1) / BM), static_cast<unsigned>(splits));
  CK_LAUNCH(kernel, grid, kThreads, smem, stream)(p);
  return cudaGetLastError();
}

template <typename TI>
cudaError_t launch_lse(const LseTileParams<typename LseTypes<TI>::TA>& p, bool bwd, int bm, int64_t splits,
                       size_t smem, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  if (bwd) {
    if (bm == 64) return launch_lse_cfg<TI, 64, true>(p, splits, smem, stream);
    if (bm == 32) return launch_lse_cfg<TI, 32, true>(p, splits, smem, stream);
    return launch_lse_cfg<TI, 16, true>(p, splits, smem, stream);
  }
  if (bm == 64) return launch_lse_cfg<TI, 64, false>(p, splits, smem, stream);
  if (bm == 32) return launch_lse_cfg<TI, 32, false>(p, splits, smem, stream);
  return launch_lse_cfg<TI, 16, false>(p, splits, smem, stream);
}

template <typename TI>
size_t lse_warp_smem_bytes(int dp) {
  return static_cast<size_t>(lse_warp_smem<TI>(dp).total);
}

template <typename TI, int MODE>
cudaError_t launch_lse_warp_cfg(const LseTileParams<float>& p, int64_t splits, size_t smem, cudaStream_t stream) {
  auto kernel = lse_warp_kernel<TI, MODE>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int dp = static_cast<int>((p.D + 15) / 16 * 16);
  dim3 grid(static_cast<unsigned>((p.R + 63) / 64), static_cast<unsigned>(splits),
            static_cast<unsigned>(lse_warp_slices(MODE, dp)));
  CK_LAUNCH(kernel, grid, kThreads, smem, stream)(p);
  return cudaGetLastError();
}

template <typename TI>
cudaError_t launch_lse_warp(const LseTileParams<typename LseTypes<TI>::TA>& p, int mode, int64_t splits, size_t smem,
                            cudaStream_t stream) {
  if constexpr (IsTensorCore<TI>::value) {
    if (p.R == 0) return cudaSuccess;
    switch (mode) {
      case kWarpStats: return launch_lse_warp_cfg<TI, kWarpStats>(p, splits, smem, stream);
      case kWarpSums: return launch_lse_warp_cfg<TI, kWarpSums>(p, splits, smem, stream);
      case kWarpGrad: return launch_lse_warp_cfg<TI, kWarpGrad>(p, splits, smem, stream);
      default: return cudaErrorInvalidValue;
    }
  } else {
    (void)p, (void)mode, (void)splits, (void)smem, (void)stream;
    return cudaErrorInvalidValue;  // fp16 / bf16 only
  }
}

template <typename TI>
size_t topk_smem_bytes(int dp) {
  return static_cast<size_t>(topk_smem<TI>(dp).total);
}

template <typename TI, int KP>
cudaError_t launch_topk_cfg(const TopkParams& p, int64_t splits, size_t smem, cudaStream_t stream) {
  auto kernel = topk_tile_kernel<TI, KP>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  dim3 grid(static_cast<unsigned>((p.M + kTopkBM - 1) / kTopkBM), static_cast<unsigned>(splits));
  CK_LAUNCH(kernel, grid, kThreads, smem, stream)(p);
  return cudaGetLastError();
}

template <typename TI>
cudaError_t launch_topk(const TopkParams& p, int kp, int64_t splits, size_t smem, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  switch (kp) {
    case 32: return launch_topk_cfg<TI, 32>(p, splits, smem, stream);
    case 64: return launch_topk_cfg<TI, 64>(p, splits, smem, stream);
    case 128: return launch_topk_cfg<TI, 128>(p, splits, smem, stream);
    case 256: return launch_topk_cfg<TI, 256>(p, splits, smem, stream);
    case 512: return launch_topk_cfg<TI, 512>(p, splits, smem, stream);
    case 1024: return launch_topk_cfg<TI, 1024>(p, splits, smem, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename TI>
cudaError_t launch_mix(const MixParams& p, int which, cudaStream_t stream) {
  using TA = typename LseTypes<TI>::TA;
  if (p.B == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(p.D + 2 * kWarps) * sizeof(TA);
  const dim3 grid(static_cast<unsigned>(p.B));
  if (which == kMixVectors) {
    auto kernel = mix_vectors_kernel<TI, TA>;
    CK_LAUNCH(kernel, grid, kThreads, 0, stream)(p);
  } else {
    auto kernel = which == kMixedDots ? mixed_dots_kernel<TI, TA>
                  : which == kMixedLse ? mixed_lse_kernel<TI, TA>
                                       : mixed_dots_bwd_kernel<TI, TA>;
    cudaError_t err = allow_smem(kernel, smem);
    if (err != cudaSuccess) return err;
    CK_LAUNCH(kernel, grid, kThreads, smem, stream)(p);
  }
  return cudaGetLastError();
}

#define CK_INSTANTIATE_LAUNCHERS(TI)                                                                           \
  template size_t lse_smem_bytes<TI>(int, int, int);                                                           \
  template cudaError_t launch_lse<TI>(const LseTileParams<typename LseTypes<TI>::TA>&, bool, int, int64_t,     \
                                      size_t, cudaStream_t);                                                   \
  template size_t lse_warp_smem_bytes<TI>(int);                                                                \
  template cudaError_t launch_lse_warp<TI>(const LseTileParams<typename LseTypes<TI>::TA>&, int, int64_t, size_t, \
                                           cudaStream_t);                                                      \
  template size_t topk_smem_bytes<TI>(int);                                                                    \
  template cudaError_t launch_topk<TI>(const TopkParams&, int, int64_t, size_t, cudaStream_t);                 \
  template cudaError_t launch_mix<TI>(const MixParams&, int, cudaStream_t);

}  // namespace cuda
}  // namespace ck
