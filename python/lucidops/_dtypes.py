"""The dtype rules shared across lucidops.

- :data:`HALF_DTYPES`: float16 and bfloat16, the dtypes whose arithmetic and training steps
  are widened to float32;
- :func:`opmath_dtype`: the dtype a computation on inputs of a dtype runs in: float64 for
  float64, float32 for everything else (half precision included), as PyTorch's own "opmath".
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else (half inputs included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
