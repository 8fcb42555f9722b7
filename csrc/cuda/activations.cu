// CUDA kernels for sinc(x / sigma) and gaussian(x / sigma) (methods.md section 10):
// grid-stride elementwise passes; the backward writes one sigma-gradient partial per
// block, summed on the host side in a fixed order (deterministic). The sums are in double
// whatever the dtype, as in the C++ kernel: terms of both signs cancel over the tensor.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "launch.h"

namespace lucidops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 4096;

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename OpMath<T>::type load(const T* p, int64_t i) {
  return static_cast<typename OpMath<T>::type>(p[i]);
}
template <> __device__ __forceinline__ float load<__half>(const __half* p, int64_t i) { return __half2float(p[i]); }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16* p, int64_t i) {
  return __bfloat162float(p[i]);
}
template <typename T> __device__ __forceinline__ void store(T* p, int64_t i, typename OpMath<T>::type v) { p[i] = static_cast<T>(v); }
template <> __device__ __forceinline__ void store<__half>(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
template <> __device__ __forceinline__ void store<__nv_bfloat16>(__nv_bfloat16* p, int64_t i, float v) {
  p[i] = __float2bfloat16_rn(v);
}

__device__ __forceinline__ void sincos_t(float u, float* s, float* c) { sincosf(u, s, c); }
__device__ __forceinline__ void sincos_t(double u, double* s, double* c) { sincos(u, s, c); }
__device__ __forceinline__ float exp_t(float v) { return expf(v); }
__device__ __forceinline__ double exp_t(double v) { return exp(v); }

// Taylor series of the sinc derivative, used below |u| = 0.5 where the direct formula
// cancels (same rule as the C++ CPU kernel and the Triton kernel).
template <typename M> __device__ __forceinline__ M sinc_derivative_series(M u) {
  const M u2 = u * u;
  return u * (M(-1.0 / 3) + u2 * (M(1.0 / 30) + u2 * (M(-1.0 / 840) + u2 * (M(1.0 / 45360) + u2 * M(-1.0 / 3991680)))));
}

template <int Kind, typename M> __device__ __forceinline__ M value(M u) {
  if (Kind == 0) {
    M s, c;
    sincos_t(u, &s, &c);
    return u == M(0) ? M(1) : s / u;
  }
  return exp_t(M(-0.5) * u * u);
}

template <int Kind, typename M> __device__ __forceinline__ M derivative(M u) {
  if (Kind == 0) {
    // The series' bound: 0.5 in float32, 0.05 in double (whose direct formula is accurate down
    // to there, and where the five-term series is off by 6e-12 near 0.5), as cpu and Triton.
    const M series_bound = sizeof(M) == sizeof(double) ? M(0.05) : M(0.5);
    if (fabs(u) < series_bound) return sinc_derivative_series(u);
    M s, c;
    sincos_t(u, &s, &c);
    // Past |u| = 1e18 u * u overflows float32: cos u / u (lucidops.reference.activations).
    return fabs(u) > M(1e18) ? c / u : (u * c - s) / (u * u);
  }
  return -u * exp_t(M(-0.5) * u * u);
}

// u = x / sigma; an overflow to +-inf becomes +-1e38 (lucidops.reference.activations.quotient).
template <typename M>
__device__ __forceinline__ M quotient(M x, M sigma) {
  const M u = x / sigma;
  return isinf(u) ? copysign(M(1e38), u) : u;
}

int num_blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

template <int Kind, typename T>
__global__ void forward_kernel(const T* __restrict__ x, const typename OpMath<T>::type* __restrict__ sigma_ptr,
                               T* __restrict__ y, int64_t n) {
  using M = typename OpMath<T>::type;
  const M sigma = *sigma_ptr;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    store(y, i, value<Kind>(quotient(load(x, i), sigma)));
  }
}

