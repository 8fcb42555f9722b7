"""Condition numbers of token matrices, and conditioned tokens (methods.md section 8).

kappa(attention) is bounded by powers of kappa(X) for the embedded token matrix X
(N x d), so adding a correction C with kappa(X + C) <= 2 before the first block
conditions the whole stack. The exact C of the paper is open; the default here is

    C = sigma_1(X) U V^T          (thin SVD X = U S V^T)

which adds sigma_1 to every singular value, keeps the singular vectors, and gives
kappa(X + C) = 2 sigma_1 / (sigma_1 + sigma_min) <= 2 for any nonzero X, rank-deficient
included (a zero X stays zero: C scales with sigma_1).

The gradient is written out (``_ConditionTokens``) rather than left to the SVD's autograd,
which divides by sigma_i^2 - sigma_j^2 and so returns NaN for any repeated singular value:
every rank-deficient X has repeated zeros, and an image with a flat region (a black border,
padding) gives identical patch tokens. The polar factor Q = U V^T depends on pairs only
through 1 / (sigma_i + sigma_j), finite unless both are zero. On X's null space Q is not
unique (any orthonormal completion: LAPACK's is used, so outputs there may differ between
dtypes or devices) and not differentiable; there the gradient takes the completion as fixed
(pairs and directions of singular values within a rounding of zero get no gradient), which
is the exact gradient wherever X has full rank.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

from .. import _autocast, _validate


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


def _finite(x: Tensor, name: str, purpose: str) -> None:
    """Refuse NaN and inf in ``x`` (where its values can be read): an inf gave NaN results
    silently, a NaN LAPACK's error."""
    values = _validate.readable_values(x)
    # max |v| is NaN or inf exactly when some v is: one pass, no bool tensor of x's size.
    if values is not None and values.numel() and not bool(torch.isfinite(values.abs().amax())):
        raise ValueError(f"{name} must be finite {purpose}, got non-finite values")


def condition_number(x: Tensor) -> Tensor:
    """Spectral condition number sigma_max / sigma_min of each matrix in ``x`` (..., m, n).

    Uses the min(m, n) singular values, so a wide or tall matrix of full rank is finite;
    a rank-deficient matrix (the zero matrix too) gives ``inf`` or, through round-off, a huge
    value; non-finite values are a ValueError. Returns a tensor of shape ``x.shape[:-2]`` in
    the compute precision (float64 for float64 input, else float32). Empty batches are
    allowed; empty matrices are not. Differentiable where the singular values are distinct.
    """
    _matrix_batch(x, "x")
    _finite(x, "x", "to have a condition number")
    s = torch.linalg.svdvals(x.to(_compute_dtype(x)))
    # An all-zero matrix has rank 0: inf, as for any rank-deficient one (0 / 0 gave NaN).
    return torch.where(s[..., 0] > 0, s[..., 0] / s[..., -1], torch.full_like(s[..., 0], math.inf))


def _negligible(s: Tensor, rows: int, cols: int) -> Tensor:
    """Singular values (or pair sums) within a rounding of zero, relative to sigma_1 (as pinv's rtol)."""
    tol = max(rows, cols) * torch.finfo(s.dtype).eps
    return s <= tol * s.amax(dim=-1, keepdim=True)


def _polar_backward(grad_q: Tensor, u: Tensor, s: Tensor, vh: Tensor) -> Tensor:
    """dL/dX of Q = U V^T for tall X = U diag(s) V^T (N >= d):

        U [F o (M - M^T)] V^T + (I - U U^T) G V diag(1/s) V^T,   M = U^T G V, F_ij = 1 / (s_i + s_j)

    with the terms of negligible s_i + s_j or s_i set to zero (X's null space held fixed)."""
    v = vh.transpose(-1, -2)
    m = u.transpose(-1, -2) @ grad_q @ v
    pair = s.unsqueeze(-1) + s.unsqueeze(-2)
    inv_pair = torch.where(_negligible(pair, *u.shape[-2:]), torch.zeros_like(pair), 1.0 / pair)
    inner = u @ (inv_pair * (m - m.transpose(-1, -2))) @ vh
    inv_s = torch.where(_negligible(s, *u.shape[-2:]), torch.zeros_like(s), 1.0 / s)
    g_v = grad_q @ v
    outside = (g_v - u @ (u.transpose(-1, -2) @ g_v)) * inv_s.unsqueeze(-2)  # (I - U U^T) G V diag(1/s)
    return inner + outside @ vh


