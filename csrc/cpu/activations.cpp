// CPU kernels for the non-monotonic activations sinc(x / sigma) and gaussian(x / sigma)
// (methods.md section 10). One pass over memory for the forward, one for the backward
// (dx and the sigma-gradient partials together), OpenMP over fixed-size chunks, SIMD
// inside each tile through vec_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../lucidops.h"
#include "half_convert.h"
#include "vec_math.h"

namespace lucidops {
namespace cpu {
namespace {

// u = x / sigma; an overflow to +-inf becomes +-1e38 (lucidops.reference.activations.quotient),
// where both functions and their derivatives are ~0 instead of sin(inf) or inf * 0 (NaN).
template <typename T>
inline T quotient(T x, T sigma) {
  const T u = x / sigma;
  return std::isinf(u) ? std::copysign(T(1e38), u) : u;
}

// Chunks are the unit of parallel work and of the sigma-gradient partial sums; a fixed
// size keeps the reduction order, hence the result, independent of the thread count.
constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kTile = 512;

// Below this |u| the sinc derivative (u cos u - sin u) / u^2 cancels badly: use its
// Taylor series, whose next omitted term is below 1e-13 there.
constexpr double kSincSeriesBound = 0.5;

template <typename T>
inline T sinc_derivative_series(T u) {
  const T u2 = u * u;
  return u * (T(-1.0 / 3) + u2 * (T(1.0 / 30) + u2 * (T(-1.0 / 840) + u2 * (T(1.0 / 45360) +
                                                                              u2 * T(-1.0 / 3991680)))));
}

// (u cos u - sin u) / u^2 in double, cos u / u past |u| = 1e18 where u^2 would overflow for a
// float64 u past 1.3e154 (lucidops.reference.activations.sinc_derivative, same threshold).
inline double sinc_derivative_direct(double x) {
  return std::fabs(x) > 1e18 ? std::cos(x) / x : (x * std::cos(x) - std::sin(x)) / (x * x);
}

// f(u) and f'(u) for each kind, over a tile. The float versions vectorise; the double
// versions (used for float64 inputs, e.g. gradcheck) call libm.
struct Sinc {
  static void value(const float* u, float* f, int64_t m) {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      float s, c;
      vec_math::sincos(u[i], &s, &c);
      f[i] = u[i] == 0.0f ? 1.0f : s / u[i];
    }
    if (!vec_math::any_beyond_sincos_range(u, m)) return;
    for (int64_t i = 0; i < m; ++i) {
      if (!(std::fabs(u[i]) <= vec_math::kSinCosMaxArg)) {
        const double ud = u[i];
        f[i] = static_cast<float>(std::sin(ud) / ud);
      }
    }
  }
  static void derivative(const float* u, float* d, int64_t m) {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) {
      float s, c;
      vec_math::sincos(u[i], &s, &c);
      const float x = u[i];
      d[i] = std::fabs(x) < float(kSincSeriesBound) ? sinc_derivative_series(x) : (x * c - s) / (x * x);
    }
    if (!vec_math::any_beyond_sincos_range(u, m)) return;
    for (int64_t i = 0; i < m; ++i) {
      if (!(std::fabs(u[i]) <= vec_math::kSinCosMaxArg)) {
        d[i] = static_cast<float>(sinc_derivative_direct(static_cast<double>(u[i])));
      }
    }
  }
  static void value(const double* u, double* f, int64_t m) {
    for (int64_t i = 0; i < m; ++i) f[i] = u[i] == 0.0 ? 1.0 : std::sin(u[i]) / u[i];
  }
  static void derivative(const double* u, double* d, int64_t m) {
    for (int64_t i = 0; i < m; ++i) {
      const double x = u[i];
      // The series bound is tighter in double: the direct formula's cancellation costs
      // eps/x^2 relative, and the series' truncation x^11/5e8.
      d[i] = std::fabs(x) < 0.05 ? sinc_derivative_series(x) : sinc_derivative_direct(x);
    }
  }
};

struct Gaussian {
  static void value(const float* u, float* f, int64_t m) {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) f[i] = vec_math::exp(-0.5f * u[i] * u[i]);
  }
  static void derivative(const float* u, float* d, int64_t m) {
#pragma omp simd
    for (int64_t i = 0; i < m; ++i) d[i] = -u[i] * vec_math::exp(-0.5f * u[i] * u[i]);
  }
  static void value(const double* u, double* f, int64_t m) {
    for (int64_t i = 0; i < m; ++i) f[i] = std::exp(-0.5 * u[i] * u[i]);
  }
  static void derivative(const double* u, double* d, int64_t m) {
    for (int64_t i = 0; i < m; ++i) d[i] = -u[i] * std::exp(-0.5 * u[i] * u[i]);
  }
};

// u = x / sigma over a tile, in opmath (quotient's overflow rule), for the forward and backward.
template <typename scalar_t, typename opmath_t>
inline void tile_quotients(const scalar_t* x, opmath_t* u, int64_t m, opmath_t sigma) {
  to_opmath(x, u, m);
  for (int64_t i = 0; i < m; ++i) u[i] = quotient(u[i], sigma);
}

template <typename scalar_t, typename Kind>
void forward_kernel(const scalar_t* x, scalar_t* y, int64_t n, double sigma_value) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t sigma = static_cast<opmath_t>(sigma_value);
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    opmath_t u[kTile], f[kTile];
    const int64_t end = std::min(n, chunk_end * kChunk);
    for (int64_t t = chunk_begin * kChunk; t < end; t += kTile) {
      const int64_t m = std::min(kTile, end - t);
      tile_quotients(x + t, u, m, sigma);
      Kind::value(u, f, m);
      from_opmath(f, y + t, m);
    }
  });
}

