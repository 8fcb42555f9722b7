"""nn.Modules built on lucidops ops."""

from .activations import Gaussian, Sinc
from .attention import ManyHeadAttention
from .conditioning import ConditionedEmbedding
from .gaussian_mixture import GaussianPointEncoder
from .lora import BoundedLoRALinear, SineLoRALinear
from .spatial import FrozenRandomDepthwise

__all__ = [
    "Sinc", "Gaussian", "ManyHeadAttention", "ConditionedEmbedding", "GaussianPointEncoder",
    "BoundedLoRALinear", "SineLoRALinear", "FrozenRandomDepthwise",
]
from .gaussian_pointnet import GaussianPointNet, GaussianTNet  # noqa: E402,F401
__all__ += ["GaussianTNet", "GaussianPointNet"]
