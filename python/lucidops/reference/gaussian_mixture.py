"""Reference 3D Gaussian point encoder mixture (methods.md section 1), in plain PyTorch.

For points x (B, N, 3), Gaussians g with mean mu_g and precision P_g (symmetric, stored
as its upper triangle [p00, p01, p02, p11, p12, p22]), and the mixer weight W (K, G),
bias b (K,):

    phi_g(x) = exp(-1/2 (x - mu_g)^T P_g (x - mu_g))
    l_k(x)   = sum_g W[k, g] phi_g(x) + b[k]
    reduce="max":  out[b, k] = max_n l_k(x_bn)   (arg-max: the lowest such n)
    reduce="none": out[b, n, k] = l_k(x_bn)

Culling with threshold t (the rule every backend shares): with alpha_g = max_k |W[k, g]|
and Sigma_g = P_g^-1, the pair (x, g) contributes nothing when
|x_i - mu_g,i| > h_g,i = sqrt(2 ln(alpha_g / t) Sigma_g[i, i]) on some axis i, and g
contributes nothing anywhere when alpha_g <= t. The half-widths come from
:func:`cull_half_widths` (float64, rounded up into the compute dtype) and every backend
compares |x - mu| in the compute dtype against them, so all backends cull the same pairs.

Everything dense here: this module materialises (B, N, G) and (B, N, K), which is what
the fused kernels avoid.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from .. import _validate
from .._dtypes import opmath_dtype  # noqa: F401  (callers also read it here)

# Upper-triangle layout of a symmetric 3x3 precision: index of (i, j) in [p00, p01, p02, p11, p12, p22].
TRIU_INDEX = ((0, 1, 2), (1, 3, 4), (2, 4, 5))


def precision_matrix(precisions: Tensor) -> Tensor:
    """(G, 6) upper triangles -> (G, 3, 3) symmetric matrices."""
    idx = torch.tensor(TRIU_INDEX, device=precisions.device).reshape(-1)
    return precisions[:, idx].reshape(-1, 3, 3)


def cull_half_widths(means: Tensor, precisions: Tensor, weight: Tensor, cull_threshold: Optional[float]) -> Tensor:
    """Per-Gaussian box half-widths (G, 3) in the compute dtype of ``means``.

    +inf everywhere when ``cull_threshold`` is None (no culling); -1 on every axis for a
    Gaussian with alpha_g <= t (no point is inside); +inf for a Gaussian whose precision
    is not positive definite (its Gaussian is unbounded, the rule does not apply).
    Computed in float64 and rounded towards +inf, so the culled error stays within t.
    """
    compute = opmath_dtype(means.dtype)
    G = means.shape[0]
    if cull_threshold is None:
        return torch.full((G, 3), math.inf, dtype=compute, device=means.device)
    t = float(cull_threshold)
    # |w| and its max are exact in any dtype: reduce first, widen the (G,) result. Widening the
    # (K, G) mixer first made this column max ATen's slow float64 path (40 us to ms per call).
    alpha = (weight.detach().abs().amax(dim=0) if weight.shape[0] > 0
             else weight.new_zeros((G,))).to(torch.float64)
    p = precisions.detach().reshape(G, 6).to(torch.float64)
    if means.device.type != "cpu":
        # On a GPU: some 35 small kernels, but no synchronisation (and CUDA-graph capturable).
        half = _half_widths_float64(p, alpha, t, torch)
        return _rounded_up(half, compute, torch).contiguous()
    # On the CPU the same arithmetic in NumPy: torch's per-operation dispatch made the
    # function cost 103 us for G = 32, K = 1024 on one thread; in NumPy 48 us.
    host = _validate.host_float64(torch.cat([p, alpha[:, None]], 1))
    with np.errstate(all="ignore"):  # as in torch: inf and NaN without warnings (both are handled)
        half = _half_widths_float64(host[:, :6], host[:, 6], t, np)
    return torch.from_numpy(np.ascontiguousarray(_rounded_up(half, compute, np)))


def _half_widths_float64(p, alpha, t: float, xp):
    """cull_half_widths in float64 from the (G, 6) precisions and the (G,) alpha, as NumPy
    arrays (xp = numpy) or tensors (xp = torch): the operations both libraries share."""
    # Sigma = P^-1 from the unit-diagonal R = D P D, D = diag(P)^-1/2: Sigma_ii = (R^-1)_ii / P_ii.
    # R's entries lie in [-1, 1] when P is positive definite, so its cofactors and determinant
    # neither overflow nor underflow (P = 1e160 I made them inf / inf = NaN in float64, and
    # the backends then culled that Gaussian everywhere or nowhere).
    diagonal = p[:, [0, 3, 5]]
    positive_diagonal = (diagonal > 0).all(axis=-1)
    inv_sqrt = 1.0 / xp.sqrt(xp.where(diagonal > 0, diagonal, 1.0))
    r01 = p[:, 1] * inv_sqrt[:, 0] * inv_sqrt[:, 1]
    r02 = p[:, 2] * inv_sqrt[:, 0] * inv_sqrt[:, 2]
    r12 = p[:, 4] * inv_sqrt[:, 1] * inv_sqrt[:, 2]
    c00, c11, c22 = 1 - r12 * r12, 1 - r02 * r02, 1 - r01 * r01
    det = c00 - r01 * (r01 - r12 * r02) + r02 * (r01 * r12 - r02)
    positive_definite = positive_diagonal & (c22 > 0) & (det > 0)
    sigma_diag = xp.stack([c00, c11, c22], axis=-1) / det[:, None] * inv_sqrt * inv_sqrt
    log_ratio = xp.clip(xp.log(alpha / t), 0.0, None)
    half = xp.sqrt(2.0 * log_ratio[:, None] * xp.clip(sigma_diag, 0.0, None))
    # Not positive definite, or a half-width that is not a number: no box (never cull on NaN).
    half = xp.where(positive_definite[:, None] & ~xp.isnan(half), half, math.inf)
    return xp.where((alpha <= t)[:, None], -1.0, half)


def _rounded_up(half, compute: torch.dtype, xp):
    """float64 half-widths in the compute dtype, rounded up: a float32 half-width below the
    exact one would cull a pair worth up to t."""
    if compute != torch.float32:
        return half
    if xp is np:
        rounded = half.astype(np.float32)
        return np.where(rounded.astype(np.float64) < half, np.nextafter(rounded, np.float32(np.inf)), rounded)
    rounded = half.to(torch.float32)
    up = torch.nextafter(rounded, torch.full_like(rounded, math.inf))
    return torch.where(rounded.to(torch.float64) < half, up, rounded)


def gaussian_phi(points: Tensor, means: Tensor, precisions: Tensor, half_widths: Optional[Tensor] = None) -> Tensor:
    """phi (..., N, G) in the compute dtype; culled pairs are exactly 0."""
    compute = opmath_dtype(points.dtype)
    d = points.to(compute).unsqueeze(-2) - means.to(compute)  # (..., N, G, 3)
    p = precisions.to(compute)
    p00, p01, p02, p11, p12, p22 = p.unbind(-1)
    d0, d1, d2 = d.unbind(-1)
    q = p00 * d0 * d0 + p11 * d1 * d1 + p22 * d2 * d2 + 2.0 * (p01 * d0 * d1 + p02 * d0 * d2 + p12 * d1 * d2)
    phi = torch.exp(-0.5 * q)
    if half_widths is not None:
        outside = (d.abs() > half_widths.to(compute)).any(dim=-1)
        phi = torch.where(outside, torch.zeros_like(phi), phi)
    return phi


def _first_argmax(values: Tensor) -> Tuple[Tensor, Tensor]:
    """Max over dim -2 and the lowest index attaining it (the tie rule of every backend)."""
    top = values.amax(dim=-2, keepdim=True)
    n = values.shape[-2]
    index = torch.arange(n, device=values.device).reshape(n, 1).expand_as(values)
    # A NaN max (amax propagates it) is attained by the first NaN: values == NaN matched no
    # entry, and the sentinel n reached gather as an index out of range.
    attains = (values == top) | (values.isnan() & top.isnan())
    first = torch.where(attains, index, torch.full_like(index, n)).amin(dim=-2)
    return top.squeeze(-2), first


def lowest_duplicate(rows: Tensor) -> Tensor:
    """(M, N) int64: for each row of each cloud (M, N, C), the lowest index of a row with
    exactly its values (points (M, N, 3), or rows of phi (M, N, G)).

    The reference's BLAS product can round two identical rows of phi differently (the row's
    position in its block decides), so the max may land on a later one of points that tie
    exactly: copies of a point, or distinct points that every Gaussian sees alike. The kernels,
    which compute every point alike, pick the first."""
    m, n, c = rows.shape
    # Identical rows of a cloud share one group (exact comparison of values). In float64, exact
    # for the rows of any float dtype and for cloud numbers (in float32 clouds 2^24 and 2^24 + 1
    # were one).
    cloud = torch.arange(m, device=rows.device, dtype=torch.float64).repeat_interleave(n)
    keyed = torch.cat([cloud[:, None], rows.reshape(m * n, c).to(torch.float64)], dim=1)
    _, group = torch.unique(keyed, dim=0, return_inverse=True)
    position = torch.arange(n, device=rows.device).repeat(m)
    first = torch.full((m * n,), n, dtype=torch.long, device=rows.device)
    first = first.scatter_reduce(0, group, position, "amin")
    return first[group].reshape(m, n)


def _first_argmax_of_rows(values: Tensor, phi: Tensor) -> Tuple[Tensor, Tensor]:
    """_first_argmax over the points of each cloud, points with identical rows of phi (so
    equal values, up to the product's rounding) counted as the first of them."""
    top, arg = _first_argmax(values)
    if phi.shape[-2] > 1:
        arg = torch.gather(lowest_duplicate(phi), 1, arg)
    return top, arg


def forward(points: Tensor, means: Tensor, precisions: Tensor, weight: Tensor, bias: Optional[Tensor],
            reduce_max: bool, cull_threshold: Optional[float]) -> Tuple[Tensor, Tensor]:
    """(out, argmax) for points (B, N, 3); argmax (B, K) int64 for reduce max, else empty."""
    compute = opmath_dtype(points.dtype)
    half = cull_half_widths(means, precisions, weight, cull_threshold) if cull_threshold is not None else None
    phi = gaussian_phi(points, means, precisions, half)
    mixed = phi @ weight.to(compute).t()
    if bias is not None:
        mixed = mixed + bias.to(compute)
    if not reduce_max:
        return mixed.to(points.dtype).contiguous(), torch.empty(0, dtype=torch.long, device=points.device)
    top, arg = _first_argmax_of_rows(mixed, phi)
    return top.to(points.dtype).contiguous(), arg.contiguous()


def backward(grad: Tensor, points: Tensor, means: Tensor, precisions: Tensor, weight: Tensor, argmax: Tensor,
             reduce_max: bool, cull_threshold: Optional[float]
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (points, means, precisions, weight, bias) given dL/dout.

    For reduce max, channel k of cloud b sends its gradient to point argmax[b, k] only.
    """
    compute = opmath_dtype(points.dtype)
    g = grad.to(compute)
    x = points.to(compute)
    if reduce_max:
        # Gather the arg-max point of each channel: (B, K, 3), and a one-hot routing.
        x_star = torch.gather(x, 1, argmax.unsqueeze(-1).expand(*argmax.shape, 3))
        half = cull_half_widths(means, precisions, weight, cull_threshold) if cull_threshold is not None else None
        phi = gaussian_phi(x_star, means, precisions, half)  # (B, K, G)
        w = weight.to(compute)
        grad_weight = torch.einsum("bk,bkg->kg", g, phi)
        grad_bias = g.sum(dim=0)
        coef = g.unsqueeze(-1) * w.unsqueeze(0) * phi  # (B, K, G): dL/dphi * phi
        d = x_star.unsqueeze(-2) - means.to(compute)  # (B, K, G, 3)
    else:
        half = cull_half_widths(means, precisions, weight, cull_threshold) if cull_threshold is not None else None
        phi = gaussian_phi(x, means, precisions, half)  # (B, N, G)
        w = weight.to(compute)
        grad_weight = torch.einsum("bnk,bng->kg", g, phi)
        grad_bias = g.sum(dim=(0, 1))
        coef = (g @ w) * phi  # (B, N, G)
        d = x.unsqueeze(-2) - means.to(compute)
    pm = precision_matrix(precisions.to(compute))  # (G, 3, 3)
    pd = torch.einsum("gij,...gj->...gi", pm, d)  # P_g d
    # dphi/dx = -phi P d; dphi/dmu = phi P d; dphi/dp_ij = -phi/2 dq/dp_ij.
    grad_x_terms = -(coef.unsqueeze(-1) * pd).sum(dim=-2)  # (B, K or N, 3)
    grad_means = (coef.unsqueeze(-1) * pd).sum(dim=tuple(range(coef.dim() - 1)))
    d0, d1, d2 = d.unbind(-1)
    dq = torch.stack([d0 * d0, 2 * d0 * d1, 2 * d0 * d2, d1 * d1, 2 * d1 * d2, d2 * d2], dim=-1)
    grad_precisions = (-0.5 * coef.unsqueeze(-1) * dq).sum(dim=tuple(range(coef.dim() - 1)))
    if reduce_max:
        grad_points = torch.zeros_like(x).scatter_add_(1, argmax.unsqueeze(-1).expand(*argmax.shape, 3), grad_x_terms)
    else:
        grad_points = grad_x_terms
    return (grad_points.to(points.dtype).contiguous(), grad_means.to(means.dtype).contiguous(),
            grad_precisions.to(precisions.dtype).contiguous(), grad_weight.to(weight.dtype).contiguous(),
            grad_bias.to(weight.dtype).contiguous())


def gaussian_mixture(points: Tensor, means: Tensor, precisions: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     *, reduce: str = "max", cull_threshold: Optional[float] = None) -> Tensor:
    """The plain-PyTorch definition, differentiable by autograd (no custom op).

    points (..., N, 3) -> (..., K) for reduce "max", (..., N, K) for "none". Ties in the
    max give their gradient to the lowest point index, as the kernels do.
    """
    if reduce not in ("max", "none"):
        raise ValueError(f"reduce must be 'max' or 'none', got {reduce!r}")
    lead = points.shape[:-2]
    n = points.shape[-2]
    x = points.reshape(-1, n, 3)
    half = cull_half_widths(means, precisions, weight, cull_threshold) if cull_threshold is not None else None
    phi = gaussian_phi(x, means, precisions, half)
    mixed = phi @ weight.to(opmath_dtype(points.dtype)).t()
    if bias is not None:
        mixed = mixed + bias
    if reduce == "none":
        return mixed.to(points.dtype).reshape(*lead, n, -1)
    _, arg = _first_argmax_of_rows(mixed.detach(), phi.detach())
    top = torch.gather(mixed, 1, arg.unsqueeze(1)).squeeze(1)
    return top.to(points.dtype).reshape(*lead, -1)
