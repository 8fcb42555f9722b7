// Declarations of every tensor-level entry point, shared by the one binding file
// (csrc/bindings.cpp) and the kernels that implement them.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lucidops {

// Activation kinds; the numbering is part of the Python <-> C++ contract
// (lucidops.ops.activations.KIND).
enum ActivationKind : int64_t { kSinc = 0, kGaussian = 1 };

namespace cpu {
at::Tensor activation_forward(const at::Tensor& x, const at::Tensor& sigma, int64_t kind);
std::tuple<at::Tensor, at::Tensor> activation_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& sigma, int64_t kind,
                                                       bool need_sigma_grad);
}  // namespace cpu

}  // namespace lucidops
