"""nn.Modules built on lucidops ops."""

from .activations import Gaussian, Sinc

__all__ = ["Sinc", "Gaussian"]
