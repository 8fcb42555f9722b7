"""One FLOP formula per op, served to both torch's FlopCounterMode and fvcore.

A formula takes the op's arguments with tensors replaced by their shapes (the
convention of ``torch.utils.flop_counter.register_flop_formula``) and returns a count.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple, Union

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

_FORMULAS: Dict[str, Callable[..., int]] = {}


def _qualname(packet) -> str:
    # OpOverloadPacket("lucidops::sinc") -> "lucidops::sinc"
    return packet._qualified_op_name


def register(packet, formula: Callable[..., int]) -> None:
    """Register ``formula`` for op ``packet`` (a torch.ops.lucidops.<name> packet)."""

    @register_flop_formula(packet)
    def _torch_formula(*args, out_shape=None, **kwargs):
        return int(formula(*args, **kwargs))

    _FORMULAS[_qualname(packet)] = formula


def _fvcore_handle(formula: Callable[..., int]):
    def handle(inputs, outputs) -> int:
        from fvcore.nn.jit_handles import get_shape

        args = []
        for value in inputs:
            if value.type().kind() == "TensorType" or value.isCompleteTensor():
                args.append(get_shape(value))
            else:
                args.append(value.toIValue())
        return int(formula(*args))

    return handle


def fvcore_handles() -> Dict[str, Callable]:
    """fvcore op handles for every lucidops op: ``FlopCountAnalysis(...).set_op_handle(**h)``."""
    return {name: _fvcore_handle(f) for name, f in _FORMULAS.items()}


Inputs = Union[torch.Tensor, Tuple[Any, ...]]


def count_flops(model: Callable, inputs: Inputs, *, backward: bool = False) -> Dict[str, int]:
    """FLOPs of ``model(*inputs)`` by op, with torch's FlopCounterMode (plus "total").

    With ``backward=True`` the backward pass of ``output.sum()`` is counted too.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(*args)
        if backward:
            out.sum().backward()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    by_op["total"] = int(counter.get_total_flops())
    return by_op


def fvcore_flops(model: torch.nn.Module, inputs: Inputs) -> Dict[str, int]:
    """fvcore's count by operator (fvcore counts one multiply-add as one flop), plus "total"."""
    from fvcore.nn import FlopCountAnalysis

    args = inputs if isinstance(inputs, tuple) else (inputs,)
    analysis = FlopCountAnalysis(model, args).set_op_handle(**fvcore_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = {k: int(v) for k, v in analysis.by_operator().items()}
    by_op["total"] = int(analysis.total())
    return by_op
