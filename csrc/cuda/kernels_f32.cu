// Every CUDA kernel configuration for float inputs (see launch.h). No torch headers.
#include "launch_impl.cuh"

namespace ck {
namespace cuda {
CK_INSTANTIATE_LAUNCHERS(float)
}  // namespace cuda
}  // namespace ck
