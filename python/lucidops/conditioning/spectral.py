"""Gradient descent as a spectral shrinkage operator (methods.md section 10).

After ``iters`` steps of gradient descent with learning rate ``lr`` on a linearised
least-squares problem, the component along a Jacobian singular direction with singular
value s has been fitted by the fraction

    m(s) = 1 - (1 - lr s^2)^iters

so lr and iters set the bandwidth of what a network with a monotonic activation learns.
"""

from __future__ import annotations


import torch
from torch import Tensor

from .. import _validate
from .._dtypes import HALF_DTYPES


def gd_shrinkage_mask(singular_values: Tensor, lr: float, iters: int) -> Tensor:
    """m(s) = 1 - (1 - lr s^2)^iters for each singular value s (any shape, s >= 0).

    Where 0 < lr s^2 <= 1 (and iters >= 1) the mask lies in (0, 1] and rises monotonically
    with s and iters; for 1 < lr s^2 < 2 each step overshoots, so the mask oscillates
    about 1 (above it for odd iters) while it converges to 1; lr s^2 > 2 is the divergent
    regime and the mask's magnitude grows without bound, as gradient descent does there.
    ``iters=0`` gives 0 everywhere (nothing fitted yet). Computed as -expm1(iters * log1p(-lr s^2))
    where lr s^2 < 1, which keeps full relative precision for tiny lr s^2.
    Half-precision inputs are computed in float32; the result has the input's shape and dtype.
    """
    _validate.floating_tensor(singular_values, "singular_values")
    lr = _validate.real_number(lr, "lr", "> 0")
    iters = _validate.integer(iters, "iters", minimum=0)
    s = singular_values
    values = _validate.readable_values(s)  # the shared rule for data-dependent checks
    if values is not None and values.numel():
        if not bool(torch.isfinite(values).all()):
            raise ValueError("singular_values must be finite")
        if bool((values < 0).any()):
            raise ValueError("singular_values must be >= 0")
    # In fp16/bf16, lr s^2 underflows and iters overflows the dtype: compute in float32.
    wide = s.float() if s.dtype in HALF_DTYPES else s
    a = lr * wide * wide
    small = a < 1
    # Stable branch; a clamped copy keeps log1p finite where the other branch is used.
    stable = -torch.expm1(iters * torch.log1p(-torch.where(small, a, torch.zeros_like(a))))
    direct = 1 - (1 - a) ** iters
    return torch.where(small, stable, direct).to(s.dtype)
