"""Pure PyTorch ground truth for every op family (one module per family)."""

from . import activations, attention, gaussian_mixture, lora

__all__ = ["activations", "attention", "gaussian_mixture", "lora"]
