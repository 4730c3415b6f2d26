// The kernels generated for AVX-512 (F, BW, DQ, VL; e.g. AMD Zen 4/5, Intel Skylake-SP+),
// selected at run time only on CPUs that have them (see dispatch.cpp).
#include "isa_prelude.h"

#if defined(CK_X86_DISPATCH)
#include <immintrin.h>

// GCC 12 flags its own _mm512_cvtph_ps / reduce intrinsics (an undefined first operand by design)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

CK_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,popcnt")
namespace ck {
namespace cpu {
namespace avx512 {

#define CK_VEC_AVX512 1
#include "kernel_common.h"
#include "vec.h"
#include "gemm_kernel.h"
#include "infonce_kernel.h"
#include "topk_kernel.h"
#include "peak_kernel.h"
#include "mixing_kernel.h"
#undef CK_VEC_AVX512

CK_DEFINE_TABLE("avx512", VecF, generic::kernel_table())

}  // namespace avx512
}  // namespace cpu
}  // namespace ck
CK_TARGET_END
#endif
