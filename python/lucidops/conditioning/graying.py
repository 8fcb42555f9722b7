"""Token graying (methods.md section 9): condition token matrices before patch embedding.

Self-attention without skips is ill-conditioned; graying flattens the spectrum of each
(N x d) token matrix X with a power law, eps in (0, 1]:

- ``mode="svd"``: X = U S V^T, S~ = (S / max S)^eps, X~ = U S~ V^T.
- ``mode="dct"``: the same power law on the magnitudes of the orthonormal 2D DCT-II
  coefficients C = D_N X D_d^T, sign kept: C~ = sign(C) (|C| / max |C|)^eps,
  X~ = D_N^T C~ D_d. Two matrix products each way with DCT bases that are built once
  per (size, dtype, device) and cached, so it costs a few GEMMs instead of an SVD.

Both normalise by the largest singular value / coefficient, as the paper states; with
``keep_scale=True`` the result is multiplied back by it, so eps = 1 returns X itself.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .tokens import _compute_dtype, _matrix_batch

MODES = ("svd", "dct")


@functools.lru_cache(maxsize=32)
def dct_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")) -> Tensor:
    """Orthonormal DCT-II matrix D (n x n): ``D @ x`` is the DCT of x along its first axis,
    ``D.T @ c`` the inverse. Built in float64 and cached (treat it as read-only)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    basis = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.to(dtype=dtype, device=device)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps must be a real number in (0, 1], got {type(eps).__name__}")
    eps = float(eps)
    if not (0.0 < eps <= 1.0):  # also rejects NaN
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    return eps


def _power_law(values: Tensor, peak: Tensor, eps: float) -> Tensor:
    """sign(v) (|v| / peak)^eps, with an all-zero matrix (peak 0) mapped to zeros."""
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    return torch.copysign((values.abs() / safe).pow(eps), values)


def token_gray(x: Tensor, eps: float = 0.9, mode: str = "dct", keep_scale: bool = False) -> Tensor:
    """Gray each token matrix of ``x`` (..., N, d); see the module docstring.

    Args:
        x: floating tensor with at least 2 dims; the last two are (tokens, features).
        eps: exponent in (0, 1]; smaller flattens the spectrum more (0.6-0.9 for ViT-B).
        mode: ``"dct"`` (fast, default) or ``"svd"``.
        keep_scale: multiply the result by max S (svd) or max |C| (dct), so the largest
            singular value / coefficient is unchanged and eps = 1 is the identity.

    Returns a tensor of ``x``'s shape and dtype; the transform runs in float32 (float64
    for float64 input). Meant for inputs (patchified images), not for backpropagation:
    the power law has an infinite derivative at 0 for eps < 1.
    """
    _matrix_batch(x, "x")
    eps = _check_eps(eps)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(keep_scale, bool):
        raise TypeError(f"keep_scale must be a bool, got {type(keep_scale).__name__}")
    if x.numel() == 0:
        return x.clone()
    dtype = _compute_dtype(x)
    xc = x.to(dtype)
    if mode == "svd":
        u, s, vh = torch.linalg.svd(xc, full_matrices=False)
        peak = s[..., :1]
        s_new = _power_law(s, peak, eps)
        if keep_scale:
            s_new = s_new * peak
        out = (u * s_new.unsqueeze(-2)) @ vh
    else:
        n, d = x.shape[-2], x.shape[-1]
        dn = dct_basis(n, dtype, x.device)
        dd = dct_basis(d, dtype, x.device)
        coeffs = torch.matmul(dn, xc) @ dd.T
        peak = coeffs.abs().amax(dim=(-2, -1), keepdim=True)
        coeffs = _power_law(coeffs, peak, eps)
        if keep_scale:
            coeffs = coeffs * peak
        out = torch.matmul(dn.T, coeffs) @ dd
    return out.to(x.dtype)