class _ConditionTokens(torch.autograd.Function):
    """(Y, U, S, V^T): Y = X + strength sigma_1 U V^T in the compute dtype, with the gradient
    written out (module docstring), and the SVD of X (of X^T when X is wide) that the backward
    needs, returned rather than computed again in setup_context (a functorch-ready Function
    cannot keep it from forward otherwise). First derivatives only."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, strength: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        # Transposed wide matrices: the backward's formula is for tall ones (Q(X^T) = Q(X)^T).
        wide = x.shape[-2] < x.shape[-1]
        xt = x.transpose(-1, -2) if wide else x
        with _autocast.disabled(x.device.type):  # float32 as documented, in a region too
            u, s, vh = torch.linalg.svd(xt, full_matrices=False)
            correction = (strength * s[..., :1].unsqueeze(-1)) * (u @ vh)
            y = xt + correction
        # A zero, as an output of this Function: it depends on x for autograd, so that the
        # gradient Function below always has a path back to x (see _ConditionTokensGrad).
        anchor = x.new_zeros(())
        return (y.transpose(-1, -2) if wide else y), u, s, vh, anchor

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, strength = inputs
        _, u, s, vh, anchor = output
        ctx.mark_non_differentiable(u, s, vh)
        ctx.save_for_backward(anchor, u, s, vh)
        ctx.strength, ctx.wide = strength, x.shape[-2] < x.shape[-1]

    @staticmethod
    def jvp(ctx, *tangents):
        raise NotImplementedError("condition_tokens has no forward-mode formula (torch.func.jvp, jacfwd, hessian, "
                                  "forward_ad dual tensors): it has reverse-mode first derivatives (grad, vjp, "
                                  "jacrev)")

    @staticmethod
    def backward(ctx, grad_y: Tensor, *_svd_and_anchor_grads):
        anchor, u, s, vh = ctx.saved_tensors
        # Through a Function whose own backward raises: its formula treats U, S, V as constants,
        # so a second derivative must raise. once_differentiable did that in eager autograd only;
        # under torch.func (grad of grad, jacrev of jacrev) it gave a second derivative of zero.
        return _ConditionTokensGrad.apply(grad_y, anchor, u, s, vh, ctx.strength, ctx.wide), None


class _ConditionTokensGrad(torch.autograd.Function):
    """The gradient of :class:`_ConditionTokens` as a function with no derivative of its own.
    It takes the forward's zero ``anchor``, which it does not read, so that a second derivative
    always reaches its backward and raises: through grad_y alone, one whose grad_y does not
    depend on X (a linear loss) found no path and came back zero. Not Y, whose saving for this
    made an in-place change of the output an autograd error."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y: Tensor, anchor: Tensor, u: Tensor, s: Tensor, vh: Tensor, strength: float,
                wide: bool) -> Tensor:
        g = grad_y.transpose(-1, -2) if wide else grad_y
        with _autocast.disabled(g.device.type):
            q = u @ vh
            sigma_1 = s[..., :1].unsqueeze(-1)
            # d sigma_1 = u_1^T dX v_1 (a valid choice also when sigma_1 repeats)
            along_q = (g * q).sum(dim=(-2, -1), keepdim=True)
            top = u[..., :, :1] @ vh[..., :1, :]
            grad_x = g + strength * (along_q * top + sigma_1 * _polar_backward(g, u, s, vh))
        return grad_x.transpose(-1, -2) if wide else grad_x

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError("condition_tokens has first derivatives only (its gradient treats the singular vectors "
                           "as constants): no second derivative (create_graph=True, torch.func.grad of grad, "
                           "hessian)")


def condition_tokens(x: Tensor, strength: float = 1.0) -> Tensor:
    """Return ``x + strength * sigma_1(x) U V^T`` for each token matrix in ``x`` (..., N, d).

    With the default ``strength=1`` every result has condition number at most 2
    (methods.md section 8); ``strength=s`` gives at most (1 + s) / s. No parameters.
    Differentiable (first derivatives), with finite gradients also for rank-deficient
    token matrices (repeated or identical tokens, e.g. an image's flat region): see the
    module docstring. The output has ``x``'s dtype; the SVD runs in float32 (float64 for
    float64 input).
    """
    _matrix_batch(x, "x")
    _finite(x, "x", "to be conditioned")
    strength = _validate.real_number(strength, "strength", "> 0")
    if x.numel() == 0:
        return x.clone()
    return _ConditionTokens.apply(x.to(_compute_dtype(x)), strength)[0].to(x.dtype)
