"""What :func:`count_flops` and :func:`report` share: the inputs' check, the loss whose
backward is profiled, and a backward that leaves every ``.grad`` as it was."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator, List, Sequence, Tuple, Union, cast

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map

Inputs = Union[Tensor, Sequence[Any]]


def check_inputs(inputs: Any) -> Tuple[Any, ...]:
    """``inputs`` as the tuple of positional arguments: a tensor is the one argument, a
    tuple or list holds them (a tuple/list argument goes inside one: ``((a, b),)``)."""
    if isinstance(inputs, Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)) and inputs:
        return tuple(inputs)
    raise TypeError("inputs must be a tensor or a non-empty tuple/list of the model's positional arguments, "
                    f"got {type(inputs).__name__}")


def float_tensors(value: Any) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in float_tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return float_tensors([getattr(value, f.name) for f in dataclasses.fields(value)])
    return []


def loss(output: Any) -> Tensor:
    """The scalar whose backward is profiled: the sum of every floating output that has a
    graph (all of them when none has), as float32 so low precision sums do not overflow."""
    tensors = float_tensors(output)
    with_graph = [t for t in tensors if t.requires_grad]
    tensors = with_graph or tensors
    if not tensors:
        raise ValueError("backward=True needs the model to return a floating tensor (or a tuple/dict of them), "
                         f"got {type(output).__name__}")
    # tensors is non-empty, so the sum is a Tensor (never the start value 0)
    return cast(Tensor, sum(t.float().sum() if not t.is_complex() else t.real.float().sum() for t in tensors))


def graph_leaves(root: Tensor) -> List[Tensor]:
    """The leaf tensors ``root``'s graph accumulates gradients into: parameters, inputs,
    tensors a function closes over or a module holds as plain attributes, at any nesting."""
    leaves: List[Tensor] = []
    seen = set()
    stack = [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad nodes hold their leaf
        if isinstance(variable, Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def backward(output: Any) -> None:
    """The backward of :func:`loss` of ``output``, every gradient a ``backward()`` would
    form, returned by ``torch.autograd.grad`` and dropped: no ``.grad`` field changes (a
    count taken mid-training must not add to the gradients), no accumulate-grad hook runs."""
    scalar = loss(output)
    if not scalar.requires_grad:
        raise ValueError("backward=True but neither the model's parameters nor the inputs require grad "
                         "(nor any tensor the output depends on)")
    leaves = graph_leaves(scalar)
    if leaves:
        torch.autograd.grad(scalar, leaves, allow_unused=True)


def _viewed(value: Any) -> Any:
    """``value`` with every leaf tensor that requires grad replaced by a view of it (None
    when it holds none, which keeps the value as it is)."""
    flat, _ = tree_flatten(value)
    if not torch.is_grad_enabled():  # no graph, no backward: a view made here would be a leaf-like orphan
        return None
    if not any(isinstance(t, Tensor) and t.requires_grad and t.is_leaf for t in flat):
        return None
    return tree_map(lambda t: t.view_as(t) if isinstance(t, Tensor) and t.requires_grad and t.is_leaf else t,
                    value)


@contextlib.contextmanager
def leaves_enter_modules_as_views() -> Iterator[None]:
    """Leaf tensors go in and out of modules through a view while the block runs.

    FlopCounterMode's module tracker hooks the gradients of every module's inputs and
    outputs, and ``torch.autograd.grad`` refuses such hooks on a leaf ("A leaf node was
    passed to _will_engine_execute_node"): an input that requires grad, or a parameter a
    module passes to a submodule or returns. A view has the same values and gradient.
    Enter it before the counter, so that these hooks run before the tracker's."""
    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

    pre = register_module_forward_pre_hook(lambda module, args: _viewed(args))
    post = register_module_forward_hook(lambda module, args, output: _viewed(output))
    try:
        yield
    finally:
        pre.remove()
        post.remove()
