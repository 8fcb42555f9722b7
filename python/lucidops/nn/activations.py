"""Sinc and Gaussian activation modules (methods.md section 10).

Non-monotonic activations set a network's bandwidth by their scale sigma rather than by
the optimiser's learning rate and iteration count; sigma can be learned.
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops import activations as F


class _ScaledActivation(nn.Module):
    _fn = staticmethod(F.sinc)
    sigma: Union[float, nn.Parameter]  # a Parameter when learnable

    def __init__(self, sigma: float = 1.0, learnable: bool = False):
        super().__init__()
        sigma = _validate.real_number(sigma, "sigma", "> 0")
        self.learnable = _validate.boolean(learnable, "learnable")  # "False" made sigma learnable
        if learnable:
            self.sigma = nn.Parameter(torch.tensor(sigma))
        else:
            self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        # Both functions depend on sigma through its size only (sinc is even in sigma, the
        # Gaussian has sigma^2): a learned sigma that an optimiser step takes below zero is
        # read as |sigma| instead of stopping the run with "sigma must be > 0".
        sigma = self.sigma.abs() if isinstance(self.sigma, Tensor) else self.sigma
        return self._fn(x, sigma)

    def extra_repr(self) -> str:
        sigma = float(self.sigma.detach()) if isinstance(self.sigma, Tensor) else self.sigma
        return f"sigma={sigma:g}, learnable={self.learnable}"


class Sinc(_ScaledActivation):
    """y = sin(x / sigma) / (x / sigma), 1 at x = 0. ``learnable=True`` makes sigma a Parameter
    (used as |sigma|, so training may take it through zero's sign)."""

    _fn = staticmethod(F.sinc)


class Gaussian(_ScaledActivation):
    """y = exp(-x^2 / (2 sigma^2)). ``learnable=True`` makes sigma a Parameter (used as |sigma|)."""

    _fn = staticmethod(F.gaussian)
