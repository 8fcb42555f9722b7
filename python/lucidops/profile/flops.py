"""One FLOP formula per op, served to both torch's FlopCounterMode and fvcore.

A formula takes the op's arguments with tensors replaced by their shapes (the
convention of ``torch.utils.flop_counter.register_flop_formula``) and returns a count.

The two counters disagree on matrix products, and each is served its own convention:
- torch's FlopCounterMode counts a multiply-add as 2 FLOPs (``aten.mm``: 2 m n k); the
  registered formula is exactly that count.
- fvcore counts a multiply-add of a matrix product as 1 (``linear``: m n k) and an
  elementwise operation as 1. An op whose formula contains matrix products registers
  ``macs`` (the number of those multiply-adds) too, and fvcore gets ``formula - macs``;
  purely elementwise ops (sinc, gaussian) get the same count in both.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from .. import _validate
from . import _run
from ._run import Inputs

_FORMULAS: Dict[str, Callable[..., int]] = {}
_MACS: Dict[str, Callable[..., int]] = {}


def _qualname(packet) -> str:
    # OpOverloadPacket("lucidops::sinc") -> "lucidops::sinc"
    return packet._qualified_op_name


def register(packet, formula: Callable[..., int], *, macs: Optional[Callable[..., int]] = None) -> None:
    """Register ``formula`` for op ``packet`` (a torch.ops.lucidops.<name> packet).

    ``macs`` (same arguments) returns how many of the formula's FLOPs are matrix-product
    multiply-adds, each counted twice by the formula and once by fvcore.
    """

    @register_flop_formula(packet)
    def _torch_formula(*args, out_shape=None, **kwargs):
        return int(formula(*args, **kwargs))

    _FORMULAS[_qualname(packet)] = formula
    if macs is not None:
        _MACS[_qualname(packet)] = macs


def fvcore_formula(qualname: str) -> Callable[..., int]:
    """The count fvcore gets for op ``qualname`` ("lucidops::<name>"): one per multiply-add."""
    formula, macs = _FORMULAS[qualname], _MACS.get(qualname)
    if macs is None:
        return formula
    return lambda *args, **kwargs: int(formula(*args, **kwargs)) - int(macs(*args, **kwargs))


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
    handles = dict(_EXTRA_FVCORE_HANDLES)
    handles.update({name: _fvcore_handle(fvcore_formula(name)) for name in _FORMULAS})
    return handles


def eager(model: Any) -> Any:
    """The eager module or function behind a ``torch.compile``'d one (``model`` itself otherwise).

    The FLOP counters watch the ops as they dispatch, which a compiled model does not allow
    (Dynamo refuses to run under FlopCounterMode, and fvcore's trace does not see through it);
    the eager model dispatches the same ops, so it has the same count. A module compiled in
    place (``module.compile()``) is its own eager original: the counters run it under
    :func:`eager_calls`, which sets its compiled call aside meanwhile."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:  # not `or`: an empty nn.Sequential is falsy
            inner = getattr(model, "_torchdynamo_orig_callable", None)
        if inner is None:
            return model
        model = inner


@contextlib.contextmanager
def eager_calls(model: Any) -> Iterator[Any]:
    """``eager(model)``, with every module in it that was compiled in place
    (``nn.Module.compile``, which sets ``_compiled_call_impl``) calling its eager forward
    until the block ends; the compiled calls are put back afterwards, even on an error."""
    model = eager(model)
    compiled = [(m, m._compiled_call_impl) for m in (model.modules() if isinstance(model, nn.Module) else ())
                if getattr(m, "_compiled_call_impl", None) is not None]
    for module, _ in compiled:
        module._compiled_call_impl = None
    try:
        yield model
    finally:
        for module, call in compiled:
            module._compiled_call_impl = call


def count_flops(model: Callable, inputs: Inputs, *, backward: bool = False) -> Dict[str, int]:
    """FLOPs of ``model(*inputs)`` by op, with torch's FlopCounterMode (plus "total").

    ``inputs``: a tuple/list of the positional arguments (``()`` for none), or the one
    argument (a tensor, a dict), as :func:`report`. With ``backward=True`` the backward pass
    of the sum of the floating outputs (a tensor, tuple or dict) is counted too, and no
    ``.grad`` field changes, whichever tensors the output depends on (parameters, inputs,
    tensors a function closes over). A ``torch.compile``'d model, or one compiled in place,
    is counted through its eager original (see :func:`eager`).
    """
    args = _run.check_inputs(inputs)
    _validate.boolean(backward, "backward")

    def step() -> None:
        with eager_calls(model) as counted:
            out = counted(*args)
            if backward:
                _run.backward(out, counted)

    # Under the caller's no_grad the step is counted again with grad on if the tracker fails.
    retry = None if torch.is_grad_enabled() else step
    counter = watched_by_counter(lambda: FlopCounterMode(display=False), step, step_with_grad=retry)
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    by_op["total"] = int(counter.get_total_flops())
    return by_op


_MODULE_TRACKER_FAILURE = "Expected gradient function to be set"


def watched_by_counter(new_counter: Callable[[], FlopCounterMode], step: Callable[[], Any], *,
                       step_with_grad: Optional[Callable[[], Any]] = None) -> FlopCounterMode:
    """A counter from ``new_counter()`` that watched ``step()``.

    PyTorch's module tracker (inside every FlopCounterMode) fails under no_grad on a module
    called with a parameter as its input (timm's attention pooling, as in SigLIP). Then, if
    ``step_with_grad`` is given, a fresh counter watches ``step_with_grad()`` with grad
    enabled: the same FLOPs, and only then, since the graph it keeps costs memory.
    """
    counter = new_counter()
    try:
        with counter:
            step()
        return counter
    except AssertionError as err:
        if step_with_grad is None or _MODULE_TRACKER_FAILURE not in str(err):
            raise
    counter = new_counter()
    with torch.enable_grad(), counter:
        step_with_grad()
    return counter


def fvcore_flops(model: nn.Module, inputs: Inputs) -> Dict[str, int]:
    """fvcore's count by operator (fvcore counts one multiply-add as one flop), plus "total".
    ``inputs`` as :func:`count_flops`. A ``torch.compile``'d model, or one compiled in place,
    is counted through its eager original (see :func:`eager`)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's use of torch.jit.script is deprecated
        from fvcore.nn import FlopCountAnalysis

    args = _run.check_inputs(inputs)
    with eager_calls(model) as counted:
        analysis = FlopCountAnalysis(counted, args).set_op_handle(**fvcore_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_op = {k: int(v) for k, v in analysis.by_operator().items()}
        by_op["total"] = int(analysis.total())
    return by_op


# ---------------------------------------------------------------- the PyTorch attention baseline
# torch counts F.scaled_dot_product_attention through its CUDA kernels' formulas only; on CPU
# it runs aten._scaled_dot_product_flash_attention_for_cpu, which torch leaves uncounted (0),
# and fvcore does not count aten::scaled_dot_product_attention at all. Without these a timm
# ViT on CPU would seem to spend nothing on attention next to its lucidops-patched copy.


def _register_cpu_sdpa() -> None:
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    fwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    bwd = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    if fwd is not None and fwd not in fc.flop_registry and hasattr(fc, "sdpa_flop_count"):
        @register_flop_formula(fwd)
        def _sdpa_cpu(query_shape, key_shape, value_shape, *_, out_shape=None, **__) -> int:
            return fc.sdpa_flop_count(query_shape, key_shape, value_shape)

    if bwd is not None and bwd not in fc.flop_registry and hasattr(fc, "sdpa_backward_flop_count"):
        @register_flop_formula(bwd)
        def _sdpa_cpu_backward(grad_shape, query_shape, key_shape, value_shape, *_, out_shape=None, **__) -> int:
            return fc.sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


_register_cpu_sdpa()


def _fvcore_sdpa(inputs, outputs) -> int:
    """aten::scaled_dot_product_attention for fvcore: Q K^T and P V, one per multiply-add
    (no causal discount, as torch's own formula)."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = 1
    for s in q[:-2]:
        batch *= int(s)
    return batch * int(q[-2]) * int(k[-2]) * (int(q[-1]) + int(v[-1]))


_EXTRA_FVCORE_HANDLES = {"aten::scaled_dot_product_attention": _fvcore_sdpa}
