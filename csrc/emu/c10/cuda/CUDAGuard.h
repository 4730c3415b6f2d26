// Emulator shim (see ../../ck_emu.h): the device guard and C10_CUDA_CHECK of the glue.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include "../../ck_emu.h"

namespace c10 {
namespace cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(expr)                                                                 \
  do {                                                                                       \
    const cudaError_t ck_emu_err = (expr);                                                   \
    TORCH_CHECK(ck_emu_err == cudaSuccess, "CUDA error (emulated): ", cudaGetErrorString(ck_emu_err)); \
  } while (0)
