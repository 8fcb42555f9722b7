// CPU kernels for bounded LoRA with placement "weight" (methods.md sections 3 and 5):
//   effective weight   W + s fn(omega B A)                       (forward, and dx's operand)
//   backward step      H = G fn'(omega B A), G = dY^T X given     (then dA, dB by two small matmuls)
// The large matmuls around them stay in ATen (oneDNN/MKL). What these kernels remove is the
// chain of N_out x K_in temporaries the plain expression makes (B A, omega B A, fn of it,
// s times that, the sum) and the passes over them: the phase of a row tile is formed in
// registers from the rank-r factors and used at once, and the backward forms fn and fn'
// from one phase, so the update is rebuilt and differentiated in one pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../lucidops.h"
#include "vec_math.h"

namespace lucidops {
namespace cpu {
namespace {

// Columns per tile: a block's phase tile stays in L1.
constexpr int64_t kCols = 256;
// Rows per block: each A element loaded feeds this many rows' phases (A is read once per
// block, not once per row).
constexpr int kBlockRows = 4;
// Blocks per parallel task.
constexpr int64_t kBlockGrain = 2;

using Lanes = vec_math::Vec<float>;

// Column vectors per pass of the phase product. With kBlockRows rows that is 8 independent
// FMA chains, what two FMA units at a latency of four cycles need (one vector per pass left
// four, and the product took 36% of a forward's samples against 21% for fn and the stores).
constexpr int kPhaseVectors = 2;

// phase[i][j0 + ..] = sum_r (omega B[row i, r]) A[r, col0 + j0 + ..] over C vectors of columns
// for Rows rows. Each A vector loaded feeds all Rows rows and stays in a register (GCC would
// otherwise fold it into every multiply as a memory operand, one load per row); each
// broadcast of omega B feeds the C vectors.
template <int Rows, int C>
inline void phase_columns(const float* a_col0, int64_t k_in, const float* scaled_b, int64_t rank, int64_t j0,
                          float* phase) {
  Lanes::type u[Rows][C] = {};
  for (int64_t r = 0; r < rank; ++r) {
    Lanes::type a_r[C];
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) a_r[c] = Lanes::reused(Lanes::load(a_col0 + r * k_in + j0 + c * Lanes::kLanes));
#pragma GCC unroll 4
    for (int i = 0; i < Rows; ++i) {
      const float b_ir = scaled_b[i * rank + r];
#pragma GCC unroll 2
      for (int c = 0; c < C; ++c) u[i][c] += b_ir * a_r[c];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < Rows; ++i) {
#pragma GCC unroll 2
    for (int c = 0; c < C; ++c) Lanes::store(phase + i * kCols + j0 + c * Lanes::kLanes, u[i][c]);
  }
}

// phase[i][j] = sum_r (omega B[row i, r]) A[r, col0 + j] for the block's Rows rows; omega is
// folded into the rank-r rows (scaled_b, Rows x rank), as the reference's phase is omega
// times the product. Every element sums its r terms in order, whichever loop computes it.
template <int Rows>
void phase_block(const float* a_col0, int64_t k_in, const float* scaled_b, int64_t rank, int64_t m, float* phase) {
  int64_t j = 0;
  for (; j + kPhaseVectors * Lanes::kLanes <= m; j += kPhaseVectors * Lanes::kLanes)
    phase_columns<Rows, kPhaseVectors>(a_col0, k_in, scaled_b, rank, j, phase);
  for (; j + Lanes::kLanes <= m; j += Lanes::kLanes) phase_columns<Rows, 1>(a_col0, k_in, scaled_b, rank, j, phase);
  for (; j < m; ++j) {  // the last columns of a row that is not a whole number of vectors
    for (int i = 0; i < Rows; ++i) {
      float u = 0.0f;
      for (int64_t r = 0; r < rank; ++r) u += scaled_b[i * rank + r] * a_col0[r * k_in + j];
      phase[i * kCols + j] = u;
    }
  }
}

// Whether a phase of the tile lies beyond the vectorised sin/cos range.
bool beyond_vector_range(const float* phase, int rows, int64_t m) {
  bool beyond = false;
  for (int i = 0; i < rows; ++i) beyond |= vec_math::any_beyond_sincos_range(phase + i * kCols, m);
  return beyond;
}

// fn and fn' of one phase. The float versions vectorise (vec_math.h); `libm` evaluates sin
// and cos in double instead, for phases beyond the vectorised range.
template <int64_t Fn>
inline void fn_and_derivative(float u, float* value, float* deriv) {
  if constexpr (Fn == kLoraSin) {
    vec_math::sincos(u, value, deriv);
  } else {
    *value = vec_math::tanh(u);
    *deriv = 1.0f - *value * *value;
  }
}

template <int64_t Fn>
inline void fn_and_derivative_libm(double u, double* value, double* deriv) {
  if constexpr (Fn == kLoraSin) {
    *value = std::sin(u);
    *deriv = std::cos(u);
  } else {
    *value = std::tanh(u);
    *deriv = 1.0 - *value * *value;
  }
}

// The outputs of a block's tile (its first `rows` rows) from its phases. `exact_sin`: some
// phase is out of the vectorised range, so every lane goes through libm (rare; a scalar loop).
template <int64_t Fn, bool kEffective, bool kGrad>
void outputs_block(const float* phase, int rows, int64_t m, const float* w, float* e, float* g, int64_t k_in,
                   float scale, bool exact_sin) {
  for (int i = 0; i < rows; ++i) {
    const float* p = phase + i * kCols;
    const float* w_row = w + i * k_in;
    float* e_row = e + i * k_in;
    float* g_row = g + i * k_in;
    if (exact_sin) {
      for (int64_t j = 0; j < m; ++j) {
        double value, deriv;
        fn_and_derivative_libm<Fn>(p[j], &value, &deriv);
        if constexpr (kEffective) e_row[j] = w_row[j] + scale * static_cast<float>(value);
        if constexpr (kGrad) g_row[j] *= static_cast<float>(deriv);
      }
      continue;
    }
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      float value, deriv;
      fn_and_derivative<Fn>(p[j], &value, &deriv);
      if constexpr (kEffective) e_row[j] = w_row[j] + scale * value;
      if constexpr (kGrad) g_row[j] *= deriv;
    }
  }
}

// Rows [row0, row0 + rows) of the pass, tile by tile, rows <= kBlockRows. The last block of
// a weight whose row count is not a multiple of kBlockRows forms its phases with zero rows of
// B in place of the missing ones, so every row's phase comes from the one instance of the
// product: with a block of one row of its own, GCC split the single chain's FMAs into
// multiplies and adds, and such a row rounded otherwise than the same row in a full block.
template <int64_t Fn, bool kEffective, bool kGrad>
void rows_pass(const float* weight, const float* a, const float* b, int64_t row0, int rows, int64_t k_in,
               int64_t rank, float omega, float scale, float* effective, float* grad_weight) {
  alignas(64) float phase[kBlockRows * kCols];
  std::vector<float> scaled_b(static_cast<size_t>(kBlockRows * rank), 0.0f);
  float* sb = scaled_b.data();
  for (int i = 0; i < rows; ++i)
    for (int64_t r = 0; r < rank; ++r) sb[i * rank + r] = omega * b[(row0 + i) * rank + r];
  for (int64_t col0 = 0; col0 < k_in; col0 += kCols) {
    const int64_t m = std::min(kCols, k_in - col0);
    phase_block<kBlockRows>(a + col0, k_in, sb, rank, m, phase);
    const bool beyond = Fn == kLoraSin && beyond_vector_range(phase, rows, m);
    const int64_t at = row0 * k_in + col0;
    outputs_block<Fn, kEffective, kGrad>(phase, rows, m, weight + at, kEffective ? effective + at : nullptr,
                                         kGrad ? grad_weight + at : nullptr, k_in, scale, beyond);
  }
}

template <int64_t Fn, bool kEffective, bool kGrad>
void lora_weight_pass_f32(const float* weight, const float* a, const float* b, int64_t n_out, int64_t k_in,
                          int64_t rank, float omega, float scale, float* effective, float* grad_weight) {
  const int64_t blocks = (n_out + kBlockRows - 1) / kBlockRows;
  at::parallel_for(0, blocks, kBlockGrain, [&](int64_t block_begin, int64_t block_end) {
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t row0 = block * kBlockRows;
      const int rows = static_cast<int>(std::min<int64_t>(kBlockRows, n_out - row0));
      rows_pass<Fn, kEffective, kGrad>(weight, a, b, row0, rows, k_in, rank, omega, scale, effective, grad_weight);
    }
  });
}

// float64 (e.g. gradcheck): libm, one element at a time, rows in parallel.
void lora_weight_pass_f64(const double* weight, const double* a, const double* b, int64_t n_out, int64_t k_in,
                          int64_t rank, int64_t fn, double omega, double scale, double* effective,
                          double* grad_weight) {
  at::parallel_for(0, n_out, 16, [&](int64_t row_begin, int64_t row_end) {
    for (int64_t n = row_begin; n < row_end; ++n) {
      for (int64_t k = 0; k < k_in; ++k) {
        double u = 0.0;
        for (int64_t r = 0; r < rank; ++r) u += (omega * b[n * rank + r]) * a[r * k_in + k];
        double value, deriv;
        if (fn == kLoraSin) fn_and_derivative_libm<kLoraSin>(u, &value, &deriv);
        else fn_and_derivative_libm<kLoraTanh>(u, &value, &deriv);
        if (effective) effective[n * k_in + k] = weight[n * k_in + k] + scale * value;
        if (grad_weight) grad_weight[n * k_in + k] *= deriv;
      }
    }
  });
}

// One pass over the N_out x K_in elements: `effective` (if not null) gets W + s fn(phase),
// `grad_weight` (if not null) is multiplied in place by fn'(phase).
template <int64_t Fn>
void dispatch_outputs_f32(const float* weight, const float* a, const float* b, int64_t n_out, int64_t k_in,
                          int64_t rank, float omega, float scale, float* effective, float* grad_weight) {
  if (effective && grad_weight)
    lora_weight_pass_f32<Fn, true, true>(weight, a, b, n_out, k_in, rank, omega, scale, effective, grad_weight);
  else if (effective)
    lora_weight_pass_f32<Fn, true, false>(weight, a, b, n_out, k_in, rank, omega, scale, effective, grad_weight);
  else if (grad_weight)
    lora_weight_pass_f32<Fn, false, true>(weight, a, b, n_out, k_in, rank, omega, scale, effective, grad_weight);
}

template <typename T>
void lora_weight_pass(const T* weight, const T* a, const T* b, int64_t n_out, int64_t k_in, int64_t rank, int64_t fn,
                      T omega, T scale, T* effective, T* grad_weight) {
  if constexpr (std::is_same_v<T, float>) {
    if (fn == kLoraSin)
      dispatch_outputs_f32<kLoraSin>(weight, a, b, n_out, k_in, rank, omega, scale, effective, grad_weight);
    else
      dispatch_outputs_f32<kLoraTanh>(weight, a, b, n_out, k_in, rank, omega, scale, effective, grad_weight);
  } else {
    lora_weight_pass_f64(weight, a, b, n_out, k_in, rank, fn, omega, scale, effective, grad_weight);
  }
}

void check_lora_inputs(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, int64_t fn) {
  TORCH_CHECK(fn == kLoraSin || fn == kLoraTanh, "lucidops cpu lora kernel: unknown fn code ", fn);
  TORCH_CHECK(weight.device().is_cpu() && lora_A.device().is_cpu() && lora_B.device().is_cpu(),
              "lucidops cpu lora kernel: weight, lora_A and lora_B must be CPU tensors");
  TORCH_CHECK(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
              "lucidops cpu lora kernel: float32 or float64 only (half inputs run in float32), got ",
              weight.scalar_type());
  TORCH_CHECK(lora_A.scalar_type() == weight.scalar_type() && lora_B.scalar_type() == weight.scalar_type(),
              "lucidops cpu lora kernel: weight, lora_A and lora_B must share a dtype");
  TORCH_CHECK(weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2, "lucidops cpu lora kernel: 2-D tensors");
  TORCH_CHECK(lora_A.size(1) == weight.size(1) && lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0),
              "lucidops cpu lora kernel: need weight (N_out, K_in), lora_A (r, K_in), lora_B (N_out, r)");
}

}  // namespace

