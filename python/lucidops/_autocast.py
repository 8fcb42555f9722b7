"""What the functional ops do inside a ``torch.autocast`` region: PyTorch's own policies.

PyTorch gives a custom op no autocast rule of its own, so inside an autocast region an op
would meet a lower-precision activation (the output of an autocast ``Linear``) next to
float32 parameters, and refuse the mix. The public wrappers in ``lucidops.ops`` therefore
cast their inputs first, the way autocast treats the nearest native op:

- :func:`lower_precision` for the matmul-shaped ops (attention as
  ``scaled_dot_product_attention``, the LoRA linears as ``linear``): every floating input
  in the region's dtype (``torch.get_autocast_dtype``); the LoRA factors follow the LoRA
  op's own rule instead (``ops/lora.py``, ``resolve_factor_dtype``: float32 factors stay
  float32, since the op forms the phase omega B A from them unrounded);
- :func:`float32` for the Gaussian mixture, an exponential of a quadratic form (autocast's
  float32 list, where ``exp`` and the distance ops are): half inputs in float32.

A backend is then the op's own implementation: :func:`disabled` keeps a region from
reaching the torch calls inside it (autocast's native kernels exclude themselves the same
way), so that, e.g., the LoRA phase is formed in float32 as documented.

As in autocast, float64 tensors and non-tensors pass through unchanged, casts are
differentiable (float32 parameters get float32 gradients), and outside a region nothing
is cast: mixed dtypes are still an error there.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, ContextManager, Optional, Tuple

import torch
from torch import Tensor


def region_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype of the autocast region enabled for ``device_type``, or None when there is none
    (or autocast does not know the device type, e.g. "meta")."""
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except RuntimeError:
        pass
    return None


def in_any_region() -> bool:
    """Whether an autocast region is enabled for any device type (a cheap first test)."""
    is_any_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)  # private; torch 2.4 on
    return True if is_any_enabled is None else bool(is_any_enabled())


def _eligible(value: Any) -> bool:
    """Autocast casts floating tensors other than float64."""
    return isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _cast(values: Tuple[Any, ...], dtype_for: Callable[[Tensor], Optional[torch.dtype]]) -> Tuple[Any, ...]:
    """``values`` with each eligible tensor cast to ``dtype_for(tensor)`` (None: left alone)."""
    if not in_any_region():
        return values  # one call instead of a device lookup per tensor, outside every region
    out = []
    for value in values:
        if _eligible(value):
            dtype = dtype_for(value)
            if dtype is not None and value.dtype != dtype:
                value = value.to(dtype)
        out.append(value)
    return tuple(out)


def lower_precision(*values: Any) -> Tuple[Any, ...]:
    """``values`` with each eligible tensor in its device's autocast dtype, inside a region."""
    return _cast(values, lambda t: region_dtype(t.device.type))


def _float32_in_region(t: Tensor) -> Optional[torch.dtype]:
    return torch.float32 if region_dtype(t.device.type) is not None else None


def float32(*values: Any) -> Tuple[Any, ...]:
    """``values`` with each eligible tensor in float32, inside an autocast region for its device."""
    return _cast(values, _float32_in_region)


def float32_dtype(t: Tensor) -> torch.dtype:
    """The dtype :func:`float32` would give ``t``, without casting it."""
    return (_float32_in_region(t) if _eligible(t) else None) or t.dtype


def disabled(device_type: str) -> ContextManager:
    """A context with autocast off for ``device_type`` (a no-op outside a region)."""
    if region_dtype(device_type) is None:
        return nullcontext()
    return torch.autocast(device_type, enabled=False)
