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

#include "cuda/gaussian_mixture.h"
#include "cuda/launch.h"
#else
#include "cpu/vec_math.h"
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
  at::Tensor partials = at::zeros({blocks}, sigma.options().dtype(at::kDouble));
  check_launch(lucidops::cuda::activation_backward(static_cast<int>(kind), dtype_of(x), grad.const_data_ptr(),
                                                   x.const_data_ptr(), sigma.const_data_ptr(), grad_x.mutable_data_ptr(),
                                                   partials.mutable_data_ptr(), need_sigma_grad, x.numel(),
                                                   c10::cuda::getCurrentCUDAStream()),
               "activation_backward");
  return {grad_x, partials.sum().to(sigma_in.scalar_type())};
}

// ---- Gaussian point encoder mixture (csrc/cuda/gaussian_mixture.cu); same contract as the cpu kernels.

void check_gaussian_params(const at::Tensor& points, const at::Tensor& means, const at::Tensor& precisions,
                           const at::Tensor& half_widths) {
  TORCH_CHECK(points.is_cuda(), "lucidops cuda kernel: points must be a CUDA tensor");
  TORCH_CHECK(points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble,
              "lucidops cuda gaussian kernel: float32 or float64 only (half inputs run in float32), got ",
              points.scalar_type());
  const int64_t G = means.size(0);
  TORCH_CHECK(means.dim() == 2 && means.size(1) == 3, "lucidops cuda kernel: means must be (G, 3)");
  TORCH_CHECK(precisions.dim() == 2 && precisions.size(0) == G && precisions.size(1) == 6,
              "lucidops cuda kernel: precisions must be (G, 6)");
  TORCH_CHECK(half_widths.dim() == 2 && half_widths.size(0) == G && half_widths.size(1) == 3,
              "lucidops cuda kernel: half_widths must be (G, 3)");
  for (const at::Tensor* t : {&means, &precisions, &half_widths})
    TORCH_CHECK(t->scalar_type() == points.scalar_type() && t->device() == points.device(),
                "lucidops cuda kernel: parameters must be tensors of points' dtype on points' device");
}

