// Branch-free float sin/cos/exp that GCC and Clang auto-vectorise inside `#pragma omp simd`
// loops (libm calls do not vectorise without -ffast-math, which would also break NaN
// handling). Classic Cody-Waite range reduction plus minimax polynomials; about 1 ulp
// inside the documented ranges, callers handle inputs outside them with libm. Also Vec, a
// 64-byte vector type for accumulators that must stay in registers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace lucidops {
namespace vec_math {

// |u| above this loses accuracy in the three-part pi/2 reduction: callers recompute those
// lanes with libm in double.
constexpr float kSinCosMaxArg = 8192.0f;

// Whether any of u[0, m) lies beyond kSinCosMaxArg or is NaN, so that its caller runs its libm
// fix-up loop only when needed. An int OR, which vectorises where a bool || does not.
inline bool any_beyond_sincos_range(const float* u, int64_t m) {
  int beyond = 0;
#pragma omp simd reduction(| : beyond)
  for (int64_t i = 0; i < m; ++i) beyond |= !(std::fabs(u[i]) <= kSinCosMaxArg);
  return beyond != 0;
}

// Round to nearest (even) by adding and subtracting 1.5 * 2^23; exact for |x| < 2^22.
// Plain arithmetic vectorises where std::floor / std::nearbyint calls do not.
inline float round_nearest(float x) { return (x + 12582912.0f) - 12582912.0f; }

inline void sincos(float u, float* s_out, float* c_out) {
  constexpr float kTwoOverPi = 0.636619772367581343f;
  // pi/2 split into three parts whose products with small integers are exact.
  constexpr float kPio2Hi = 1.5703125f;
  constexpr float kPio2Mid = 4.837512969970703125e-4f;
  constexpr float kPio2Lo = 7.54978995489188216e-8f;
  const float jf = round_nearest(u * kTwoOverPi);
  const float r = ((u - jf * kPio2Hi) - jf * kPio2Mid) - jf * kPio2Lo;  // r in [-pi/4, pi/4]
  const float r2 = r * r;
  const float sin_r = r + r * r2 * (-1.6666654611e-1f + r2 * (8.3321608736e-3f + r2 * -1.9515295891e-4f));
  const float cos_r =
      1.0f - 0.5f * r2 + r2 * r2 * (4.166664568298827e-2f + r2 * (-1.388731625493765e-3f + r2 * 2.443315711809948e-5f));
  const int q = static_cast<int>(jf) & 3;
  // sin(r + q pi/2) and cos(r + q pi/2) by quadrant.
  const float s = (q & 1) ? cos_r : sin_r;
  const float c = (q & 1) ? sin_r : cos_r;
  *s_out = (q & 2) ? -s : s;
  *c_out = ((q + 1) & 2) ? -c : c;
}

namespace detail {

// exp(v) for v in [-87.3, 88.7] (or NaN): Cody-Waite reduction by ln 2, a polynomial, and
// 2^n built in the exponent bits. Callers clamp v into that range first.
inline float exp_in_range(float v) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  const float n = round_nearest(v * kLog2e);
  const float r = (v - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace detail

// Range: v <= 88.37. From 88.38 on n rounds to 128 and the scale 2^n is +inf, so this
// returns +inf where exp is finite up to 88.72; no caller gets there (they take exp of a
// non-positive value, or tanh's exp(2|v|), whose 2 / (inf + 1) = 0 is the right limit).
// Below -87.3 the result is subnormal: flushed to zero, as the polynomial cannot scale there.
inline float exp(float v) {
  const bool underflow = v < -87.3f;
  v = v < -87.3f ? -87.3f : (v > 88.7f ? 88.7f : v);  // ternaries vectorise, fmin/fmax calls do not
  return underflow ? 0.0f : detail::exp_in_range(v);
}

// exp for v <= 0, -inf or NaN (a softmax's scores minus their max), bit for bit exp's: no
// upper clamp. GCC carries exp's two clamps through the polynomial as six blends (it blends
// in the results for the clamped ends, which it folds to constants); with one clamp, two.
// A vector of the attention forward's softmax then takes 24 instructions instead of 36.
inline float exp_nonpositive(float v) {
  const bool underflow = v < -87.3f;
  v = underflow ? -87.3f : v;
  return underflow ? 0.0f : detail::exp_in_range(v);
}

// The double counterpart. Range: v <= 709 (larger v is clamped there, so exp of +inf is
// finite; no caller gets there: they take exp of a non-positive value). Below -708.39 it
// flushes to zero (exp(-708.39) is 1.007 times the smallest normal double).
// n = round(v log2 e) comes from adding 1.5 * 2^52, whose low mantissa bits then hold n as an
// integer, and 2^n is built from those bits with 64-bit integer adds and shifts: no
// double-to-integer conversion, which AVX2 lacks for 64-bit lanes. exp(r) on |r| <= ln2 / 2
// by its Taylor series to r^13 (the first omitted term is below 5e-18 relative, a twentieth
// of an ulp). Measured against libm over 20M arguments in [-745, 0.5]: at most 1 ulp apart.
namespace detail {

// exp(v) for v in [-708.39, 709] (or NaN); callers clamp v into that range first.
inline double exp_in_range(double v) {
  constexpr double kLog2e = 1.4426950408889634;
  // ln 2 in two parts; the high part's trailing zero bits make n * kLn2Hi exact for |n| < 2^11.
  constexpr double kLn2Hi = 6.93147180369123816490e-01;
  constexpr double kLn2Lo = 1.90821492927058770002e-10;
  constexpr double kShift = 6755399441055744.0;  // 1.5 * 2^52
  const double shifted = v * kLog2e + kShift;
  const double n = shifted - kShift;
  const double r = (v - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.0 / 6227020800.0;  // 1 / 13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r * r + r + 1.0;
  uint64_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  const uint64_t scale_bits = (bits + 1023) << 52;  // (n + 1023) in the exponent field
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

}  // namespace detail

inline double exp(double v) {
  const bool underflow = v < -708.39;
  v = v < -708.39 ? -708.39 : (v > 709.0 ? 709.0 : v);
  return underflow ? 0.0 : detail::exp_in_range(v);
}

// The double exp_nonpositive: exp's results for v <= 0, -inf or NaN, with one clamp.
inline double exp_nonpositive(double v) {
  const bool underflow = v < -708.39;
  v = underflow ? -708.39 : v;
  return underflow ? 0.0 : detail::exp_in_range(v);
}

// tanh(v) = 1 - 2 / (exp(2|v|) + 1) with v's sign for |v| >= 0.25 (a few ulp lost to the
// cancellation near the bound), the odd Taylor series below it (the first omitted term,
// 1382 v^11 / 155925, is under 1e-8 relative there). exp's clamp at 88.7 gives exactly
// +-1 for large |v|.
inline float tanh(float v) {
  const float a = v < 0.0f ? -v : v;
  const float v2 = v * v;
  const float series =
      v * (1.0f + v2 * (-3.33333343e-1f + v2 * (1.33333340e-1f + v2 * (-5.39682545e-2f + v2 * 2.18694880e-2f))));
  const float far = 1.0f - 2.0f / (exp(2.0f * a) + 1.0f);
  return a < 0.25f ? series : (v < 0.0f ? -far : far);
}

// The width of Vec: one register of the target's widest vectors. Wider than a register, GCC
// splits the type's arithmetic through the stack and general registers: with 64 bytes on an
// AVX2 build the attention op took 32.7 ms at B8 H24 N197 d8 forward, 24.1 ms with 32.
#if defined(__AVX512F__)
constexpr int64_t kVecBytes = 64;
#elif defined(__AVX__)
constexpr int64_t kVecBytes = 32;
#else
constexpr int64_t kVecBytes = 16;
#endif

// kVecBytes of T (AVX-512: 16 floats, 8 doubles; AVX2: 8 floats, 4 doubles) that GCC and
// Clang lower to one vector register: accumulators of this type stay in registers across a
// loop, which `omp simd` over a row does not achieve (it keeps them in memory).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(kVecBytes)));
  static constexpr int64_t kLanes = kVecBytes / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, const type& v) { std::memcpy(p, &v, sizeof(v)); }
  // A loaded vector that several multiplies reuse: GCC otherwise folds the load into each
  // multiply as a memory operand, reloading it once per use (measured: a tile that reuses
  // each vector four times then ran slower than one that does not). On x86 with AVX, where a
  // vector is one register ("v": an AVX register); elsewhere a no-op.
  static type reused(type v) {
#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX__)
    asm("" : "+v"(v));
#endif
    return v;
  }
  // A pairwise tree over the lanes: log-depth where a lane-by-lane loop is a chain of
  // dependent adds. Subscripts, not memcpy: taking an accumulator's address would keep it
  // in memory through the loop that fills it.
  static T sum(type v) {
#pragma GCC unroll 16
    for (int64_t width = kLanes / 2; width >= 1; width /= 2) {
#pragma GCC unroll 16
      for (int64_t l = 0; l < width; ++l) v[l] += v[l + width];
    }
    return v[0];
  }
};

}  // namespace vec_math
}  // namespace lucidops
