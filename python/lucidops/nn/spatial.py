"""Frozen random depthwise (spatial) mixing (methods.md section 11).

ConvMixers and ResNet-style models reach nearly the same accuracy with their depthwise
spatial mixers left at a random initialisation and frozen; only channel mixers train.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate

INITS = ("default", "impulse", "smoothed")


def _gaussian_taps(radius: int, sigma: float) -> Tensor:
    """exp(-t^2 / (2 sigma^2)) at t = -radius..radius, as (t / sigma)^2 so that no sigma
    overflows or underflows it: a tiny sigma gives the centre tap alone, a huge one flat taps."""
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    return torch.exp(-0.5 * (t / sigma) ** 2).nan_to_num(nan=0.0)


def _pair(value, name: str, minimum: int = 1) -> Tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value[0]), int(value[1])


def random_depthwise_weight(channels: int, kernel_size: Tuple[int, int], init: str = "default",
                            smoothing_sigma: float = 1.0, generator: Optional[torch.Generator] = None,
                            dtype: torch.dtype = torch.float32) -> Tensor:
    """A (channels, 1, kh, kw) random depthwise filter bank.

    - ``"default"``: PyTorch's Conv2d default, uniform(+-1/sqrt(kh kw)).
    - ``"impulse"``: each filter a one-hot impulse at a random tap (a random shift).
    - ``"smoothed"``: a default filter blurred by a normalised Gaussian of width
      ``smoothing_sigma`` taps (zero padding), rescaled to the default filter's norm.
    """
    kh, kw = kernel_size
    bound = 1.0 / math.sqrt(kh * kw)
    if init == "impulse":
        taps = torch.randint(0, kh * kw, (channels,), generator=generator)
        weight = torch.zeros(channels, kh * kw, dtype=torch.float64)
        weight[torch.arange(channels), taps] = 1.0
        return weight.reshape(channels, 1, kh, kw).to(dtype)
    weight = (torch.rand(channels, 1, kh, kw, generator=generator, dtype=torch.float64) * 2 - 1) * bound
    if init == "smoothed":
        ry, rx = kh // 2, kw // 2
        blur = torch.outer(_gaussian_taps(ry, smoothing_sigma), _gaussian_taps(rx, smoothing_sigma))
        blur = (blur / blur.sum()).reshape(1, 1, 2 * ry + 1, 2 * rx + 1)
        norms = weight.flatten(1).norm(dim=1)
        smooth = F.conv2d(weight, blur, padding=(ry, rx))[..., :kh, :kw]
        weight = smooth * (norms / smooth.flatten(1).norm(dim=1).clamp_min(1e-30)).reshape(-1, 1, 1, 1)
    return weight.to(dtype)


class FrozenRandomDepthwise(nn.Module):
    """A depthwise Conv2d whose filters stay at their random initialisation.

    The weight is an ``nn.Parameter`` with ``requires_grad=False`` (so parameter counts
    report it as frozen) and is detached in ``forward``, so it never receives a gradient
    even if someone re-enables ``requires_grad``; optimisers skip it. Bias, if any, is
    frozen the same way (zero).

    Args:
        channels: number of input (= output) channels.
        kernel_size: int or (kh, kw).
        init: ``"default"``, ``"impulse"`` or ``"smoothed"`` (see :func:`random_depthwise_weight`).
        stride, padding, dilation: as for ``nn.Conv2d`` (padding may be ``"same"``).
        bias: add a frozen zero bias (for drop-in replacement of a biased conv).
        smoothing_sigma: Gaussian width in taps for ``init="smoothed"`` (default 1.0; refused
            with another init or a given weight, which would ignore it).
        generator: optional ``torch.Generator`` for reproducible filters.
        weight: a given (channels, 1, kh, kw) filter bank to freeze instead of a random one
            (copied); ``init`` then only names it and ``generator`` must be None.
    """

    channels: int
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int]
    dilation: Tuple[int, int]
    padding: Union[str, Tuple[int, int]]
    init: str
    weight: nn.Parameter
    bias: Optional[nn.Parameter]

    def __init__(self, channels: int, kernel_size: Union[int, Tuple[int, int]], init: str = "default",
                 stride: Union[int, Tuple[int, int]] = 1, padding: Union[str, int, Tuple[int, int]] = "same",
                 dilation: Union[int, Tuple[int, int]] = 1, bias: bool = False,
                 smoothing_sigma: Optional[float] = None, generator: Optional[torch.Generator] = None,
                 weight: Optional[Tensor] = None):
        super().__init__()
        _validate.integer(channels, "channels", minimum=1)
        kernel_size = _pair(kernel_size, "kernel_size")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if smoothing_sigma is not None:  # shapes only a drawn "smoothed" bank: elsewhere it would be ignored
            _validate.real_number(smoothing_sigma, "smoothing_sigma", "> 0")
            if init != "smoothed" or weight is not None:
                raise ValueError("smoothing_sigma shapes the random filters of init='smoothed' (without a given "
                                 f"weight); got init={init!r}" + (" and a weight" if weight is not None else ""))
        _validate.boolean(bias, "bias")
        self.channels = int(channels)
        self.kernel_size = kernel_size
        self.stride = _pair(stride, "stride")
        self.dilation = _pair(dilation, "dilation")
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid', an int or a pair, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1; give an explicit padding")
            self.padding = padding
        else:
            self.padding = _pair(padding, "padding", minimum=0)
        self.init = init
        if weight is None:
            sigma = 1.0 if smoothing_sigma is None else float(smoothing_sigma)
            weight = random_depthwise_weight(self.channels, kernel_size, init, sigma, generator)
        elif generator is not None:  # it would draw nothing: say so rather than ignore it
            raise ValueError("generator draws random filters: pass generator=None with a given weight")
        elif not isinstance(weight, Tensor) or not weight.is_floating_point():
            # An integer weight failed only in forward, in conv2d's dtype error.
            raise TypeError(f"weight must be a floating-point tensor, got "
                            f"{weight.dtype if isinstance(weight, Tensor) else type(weight).__name__}")
        elif tuple(weight.shape) != (self.channels, 1, *kernel_size):
            raise ValueError(f"weight must have shape {(self.channels, 1, *kernel_size)}, got {tuple(weight.shape)}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(self.channels, dtype=weight.dtype, device=weight.device),
                                  requires_grad=False) if bias else None)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (3, 4) or x.shape[-3] != self.channels:
            raise ValueError(f"x must be (B, {self.channels}, H, W) or ({self.channels}, H, W), got shape {tuple(x.shape)}")
        bias = None if self.bias is None else self.bias.detach()
        return F.conv2d(x, self.weight.detach(), bias, self.stride, self.padding, self.dilation, self.channels)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, init={self.init!r}, stride={self.stride}, "
                f"padding={self.padding!r}, frozen=True")