std::tuple<at::Tensor, at::Tensor> gaussian_mixture_forward(const at::Tensor& points_in, const at::Tensor& means_in,
                                                            const at::Tensor& precisions_in,
                                                            const at::Tensor& weight_in, const at::Tensor& bias_in,
                                                            const at::Tensor& half_widths_in, bool cull,
                                                            bool reduce_max) {
  check_gaussian_params(points_in, means_in, precisions_in, half_widths_in);
  TORCH_CHECK(points_in.dim() == 3 && points_in.size(2) == 3, "lucidops cuda kernel: points must be (B, N, 3)");
  const int64_t B = points_in.size(0), N = points_in.size(1), G = means_in.size(0), K = weight_in.size(0);
  TORCH_CHECK(N > 0, "lucidops cuda kernel: N must be > 0");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == G && bias_in.dim() == 1 && bias_in.size(0) == K,
              "lucidops cuda kernel: weight must be (K, G) and bias (K,)");
  TORCH_CHECK(weight_in.scalar_type() == points_in.scalar_type() && bias_in.scalar_type() == points_in.scalar_type() &&
                  weight_in.device() == points_in.device() && bias_in.device() == points_in.device(),
              "lucidops cuda kernel: weight and bias must have points' dtype and device");
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor points = points_in.contiguous(), means = means_in.contiguous(),
                   precisions = precisions_in.contiguous(), bias = bias_in.contiguous(),
                   half = half_widths_in.contiguous();
  const at::Tensor weight_t = weight_in.t().contiguous();  // (G, K): a tile's channels are contiguous
  const auto opts = points.options();
  at::Tensor out = reduce_max ? at::empty({B, K}, opts) : at::empty({B, N, K}, opts);
  at::Tensor argmax = reduce_max ? at::empty({B, K}, opts.dtype(at::kLong)) : at::empty({0}, opts.dtype(at::kLong));
  const int64_t chunks = lucidops::cuda::gaussian_forward_chunks(N);
  at::Tensor part_max, part_idx;
  if (reduce_max && chunks > 1) {
    part_max = at::empty({B, chunks, K}, opts);
    part_idx = at::empty({B, chunks, K}, opts.dtype(at::kLong));
  }
  check_launch(lucidops::cuda::gaussian_mixture_forward(
                   dtype_of(points), points.const_data_ptr(), means.const_data_ptr(), precisions.const_data_ptr(),
                   half.const_data_ptr(), weight_t.const_data_ptr(), bias.const_data_ptr(), B, N, G, K, cull,
                   reduce_max, reduce_max ? nullptr : out.mutable_data_ptr(),
                   reduce_max ? out.mutable_data_ptr() : nullptr,
                   reduce_max ? argmax.mutable_data_ptr<int64_t>() : nullptr,
                   part_max.defined() ? part_max.mutable_data_ptr() : nullptr,
                   part_idx.defined() ? part_idx.mutable_data_ptr<int64_t>() : nullptr,
                   c10::cuda::getCurrentCUDAStream()),
               "gaussian_mixture_forward");
  return {out, argmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_mixture_backward_max(
    const at::Tensor& grad_in, const at::Tensor& points_in, const at::Tensor& means_in,
    const at::Tensor& precisions_in, const at::Tensor& weight_in, const at::Tensor& argmax_in,
    const at::Tensor& half_widths_in, bool cull) {
  check_gaussian_params(points_in, means_in, precisions_in, half_widths_in);
  TORCH_CHECK(points_in.dim() == 3 && points_in.size(2) == 3, "lucidops cuda kernel: points must be (B, N, 3)");
  const int64_t B = points_in.size(0), N = points_in.size(1), G = means_in.size(0), K = weight_in.size(0);
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == G && weight_in.scalar_type() == points_in.scalar_type() &&
                  weight_in.device() == points_in.device(),
              "lucidops cuda kernel: weight must be (K, G) of points' dtype and device");
  TORCH_CHECK(grad_in.sizes() == at::IntArrayRef({B, K}) && grad_in.scalar_type() == points_in.scalar_type() &&
                  grad_in.device() == points_in.device(),
              "lucidops cuda kernel: grad must be (B, K) of points' dtype and device");
  TORCH_CHECK(argmax_in.sizes() == at::IntArrayRef({B, K}) && argmax_in.scalar_type() == at::kLong &&
                  argmax_in.device() == points_in.device(),
              "lucidops cuda kernel: argmax must be (B, K) int64 on points' device");
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor grad = grad_in.contiguous(), points = points_in.contiguous(), means = means_in.contiguous(),
                   precisions = precisions_in.contiguous(), weight = weight_in.contiguous(),
                   argmax = argmax_in.contiguous(), half = half_widths_in.contiguous();
  // Out-of-range indices would read out of bounds: check them, as the cpu kernel does (one sync).
  if (argmax.numel() > 0) {
    const auto range = at::aminmax(argmax);
    TORCH_CHECK(std::get<0>(range).item<int64_t>() >= 0 && std::get<1>(range).item<int64_t>() < N,
                "lucidops cuda kernel: argmax out of range");
  }
  const auto opts = points.options();
  const int64_t splits = lucidops::cuda::gaussian_backward_splits(B);
  const int64_t kblocks = lucidops::cuda::gaussian_backward_channel_blocks(K);
  const int64_t tiles = lucidops::cuda::gaussian_gauss_tiles(G);
  // Partial sums, reduced below in a fixed order (no atomics: reproducible gradients).
  at::Tensor gw_part = at::zeros({splits, K, G}, opts);
  at::Tensor gmp_part = at::zeros({splits, kblocks, G, 9}, opts);
  at::Tensor gx_part = at::zeros({tiles, B, K, 3}, opts);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(lucidops::cuda::gaussian_mixture_backward_max(
                   dtype_of(points), grad.const_data_ptr(), points.const_data_ptr(), argmax.const_data_ptr<int64_t>(),
                   means.const_data_ptr(), precisions.const_data_ptr(), half.const_data_ptr(),
                   weight.const_data_ptr(), B, N, G, K, cull, gw_part.mutable_data_ptr(), gmp_part.mutable_data_ptr(),
                   gx_part.mutable_data_ptr(), stream),
               "gaussian_mixture_backward_max");
  const at::Tensor gx_bk = gx_part.sum(0).contiguous();  // (B, K, 3)
  at::Tensor g_pts = at::zeros_like(points);
  check_launch(lucidops::cuda::gaussian_scatter_point_grads(dtype_of(points), gx_bk.const_data_ptr(),
                                                            argmax.const_data_ptr<int64_t>(), B, N, K,
                                                            g_pts.mutable_data_ptr(), stream),
               "gaussian_scatter_point_grads");
  const at::Tensor gmp = gmp_part.sum(at::IntArrayRef({0, 1}));  // (G, 9)
  return {g_pts, gmp.slice(1, 0, 3).contiguous(), gmp.slice(1, 3, 9).contiguous(), gw_part.sum(0),
          grad.sum(0)};
}

