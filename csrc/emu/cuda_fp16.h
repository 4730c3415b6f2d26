// Emulator shim (see ck_emu.h): __half as its IEEE binary16 bits, the conversions the kernels use.
#pragma once
#include "ck_emu.h"

struct __half {
  uint16_t x;
};
inline float __half2float(__half h) { return c10::detail::fp16_ieee_to_fp32_value(h.x); }
inline __half __float2half_rn(float f) { return __half{c10::detail::fp16_ieee_from_fp32_value(f)}; }
