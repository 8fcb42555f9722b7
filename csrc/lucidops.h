// Declarations of every tensor-level entry point, shared by the one binding file
// (csrc/bindings.cpp) and the kernels that implement them.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace lucidops {

// Activation kinds; the numbering is part of the Python <-> C++ contract
// (lucidops.ops.activations.KIND).
enum ActivationKind : int64_t { kSinc = 0, kGaussian = 1 };
// Bounded LoRA functions; part of the contract too (lucidops.ops.lora.FN_CODE).
enum LoraFn : int64_t { kLoraSin = 0, kLoraTanh = 1 };

namespace cpu {
at::Tensor activation_forward(const at::Tensor& x, const at::Tensor& sigma, int64_t kind);
std::tuple<at::Tensor, at::Tensor> activation_backward(const at::Tensor& grad, const at::Tensor& x,
                                                       const at::Tensor& sigma, int64_t kind,
                                                       bool need_sigma_grad);

// 3D Gaussian point encoder mixture (csrc/cpu/gaussian_mixture.cpp). points (B, N, 3), means (G, 3),
// precisions (G, 6) upper triangles, weight (K, G), bias (K,), half_widths (G, 3) culling boxes.
std::tuple<at::Tensor, at::Tensor> gaussian_mixture_forward(const at::Tensor& points, const at::Tensor& means,
                                                            const at::Tensor& precisions, const at::Tensor& weight,
                                                            const at::Tensor& bias, const at::Tensor& half_widths,
                                                            bool cull, bool reduce_max);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> gaussian_mixture_backward_max(
    const at::Tensor& grad, const at::Tensor& points, const at::Tensor& means, const at::Tensor& precisions,
    const at::Tensor& weight, const at::Tensor& argmax, const at::Tensor& half_widths, bool cull);
at::Tensor gaussian_phi(const at::Tensor& points, const at::Tensor& means, const at::Tensor& precisions,
                        const at::Tensor& half_widths, bool cull);
std::tuple<at::Tensor, at::Tensor, at::Tensor> gaussian_phi_backward(const at::Tensor& coef, const at::Tensor& points,
                                                                     const at::Tensor& means,
                                                                     const at::Tensor& precisions);
// The order in which the culled forward visits a cloud's points (N, 3): by Morton code over the
// cloud's bounding box, ties in index order. Exposed for tests; CPU builds only.
at::Tensor gaussian_spatial_order(const at::Tensor& points);

// Bounded LoRA, placement "weight" (csrc/cpu/bounded_lora.cpp); float32 or float64, weight (N_out, K_in),
// lora_A (r, K_in), lora_B (N_out, r). The effective weight W + scale fn(omega B A):
at::Tensor lora_effective_weight(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                 int64_t fn, double omega, double scale);
// The backward's elementwise step: grad_weight (G = dY^T X, contiguous) is multiplied in place by
// fn'(omega B A); returns the effective weight (for dx) when asked, else an empty tensor.
at::Tensor lora_weight_backward(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                at::Tensor grad_weight, int64_t fn, double omega, double scale,
                                bool need_effective_weight);

// Attention for many small heads (csrc/cpu/attention.cpp); float16, bfloat16 (computed in
// float32), float32 or float64, any strides but a unit one along d. q (B, H, Nq, d), k and v
// (B, H, Nk, d), key_padding_mask bool (B, Nk) or empty. Forward: (out (B, H, Nq, d) in q's dtype
// laid out as (B, Nq, H, d), lse (B, H, Nq) in the compute dtype, out_lo: for bfloat16 the
// output's rounding residual (B, H, Nq, d), else empty). Backward, from the forward's out,
// out_lo and lse and grad_lse = dL/dlse (compute dtype, or empty when no loss uses the lse):
// (dq, dk, dv) in q's dtype. Dropout
// (lucidops.reference.attention_dropout): a 32-bit seed, the 24-bit keep threshold (0: no
// dropout) and the kept probabilities' scale.
//
// Calls with at most this many query rows per head form their scores from the keys' rows (no
// K^T; attention.cpp, rows_dot_keys); the op's CPU default reads it (ops/attention.py).
constexpr int64_t kAttentionDirectScoreRows = 8;
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k,
                                                                 const at::Tensor& v,
                                                                 const at::Tensor& key_padding_mask, bool causal,
                                                                 double scale, int64_t dropout_seed,
                                                                 int64_t dropout_threshold, double dropout_scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(const at::Tensor& grad_out, const at::Tensor& q,
                                                                  const at::Tensor& k, const at::Tensor& v,
                                                                  const at::Tensor& out, const at::Tensor& out_lo,
                                                                  const at::Tensor& lse, const at::Tensor& grad_lse,
                                                                  const at::Tensor& key_padding_mask, bool causal,
                                                                  double scale, int64_t dropout_seed,
                                                                  int64_t dropout_threshold, double dropout_scale);
}  // namespace cpu

}  // namespace lucidops
