"""The backends of the LoRA ops (lucidops::bounded_lora_linear, its backward, and the
quantized-adapter pair), registered with lucidops.backends on import: the reference, the
cpp path (a C++ pass over the rank-r factors around ATen matmuls) and the Triton kernels.
The custom ops, their autograd and the public functions are in ops/lora.py."""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext, backends
from ..reference import lora as _reference

Grads = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def _reference_forward(x, weight, a, b, bias, fn, placement, omega, scale):
    return _reference.forward(x, weight, a, b, bias, fn, placement, omega, scale)


def _reference_backward(grad, x, weight, a, b, fn, placement, omega, scale, need_x, need_weight, need_bias,
                        need_lora):
    out = _reference.backward(grad, x, weight, a, b, fn, placement, omega, scale, need_x, need_weight, need_bias)
    if need_lora:
        return out
    # Unneeded gradients are empty tensors of x's dtype on every backend (and in the fake
    # kernel), also with float32 factors over a half x.
    return out[0], out[1], out[2], x.new_empty(0), x.new_empty(0)


# The fn numbering shared with csrc/lucidops.h (LoraFn).
FN_CODE = {"sin": 0, "tanh": 1}


@functools.lru_cache(maxsize=None)
def _onednn_has_bf16_gemm() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN, or without this query
        return False


