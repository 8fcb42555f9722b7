"""torch.func (grad, vmap of grad, jacrev, functional_call) through the custom ops.

``register_autograd`` wraps an op's formula in an autograd.Function that has no
``setup_context`` staticmethod, and torch.func refuses such Functions
(pytorch/pytorch#168393): ``torch.func.grad`` through any custom op raises. So each op
gets a twin autograd.Function with the same formula, used only while a torch.func
transform is active; eager autograd, torch.compile and torch.export keep calling the op
itself, and see no difference. A call nothing records or traces runs the op's body
directly (ops/_eager.py).

The twins let torch.func generate their vmap rule (``generate_vmap_rule``): under vmap
they call the ops on batched tensors, and the ops' own vmap rules take over. Forward-mode
AD (``jvp``, ``jacfwd``, ``hessian``, and ``torch.autograd.forward_ad``'s dual tensors, which
also take the twin) and second derivatives have no formula and raise.

Both the op and its twin run the backward on the backend their forward was forced to
(``use_backend``), wherever and whenever the backward runs: see ``_same_backend``.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch.autograd import forward_ad

from .. import _validate, backends
from . import _eager


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, ...) is active around this call."""
    if _validate.is_compiling():
        return False  # torch.compile traces the op itself
    return torch._C._functorch.peek_interpreter_stack() is not None


def _op_name(op: Any) -> str:
    return str(getattr(op, "_qualname", op))


def differentiable(op: Any, backward: Callable, setup_context: Callable) -> Callable[..., Any]:
    """Register ``backward`` as ``op``'s autograd formula and return the callable the public
    wrappers use: ``op`` itself, or its twin while a torch.func transform is active."""
    setup_context, backward = _same_backend(setup_context, backward)
    op.register_autograd(backward, setup_context=setup_context)

    def no_forward_mode(ctx, *tangents):
        raise NotImplementedError(f"{_op_name(op)} has no forward-mode formula (torch.func.jvp, jacfwd, hessian): "
                                  "lucidops ops have reverse-mode first derivatives (grad, vjp, jacrev)")

    return _either(op, _twin(op, setup_context, backward, jvp=no_forward_mode))


def _same_backend(setup_context: Callable, backward: Callable):
    """The formula, made to run its backward on the backend forced around the forward.

    ``use_backend`` is a context variable, and the backward usually runs outside the block that
    forced the forward (``loss.backward()`` after it), or on another thread: the autograd engine
    runs CUDA nodes on its own device threads, which never see the caller's context. PyTorch's
    own choice of kernel (``sdpa_kernel``) likewise holds for the backward of the calls it made."""
    def setup(ctx, inputs, output):
        ctx.forced_backend = backends.forced_backend()
        setup_context(ctx, inputs, output)

    def run_backward(ctx, *grads):
        if ctx.forced_backend is None:
            return backward(ctx, *grads)
        with backends.use_backend(ctx.forced_backend):
            return backward(ctx, *grads)

    return setup, run_backward


def first_order_only(op: Any) -> Callable[..., Any]:
    """The callable for a backward op, which has no derivative of its own: under torch.func its
    twin raises the same error a second derivative raises in eager autograd."""
    def no_second_derivative(ctx, *grads):
        raise RuntimeError(f"Trying to backward through {_op_name(op)} but no autograd formula was registered: "
                           "lucidops ops have first derivatives only")

    return _either(op, _twin(op, lambda ctx, inputs, output: None, no_second_derivative))


def _twin(op: Any, setup_context: Callable, backward: Callable, **more: Callable) -> Any:
    """An autograd.Function that runs ``op`` with this formula (vmap rule generated)."""
    formulas = dict(setup_context=setup_context, backward=backward, **more)
    methods = {name: staticmethod(f) for name, f in formulas.items()}
    return type(f"{_op_name(op).replace('::', '_')}_functorch", (torch.autograd.Function,),
                {"generate_vmap_rule": True, "forward": staticmethod(lambda *args: op(*args)), **methods})


def carries_tangent(args: Tuple[Any, ...]) -> bool:
    """Whether a tensor among ``args`` is a forward-mode dual tensor (``torch.autograd.forward_ad``).
    The op dropped its tangent: with no input requiring grad, the custom op's autograd (where a
    missing formula would raise) is skipped, so a frozen model's JVP came back without the op's
    part, silently. Checked only inside a dual level (one comparison otherwise)."""
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(isinstance(a, torch.Tensor) and forward_ad.unpack_dual(a).tangent is not None for a in args)


def _either(op: Any, twin: Any) -> Callable[..., Any]:
    direct = _eager.body(op)

    def call(*args: Any) -> Any:
        # The twin raises for forward mode, as under torch.func.jvp; under torch.compile too
        # (outside a dual level the check reads one global, which Dynamo guards on).
        if transforms_active() or carries_tangent(args):
            return twin.apply(*args)
        # The op's own body when nothing records or traces the call (ops/_eager.py).
        return direct(*args) if _eager.runs_directly(args) else op(*args)

    call.__name__ = call.__qualname__ = f"{_op_name(op)}_or_twin"
    return call
