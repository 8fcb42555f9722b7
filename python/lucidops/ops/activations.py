"""Functional sinc and Gaussian activations (methods.md section 10) as custom ops.

    lucidops.ops.sinc(x, sigma=1.0)      = sin(x / sigma) / (x / sigma), 1 at x = 0
    lucidops.ops.gaussian(x, sigma=1.0)  = exp(-x^2 / (2 sigma^2))

Each is ``torch.ops.lucidops.<name>(x, sigma)`` with a backward op
``torch.ops.lucidops.<name>_backward(grad, x, sigma, need_sigma_grad)``; sigma reaches
the op as a 0-d tensor in the compute precision (float32, float64 for float64 x), so a
learnable sigma gets its gradient through the wrapper's conversion.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

from .. import _ext, _validate, backends
from ..profile import flops as _flops
from ..reference import activations as _reference
from . import _eager, _functorch, _vmap

KIND = {"sinc": 0, "gaussian": 1}

# FLOPs per element, counting each arithmetic operation and each transcendental as one:
# forward  sinc: divide, sin, divide (3)         gaussian: divide, square, scale, exp (4)
# backward sinc: divide, sin, cos, 4 for (u cos u - sin u) / u^2, 2 for dx, 2 for the sigma sum (11)
#          gaussian: divide, square, scale, exp, 2 products, 2 for dx, 2 for the sum (10)
FLOPS_PER_ELEMENT = {"sinc": (3, 11), "gaussian": (4, 10)}


def _extension(ext: str, kind: int):
    """Forward/backward through the C++ extension ``ext`` ('cpu' or 'cuda')."""

    def forward(x: Tensor, sigma: Tensor) -> Tensor:
        return _ext.load(ext).activation_forward(x, sigma, kind)

    def backward(grad: Tensor, x: Tensor, sigma: Tensor, need: bool):
        return tuple(_ext.load(ext).activation_backward(grad, x, sigma, kind, need))

    return forward, backward


def _triton(kind: int):
    def forward(x: Tensor, sigma: Tensor) -> Tensor:
        from ..triton_kernels import activations as tk

        return tk.forward(x, sigma, kind)

    def backward(grad: Tensor, x: Tensor, sigma: Tensor, need: bool):
        from ..triton_kernels import activations as tk

        return tk.backward(grad, x, sigma, kind, need)

    return forward, backward


def _reference_impl(name: str):
    def forward(x: Tensor, sigma: Tensor) -> Tensor:
        return _reference.forward(name, x, sigma)

    def backward(grad: Tensor, x: Tensor, sigma: Tensor, need: bool):
        return _reference.backward(name, grad, x, sigma, need)

    return forward, backward


def _check_sigma_at_run_time(sigma: Tensor) -> None:
    # Inside the op, so compiled graphs are checked too; free for a CPU sigma only.
    if sigma.device.type == "cpu":
        _validate.positive_finite_tensor_value(sigma, "sigma")


def _define(name: str):
    """Register lucidops::<name> and lucidops::<name>_backward with every backend; return the
    callable that runs the op (its torch.func twin under a transform)."""
    kind = KIND[name]
    pairs = {"reference": _reference_impl(name), "cpp": _extension("cpu", kind),
             "triton": _triton(kind), "cuda": _extension("cuda", kind)}
    backends.register_op(name, {b: p[0] for b, p in pairs.items()})
    backends.register_op(f"{name}_backward", {b: p[1] for b, p in pairs.items()})

    @_eager.custom_op(f"lucidops::{name}")
    def forward_op(x: Tensor, sigma: Tensor) -> Tensor:
        _check_sigma_at_run_time(sigma)
        return backends.dispatch(name, x.device.type, x, sigma)

    @forward_op.register_fake
    def _(x: Tensor, sigma: Tensor) -> Tensor:
        return x.new_empty(x.shape)

    @_eager.custom_op(f"lucidops::{name}_backward")
    def backward_op(grad: Tensor, x: Tensor, sigma: Tensor, need_sigma_grad: bool) -> Tuple[Tensor, Tensor]:
        return backends.dispatch(f"{name}_backward", x.device.type, grad, x, sigma, need_sigma_grad)

    @backward_op.register_fake
    def _(grad: Tensor, x: Tensor, sigma: Tensor, need_sigma_grad: bool) -> Tuple[Tensor, Tensor]:
        return x.new_empty(x.shape), sigma.new_empty(())

    # vmap: elementwise, so a batched x needs nothing when sigma is shared; a batched sigma (or
    # sigma's gradient, a sum over each example) runs per example.
    @forward_op.register_vmap
    def _(info, in_dims, x, sigma):
        if in_dims[1] is None:
            return forward_op(x, sigma), in_dims[0]
        return _vmap.per_example(forward_op, info, in_dims, (x, sigma))

    @backward_op.register_vmap
    def _(info, in_dims, grad, x, sigma, need_sigma_grad):
        n = info.batch_size
        if in_dims[2] is None and not need_sigma_grad:
            grad_x, grad_sigma = backward_op(_vmap.leading(grad, in_dims[0], n), _vmap.leading(x, in_dims[1], n),
                                             sigma, False)
            return (grad_x, grad_sigma), (0, None)
        return _vmap.per_example(backward_op, info, in_dims, (grad, x, sigma, need_sigma_grad))

    def setup_context(ctx, inputs, output):
        x, sigma = inputs
        ctx.save_for_backward(x, sigma)

    def backward(ctx, grad):
        x, sigma = ctx.saved_tensors
        need_x, need_sigma = ctx.needs_input_grad
        grad_x, grad_sigma = run_backward(grad, x, sigma, bool(need_sigma))
        return (grad_x if need_x else None), (grad_sigma if need_sigma else None)

    run_forward = _functorch.differentiable(forward_op, backward, setup_context)
    run_backward = _functorch.first_order_only(backward_op)

    fwd_flops, bwd_flops = FLOPS_PER_ELEMENT[name]
    _flops.register(getattr(torch.ops.lucidops, name), lambda x_shape, *_, **__: fwd_flops * _numel(x_shape))
    _flops.register(getattr(torch.ops.lucidops, f"{name}_backward"), lambda g_shape, *_, **__: bwd_flops * _numel(g_shape))
    return run_forward


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


_sinc_op = _define("sinc")
_gaussian_op = _define("gaussian")

Sigma = Union[float, Tensor]


def _in_normal_range(value: float, compute: torch.dtype) -> None:
    """Refuse a sigma that would round to 0 or inf (or lose precision) in the compute dtype."""
    info = torch.finfo(compute)
    if not info.tiny <= value <= info.max:
        raise ValueError(f"sigma must be within {compute}'s normal range [{info.tiny:g}, {info.max:g}] "
                         f"(x's compute precision), got {value!r}")


def _sigma_tensor(sigma: Sigma, x: Tensor) -> Tensor:
    """Validate sigma and return it as a 0-d tensor in x's compute precision."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if isinstance(sigma, Tensor):
        if sigma.numel() != 1:
            raise ValueError(f"sigma must be a number or a one-element tensor, got shape {tuple(sigma.shape)}")
        if not sigma.is_floating_point():
            raise TypeError(f"sigma must be a floating-point tensor, got dtype {sigma.dtype}")
        _validate.same_device(sigma, x, "sigma", "x")
        _validate.positive_finite_tensor_value(sigma, "sigma")
        values = _validate.readable_values(sigma)
        if values is not None and sigma.dtype != compute:  # a float64 1e-300 became 0 ("got 0.0")
            _in_normal_range(float(values.detach().reshape(())), compute)
        return sigma.reshape(()).to(compute)
    value = _validate.real_number(sigma, "sigma", "> 0")
    _in_normal_range(value, compute)
    return torch.full((), value, dtype=compute, device=x.device)


def sinc(x: Tensor, sigma: Sigma = 1.0) -> Tensor:
    """sin(x / sigma) / (x / sigma), exactly 1 at x = 0 (gradient 0 there).

    Args:
        x: floating-point tensor of any shape (float16, bfloat16, float32, float64);
            half inputs are computed in float32.
        sigma: positive finite scale, a number or a one-element tensor on x's device
            (a learnable parameter gets its gradient).
    Returns:
        a contiguous tensor of x's shape and dtype.
    """
    _validate.floating_tensor(x, "x")
    return _sinc_op(x, _sigma_tensor(sigma, x))


def gaussian(x: Tensor, sigma: Sigma = 1.0) -> Tensor:
    """exp(-x^2 / (2 sigma^2)); arguments as for :func:`sinc`."""
    _validate.floating_tensor(x, "x")
    return _gaussian_op(x, _sigma_tensor(sigma, x))
