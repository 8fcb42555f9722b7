"""Functional ops, one module per family; each is a ``torch.ops.lucidops`` custom op."""

from .activations import gaussian, sinc
from .attention import attention
from .gaussian_mixture import gaussian_mixture
from .lora import bounded_lora_linear, sine_lora_linear

__all__ = ["sinc", "gaussian", "attention", "gaussian_mixture", "bounded_lora_linear", "sine_lora_linear"]
