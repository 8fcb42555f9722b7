"""Reference sine and bounded LoRA linear layers (methods.md sections 3 and 5), in PyTorch.

With x (M, K_in), W0 (N_out, K_in), A (r, K_in), B (N_out, r), scale s (the whole
multiplier, e.g. alpha / r / g), frequency omega and a bounded fn in {sin, tanh}:

    placement "weight":  y = x (W0 + s fn(omega B A))^T + bias
    placement "output":  y = x W0^T + s fn(omega (x A^T) B^T) + bias

The phase omega B A (or omega (x A^T) B^T) is formed in float32 whatever the input dtype
(float64 for float64 inputs): "opmath". Everything here materialises the full-rank
update, as the authors' code does; it is the ground truth the fused kernels are tested
against, and its backward is written out explicitly (no autograd):

    weight:  P = omega B A,  G = dY^T X,  H = G * s omega fn'(P)
             dX = dY (W0 + s fn(P)),  dA = B^T H,  dB = H A^T,  dW0 = G,  dbias = sum dY
    output:  U = X A^T,  Z = omega U B^T,  Gz = dY * s fn'(Z)
             dB = omega Gz^T U,  dU = omega Gz B,  dA = dU^T X,  dX = dY W0 + dU A
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._dtypes import opmath_dtype  # noqa: F401  (callers also read it here)

FNS = ("sin", "tanh")
PLACEMENTS = ("weight", "output")


def bounded(fn: str, z: Tensor) -> Tensor:
    """fn(z) for fn in FNS."""
    if fn == "sin":
        return torch.sin(z)
    if fn == "tanh":
        return torch.tanh(z)
    raise ValueError(f"fn must be one of {FNS}, got {fn!r}")


def bounded_derivative(fn: str, z: Tensor) -> Tensor:
    """fn'(z): cos(z) for sin, 1 - tanh(z)^2 for tanh."""
    if fn == "sin":
        return torch.cos(z)
    if fn == "tanh":
        t = torch.tanh(z)
        return 1.0 - t * t
    raise ValueError(f"fn must be one of {FNS}, got {fn!r}")


def phase(lora_A: Tensor, lora_B: Tensor, omega: float) -> Tensor:
    """omega * B @ A in opmath precision: (N_out, K_in)."""
    compute = opmath_dtype(lora_A.dtype)
    return omega * (lora_B.to(compute) @ lora_A.to(compute))


def delta_weight(lora_A: Tensor, lora_B: Tensor, fn: str, omega: float, scale: float) -> Tensor:
    """The full-rank update s * fn(omega B A) in opmath precision: (N_out, K_in)."""
    return scale * bounded(fn, phase(lora_A, lora_B, omega))


def _check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


def forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
            fn: str, placement: str, omega: float, scale: float) -> Tensor:
    """y for 2-D x (M, K_in), in x's dtype (computed in opmath)."""
    _check_placement(placement)
    compute = opmath_dtype(x.dtype)
    xc, wc = x.to(compute), weight.to(compute)
    if placement == "weight":
        y = xc @ (wc + delta_weight(lora_A, lora_B, fn, omega, scale)).T
    else:
        z = omega * ((xc @ lora_A.to(compute).T) @ lora_B.to(compute).T)
        y = xc @ wc.T + scale * bounded(fn, z)
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype).contiguous()


def backward(grad: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, fn: str, placement: str,
             omega: float, scale: float, need_x: bool, need_weight: bool, need_bias: bool
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dA, dB) for 2-D x; a gradient that is not needed is an empty
    (0,) tensor. dA and dB are always computed (the adapter is what is trained)."""
    _check_placement(placement)
    compute = opmath_dtype(x.dtype)
    g, xc, wc = grad.to(compute), x.to(compute), weight.to(compute)
    ac, bc = lora_A.to(compute), lora_B.to(compute)
    empty = x.new_empty(0)  # also the placeholder for a gradient that is not needed
    if placement == "weight":
        p = omega * (bc @ ac)
        gw = g.T @ xc                                            # G = dY^T X  (N_out, K_in)
        h = gw * (scale * omega) * bounded_derivative(fn, p)
        grad_a, grad_b = bc.T @ h, h @ ac.T
        grad_x = g @ (wc + scale * bounded(fn, p)) if need_x else empty
    else:
        u = xc @ ac.T
        z = omega * (u @ bc.T)
        gz = g * scale * bounded_derivative(fn, z)
        grad_b = omega * (gz.T @ u)
        du = omega * (gz @ bc)
        grad_a = du.T @ xc
        grad_x = g @ wc + du @ ac if need_x else empty
        gw = g.T @ xc if need_weight else empty
    return (
        grad_x.to(x.dtype).contiguous() if need_x else empty,
        gw.to(weight.dtype).contiguous() if need_weight else empty,
        g.sum(0).to(weight.dtype) if need_bias else empty,
        grad_a.to(lora_A.dtype).contiguous(),
        grad_b.to(lora_B.dtype).contiguous(),
    )


def sine_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor] = None, *,
                     omega: float, scale: float) -> Tensor:
    """x (W0 + s sin(omega B A))^T + bias for x (..., K_in): the plain-PyTorch definition."""
    return bounded_lora_linear(x, weight, lora_A, lora_B, bias, fn="sin", omega=omega, scale=scale)


def bounded_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor] = None, *,
                        fn: str = "sin", omega: float = 1.0, scale: float, placement: str = "weight") -> Tensor:
    """Bounded LoRA for x (..., K_in), either placement: the plain-PyTorch definition."""
    y = forward(x.reshape(-1, x.shape[-1]), weight, lora_A, lora_B, bias, fn, placement, omega, scale)
    return y.reshape(*x.shape[:-1], weight.shape[0])
