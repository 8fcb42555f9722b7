"""Argument checks shared by the functional ops: each error names the argument."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn


def is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # torch < 2.3
        return False


def tensor(value, name: str) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:  # sparse or mkldnn: every backend failed deep inside, naming nothing
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {value.layout}")
    return value


def floating_tensor(value, name: str) -> Tensor:
    tensor(value, name)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


_BOUNDS = {None: lambda v: True, "> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "!= 0": lambda v: v != 0}


def real_number(value, name: str, bound: Optional[str] = None, *, tensor_ok: bool = False) -> float:
    """``value`` as a float, finite and within ``bound`` (None, "> 0", ">= 0" or "!= 0").

    A bool, a string or another non-number is a TypeError; with ``tensor_ok`` a one-element
    tensor is read once (a host sync on CUDA; under torch.compile a graph break, so
    ``fullgraph=True`` needs a Python number), and one that requires grad (with grad mode on)
    or lives on the meta device is a TypeError: the ops take these as constants, and would
    drop its gradient or cannot read it. The checks run while torch.compile traces too.
    """
    if tensor_ok and isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.requires_grad and torch.is_grad_enabled():
            # Read as a plain number, it would leave the graph and its gradient would be silently zero.
            raise TypeError(f"{name} is a tensor that requires grad, but the op has no gradient for {name}: "
                            f"pass a number or {name}.detach() (a learnable {name} is not supported)")
        if value.device.type == "meta":
            raise TypeError(f"{name} is a tensor on the meta device, whose value cannot be read: pass a number")
        value = value.detach().reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    # Comparisons, not math.isfinite: they trace under torch.compile, where math.isfinite made
    # the check stand aside and a NaN scale or a negative cull_threshold ran. NaN fails them.
    if not (-math.inf < value < math.inf and _BOUNDS[bound](value)):
        raise ValueError(f"{name} must be finite{' and ' + bound if bound else ''}, got {value!r}")
    return value


def probability(value, name: str) -> float:
    """``value`` as a float in [0, 1), a dropout probability (1 would drop everything)."""
    value = real_number(value, name)
    # Checked while compiling too: comparisons trace (math.isfinite does not), and NaN fails them.
    # A dropout_p out of range compiled used to run: zeros, or a silent rescaling.
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return value


def dataset_index(index, length: int, item: str) -> int:
    """A dataset's ``__getitem__`` index as a position in [0, length): an int, a numpy integer
    or a one-element integer tensor (``Subset(ds, torch.arange(n))``), negative from the end.
    Through ``operator.index``: ``int(torch.tensor(1.7))`` would truncate to item 1. A bool, a
    float or a several-element tensor is a TypeError; the IndexError names the index as given.
    ``item`` names one element in the messages ("cloud", "sample")."""
    try:
        if isinstance(index, bool) or (isinstance(index, Tensor) and index.dtype == torch.bool):
            raise TypeError
        position = operator.index(index)
    except TypeError:
        given = (f"a tensor of dtype {index.dtype} and shape {tuple(index.shape)}" if isinstance(index, Tensor)
                 else type(index).__name__)
        raise TypeError(f"index must be an integer (one {item}; a DataLoader batches them), got {given}") from None
    shown = position
    if position < 0:
        position += length
    if not 0 <= position < length:
        raise IndexError(f"index {shown} out of range for {length} {item}s")
    return position


def boolean(value, name: str) -> bool:
    """``value`` itself when it is a bool; anything else (1, "False", None, a numpy bool) is a
    TypeError naming it: read by truthiness, the string "False" meant True."""
    if not isinstance(value, bool):
        kind = type(value)  # qualified unless builtin: numpy's bool is also named "bool"
        got = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
        raise TypeError(f"{name} must be a bool, got {got}")
    return value


def integer(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an int within [minimum, maximum]; a bool, a float or a string is a TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        bounds = (f"in [{minimum}, {maximum}]" if minimum is not None and maximum is not None
                  else f">= {minimum}" if minimum is not None else f"<= {maximum}")
        raise ValueError(f"{name} must be an int {bounds}, got {value}")
    return value


def readable_values(value: Tensor, *, batch_first: bool = False) -> Optional[Tensor]:
    """The plain tensor a data-dependent check reads ``value``'s elements from, or None where
    they cannot be read: while torch.compile traces, for fake tensors (FakeTensorMode,
    make_fx's fake and symbolic tracing) and on the meta device (shape-only runs, e.g.
    counting FLOPs without memory). Under torch.func transforms it is the unwrapped tensor
    (under vmap it holds every example, each vmap's dim where that vmap put it; with
    ``batch_first`` in front, so that the trailing dims are one example's)."""
    if is_compiling():
        return None
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(value):
        batch_dim = functorch.maybe_get_bdim(value)
        value = functorch.get_unwrapped(value)
        if batch_first and batch_dim > 0:
            value = value.movedim(batch_dim, 0)
    if value.device.type == "meta" or _is_fake(value):
        return None
    return value


def host_float64(values: Tensor) -> np.ndarray:
    """``values`` as a float64 NumPy array on the host (a copy). For checks and small
    side computations that run faster in NumPy than through torch's per-op dispatch.
    Functorch is disabled for the conversion: under grad / vmap, an op on an unwrapped tensor
    (readable_values) came back wrapped again, with no storage to read."""
    with torch._C._DisableFuncTorch():
        return values.detach().to("cpu", torch.float64).numpy()


def _is_fake(value: Tensor) -> bool:
    """A fake tensor, or any tensor while a fake or proxy (make_fx) dispatch mode is tracing:
    reading values there would be traced as data-dependent."""
    modes = torch._C._TorchDispatchModeKey
    if any(torch._C._get_dispatch_mode(key) is not None for key in (modes.FAKE, modes.PROXY)):
        return True
    # A plain tensor (not a subclass such as FakeTensor) is fake only through a functional
    # wrapper: the common case skips torch's is_fake, which cost 2.5 us a call with its import
    # (six calls per gaussian_mixture).
    if type(value) in (Tensor, nn.Parameter) and not torch._is_functional_tensor(value):
        return False
    from torch._subclasses.fake_tensor import is_fake

    return bool(is_fake(value))


def positive_finite_tensor_value(value: Tensor, name: str) -> None:
    """Data-dependent check (synchronises on CUDA); skipped when the values cannot be read."""
    values = readable_values(value)
    if values is None:
        return
    flat = values.detach().reshape(-1)
    if flat.numel() == 1:  # a scale such as sigma: one read, where the boolean-mask select took most of a small call
        number = float(flat.item())
        if not 0 < number < math.inf:  # NaN fails too
            raise ValueError(f"{name} must be finite and > 0, got {number}")
        return
    bad = flat[~(torch.isfinite(flat) & (flat > 0))]
    if bad.numel():
        raise ValueError(f"{name} must be finite and > 0, got {float(bad[0])}")


def same_device(value: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {value.device}")
