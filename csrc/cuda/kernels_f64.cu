// Every CUDA kernel configuration for double inputs (see launch.h). No torch headers.
#include "launch_impl.cuh"

namespace ck {
namespace cuda {
CK_INSTANTIATE_LAUNCHERS(double)
}  // namespace cuda
}  // namespace ck
