"""What :func:`count_flops` and :func:`report` share: the inputs' check, the loss whose
backward is profiled, and a backward that leaves every ``.grad`` as it was."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Sequence, Tuple, Union, cast

from torch import Tensor, nn

Inputs = Union[Tensor, Sequence[Any]]


def check_inputs(inputs: Any) -> Tuple[Any, ...]:
    """``inputs`` as the tuple of positional arguments: a tuple or list holds them (an empty
    tuple: a model without arguments); any other value (a tensor, a dict) is the one argument.
    A tuple/list argument goes inside one: ``((a, b),)``."""
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    if inputs is None:
        raise TypeError("inputs must be the model's positional arguments (a tensor, a dict, or a tuple/list of "
                        "them), got None")
    return (inputs,)


def tensors(value: Any) -> List[Tensor]:
    """Every tensor in ``value``: itself, or inside tuples, lists, dicts and dataclasses."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return tensors([getattr(value, f.name) for f in dataclasses.fields(value)])
    return []


def float_tensors(value: Any) -> List[Tensor]:
    return [t for t in tensors(value) if t.is_floating_point() or t.is_complex()]


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


def backward(output: Any, model: Any = None) -> None:
    """The backward of :func:`loss` of ``output``, leaving every ``.grad`` as it was.

    Each leaf the graph accumulates into (parameters, inputs, tensors a function closes
    over, at any nesting) and each of ``model``'s parameters (those a reentrant checkpoint
    hides from the outer graph) gets ``.grad = None`` for the backward and its own ``.grad``
    object back after it: a count taken mid-training adds nothing to the gradients. A plain
    ``backward()`` (not ``torch.autograd.grad``): reentrant checkpointing refuses the latter.
    Gradient hooks run as in any backward."""
    scalar = loss(output)
    if not scalar.requires_grad:
        raise ValueError("backward=True but neither the model's parameters nor the inputs require grad "
                         "(nor any tensor the output depends on)")
    leaves = {id(t): t for t in graph_leaves(scalar)}
    if isinstance(model, nn.Module):
        leaves.update((id(p), p) for p in model.parameters() if p.requires_grad)
    saved = [(t, t.grad) for t in leaves.values()]
    for t, _ in saved:
        t.grad = None
    try:
        scalar.backward()
    finally:
        for t, grad in saved:
            t.grad = grad
