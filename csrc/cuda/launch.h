// Raw-pointer launchers for the CUDA kernels. Kept free of ATen so that nvcc compiles the
// .cu files in seconds; tensor checks and stream lookup live in csrc/bindings.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace lucidops {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// Blocks a backward launch uses for n elements: the caller allocates that many
// sigma-gradient partials, double whatever the dtype.
int activation_backward_num_blocks(int64_t n);

// sigma points to one opmath value on the device.
cudaError_t activation_forward(int kind, DType dtype, const void* x, const void* sigma, void* y, int64_t n,
                               cudaStream_t stream);
cudaError_t activation_backward(int kind, DType dtype, const void* grad, const void* x, const void* sigma,
                                void* grad_x, void* sigma_partials, bool need_sigma_grad, int64_t n,
                                cudaStream_t stream);

}  // namespace cuda
}  // namespace lucidops