def _product_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the cpp path's full-size products (x W^T or x W_eff^T, dY^T X, dY W): bfloat16
    for bfloat16 x where oneDNN has a bfloat16 GEMM (float32 accumulation, as a bfloat16
    nn.Linear; (4096, 1024) x (1024, 1024) took 8.9 ms there against 43.6 ms in float32 on
    2 AVX-512 cores), otherwise the compute dtype (float16 too: its CPU GEMM took 160 ms).
    The phase, fn and the effective weight stay float32 either way."""
    compute = _reference.opmath_dtype(x.dtype)
    return x.dtype if x.dtype == torch.bfloat16 and _onednn_has_bf16_gemm() else compute


def _cpp_forward(x: Tensor, weight: Tensor, a: Tensor, b: Tensor, bias: Optional[Tensor], fn: str,
                 placement: str, omega: float, scale: float) -> Tensor:
    """The cpp path. Placement "weight": the C++ kernel builds the effective weight
    W + s fn(omega B A) in one pass (no update temporaries), then one ATen matmul (in
    _product_dtype); nothing is kept for backward. Placement "output" has no full-rank update:
    the base's product x W^T (in _product_dtype, then in the compute dtype) and U = x A^T by
    ATen, then the same C++ pass adds s fn(omega U B^T) to it, with the (M, N_out) phase formed
    tile by tile from the rank-r U and B (the pass's "weight" is the base product, its factors
    B^T and U)."""
    compute = _reference.opmath_dtype(x.dtype)
    if placement == "weight":
        product = _product_dtype(x)
        w_eff = _ext.load("cpu").lora_effective_weight(weight.to(compute), a.to(compute), b.to(compute),
                                                       FN_CODE[fn], omega, scale).to(product)
        xp = x.to(product)
        if bias is not None:
            return torch.addmm(bias.to(product), xp, w_eff.T).to(x.dtype)
        return torch.mm(xp, w_eff.T).to(x.dtype)
    xc = x.to(compute)
    u = torch.mm(xc, a.to(compute).T)
    product = _product_dtype(x)
    if product == compute:
        base = torch.mm(xc, weight.to(compute).T) if bias is None else torch.addmm(bias.to(compute), xc,
                                                                                 weight.to(compute).T)
    else:  # the base product in bfloat16, raised to the float32 of the adapter term
        base = torch.mm(x, weight.to(product).T).to(compute)
        if bias is not None:
            base.add_(bias)
    y = _ext.load("cpu").lora_effective_weight(base, b.to(compute).T, u, FN_CODE[fn], omega, scale)
    return y.to(x.dtype)


def _cpp_backward(grad, x, weight, a, b, fn, placement, omega, scale, need_x, need_weight, need_bias,
                  need_lora) -> Grads:
    compute = _reference.opmath_dtype(x.dtype)
    ac, bc = a.to(compute), b.to(compute)
    empty = x.new_empty(0)
    grad_x = grad_w = grad_a = grad_b = empty
    product = _product_dtype(x)
    gp = grad.to(product)
    if placement == "weight":
        ext = _ext.load("cpu")
        if need_lora or need_weight:
            gw = torch.mm(gp.T, x.to(product))                     # G = dY^T X
            if need_weight:
                grad_w = gw.to(weight.dtype)
        if need_lora:
            # One C++ pass over the phase: H / (s omega) = G fn'(P) in place, on a float32 G of
            # its own (a copy when G is also dweight, or in bfloat16), and the effective weight
            # for dx when it is needed.
            h = gw.to(compute)
            if need_weight and grad_w.data_ptr() == h.data_ptr():
                h = h.clone()
            w_eff = ext.lora_weight_backward(weight.to(compute), ac, bc, h, FN_CODE[fn], omega, scale, need_x)
            # s omega applied to the small results, not to the N_out x K_in H.
            grad_a = torch.mm(bc.T, h).mul_(scale * omega)
            grad_b = torch.mm(h, ac.T).mul_(scale * omega)
        elif need_x:
            w_eff = ext.lora_effective_weight(weight.to(compute), ac, bc, FN_CODE[fn], omega, scale)
        if need_x:
            grad_x = torch.mm(gp, w_eff.to(product))
    else:
        xc = x.to(compute)
        if need_lora or need_x:
            u = torch.mm(xc, ac.T)
            # H = dY fn'(omega U B^T) in one C++ pass on a copy of dY in the compute dtype (the
            # phase formed tile by tile from U and B, as in placement "weight"; the pass reads its
            # "weight" only for an effective weight, not asked for here); s omega is applied to
            # the rank-r results, not to the M x N_out H.
            h = grad.to(compute, copy=True).contiguous()
            _ext.load("cpu").lora_weight_backward(h, bc.T, u, h, FN_CODE[fn], omega, scale, False)
            du = torch.mm(h, bc).mul_(scale * omega)
            if need_lora:
                grad_b = torch.mm(h.T, u).mul_(scale * omega)
                grad_a = torch.mm(du.T, xc)
            if need_x:
                # The base's dY W in the products' dtype, the rank-r du A in float32.
                grad_x = torch.mm(gp, weight.to(product)).to(compute).addmm_(du, ac)
        if need_weight:
            grad_w = torch.mm(gp.T, x.to(product)).to(weight.dtype)
    grad_bias = grad.sum(0, dtype=compute).to(weight.dtype) if need_bias else empty
    if not need_lora:  # empty, in x's dtype as the other backends and the fake kernel give it
        return grad_x.to(x.dtype), grad_w, grad_bias, empty, empty
    return (grad_x.to(x.dtype), grad_w, grad_bias, grad_a.to(a.dtype), grad_b.to(b.dtype))


def _triton_forward(x, weight, a, b, bias, fn, placement, omega, scale):
    from ..triton_kernels import lora as tk

    return tk.forward(x, weight, a, b, bias, fn, placement, omega, scale)


def _triton_backward(grad, x, weight, a, b, fn, placement, omega, scale, need_x, need_weight, need_bias,
                     need_lora):
    from ..triton_kernels import lora as tk

    return tk.backward(grad, x, weight, a, b, fn, placement, omega, scale, need_x, need_weight, need_bias,
                       need_lora)


_NOTES = {
    "cpp": "placement weight: a C++ pass builds the effective weight W + s fn(omega B A) from the rank-r "
           "factors (forward, dx) and forms G fn'(omega B A) in place (dA, dB), around ATen matmuls "
           "(bfloat16 ones for a bfloat16 x where oneDNN has a bfloat16 GEMM, else float32); "
           "placement output: the same C++ pass adds s fn(omega U B^T) to the base product x W^T and forms "
           "dY fn'(omega U B^T), the (M, N_out) phase formed tile by tile from U = x A^T and B; saves only x, "
           "weight, A, B",
    "triton": "up to 128 rows the update's tiles are regenerated inside the matmul K-loop (forward, dx) "
              "and the weight-gradient tile is reduced into dA, dB without reaching memory; above, Triton "
              "kernels build the effective weight once per call in <= 8 MiB column chunks for torch's "
              "matmul and reduce chunks of torch's dY^T X into dA, dB",
}
# What the triton kernels take (triton_kernels.lora checks it again, for a forced backend):
# half and single precision x, and for placement "output" a rank up to its widest padding.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_OUTPUT_MAX_RANK = 64


def _gpu_reference_where_triton_refuses(device_type: str, x: Tensor, rank: int, placement: str):
    """Automatic selection on a GPU: the reference for the calls the triton kernels refuse
    (float64 x, placement "output" past rank 64), which raised their TypeError/ValueError
    where the README promises a backend that runs them; None (the usual order) otherwise."""
    if device_type == "cpu":
        return None
    if x.dtype not in TRITON_DTYPES or (placement == "output" and rank > TRITON_OUTPUT_MAX_RANK):
        return ("reference",)
    return None


def _forward_preference(device_type, x, weight, a, b, bias, fn, placement, *_):
    return _gpu_reference_where_triton_refuses(device_type, x, a.shape[0], placement)


def _backward_preference(device_type, grad, x, weight, a, b, fn, placement, *_):
    return _gpu_reference_where_triton_refuses(device_type, x, a.shape[0], placement)


def _quant_preference(device_type, first, *_):
    """Forward (x, ...) and backward (grad, ...) alike: grad has x's dtype."""
    return _gpu_reference_where_triton_refuses(device_type, first, 0, "weight")


