// Emulator shim (see ../../ck_emu.h): the current stream and device properties of the glue.
#pragma once
#include "../../ck_emu.h"

namespace at {
namespace cuda {
struct EmulatedDeviceProp {
  int multiProcessorCount = ck_emu::kSms;
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
inline const EmulatedDeviceProp* getCurrentDeviceProperties() {
  static const EmulatedDeviceProp prop;
  return &prop;
}
}  // namespace cuda
}  // namespace at
