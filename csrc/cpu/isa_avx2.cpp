// The kernels generated for AVX2 + FMA + F16C (x86-64-v3, e.g. AMD Zen 2/3, Intel Haswell+),
// selected at run time only on CPUs that have them (see dispatch.cpp).
#include "isa_prelude.h"

#if defined(CK_X86_DISPATCH)
#include <immintrin.h>

CK_TARGET_BEGIN("avx2,fma,f16c,bmi,bmi2,popcnt")
namespace ck {
namespace cpu {
namespace avx2 {

#define CK_VEC_AVX2 1
#include "kernel_common.h"
#include "vec.h"
#include "gemm_kernel.h"
#include "infonce_kernel.h"
#include "topk_kernel.h"
#include "peak_kernel.h"
#include "mixing_kernel.h"
#undef CK_VEC_AVX2

CK_DEFINE_TABLE("avx2", VecF, generic::kernel_table())

}  // namespace avx2
}  // namespace cpu
}  // namespace ck
CK_TARGET_END
#endif
