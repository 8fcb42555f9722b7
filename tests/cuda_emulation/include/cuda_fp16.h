// float16 of the emulated runtime: the host compiler's _Float16 converts with round to nearest even.
#pragma once
#include <cstdint>
#include <cstring>

#include "../emulated_cuda.h"

struct __half {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.bits, 2);
  return static_cast<float>(v);
}
inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.bits, &v, 2);
  return h;
}
