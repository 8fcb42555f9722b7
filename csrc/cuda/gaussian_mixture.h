// Raw-pointer launchers of the Gaussian point encoder mixture kernels (csrc/cuda/gaussian_mixture.cu).
// ATen-free like launch.h; the tensor-level adapters live in csrc/bindings.cpp. Every launcher takes
// float32 or float64 data (half inputs are upcast by the Python wrapper, as for the cpp backend) and
// returns the launch error (cudaSuccess, or cudaErrorInvalidValue for another dtype).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch.h"

namespace lucidops {
namespace cuda {

// Workspace sizes the caller allocates.
int64_t gaussian_forward_chunks(int64_t N);       // point chunks per cloud: max partials (B, chunks, K)
int64_t gaussian_backward_splits(int64_t B);      // cloud slices of the max backward
int64_t gaussian_backward_channel_blocks(int64_t K);
int64_t gaussian_gauss_tiles(int64_t G);          // Gaussian tiles of the backward kernels
int64_t gaussian_phi_backward_blocks(int64_t M);

// points (B, N, 3), means (G, 3), precisions (G, 6), half_widths (G, 3), weight_t (G, K) (the mixer
// transposed), bias (K,). reduce none: writes rows (B, N, K). reduce max: writes out_max (B, K) and
// argmax (B, K); when gaussian_forward_chunks(N) > 1, part_max / part_idx (B, chunks, K) are scratch.
cudaError_t gaussian_mixture_forward(DType dtype, const void* points, const void* means, const void* precisions,
                                     const void* half_widths, const void* weight_t, const void* bias, int64_t B,
                                     int64_t N, int64_t G, int64_t K, bool cull, bool reduce_max, void* rows,
                                     void* out_max, int64_t* argmax, void* part_max, int64_t* part_idx,
                                     cudaStream_t stream);

// Backward of reduce max. grad (B, K), argmax (B, K), weight (K, G). Writes per-slice partial sums
// gw_part (splits, K, G), gmp_part (splits, channel_blocks, G, 9) (mean then precision gradients) and
// gx_part (gauss_tiles, B, K, 3), the point-gradient contribution of each (cloud, channel) pair.
cudaError_t gaussian_mixture_backward_max(DType dtype, const void* grad, const void* points, const int64_t* argmax,
                                          const void* means, const void* precisions, const void* half_widths,
                                          const void* weight, int64_t B, int64_t N, int64_t G, int64_t K, bool cull,
                                          void* gw_part, void* gmp_part, void* gx_part, cudaStream_t stream);

// gx (B, N, 3): point n of cloud b gets the sum, in channel order, of gx_bk[b, k] over the channels
// whose arg-max is n (deterministic: no atomics).
cudaError_t gaussian_scatter_point_grads(DType dtype, const void* gx_bk, const int64_t* argmax, int64_t B, int64_t N,
                                         int64_t K, void* gx, cudaStream_t stream);

// phi (M, G) of points (M, 3), culled pairs exactly 0.
cudaError_t gaussian_phi(DType dtype, const void* points, const void* means, const void* precisions,
                         const void* half_widths, int64_t M, int64_t G, bool cull, void* out, cudaStream_t stream);

// From coef = dL/dphi * phi (M, G): gx_part (gauss_tiles, M, 3) and gmp_part (phi_backward_blocks, G, 9).
cudaError_t gaussian_phi_backward(DType dtype, const void* coef, const void* points, const void* means,
                                  const void* precisions, int64_t M, int64_t G, void* gx_part, void* gmp_part,
                                  cudaStream_t stream);

}  // namespace cuda
}  // namespace lucidops
