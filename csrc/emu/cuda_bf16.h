// Emulator shim (see ck_emu.h): __nv_bfloat16 as its bits, the conversions the kernels use.
#pragma once
#include "ck_emu.h"

struct __nv_bfloat16 {
  uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) { return c10::detail::f32_from_bits(h.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  return __nv_bfloat16{c10::detail::round_to_nearest_even(f)};
}