backends.register_op("bounded_lora_linear",
                     {"reference": _reference_forward, "cpp": _cpp_forward, "triton": _triton_forward},
                     notes=_NOTES, preference_for_call=_forward_preference)
backends.register_op("bounded_lora_linear_backward",
                     {"reference": _reference_backward, "cpp": _cpp_backward, "triton": _triton_backward},
                     notes=_NOTES, preference_for_call=_backward_preference)


# Quantized adapters: the reference and cpp backends dequantize in PyTorch, then run the plain path.
# They dequantize in float32 (float64 for float64 x), as the Triton kernel's prologue does: in a
# half x's dtype the factors were rounded to 8 or 11 bits before the phase omega B A, and with
# bfloat16 at omega 300 the output erred by 14% against Triton's 0.26%.

def _dequantized(a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, method, group_a, group_b, x_dtype):
    """(A, B) dequantized in PyTorch from kernel tensors (the reference and cpp paths), in the
    opmath dtype of x's dtype."""
    from ..quant.adapters import QuantizedTensor

    dtype = _reference.opmath_dtype(x_dtype)

    def one(codes, t0, t1, group):
        side = dict(scales=t0, minimums=t1) if method == "uniform" else dict(codebook=t0)
        return QuantizedTensor(codes=codes.reshape(-1), shape=codes.shape, dtype=dtype, bits=8, method=method,
                               group_size=group, **side).dequantize(dtype)

    return one(a_codes, a_t0, a_t1, group_a), one(b_codes, b_t0, b_t1, group_b)


def _quant_fallback_forward(plain):
    def forward(x, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, bias, method, group_a, group_b, fn, omega,
                scale):
        a, b = _dequantized(a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, method, group_a, group_b, x.dtype)
        return plain(x, weight, a, b, bias, fn, "weight", omega, scale)

    return forward


def _quant_fallback_backward(plain):
    def backward(grad, x, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, method, group_a, group_b, fn, omega,
                 scale, need_x, need_weight, need_bias):
        a, b = _dequantized(a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, method, group_a, group_b, x.dtype)
        return plain(grad, x, weight, a, b, fn, "weight", omega, scale, need_x, need_weight, need_bias, False)[:3]

    return backward


def _triton_quant_forward(*args):
    from ..triton_kernels import lora as tk

    return tk.quant_forward(*args)


def _triton_quant_backward(*args):
    from ..triton_kernels import lora as tk

    return tk.quant_backward(*args)


_QUANT_NOTES = {
    "reference": "dequantizes A and B in PyTorch (in float32, float64 for float64 x), then the reference path",
    "cpp": "dequantizes A and B in PyTorch (in float32, float64 for float64 x), then the cpp path",
    "triton": "dequantizes tiles of A and B from their uint8 codes in the kernel prologue (forward and dx), "
              "so neither the factors nor the update reach global memory; dweight needs no adapter",
}
backends.register_op("bounded_lora_linear_quant",
                     {"reference": _quant_fallback_forward(_reference_forward),
                      "cpp": _quant_fallback_forward(_cpp_forward), "triton": _triton_quant_forward},
                     notes=_QUANT_NOTES, preference_for_call=_quant_preference)
backends.register_op("bounded_lora_linear_quant_backward",
                     {"reference": _quant_fallback_backward(_reference_backward),
                      "cpp": _quant_fallback_backward(_cpp_backward), "triton": _triton_quant_backward},
                     notes=_QUANT_NOTES, preference_for_call=_quant_preference)
