"""Freeze the spatial (depthwise) mixers of a ConvMixer / ResNet-style model (methods.md section 11)."""

from __future__ import annotations

from typing import List, Optional, Tuple, Union, cast

import torch
from torch import nn

from ..nn.spatial import INITS, FrozenRandomDepthwise
from .handle import PatchHandle, name_list, parent_slot

_Pair = Tuple[int, int]


def _is_spatial_mixer(module: nn.Module) -> bool:
    # Depthwise: one filter per channel, no channel mixing, and a real spatial extent.
    return (type(module) is nn.Conv2d and module.groups == module.in_channels == module.out_channels
            and module.kernel_size != (1, 1) and module.padding_mode == "zeros")


def _depthwise_left_trainable(model: nn.Module) -> List[str]:
    """Trainable depthwise-like convs :func:`freeze_spatial_mixing` does not replace: Conv2d subclasses
    with their own forward (timm's Conv2dSame), padding modes other than zeros, channel
    multipliers (groups == in_channels < out_channels)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and not _is_spatial_mixer(m) and m.weight.requires_grad
            and m.groups == m.in_channels > 1
            and m.out_channels % m.in_channels == 0 and m.kernel_size != (1, 1)]


def spatial_mixers(model: nn.Module) -> List[str]:
    """Qualified names of the depthwise Conv2d layers :func:`freeze_spatial_mixing` would replace."""
    return [name for name, m in model.named_modules() if _is_spatial_mixer(m)]


def freeze_spatial_mixing(model: nn.Module, init: Optional[str] = None,
                          generator: Optional[torch.Generator] = None, **init_kwargs) -> PatchHandle:
    """Replace every depthwise ``nn.Conv2d`` (groups == channels, kernel > 1x1) of ``model``
    in place by a :class:`~lucidops.nn.FrozenRandomDepthwise`.

    ``init=None`` keeps each layer's current (random) filters; ``"default"``,
    ``"impulse"`` or ``"smoothed"`` draws new ones, from ``generator`` if given, with
    ``init_kwargs`` passed on (``smoothing_sigma``, for ``"smoothed"`` only); each is
    refused where it would be ignored (``init=None`` keeps the filters). A conv bias is kept, frozen.
    Returns a :class:`~lucidops.patch.PatchHandle` (``handle.model`` is ``model``) whose
    ``revert()`` puts the original ``nn.Conv2d`` objects back; :func:`unfreeze_spatial_mixing`
    instead turns the frozen layers into new trainable convs with the frozen filters.
    Raises ``ValueError`` when the model has no depthwise convolution to freeze.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if init is not None and init not in INITS:
        raise ValueError(f"init must be None or one of {INITS}, got {init!r}")
    if init is None and (generator is not None or init_kwargs):
        # They shape new filters; init=None keeps the layers' own, so they would be ignored.
        given = ", ".join((["generator"] if generator is not None else []) + sorted(init_kwargs))
        choices = "init='smoothed'" if init_kwargs else f"init={INITS[0]!r}, {INITS[1]!r} or {INITS[2]!r}"
        raise ValueError(f"{given}: used to draw new filters, but init=None keeps each layer's own; pass "
                         f"{choices} to draw new ones")
    names = spatial_mixers(model)
    if "" in names:
        raise ValueError("model is itself a depthwise nn.Conv2d; use lucidops.nn.FrozenRandomDepthwise directly")
    if not names:
        raise ValueError("model has no depthwise nn.Conv2d (groups == channels, kernel > 1x1) to freeze")
    built = []  # build every replacement before swapping any: a bad init_kwargs leaves the model as it was
    for name in names:
        conv = cast(nn.Conv2d, model.get_submodule(name))  # spatial_mixers found an nn.Conv2d
        weight = None if init is not None else conv.weight.detach()
        # An nn.Conv2d's sizes are pairs; torch annotates them as Tuple[int, ...].
        frozen = FrozenRandomDepthwise(
            conv.in_channels, cast(_Pair, conv.kernel_size), init=init or "default", stride=cast(_Pair, conv.stride),
            padding=cast(Union[str, _Pair], conv.padding), dilation=cast(_Pair, conv.dilation),
            bias=conv.bias is not None, generator=generator, weight=weight, **init_kwargs)
        frozen.to(device=conv.weight.device, dtype=conv.weight.dtype)
        if conv.bias is not None:
            assert frozen.bias is not None  # built with bias=True
            frozen.bias.data.copy_(conv.bias.detach())
        built.append((name, frozen))
    handle = PatchHandle(model, settings=dict(init=init, **init_kwargs))
    for name, frozen in built:
        handle.swap_child(model, name, frozen)
    left = _depthwise_left_trainable(model)
    if left:  # they still train: an experiment on frozen spatial mixing must know
        handle.warn("freeze_spatial_mixing", f"{len(left)} depthwise-like conv(s) left trainable (a Conv2d "
                    "subclass with its own forward, a padding mode other than zeros, or a channel multiplier): "
                    f"{name_list(left)}")
    return handle


def unfreeze_spatial_mixing(model: nn.Module) -> nn.Module:
    """Turn every FrozenRandomDepthwise of ``model`` back into a trainable ``nn.Conv2d``
    with the same filters. Returns ``model``."""
    names = [name for name, m in model.named_modules() if isinstance(m, FrozenRandomDepthwise)]
    if not names:
        raise ValueError("model has no FrozenRandomDepthwise layer to unfreeze")
    for name in names:
        frozen = cast(FrozenRandomDepthwise, model.get_submodule(name))
        conv = nn.Conv2d(frozen.channels, frozen.channels, frozen.kernel_size, stride=frozen.stride,
                         padding=frozen.padding, dilation=frozen.dilation, groups=frozen.channels,
                         bias=frozen.bias is not None, device=frozen.weight.device, dtype=frozen.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(frozen.weight)
            if frozen.bias is not None:
                assert conv.bias is not None  # built with bias=True
                conv.bias.copy_(frozen.bias)
        parent, child = parent_slot(model, name)
        setattr(parent, child, conv)
    return model
