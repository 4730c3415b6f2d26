// Every CUDA kernel configuration for __half inputs (see launch.h). No torch headers.
#include "launch_impl.cuh"

namespace ck {
namespace cuda {
CK_INSTANTIATE_LAUNCHERS(__half)
}  // namespace cuda
}  // namespace ck
