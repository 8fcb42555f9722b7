// bfloat16 of the emulated runtime: the top half of a float32, rounded to nearest even.
#pragma once
#include <cstdint>
#include <cstring>

#include "../emulated_cuda.h"

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t word = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &word, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t word;
  std::memcpy(&word, &f, 4);
  if ((word & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((word >> 16) | 0x40u)};  // quiet NaN
  word += 0x7fffu + ((word >> 16) & 1u);
  return {static_cast<uint16_t>(word >> 16)};
}
