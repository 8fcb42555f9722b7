"""Pure PyTorch ground truth for every op family (one module per family)."""

from . import activations

__all__ = ["activations"]
