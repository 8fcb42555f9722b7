"""lucidops: fused Triton and CUDA/C++ kernels for explicit, well-conditioned networks.

    import lucidops
    y = lucidops.ops.sinc(x, sigma=0.5)
    with lucidops.use_backend("reference"):
        y_ref = lucidops.ops.sinc(x, sigma=0.5)

See ``lucidops info`` for the backends available on this machine.
"""

from . import backends, conditioning, data, init, models, nn, ops, optim, patch, profile, quant, reference, train
from .backends import BACKENDS, BackendUnavailable, use_backend

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "BackendUnavailable", "use_backend",
    "backends", "conditioning", "data", "init", "models", "nn", "ops", "optim", "patch", "profile", "quant",
    "reference", "train",
]
