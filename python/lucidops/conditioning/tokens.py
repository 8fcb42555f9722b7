"""Condition numbers of token matrices, and conditioned tokens (methods.md section 8).

kappa(attention) is bounded by powers of kappa(X) for the embedded token matrix X
(N x d), so adding a correction C with kappa(X + C) <= 2 before the first block
conditions the whole stack. The exact C of the paper is open; the default here is

    C = sigma_1(X) U V^T          (thin SVD X = U S V^T)

which adds sigma_1 to every singular value, keeps the singular vectors, and gives
kappa(X + C) = 2 sigma_1 / (sigma_1 + sigma_min) <= 2 for any nonzero X, rank-deficient
included (a zero X stays zero: C scales with sigma_1).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _validate


def _compute_dtype(x: Tensor) -> torch.dtype:
    # LAPACK/cuSOLVER have no half-precision SVD; float64 stays float64.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _matrix_batch(x, name: str) -> Tensor:
    _validate.floating_tensor(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., N, d), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0 or x.shape[-2] == 0:
        raise ValueError(f"{name} must have non-empty matrix dimensions (..., N, d), got shape {tuple(x.shape)}")
    return x


def condition_number(x: Tensor) -> Tensor:
    """Spectral condition number sigma_max / sigma_min of each matrix in ``x`` (..., m, n).

    Uses the min(m, n) singular values, so a wide or tall matrix of full rank is finite;
    a rank-deficient matrix gives ``inf`` or, through round-off, a huge value. Returns a tensor of shape ``x.shape[:-2]`` in
    the compute precision (float64 for float64 input, else float32). Empty batches are
    allowed; empty matrices are not. Differentiable where the singular values are distinct.
    """
    _matrix_batch(x, "x")
    s = torch.linalg.svdvals(x.to(_compute_dtype(x)))
    return s[..., 0] / s[..., -1]


def condition_tokens(x: Tensor, strength: float = 1.0) -> Tensor:
    """Return ``x + strength * sigma_1(x) U V^T`` for each token matrix in ``x`` (..., N, d).

    With the default ``strength=1`` every result has condition number at most 2
    (methods.md section 8); ``strength=s`` gives at most (1 + s) / s. No parameters,
    differentiable (through the SVD, so gradients need distinct singular values, which
    holds almost surely for real token matrices). The output has ``x``'s dtype; the
    SVD runs in float32 (float64 for float64 input).
    """
    _matrix_batch(x, "x")
    strength = _validate.real_number(strength, "strength", "> 0")
    if x.numel() == 0:
        return x.clone()
    xc = x.to(_compute_dtype(x))
    u, s, vh = torch.linalg.svd(xc, full_matrices=False)
    correction = (strength * s[..., :1].unsqueeze(-1)) * (u @ vh)
    return (xc + correction).to(x.dtype)