at::Tensor lora_effective_weight(const at::Tensor& weight_in, const at::Tensor& lora_A_in,
                                 const at::Tensor& lora_B_in, int64_t fn, double omega, double scale) {
  check_lora_inputs(weight_in, lora_A_in, lora_B_in, fn);
  const at::Tensor weight = weight_in.contiguous(), a = lora_A_in.contiguous(), b = lora_B_in.contiguous();
  at::Tensor effective = at::empty(weight.sizes(), weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "lucidops_lora_effective_weight", [&] {
    lora_weight_pass<scalar_t>(weight.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                               b.const_data_ptr<scalar_t>(), weight.size(0), weight.size(1), a.size(0), fn,
                               static_cast<scalar_t>(omega), static_cast<scalar_t>(scale),
                               effective.mutable_data_ptr<scalar_t>(), nullptr);
  });
  return effective;
}

at::Tensor lora_weight_backward(const at::Tensor& weight_in, const at::Tensor& lora_A_in, const at::Tensor& lora_B_in,
                                at::Tensor grad_weight, int64_t fn, double omega, double scale,
                                bool need_effective_weight) {
  check_lora_inputs(weight_in, lora_A_in, lora_B_in, fn);
  TORCH_CHECK(grad_weight.sizes() == weight_in.sizes() && grad_weight.scalar_type() == weight_in.scalar_type() &&
                  grad_weight.device().is_cpu() && grad_weight.is_contiguous(),
              "lucidops cpu lora kernel: grad_weight must be a contiguous CPU tensor of weight's shape and dtype");
  const at::Tensor weight = weight_in.contiguous(), a = lora_A_in.contiguous(), b = lora_B_in.contiguous();
  at::Tensor effective =
      need_effective_weight ? at::empty(weight.sizes(), weight.options()) : at::empty({0}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "lucidops_lora_weight_backward", [&] {
    lora_weight_pass<scalar_t>(weight.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                               b.const_data_ptr<scalar_t>(), weight.size(0), weight.size(1), a.size(0), fn,
                               static_cast<scalar_t>(omega), static_cast<scalar_t>(scale),
                               need_effective_weight ? effective.mutable_data_ptr<scalar_t>() : nullptr,
                               grad_weight.mutable_data_ptr<scalar_t>());
  });
  return effective;
}

}  // namespace cpu
}  // namespace lucidops
