"""Functional ops, one module per family; each is a ``torch.ops.lucidops`` custom op."""

from .activations import gaussian, sinc

__all__ = ["sinc", "gaussian"]
