"""Helpers for the ops' ``torch.vmap`` rules.

Without a rule PyTorch runs a custom op once per example, with a warning. Each op's rule
folds the vmapped dim into a batch dim its kernels already have (attention's B, the
LoRA rows, the Gaussian mixture's clouds) when the result is the same per example; where
it is not (a gradient summed over the batch, such as a per-example parameter gradient
under ``vmap(grad(...))``), the rule runs the op once per example (``per_example``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import torch
from torch import Tensor


def batched_only(in_dims: Sequence[Optional[int]], positions: Sequence[int]) -> bool:
    """Whether no tensor outside ``positions`` is batched."""
    return all(d is None for i, d in enumerate(in_dims) if i not in positions)


def leading(value: Tensor, dim: Optional[int], size: int) -> Tensor:
    """``value`` with the vmapped dim first (an unbatched value expanded to ``size``)."""
    return value.movedim(dim, 0) if dim is not None else value.expand(size, *value.shape)


def fold(value: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """``value``'s vmapped dim merged into its first dim, example-major: (size * n, ...)."""
    if value is None:
        return None
    return leading(value, dim, size).flatten(0, 1)


def unfold(value: Tensor, size: int) -> Tensor:
    """Inverse of ``fold`` on an output: (size * n, ...) -> (size, n, ...)."""
    return value.unflatten(0, (size, -1))


def not_computed(value: Tensor) -> bool:
    """The ops' marker for an output they did not compute: an empty 1-d tensor."""
    return value.dim() == 1 and value.numel() == 0


def unfold_all(outputs: Tuple[Tensor, ...], size: int) -> Tuple[Tuple[Tensor, ...], Tuple[Optional[int], ...]]:
    """``unfold`` each output; "not computed" markers stay unbatched."""
    return (tuple(t if not_computed(t) else unfold(t, size) for t in outputs),
            tuple(None if not_computed(t) else 0 for t in outputs))


def fold_first_argument(op: Callable[..., Any]) -> Callable[..., Tuple[Any, Any]]:
    """The vmap rule of an op whose first argument's leading dim indexes independent items
    (rows, clouds): a batch of those (every other argument shared) folds into that dim; any
    other batching runs per example."""
    def rule(info: Any, in_dims: Sequence[Optional[int]], first: Tensor, *rest: Any) -> Tuple[Any, Any]:
        if not batched_only(in_dims, [0]):
            return per_example(op, info, in_dims, (first, *rest))
        n = info.batch_size
        out = op(fold(first, in_dims[0], n), *rest)
        return unfold_all(out, n) if isinstance(out, tuple) else (unfold(out, n), 0)

    return rule


def per_example(op: Callable[..., Any], info: Any, in_dims: Sequence[Optional[int]], args: Sequence[Any]
                ) -> Tuple[Any, Any]:
    """``op`` once per example, outputs stacked on dim 0: PyTorch's fallback, for the cases
    a fold cannot serve."""
    results = [op(*(a.select(d, i) if d is not None else a for a, d in zip(args, in_dims)))
               for i in range(info.batch_size)]
    if isinstance(results[0], tuple):
        return tuple(torch.stack(parts) for parts in zip(*results)), (0,) * len(results[0])
    return torch.stack(results), 0
