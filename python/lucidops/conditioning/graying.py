"""Token graying (methods.md section 9): condition token matrices before patch embedding.

Self-attention without skips is ill-conditioned; graying flattens the spectrum of each
(N x d) token matrix X with a power law, eps in (0, 1]:

- ``mode="svd"``: X = U S V^T, S~ = (S / max S)^eps, X~ = U S~ V^T.
- ``mode="dct"``: the same power law on the magnitudes of the orthonormal 2D DCT-II
  coefficients C = D_N X D_d^T, sign kept: C~ = sign(C) (|C| / max |C|)^eps,
  X~ = D_N^T C~ D_d. On the CPU the transforms run in scipy.fft (pocketfft, O(n log n),
  on all of torch's threads); on other devices, or when a gradient is needed, as two
  matrix products each way with DCT bases built once per (size, dtype, device) and
  cached. Either way it costs a fraction of an SVD.

Both normalise by the largest singular value / coefficient, as the paper states; with
``keep_scale=True`` the result is multiplied back by it, so eps = 1 returns X itself.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from .. import _autocast, _validate
from ..ops._functorch import carries_tangent
from .tokens import _compute_dtype, _finite, _matrix_batch

MODES = ("svd", "dct")


def dct_basis(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """Orthonormal DCT-II matrix D (n x n): ``D @ x`` is the DCT of x along its first axis,
    ``D.T @ c`` the inverse. Built in float64 and cached (treat it as read-only)."""
    _validate.integer(n, "n", minimum=1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype}")  # int64 gave an all-zero basis
    return _cached_dct_basis(n, dtype, torch.device(device))


@functools.lru_cache(maxsize=32)
def _cached_dct_basis(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    # Outside inference mode whatever the first caller's mode: a cached inference tensor
    # could never be saved for backward by a later differentiable call.
    with torch.inference_mode(False):
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        basis = torch.cos(math.pi * (i + 0.5) * k / n) * math.sqrt(2.0 / n)
        basis[0] /= math.sqrt(2.0)
        return basis.to(dtype=dtype, device=device)


def _dct2_matmul(x: Tensor, inverse: bool) -> Tensor:
    """Orthonormal 2D DCT-II (or its inverse) over the last two dims as cached-basis
    GEMMs: differentiable and device-agnostic."""
    dn = dct_basis(x.shape[-2], x.dtype, x.device)
    dd = dct_basis(x.shape[-1], x.dtype, x.device)
    if inverse:
        return torch.matmul(dn.T, x) @ dd
    return torch.matmul(dn, x) @ dd.T


def _dct2_scipy(x: Tensor, inverse: bool) -> Tensor:
    """The same transform with scipy.fft on a CPU tensor (no autograd)."""
    import scipy.fft

    transform = scipy.fft.idctn if inverse else scipy.fft.dctn
    out = transform(x.detach().numpy(), type=2, axes=(-2, -1), norm="ortho", workers=torch.get_num_threads())
    return torch.from_numpy(out)


def _scipy_fft_available() -> bool:
    try:
        import scipy.fft  # noqa: F401
    except ImportError:
        return False
    return True


def _dct2(x: Tensor, inverse: bool = False) -> Tensor:
    """Orthonormal 2D DCT-II of the last two dims (``inverse``: DCT-III, its inverse)."""
    # A forward-mode dual tensor needs the differentiable path too (scipy dropped its tangent).
    needs_grad = (torch.is_grad_enabled() and x.requires_grad) or carries_tangent((x,))
    # Not under torch.func's transforms either: scipy reads the storage a vmapped tensor lacks.
    if (x.device.type == "cpu" and not needs_grad and not torch._C._functorch.is_functorch_wrapped_tensor(x)
            and _scipy_fft_available()):
        return _dct2_scipy(x, inverse)
    return _dct2_matmul(x, inverse)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):  # numpy scalars too
        raise TypeError(f"eps must be a real number in (0, 1], got {type(eps).__name__}")
    eps = float(eps)
    if not (0.0 < eps <= 1.0):  # also rejects NaN
        raise ValueError(f"eps must be in (0, 1], got {eps}")
    return eps


def _power_law(values: Tensor, peak: Tensor, eps: float) -> Tensor:
    """sign(v) (|v| / peak)^eps, with an all-zero matrix (peak 0) mapped to zeros."""
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    if torch.is_grad_enabled() and values.requires_grad:
        return torch.copysign((values.abs() / safe).pow(eps), values)
    # In place, and exp(eps * log(.)) rather than pow: the same values, ~1.5x faster on the CPU.
    return values.abs().div_(safe).log_().mul_(eps).exp_().copysign_(values)


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
    _finite(x, "x", "to be grayed")  # DCT mode returned all NaN, SVD mode LAPACK's error
    eps = _check_eps(eps)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _validate.boolean(keep_scale, "keep_scale")
    if x.numel() == 0:
        return x.clone()
    # float32 as documented, in a region too: its matmuls ran in bfloat16 there, the SVD and scipy did not.
    with _autocast.disabled(x.device.type):
        return _gray(x.to(_compute_dtype(x)), eps, mode, keep_scale).to(x.dtype)


def _gray(xc: Tensor, eps: float, mode: str, keep_scale: bool) -> Tensor:
    """token_gray's transform of ``xc``, already in its compute dtype."""
    if mode == "svd":
        u, s, vh = torch.linalg.svd(xc, full_matrices=False)
        peak = s[..., :1]
        s_new = _power_law(s, peak, eps)
        if keep_scale:
            s_new = s_new * peak
        out = (u * s_new.unsqueeze(-2)) @ vh
    else:
        coeffs = _dct2(xc)
        peak = torch.maximum(coeffs.amax(dim=(-2, -1), keepdim=True), -coeffs.amin(dim=(-2, -1), keepdim=True))
        coeffs = _power_law(coeffs, peak, eps)
        if keep_scale:
            coeffs = coeffs * peak
        out = _dct2(coeffs, inverse=True)
    return out
