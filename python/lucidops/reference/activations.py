"""Reference sinc and Gaussian activations (methods.md section 10), in PyTorch.

With u = x / sigma:
    sinc(u)     = sin(u) / u, 1 at u = 0          sinc'(u)     = (u cos u - sin u) / u^2
    gaussian(u) = exp(-u^2 / 2)                    gaussian'(u) = -u exp(-u^2 / 2)
and for both  d/dx = f'(u) / sigma,  d/dsigma = -f'(u) u / sigma.
Computed in float32 for half inputs ("opmath"), in the input's precision otherwise.
A quotient x / sigma that overflows to +-inf is taken as +-1e38 (``quotient``; every backend
does the same): both functions and their x-derivatives are then ~0, as they tend to, where
inf would give sin(inf) and inf * 0, NaN.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._dtypes import opmath_dtype  # noqa: F401  (callers also read it here)

KINDS = ("sinc", "gaussian")


SATURATED_QUOTIENT = 1e38  # finite in float32, where x / sigma overflowed


def quotient(x: Tensor, s: Tensor) -> Tensor:
    """u = x / sigma, with an overflow to +-inf replaced by +-SATURATED_QUOTIENT (NaN stays NaN)."""
    u = x / s
    return torch.where(torch.isinf(u), torch.sign(u) * SATURATED_QUOTIENT, u)


SINC_DERIVATIVE_FAR = 1e18


def sinc_derivative(u: Tensor) -> Tensor:
    """(u cos u - sin u) / u^2, with its Taylor series where the formula cancels, and cos u / u
    past |u| = SINC_DERIVATIVE_FAR: u^2 overflows float32 past 1.8e19 (the derivative, and
    sigma's gradient f'(u) u ~ cos u, came out 0), and sin u / u^2 is below cos u / u's
    rounding there."""
    bound = 0.05 if u.dtype == torch.float64 else 0.5
    u2 = u * u
    series = u * (-1.0 / 3 + u2 * (1.0 / 30 + u2 * (-1.0 / 840 + u2 * (1.0 / 45360 + u2 * (-1.0 / 3991680)))))
    safe = torch.where(u.abs() < bound, torch.ones_like(u), u)
    direct = (safe * torch.cos(safe) - torch.sin(safe)) / (safe * safe)
    direct = torch.where(safe.abs() > SINC_DERIVATIVE_FAR, torch.cos(safe) / safe, direct)
    return torch.where(u.abs() < bound, series, direct)


def value(kind: str, u: Tensor) -> Tensor:
    if kind == "sinc":
        safe = torch.where(u == 0, torch.ones_like(u), u)
        return torch.where(u == 0, torch.ones_like(u), torch.sin(safe) / safe)
    if kind == "gaussian":
        return torch.exp(-0.5 * u * u)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def derivative(kind: str, u: Tensor) -> Tensor:
    if kind == "sinc":
        return sinc_derivative(u)
    if kind == "gaussian":
        return -u * torch.exp(-0.5 * u * u)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def forward(kind: str, x: Tensor, sigma: Tensor) -> Tensor:
    """f(x / sigma) in x's dtype (sigma: a one-element tensor)."""
    compute = opmath_dtype(x.dtype)
    u = quotient(x.to(compute), sigma.reshape(()).to(compute))
    return value(kind, u).to(x.dtype).contiguous()


def backward(kind: str, grad: Tensor, x: Tensor, sigma: Tensor, need_sigma_grad: bool) -> Tuple[Tensor, Tensor]:
    """(dL/dx, dL/dsigma) given dL/dy; dL/dsigma is 0 when not needed."""
    compute = opmath_dtype(x.dtype)
    s = sigma.reshape(()).to(compute)
    u = quotient(x.to(compute), s)
    gd = grad.to(compute) * derivative(kind, u)
    grad_x = (gd / s).to(x.dtype).contiguous()
    if need_sigma_grad:
        grad_sigma = (-(gd * u).sum(dtype=torch.float64) / s).to(sigma.dtype).reshape(())
    else:
        grad_sigma = torch.zeros((), dtype=sigma.dtype, device=sigma.device)
    return grad_x, grad_sigma


def sinc(x: Tensor, sigma: float = 1.0) -> Tensor:
    """sin(x / sigma) / (x / sigma): the plain-PyTorch definition."""
    return forward("sinc", x, torch.as_tensor(sigma, device=x.device))


def gaussian(x: Tensor, sigma: float = 1.0) -> Tensor:
    """exp(-x^2 / (2 sigma^2)): the plain-PyTorch definition."""
    return forward("gaussian", x, torch.as_tensor(sigma, device=x.device))
