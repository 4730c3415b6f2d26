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

// Calls f(kernel) with the kernel of a configuration (the one switch over each family's template
// arguments, shared by its launcher and its occupancy query); an unknown warp mode or top-k
// width is cudaErrorInvalidValue.
template <typename TI, typename F>
cudaError_t with_lse_kernel(bool bwd, int bm, F&& f) {
  if (bwd) {
    if (bm == 64) return f(lse_tile_kernel<TI, 64, true>);
    if (bm == 32) return f(lse_tile_kernel<TI, 32, true>);
    return f(lse_tile_kernel<TI, 16, true>);
  }
  if (bm == 64) return f(lse_tile_kernel<TI, 64, false>);
  if (bm == 32) return f(lse_tile_kernel<TI, 32, false>);
  return f(lse_tile_kernel<TI, 16, false>);
}

template <typename TI, typename F>
cudaError_t with_lse_warp_kernel(int mode, F&& f) {
  if constexpr (IsTensorCore<TI>::value) {
    switch (mode) {
      case kWarpStats: return f(lse_warp_kernel<TI, kWarpStats>);
      case kWarpSums: return f(lse_warp_kernel<TI, kWarpSums>);
      case kWarpGrad: return f(lse_warp_kernel<TI, kWarpGrad>);
      default: return cudaErrorInvalidValue;
    }
  } else {
    (void)mode, (void)f;
    return cudaErrorInvalidValue;  // fp16 / bf16 only
  }
}

template <typename TI, typename F>
cudaError_t with_topk_kernel(int kp, F&& f) {
  switch (kp) {
    case 32: return f(topk_tile_kernel<TI, 32>);
    case 64: return f(topk_tile_kernel<TI, 64>);
    case 128: return f(topk_tile_kernel<TI, 128>);
    case 256: return f(topk_tile_kernel<TI, 256>);
    case 512: return f(topk_tile_kernel<TI, 512>);
    case 1024: return f(topk_tile_kernel<TI, 1024>);
    default: return cudaErrorInvalidValue;
  }
}

template <typename K, typename P>
cudaError_t launch_kernel(K kernel, dim3 grid, size_t smem, cudaStream_t stream, const P& params) {
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  CK_LAUNCH(kernel, grid, kThreads, smem, stream)(params);
  return cudaGetLastError();
}

// the blocks of `kernel` that an SM holds at once
template <typename K>
cudaError_t occupancy(K kernel, size_t smem, int* blocks) {
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel, kThreads, smem);
}

template <typename TI>
cudaError_t launch_lse(const LseTileParams<typename LseTypes<TI>::TA>& p, bool bwd, int bm, int64_t splits,
                       size_t smem, cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((p.R + bm - 1) / bm), static_cast<unsigned>(splits));
  return with_lse_kernel<TI>(bwd, bm, [&](auto kernel) { return launch_kernel(kernel, grid, smem, stream, p); });
}

template <typename TI>
cudaError_t lse_blocks_per_sm(bool bwd, int bm, size_t smem, int* blocks) {
  return with_lse_kernel<TI>(bwd, bm, [&](auto kernel) { return occupancy(kernel, smem, blocks); });
}

template <typename TI>
size_t lse_warp_smem_bytes(int dp) {
  return static_cast<size_t>(lse_warp_smem<TI>(dp).total);
}

template <typename TI>
cudaError_t launch_lse_warp(const LseTileParams<typename LseTypes<TI>::TA>& p, int mode, int64_t splits, size_t smem,
                            cudaStream_t stream) {
  if (p.R == 0) return cudaSuccess;
  const int dp = static_cast<int>((p.D + 15) / 16 * 16);
  const dim3 grid(static_cast<unsigned>((p.R + 63) / 64), static_cast<unsigned>(splits),
                  static_cast<unsigned>(lse_warp_slices(mode, dp)));
  return with_lse_warp_kernel<TI>(mode, [&](auto kernel) { return launch_kernel(kernel, grid, smem, stream, p); });
}

template <typename TI>
cudaError_t lse_warp_blocks_per_sm(int mode, size_t smem, int* blocks) {
  return with_lse_warp_kernel<TI>(mode, [&](auto kernel) { return occupancy(kernel, smem, blocks); });
}

template <typename TI>
size_t topk_smem_bytes(int dp) {
  return static_cast<size_t>(topk_smem<TI>(dp).total);
}

template <typename TI>
cudaError_t launch_topk(const TopkParams& p, int kp, int64_t splits, size_t smem, cudaStream_t stream) {
  if (p.M == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((p.M + kTopkBM - 1) / kTopkBM), static_cast<unsigned>(splits));
  return with_topk_kernel<TI>(kp, [&](auto kernel) { return launch_kernel(kernel, grid, smem, stream, p); });
}

template <typename TI>
cudaError_t topk_blocks_per_sm(int kp, size_t smem, int* blocks) {
  return with_topk_kernel<TI>(kp, [&](auto kernel) { return occupancy(kernel, smem, blocks); });
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
  template cudaError_t lse_blocks_per_sm<TI>(bool, int, size_t, int*);                                         \
  template cudaError_t lse_warp_blocks_per_sm<TI>(int, size_t, int*);                                          \
  template cudaError_t topk_blocks_per_sm<TI>(int, size_t, int*);                                              \
  template cudaError_t launch_mix<TI>(const MixParams&, int, cudaStream_t);

}  // namespace cuda
}  // namespace ck