// grad_x[i] = grad[i] d[i] / sigma over one tile; returns sum(grad[i] d[i] u[i]) in double:
// terms of one sign cancelling others (a gradient that changes sign along the tensor) lost up
// to 5e-4 relative in a float32 tile sum. This version serves float64.
inline double scale_tile(const double* grad, const double* d, const double* u, double* grad_x, int64_t m,
                         double sigma) {
  double tile_sum = 0.0;
#pragma omp simd reduction(+ : tile_sum)
  for (int64_t i = 0; i < m; ++i) {
    const double gd = grad[i] * d[i];
    grad_x[i] = gd / sigma;
    tile_sum += gd * u[i];
  }
  return tile_sum;
}

// The same for float32 (and the half types, through float32 buffers) with explicit vectors:
// GCC's `omp simd` reduction of widened float products ran near scalar speed (the float32
// backward took twice its forward; with this, 1.2x at 16M elements on 2 threads). Each
// vector of float products widens to two vectors of doubles, one per half.
inline double scale_tile(const float* grad, const float* d, const float* u, float* grad_x, int64_t m, float sigma) {
  using VF = vec_math::Vec<float>;
  using VD = vec_math::Vec<double>;
  typedef float half_vector __attribute__((vector_size(vec_math::kVecBytes / 2)));
  VD::type acc = {};
  int64_t i = 0;
  for (; i + VF::kLanes <= m; i += VF::kLanes) {
    const VF::type gd = VF::load(grad + i) * VF::load(d + i);
    VF::store(grad_x + i, gd / sigma);
    const VF::type product = gd * VF::load(u + i);
    half_vector low, high;
    std::memcpy(&low, &product, sizeof(low));
    std::memcpy(&high, reinterpret_cast<const char*>(&product) + sizeof(low), sizeof(high));
    acc += __builtin_convertvector(low, VD::type) + __builtin_convertvector(high, VD::type);
  }
  double tile_sum = VD::sum(acc);
  for (; i < m; ++i) {
    const float gd = grad[i] * d[i];
    grad_x[i] = gd / sigma;
    tile_sum += static_cast<double>(gd * u[i]);
  }
  return tile_sum;
}

// grad_x = grad * f'(u) / sigma;  grad_sigma = sum(grad * f'(u) * (-u / sigma)).
template <typename scalar_t, typename Kind>
double backward_kernel(const scalar_t* grad, const scalar_t* x, scalar_t* grad_x, int64_t n,
                       double sigma_value, bool need_sigma_grad) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t sigma = static_cast<opmath_t>(sigma_value);
  const int64_t num_chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partials(need_sigma_grad ? num_chunks : 0, 0.0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    opmath_t u[kTile], d[kTile];
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      const int64_t end = std::min(n, (chunk + 1) * kChunk);
      double chunk_sum = 0.0;
      for (int64_t t = chunk * kChunk; t < end; t += kTile) {
        const int64_t m = std::min(kTile, end - t);
        tile_quotients(x + t, u, m, sigma);
        Kind::derivative(u, d, m);
        if constexpr (std::is_same_v<scalar_t, opmath_t>) {
          chunk_sum += scale_tile(grad + t, d, u, grad_x + t, m, sigma);
        } else {  // half types: through opmath buffers
          opmath_t g[kTile], gx[kTile];
          to_opmath(grad + t, g, m);
          chunk_sum += scale_tile(g, d, u, gx, m, sigma);
          from_opmath(gx, grad_x + t, m);
        }
      }
      if (need_sigma_grad) partials[chunk] = chunk_sum;
    }
  });
  double total = 0.0;
  for (double p : partials) total += p;
  return -total / sigma_value;
}

void check_inputs(const at::Tensor& x, const at::Tensor& sigma, int64_t kind) {
  TORCH_CHECK(x.device().is_cpu(), "lucidops cpu kernel: x must be a CPU tensor");
  TORCH_CHECK(sigma.device().is_cpu() && sigma.numel() == 1, "lucidops cpu kernel: sigma must be a one-element CPU tensor");
  TORCH_CHECK(kind == kSinc || kind == kGaussian, "lucidops cpu kernel: unknown activation kind ", kind);
}

}  // namespace

at::Tensor activation_forward(const at::Tensor& x_in, const at::Tensor& sigma, int64_t kind) {
  check_inputs(x_in, sigma, kind);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  const double sigma_value = sigma.item<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lucidops_activation_forward", [&] {
    if (kind == kSinc) {
      forward_kernel<scalar_t, Sinc>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel(), sigma_value);
    } else {
      forward_kernel<scalar_t, Gaussian>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel(),
                                         sigma_value);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> activation_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                       const at::Tensor& sigma, int64_t kind, bool need_sigma_grad) {
  check_inputs(x_in, sigma, kind);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type(),
              "lucidops cpu kernel: grad must match x in shape and dtype");
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const double sigma_value = sigma.item<double>();
  double grad_sigma = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lucidops_activation_backward", [&] {
    auto run = [&](auto kind_tag) {
      using Kind = decltype(kind_tag);
      grad_sigma = backward_kernel<scalar_t, Kind>(grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                   grad_x.mutable_data_ptr<scalar_t>(), x.numel(), sigma_value,
                                                   need_sigma_grad);
    };
    if (kind == kSinc) run(Sinc{}); else run(Gaussian{});
  });
  at::Tensor grad_sigma_t = at::full({}, need_sigma_grad ? grad_sigma : 0.0, sigma.options());
  return {grad_x, grad_sigma_t};
}

}  // namespace cpu
}  // namespace lucidops
