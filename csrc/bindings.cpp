// The one binding file. Compiled into two extensions:
//   lucidops CPU extension  (csrc/cpu/*.cpp)                  -> DEVICE == "cpu"
//   lucidops CUDA extension (csrc/cuda/*.cu, -DLUCIDOPS_WITH_CUDA) -> DEVICE == "cuda"
// Both expose the same function names, so the Python side treats them alike. The
// CUDA section also holds the thin tensor -> raw pointer adapters for csrc/cuda.
#include <torch/extension.h>

#include "lucidops.h"

#ifdef LUCIDOPS_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/launch.h"
#endif

// The build passes the source hash as an identifier (-DLUCIDOPS_SOURCE_HASH=h<hex>).
#ifndef LUCIDOPS_SOURCE_HASH
#define LUCIDOPS_SOURCE_HASH unknown
#endif
#define LUCIDOPS_STRINGIFY_(x) #x
#define LUCIDOPS_STRINGIFY(x) LUCIDOPS_STRINGIFY_(x)

#ifdef LUCIDOPS_WITH_CUDA
namespace lucidops {
namespace cuda_host {

using cuda::DType;

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kDouble: return DType::kFloat64;
    default: TORCH_CHECK(false, "lucidops cuda kernel: unsupported dtype ", t.scalar_type());
  }
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "lucidops cuda kernel ", what, " failed: ", cudaGetErrorString(err));
}

// The kernels read sigma as one opmath value on the device.
at::Tensor opmath_sigma(const at::Tensor& sigma, const at::Tensor& x) {
  TORCH_CHECK(sigma.numel() == 1 && sigma.device() == x.device(), "lucidops cuda kernel: sigma must be a one-element tensor on x's device");
  const auto opmath = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return sigma.reshape({}).to(opmath).contiguous();
}

void check_activation_inputs(const at::Tensor& x, int64_t kind) {
  TORCH_CHECK(x.is_cuda(), "lucidops cuda kernel: x must be a CUDA tensor");
  TORCH_CHECK(kind == kSinc || kind == kGaussian, "lucidops cuda kernel: unknown activation kind ", kind);
}

at::Tensor activation_forward(const at::Tensor& x_in, const at::Tensor& sigma_in, int64_t kind) {
  check_activation_inputs(x_in, kind);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor sigma = opmath_sigma(sigma_in, x);
  at::Tensor y = at::empty(x.sizes(), x.options());
  check_launch(lucidops::cuda::activation_forward(static_cast<int>(kind), dtype_of(x), x.const_data_ptr(),
                                                  sigma.const_data_ptr(), y.mutable_data_ptr(), x.numel(),
                                                  c10::cuda::getCurrentCUDAStream()),
               "activation_forward");
  return y;
}

std::tuple<at::Tensor, at::Tensor> activation_backward(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                       const at::Tensor& sigma_in, int64_t kind, bool need_sigma_grad) {
  check_activation_inputs(x_in, kind);
  TORCH_CHECK(grad_in.sizes() == x_in.sizes() && grad_in.scalar_type() == x_in.scalar_type() &&
                  grad_in.device() == x_in.device(),
              "lucidops cuda kernel: grad must match x in shape, dtype and device");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor sigma = opmath_sigma(sigma_in, x);
  at::Tensor grad_x = at::empty(x.sizes(), x.options());
  const int64_t blocks = need_sigma_grad ? lucidops::cuda::activation_backward_num_blocks(x.numel()) : 1;
  at::Tensor partials = at::zeros({blocks}, sigma.options());
  check_launch(lucidops::cuda::activation_backward(static_cast<int>(kind), dtype_of(x), grad.const_data_ptr(),
                                                   x.const_data_ptr(), sigma.const_data_ptr(), grad_x.mutable_data_ptr(),
                                                   partials.mutable_data_ptr(), need_sigma_grad, x.numel(),
                                                   c10::cuda::getCurrentCUDAStream()),
               "activation_backward");
  return {grad_x, partials.sum().to(sigma_in.scalar_type())};
}

}  // namespace cuda_host
}  // namespace lucidops
#endif  // LUCIDOPS_WITH_CUDA

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("SOURCE_HASH") = LUCIDOPS_STRINGIFY(LUCIDOPS_SOURCE_HASH);
#ifdef LUCIDOPS_WITH_CUDA
  namespace impl = lucidops::cuda_host;
  m.attr("DEVICE") = "cuda";
#else
  namespace impl = lucidops::cpu;
  m.attr("DEVICE") = "cpu";
#endif
  m.def("activation_forward", &impl::activation_forward, "sinc/gaussian forward", py::arg("x"), py::arg("sigma"),
        py::arg("kind"));
  m.def("activation_backward", &impl::activation_backward, "sinc/gaussian backward: (grad_x, grad_sigma)",
        py::arg("grad"), py::arg("x"), py::arg("sigma"), py::arg("kind"), py::arg("need_sigma_grad"));
#ifndef LUCIDOPS_WITH_CUDA
  // Gaussian point encoder (CPU only so far).
  m.def("gaussian_mixture_forward", &impl::gaussian_mixture_forward, "Gaussian mixture forward: (out, argmax)");
  m.def("gaussian_mixture_backward_max", &impl::gaussian_mixture_backward_max,
        "Gaussian mixture backward, reduce max: (points, means, precisions, weight, bias) grads");
  m.def("gaussian_phi", &impl::gaussian_phi, "phi (M, G) with culling");
  m.def("gaussian_phi_backward", &impl::gaussian_phi_backward, "grads of points, means, precisions from dL/dphi*phi");
#endif
}
