// Every CUDA kernel configuration for __nv_bfloat16 inputs (see launch.h). No torch headers.
#include "launch_impl.cuh"

namespace ck {
namespace cuda {
CK_INSTANTIATE_LAUNCHERS(__nv_bfloat16)
}  // namespace cuda
}  // namespace ck
