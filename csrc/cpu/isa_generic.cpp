// Portable kernels (any compiler with GCC/Clang extensions, any CPU): one-lane "vectors" that
// the compiler may auto-vectorize for the baseline ISA; also the fp64 kernels of every table.
#include "isa_prelude.h"

namespace ck {
namespace cpu {
namespace generic {

#define CK_VEC_GENERIC 1
#include "kernel_common.h"
#include "vec.h"
using VecF = Scalar<float>;
#include "gemm_kernel.h"
#include "infonce_kernel.h"
#include "topk_kernel.h"
#include "peak_kernel.h"
#include "mixing_kernel.h"
#undef CK_VEC_GENERIC

CK_DEFINE_TABLE("generic", VecF, nullptr)

}  // namespace generic
}  // namespace cpu
}  // namespace ck
