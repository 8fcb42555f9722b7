"""Triton kernels for sinc(x / sigma) and gaussian(x / sigma) (methods.md section 10).

One pass for the forward, one for the backward: dx and one sigma-gradient partial per
program, summed afterwards in a fixed order (deterministic). The compute precision is
sigma's dtype (float32, or float64 for float64 inputs): the op passes sigma in opmath. The
partials are float64 whatever the dtype, as the C++ kernel's sums: the sigma gradient sums
terms of both signs over the whole tensor, and float32 partials lost 12x more to their
cancellation (1.7e-3 relative against 1.4e-4, 196K elements of one repeated row).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
import triton
import triton.language as tl

KIND_SINC = 0
KIND_GAUSSIAN = 1

# (BLOCK, num_warps) the launchers choose from; aot_specs() enumerates the same list.
LAUNCH_CONFIGS: Tuple[Tuple[int, int], ...] = ((1024, 4), (4096, 8))
_LARGE = 1 << 20


def _config(n: int) -> Tuple[int, int]:
    return LAUNCH_CONFIGS[1] if n >= _LARGE else LAUNCH_CONFIGS[0]


@triton.jit
def _value(u, KIND: tl.constexpr):
    if KIND == 0:
        safe = tl.where(u == 0, 1.0, u)
        f = tl.where(u == 0, 1.0, tl.sin(safe) / safe)
    else:
        f = tl.exp(-0.5 * u * u)
    return f


@triton.jit
def _derivative(u, KIND: tl.constexpr):
    if KIND == 0:
        # Taylor series below |u| = 0.5 (0.05 in float64, whose direct formula is accurate down
        # to there and whose series would need more terms up to 0.5: as cpp and the reference),
        # where (u cos u - sin u) / u^2 cancels.
        u2 = u * u
        series = u * (-1.0 / 3 + u2 * (1.0 / 30 + u2 * (-1.0 / 840 + u2 * (1.0 / 45360 + u2 * (-1.0 / 3991680)))))
        if u.dtype == tl.float64:
            small = tl.abs(u) < 0.05
        else:
            small = tl.abs(u) < 0.5
        safe = tl.where(small, 1.0, u)
        direct = (safe * tl.cos(safe) - tl.sin(safe)) / (safe * safe)
        # Past |u| = 1e18 cos u / u: u * u overflows float32 (reference.activations.sinc_derivative).
        direct = tl.where(tl.abs(safe) > 1e18, tl.cos(safe) / safe, direct)
        d = tl.where(small, series, direct)
    else:
        d = -u * tl.exp(-0.5 * u * u)
    return d


@triton.jit
def _quotient(x, sigma):
    """u = x / sigma, an overflow to +-inf taken as +-1e38 (lucidops.reference.activations.quotient)."""
    u = x / sigma
    return tl.where(u == float("inf"), 1e38, tl.where(u == float("-inf"), -1e38, u))


@triton.jit
def activation_forward_kernel(x_ptr, sigma_ptr, y_ptr, n, KIND: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sigma = tl.load(sigma_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    u = _quotient(x.to(sigma.dtype), sigma)
    y = _value(u, KIND)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def activation_backward_kernel(
    grad_ptr, x_ptr, sigma_ptr, grad_x_ptr, partial_ptr, n,
    KIND: tl.constexpr, NEED_SIGMA_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    sigma = tl.load(sigma_ptr)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(sigma.dtype)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(sigma.dtype)
    u = _quotient(x, sigma)
    gd = g * _derivative(u, KIND)
    tl.store(grad_x_ptr + offs, (gd / sigma).to(grad_x_ptr.dtype.element_ty), mask=mask)
    if NEED_SIGMA_GRAD:
        # Masked lanes have x = g = 0, so they add nothing.
        tl.store(partial_ptr + pid, -tl.sum((gd * u).to(tl.float64), axis=0) / sigma.to(tl.float64))


def _opmath_sigma(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return sigma.reshape(()).to(device=x.device, dtype=dtype).contiguous()


def forward(x: torch.Tensor, sigma: torch.Tensor, kind: int) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return y
    block, warps = _config(n)
    grid = (triton.cdiv(n, block),)
    activation_forward_kernel[grid](x, _opmath_sigma(sigma, x), y, n, KIND=kind, BLOCK=block, num_warps=warps)
    return y


def backward(grad: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, kind: int, need_sigma_grad: bool):
    x = x.contiguous()
    grad = grad.contiguous()
    s = _opmath_sigma(sigma, x)
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return grad_x, torch.zeros((), dtype=sigma.dtype, device=sigma.device)
    block, warps = _config(n)
    programs = triton.cdiv(n, block)
    partials = torch.empty(programs if need_sigma_grad else 1, dtype=torch.float64, device=x.device)
    activation_backward_kernel[(programs,)](
        grad, x, s, grad_x, partials, n, KIND=kind, NEED_SIGMA_GRAD=need_sigma_grad, BLOCK=block, num_warps=warps
    )
    grad_sigma = partials.sum() if need_sigma_grad else torch.zeros((), dtype=s.dtype, device=x.device)
    return grad_x, grad_sigma.to(sigma.dtype).reshape(())


_DTYPES = ("fp32", "fp16", "bf16", "fp64")


def aot_specs() -> Iterator[Dict]:
    """Every configuration the launchers above can pick, for ahead-of-time compilation."""
    for dtype in _DTYPES:
        opmath = "fp64" if dtype == "fp64" else "fp32"
        for index_type in ("i32", "i64"):  # Triton specialises n by its magnitude
            for kind in (KIND_SINC, KIND_GAUSSIAN):
                for block, warps in LAUNCH_CONFIGS:
                    yield dict(
                        fn=activation_forward_kernel,
                        signature={"x_ptr": f"*{dtype}", "sigma_ptr": f"*{opmath}", "y_ptr": f"*{dtype}",
                                   "n": index_type, "KIND": "constexpr", "BLOCK": "constexpr"},
                        constexprs={"KIND": kind, "BLOCK": block},
                        num_warps=warps,
                    )
                    for need in (False, True):
                        yield dict(
                            fn=activation_backward_kernel,
                            signature={"grad_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "sigma_ptr": f"*{opmath}",
                                       "grad_x_ptr": f"*{dtype}", "partial_ptr": "*fp64", "n": index_type,
                                       "KIND": "constexpr", "NEED_SIGMA_GRAD": "constexpr", "BLOCK": "constexpr"},
                            constexprs={"KIND": kind, "NEED_SIGMA_GRAD": need, "BLOCK": block},
                            num_warps=warps,
                        )


def describe_specs() -> List[str]:
    return [f"{s['fn'].__name__}{s['constexprs']} {s['signature']}" for s in aot_specs()]
