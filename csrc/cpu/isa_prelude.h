// Included first by every per-ISA translation unit, at global scope and BEFORE the unit switches
// its code-generation target: every system header the kernels need comes from here, so no
// library code is ever compiled for a wider instruction set than the baseline (an inline
// library function compiled for AVX-512 could otherwise be picked by the linker for all units).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "isa.h"

#define CK_INLINE inline __attribute__((always_inline))
#define CK_SCALAR_INLINE static inline

// Builds the KernelTable of one instruction set from its float traits `VF` (the fp64 kernels are
// the portable ones everywhere: fp64 serves tests and precision, not speed).
#define CK_DEFINE_TABLE(NAME, VF, F64_TABLE)                                        \
  const KernelTable* kernel_table() {                                               \
    static const KernelTable table = [] {                                           \
      KernelTable t{};                                                              \
      t.name = NAME;                                                                \
      t.row_group_f32 = Tiles<VF>::RG;                                              \
      t.vec_f32 = VF::W;                                                            \
      t.lse_scratch_f32 = &lse_scratch<VF>;                                         \
      t.topk_scratch = &topk_scratch<VF>;                                           \
      t.lse_fwd_f32 = &lse_fwd_part<VF>;                                            \
      t.lse_bwd_f32 = &lse_bwd_part<VF>;                                            \
      t.topk = &topk_part<VF>;                                                      \
      t.mixed_lse_f32 = &mixed_lse_rows<VF>;                                        \
      t.fma_probe_f32 = &fma_probe<VF>;                                             \
      t.fma_flops_per_step = 2 * kFmaChains * VF::W;                                \
      t.col_align = Tiles<VF>::NC;                                                  \
      const KernelTable* f64 = F64_TABLE;                                           \
      if (f64 == nullptr) {                                                         \
        t.row_group_f64 = Tiles<Scalar<double>>::RG;                                \
        t.vec_f64 = 1;                                                              \
        t.lse_scratch_f64 = &lse_scratch<Scalar<double>>;                           \
        t.lse_fwd_f64 = &lse_fwd_part<Scalar<double>>;                              \
        t.lse_bwd_f64 = &lse_bwd_part<Scalar<double>>;                              \
      } else {                                                                      \
        t.row_group_f64 = f64->row_group_f64;                                       \
        t.vec_f64 = f64->vec_f64;                                                   \
        t.lse_scratch_f64 = f64->lse_scratch_f64;                                   \
        t.lse_fwd_f64 = f64->lse_fwd_f64;                                           \
        t.lse_bwd_f64 = f64->lse_bwd_f64;                                           \
      }                                                                             \
      return t;                                                                     \
    }();                                                                            \
    return &table;                                                                  \
  }