at::Tensor gaussian_phi(const at::Tensor& points_in, const at::Tensor& means_in, const at::Tensor& precisions_in,
                        const at::Tensor& half_widths_in, bool cull) {
  check_gaussian_params(points_in, means_in, precisions_in, half_widths_in);
  TORCH_CHECK(points_in.dim() == 2 && points_in.size(1) == 3, "lucidops cuda kernel: points must be (M, 3)");
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor points = points_in.contiguous(), means = means_in.contiguous(),
                   precisions = precisions_in.contiguous(), half = half_widths_in.contiguous();
  const int64_t M = points.size(0), G = means.size(0);
  at::Tensor out = at::empty({M, G}, points.options());
  check_launch(lucidops::cuda::gaussian_phi(dtype_of(points), points.const_data_ptr(), means.const_data_ptr(),
                                            precisions.const_data_ptr(), half.const_data_ptr(), M, G, cull,
                                            out.mutable_data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "gaussian_phi");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_phi_backward(const at::Tensor& coef_in,
                                                                     const at::Tensor& points_in,
                                                                     const at::Tensor& means_in,
                                                                     const at::Tensor& precisions_in) {
  TORCH_CHECK(points_in.dim() == 2 && points_in.size(1) == 3, "lucidops cuda kernel: points must be (M, 3)");
  const int64_t M = points_in.size(0), G = means_in.size(0);
  TORCH_CHECK(coef_in.sizes() == at::IntArrayRef({M, G}) && coef_in.scalar_type() == points_in.scalar_type() &&
                  coef_in.device() == points_in.device(),
              "lucidops cuda kernel: coef must be (M, G) of points' dtype and device");
  check_gaussian_params(points_in, means_in, precisions_in, at::empty({G, 3}, points_in.options()));
  const c10::cuda::CUDAGuard guard(points_in.device());
  const at::Tensor coef = coef_in.contiguous(), points = points_in.contiguous(), means = means_in.contiguous(),
                   precisions = precisions_in.contiguous();
  const int64_t tiles = lucidops::cuda::gaussian_gauss_tiles(G);
  const int64_t blocks = lucidops::cuda::gaussian_phi_backward_blocks(M);
  at::Tensor gx_part = at::zeros({tiles, M, 3}, points.options());
  at::Tensor gmp_part = at::zeros({blocks, G, 9}, points.options());
  check_launch(lucidops::cuda::gaussian_phi_backward(dtype_of(points), coef.const_data_ptr(), points.const_data_ptr(),
                                                     means.const_data_ptr(), precisions.const_data_ptr(), M, G,
                                                     gx_part.mutable_data_ptr(), gmp_part.mutable_data_ptr(),
                                                     c10::cuda::getCurrentCUDAStream()),
               "gaussian_phi_backward");
  const at::Tensor gmp = gmp_part.sum(0);
  return {gx_part.sum(0), gmp.slice(1, 0, 3).contiguous(), gmp.slice(1, 3, 9).contiguous()};
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
  // Bytes per vector register the kernels were compiled for (64: AVX-512, 32: AVX2): the
  // attention op's CPU default depends on it (ops/attention.py).
  m.attr("VECTOR_BYTES") = lucidops::vec_math::kVecBytes;
  // Query rows per head up to which the attention kernel forms scores from the keys' rows.
  m.attr("ATTENTION_DIRECT_SCORE_ROWS") = lucidops::cpu::kAttentionDirectScoreRows;
#endif
  m.def("activation_forward", &impl::activation_forward, "sinc/gaussian forward", py::arg("x"), py::arg("sigma"),
        py::arg("kind"));
  m.def("activation_backward", &impl::activation_backward, "sinc/gaussian backward: (grad_x, grad_sigma)",
        py::arg("grad"), py::arg("x"), py::arg("sigma"), py::arg("kind"), py::arg("need_sigma_grad"));
  // Gaussian point encoder (cpu: csrc/cpu/gaussian_mixture.cpp, cuda: csrc/cuda/gaussian_mixture.cu).
  m.def("gaussian_mixture_forward", &impl::gaussian_mixture_forward, "Gaussian mixture forward: (out, argmax)");
  m.def("gaussian_mixture_backward_max", &impl::gaussian_mixture_backward_max,
        "Gaussian mixture backward, reduce max: (points, means, precisions, weight, bias) grads");
  m.def("gaussian_phi", &impl::gaussian_phi, "phi (M, G) with culling");
  m.def("gaussian_phi_backward", &impl::gaussian_phi_backward, "grads of points, means, precisions from dL/dphi*phi");
#ifndef LUCIDOPS_WITH_CUDA
  m.def("gaussian_spatial_order", &impl::gaussian_spatial_order, "culled forward's point order (N,) of points (N, 3)");
  // Attention for many small heads (csrc/cpu/attention.cpp).
  m.def("attention_forward", &impl::attention_forward, "(out, lse, out_lo) of q, k, v (B, H, N, d)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("key_padding_mask"), py::arg("causal"),
        py::arg("scale"), py::arg("dropout_seed") = 0, py::arg("dropout_threshold") = 0,
        py::arg("dropout_scale") = 1.0);
  m.def("attention_backward", &impl::attention_backward, "(dq, dk, dv) from the forward's out, out_lo and lse",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("out_lo"),
        py::arg("lse"), py::arg("grad_lse"),
        py::arg("key_padding_mask"), py::arg("causal"), py::arg("scale"), py::arg("dropout_seed") = 0,
        py::arg("dropout_threshold") = 0, py::arg("dropout_scale") = 1.0);
  // Bounded LoRA, placement "weight" (csrc/cpu/bounded_lora.cpp).
  m.def("lora_effective_weight", &impl::lora_effective_weight, "W + scale fn(omega B A)", py::arg("weight"),
        py::arg("lora_A"), py::arg("lora_B"), py::arg("fn"), py::arg("omega"), py::arg("scale"));
  m.def("lora_weight_backward", &impl::lora_weight_backward,
        "grad_weight *= fn'(omega B A) in place; returns the effective weight if asked, else an empty tensor",
        py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("grad_weight"), py::arg("fn"),
        py::arg("omega"), py::arg("scale"), py::arg("need_effective_weight"));
#endif
}
