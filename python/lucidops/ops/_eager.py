"""Plain eager calls that skip the dispatcher's layers of a lucidops custom op.

Each op is a ``torch.library`` custom op, so that autograd, torch.compile, torch.export,
FlopCounterMode, fake tensors, vmap and the profiler all see it. A call that none of them
observes pays for those layers anyway: on a one-element input, about 35 us of the 60 that
``torch.ops.lucidops.attention`` takes beyond its kernel (autograd's key, the redispatch
below it, the wrapper that keeps Dynamo out, the output aliasing check), where PyTorch's
own SDPA takes 6 us in all. Batch-1 inference and the backward ops that autograd runs
(grad mode is off inside a backward) are such calls.

So a public wrapper runs the op's own Python body (the function the custom op was made
from, registered here by :func:`custom_op`) directly when :func:`runs_directly` says no
machinery is watching: no input requires grad with grad mode on, no dispatch or
torch-function mode (FlopCounterMode, FakeTensorMode, make_fx, ``with torch.device``), no
torch.compile or ``torch.jit.trace`` tracing, no profiler, only plain tensors (no subclass,
no meta tensor). Any of them, and the call goes through the custom op as before. The body
is the op's kernel for every device, so both paths run the same code and give the same
bits (tests/test_eager_calls.py).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple, TypeVar

import torch
from torch import Tensor, nn

from .. import _validate

_F = TypeVar("_F", bound=Callable[..., Any])
_BODIES: Dict[Any, Callable[..., Any]] = {}  # custom op -> the function it was made from
_PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)

# False sends every call through the custom op: for benchmarks and tests that compare the paths.
enabled = True


def custom_op(qualname: str) -> Callable[[_F], Any]:
    """``torch.library.custom_op(qualname, mutates_args=())``, remembering the decorated
    function as the op's body for :func:`body`."""
    def define(fn: _F) -> Any:
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        _BODIES[op] = fn
        return op

    return define


def body(op: Any) -> Callable[..., Any]:
    """The Python function custom op ``op`` (made by :func:`custom_op`) runs as its kernel."""
    return _BODIES[op]


def runs_directly(args: Tuple[Any, ...]) -> bool:
    """Whether a call of an op with ``args`` may run its body without the dispatcher: nothing
    records, traces or intercepts it (module docstring). The caller has already sent
    torch.func transforms and forward-mode dual tensors to the op's twin."""
    if not enabled or _validate.is_compiling():
        return False  # is_compiling first: Dynamo reads this one as a constant, and traces none of the rest
    if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
        return False  # autograd must record the op
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._get_tracing_state() is not None or torch._C._autograd._profiler_enabled()):
        return False
    # A subclass (FakeTensor, DTensor, a user's __torch_function__ type) dispatches on its own;
    # a meta tensor takes the op's fake kernel.
    return not any(isinstance(a, Tensor) and (type(a) not in _PLAIN_TENSOR_TYPES or a.is_meta) for a in args)