template <int Kind, typename T>
__global__ void backward_kernel(const T* __restrict__ grad, const T* __restrict__ x,
                                const typename OpMath<T>::type* __restrict__ sigma_ptr, T* __restrict__ grad_x,
                                double* __restrict__ partials, bool need_sigma_grad, int64_t n) {
  using M = typename OpMath<T>::type;
  const M sigma = *sigma_ptr;
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  double local = 0.0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const M u = quotient(load(x, i), sigma);
    const M gd = load(grad, i) * derivative<Kind>(u);
    store(grad_x, i, gd / sigma);
    if (need_sigma_grad) local += static_cast<double>(gd * u);  // uniform branch: no double work otherwise
  }
  if (!need_sigma_grad) return;
  // Block reduction: warp shuffles, then one value per warp through shared memory.
  __shared__ double warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) local += __shfl_down_sync(0xffffffffu, local, offset);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = local;
  __syncthreads();
  if (warp == 0) {
    local = lane < kThreads / 32 ? warp_sums[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) local += __shfl_down_sync(0xffffffffu, local, offset);
    if (lane == 0) partials[blockIdx.x] = -local / static_cast<double>(sigma);
  }
}

template <typename T>
cudaError_t forward_typed(int kind, const void* x, const void* sigma, void* y, int64_t n, cudaStream_t stream) {
  using M = typename OpMath<T>::type;
  if (n == 0) return cudaSuccess;
  const int blocks = num_blocks_for(n);
  auto xs = static_cast<const T*>(x);
  auto ss = static_cast<const M*>(sigma);
  auto ys = static_cast<T*>(y);
  if (kind == 0) forward_kernel<0, T><<<blocks, kThreads, 0, stream>>>(xs, ss, ys, n);
  else forward_kernel<1, T><<<blocks, kThreads, 0, stream>>>(xs, ss, ys, n);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(int kind, const void* grad, const void* x, const void* sigma, void* grad_x, void* partials,
                           bool need_sigma_grad, int64_t n, cudaStream_t stream) {
  using M = typename OpMath<T>::type;
  if (n == 0) return cudaSuccess;
  const int blocks = num_blocks_for(n);
  auto gs = static_cast<const T*>(grad);
  auto xs = static_cast<const T*>(x);
  auto ss = static_cast<const M*>(sigma);
  auto gx = static_cast<T*>(grad_x);
  auto ps = static_cast<double*>(partials);
  if (kind == 0) backward_kernel<0, T><<<blocks, kThreads, 0, stream>>>(gs, xs, ss, gx, ps, need_sigma_grad, n);
  else backward_kernel<1, T><<<blocks, kThreads, 0, stream>>>(gs, xs, ss, gx, ps, need_sigma_grad, n);
  return cudaGetLastError();
}

}  // namespace

int activation_backward_num_blocks(int64_t n) { return num_blocks_for(n); }

cudaError_t activation_forward(int kind, DType dtype, const void* x, const void* sigma, void* y, int64_t n,
                               cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return forward_typed<float>(kind, x, sigma, y, n, stream);
    case DType::kFloat16: return forward_typed<__half>(kind, x, sigma, y, n, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(kind, x, sigma, y, n, stream);
    case DType::kFloat64: return forward_typed<double>(kind, x, sigma, y, n, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t activation_backward(int kind, DType dtype, const void* grad, const void* x, const void* sigma,
                                void* grad_x, void* partials, bool need_sigma_grad, int64_t n, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return backward_typed<float>(kind, grad, x, sigma, grad_x, partials, need_sigma_grad, n, stream);
    case DType::kFloat16: return backward_typed<__half>(kind, grad, x, sigma, grad_x, partials, need_sigma_grad, n, stream);
    case DType::kBFloat16:
      return backward_typed<__nv_bfloat16>(kind, grad, x, sigma, grad_x, partials, need_sigma_grad, n, stream);
    case DType::kFloat64: return backward_typed<double>(kind, grad, x, sigma, grad_x, partials, need_sigma_grad, n, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace lucidops
