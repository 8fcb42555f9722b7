// C entry points to the raw-pointer launchers of csrc/cuda, for ctypes (tests/cuda_emulator.py).
// Compiled with the emulated runtime (emulated_cuda.h) next to the .cu files it wraps.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "gaussian_mixture.h"
#include "launch.h"

using lucidops::cuda::DType;

extern "C" {

int emu_activation_backward_num_blocks(int64_t n) { return lucidops::cuda::activation_backward_num_blocks(n); }

int emu_activation_forward(int kind, int dtype, const void* x, const void* sigma, void* y, int64_t n) {
  return lucidops::cuda::activation_forward(kind, static_cast<DType>(dtype), x, sigma, y, n, nullptr);
}

int emu_activation_backward(int kind, int dtype, const void* grad, const void* x, const void* sigma, void* grad_x,
                            void* sigma_partials, bool need_sigma_grad, int64_t n) {
  return lucidops::cuda::activation_backward(kind, static_cast<DType>(dtype), grad, x, sigma, grad_x, sigma_partials,
                                             need_sigma_grad, n, nullptr);
}

int emu_gaussian_forward_chunks(int64_t n) { return static_cast<int>(lucidops::cuda::gaussian_forward_chunks(n)); }
int emu_gaussian_backward_splits(int64_t b) { return static_cast<int>(lucidops::cuda::gaussian_backward_splits(b)); }
int emu_gaussian_backward_channel_blocks(int64_t k) {
  return static_cast<int>(lucidops::cuda::gaussian_backward_channel_blocks(k));
}
int emu_gaussian_gauss_tiles(int64_t g) { return static_cast<int>(lucidops::cuda::gaussian_gauss_tiles(g)); }
int emu_gaussian_phi_backward_blocks(int64_t m) {
  return static_cast<int>(lucidops::cuda::gaussian_phi_backward_blocks(m));
}

int emu_gaussian_mixture_forward(int dtype, const void* points, const void* means, const void* precisions,
                                 const void* half_widths, const void* weight_t, const void* bias, int64_t B, int64_t N,
                                 int64_t G, int64_t K, bool cull, bool reduce_max, void* rows, void* out_max,
                                 int64_t* argmax, void* part_max, int64_t* part_idx) {
  return lucidops::cuda::gaussian_mixture_forward(static_cast<DType>(dtype), points, means, precisions, half_widths,
                                                  weight_t, bias, B, N, G, K, cull, reduce_max, rows, out_max, argmax,
                                                  part_max, part_idx, nullptr);
}

int emu_gaussian_mixture_backward_max(int dtype, const void* grad, const void* points, const int64_t* argmax,
                                      const void* means, const void* precisions, const void* half_widths,
                                      const void* weight, int64_t B, int64_t N, int64_t G, int64_t K, bool cull,
                                      void* gw_part, void* gmp_part, void* gx_part) {
  return lucidops::cuda::gaussian_mixture_backward_max(static_cast<DType>(dtype), grad, points, argmax, means,
                                                       precisions, half_widths, weight, B, N, G, K, cull, gw_part,
                                                       gmp_part, gx_part, nullptr);
}

int emu_gaussian_scatter_point_grads(int dtype, const void* gx_bk, const int64_t* argmax, int64_t B, int64_t N,
                                     int64_t K, void* gx) {
  return lucidops::cuda::gaussian_scatter_point_grads(static_cast<DType>(dtype), gx_bk, argmax, B, N, K, gx, nullptr);
}

int emu_gaussian_phi(int dtype, const void* points, const void* means, const void* precisions,
                     const void* half_widths, int64_t M, int64_t G, bool cull, void* out) {
  return lucidops::cuda::gaussian_phi(static_cast<DType>(dtype), points, means, precisions, half_widths, M, G, cull,
                                      out, nullptr);
}

int emu_gaussian_phi_backward(int dtype, const void* coef, const void* points, const void* means,
                              const void* precisions, int64_t M, int64_t G, void* gx_part, void* gmp_part) {
  return lucidops::cuda::gaussian_phi_backward(static_cast<DType>(dtype), coef, points, means, precisions, M, G,
                                               gx_part, gmp_part, nullptr);
}

}  // extern "C"

