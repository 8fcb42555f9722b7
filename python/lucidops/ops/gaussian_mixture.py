"""Fused 3D Gaussian point encoder mixture (methods.md section 1) as a custom op.

    lucidops.ops.gaussian_mixture(points, means, precisions, weight, bias=None, *,
                                  reduce="max", cull_threshold=None)

phi_g(x) = exp(-1/2 (x - mu_g)^T P_g (x - mu_g)), l_k(x) = sum_g weight[k, g] phi_g(x) + bias[k];
``reduce="max"`` returns the max of l over the points, ``reduce="none"`` l itself.

The op is ``torch.ops.lucidops.gaussian_mixture(points (B, N, 3), means, precisions, weight,
bias?, reduce_max, cull_threshold?) -> (out, argmax)``; ``argmax`` (B, K) int64 is the
lowest point index attaining each channel's max (empty for reduce none) and is all the
backward keeps besides the inputs. The backward op
``torch.ops.lucidops.gaussian_mixture_backward(grad, points, means, precisions, weight,
argmax, reduce_max, cull_threshold)`` returns the gradients of points, means, precisions,
weight and bias. Culling boxes come from :func:`lucidops.reference.gaussian_mixture.cull_half_widths`
in every backend, so every backend culls exactly the same (point, Gaussian) pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, cast

import numpy as np
import torch
from torch import Tensor

from .. import _autocast, _ext, _validate, backends
from ..profile import flops as _flops
from ..reference import gaussian_mixture as _reference
from . import _eager, _functorch, _vmap

REDUCTIONS = ("max", "none")

# FLOPs, counting each arithmetic operation and each exp as one, a multiply-add as two:
# phi per (point, Gaussian): 3 differences, 12 products, 5 sums, 2 scalings, 1 exp = 23.
# Mixing: 2 G K per point, plus K for the bias; the max: K comparisons per point.
PHI_FLOPS = 23
# Backward per (channel or point, Gaussian) pair: phi again (23), the weight gradient (2),
# the coefficient dL/dphi * phi (2), P d (15), the mean (6), precision (18) and point (6) terms.
BACKWARD_PAIR_FLOPS = 72
# reduce="none" forms the weight gradient and dL/dphi as the two (M x K x G) products its
# formula counts apart, so per pair the coefficient is one multiply: 72 - 2 - 1.
NONE_BACKWARD_PAIR_FLOPS = 69


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def forward_flops(points_shape, means_shape, precisions_shape, weight_shape, bias_shape, reduce_max, cull_threshold,
                  *_, **__) -> int:
    """Dense-equivalent FLOPs of the forward: culling skips work but does not change the count
    (which pairs it skips depends on the values; a formula sees shapes)."""
    m = _numel(points_shape[:-1])  # B * N points
    g, k = int(means_shape[0]), int(weight_shape[0])
    total = m * (PHI_FLOPS * g + 2 * g * k)
    if bias_shape is not None:
        total += m * k
    if reduce_max:
        total += m * k
    return total


def backward_flops(grad_shape, points_shape, means_shape, precisions_shape, weight_shape, argmax_shape, reduce_max,
                   cull_threshold, *_, **__) -> int:
    g, k = int(means_shape[0]), int(weight_shape[0])
    # The bias gradient (+1 per arg-max point, M K for reduce "none") is counted with or
    # without a bias: every backend forms it either way (the op is not told whether there
    # is one), and a formula counts the work the op does.
    if reduce_max:
        pairs = _numel(grad_shape)  # B * K arg-max points
        return pairs * (BACKWARD_PAIR_FLOPS * g + 1)
    m = _numel(points_shape[:-1])
    # grad_weight = grad^T phi and dL/dphi = grad W: two (M x K x G) products; the bias sum.
    return 4 * m * k * g + m * k + m * g * NONE_BACKWARD_PAIR_FLOPS


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return _reference.opmath_dtype(dtype)


# ---------------------------------------------------------------- backends


def _reference_forward(points, means, precisions, weight, bias, reduce_max, cull_threshold):
    return _reference.forward(points, means, precisions, weight, bias, reduce_max, cull_threshold)


def _reference_backward(grad, points, means, precisions, weight, argmax, reduce_max, cull_threshold):
    return _reference.backward(grad, points, means, precisions, weight, argmax, reduce_max, cull_threshold)


def _cpp_forward(points, means, precisions, weight, bias, reduce_max, cull_threshold):
    ext = _ext.load("cpu")
    compute = _opmath(points.dtype)  # half inputs run in float32
    half = _reference.cull_half_widths(means, precisions, weight, cull_threshold)
    b = bias.to(compute) if bias is not None else torch.zeros(weight.shape[0], dtype=compute)
    out, argmax = ext.gaussian_mixture_forward(points.to(compute), means.to(compute), precisions.to(compute),
                                               weight.to(compute), b, half, cull_threshold is not None, reduce_max)
    return out.to(points.dtype), argmax


def _cpp_backward(grad, points, means, precisions, weight, argmax, reduce_max, cull_threshold):
    ext = _ext.load("cpu")
    compute = _opmath(points.dtype)
    cull = cull_threshold is not None
    half = _reference.cull_half_widths(means, precisions, weight, cull_threshold)
    x, mu, p, w, g = (t.to(compute) for t in (points, means, precisions, weight, grad))
    if reduce_max:
        gx, gm, gp, gw, gb = ext.gaussian_mixture_backward_max(g, x, mu, p, w, argmax, half, cull)
    else:
        gx, gm, gp, gw, gb = _backward_none(g, x, mu, p, w, half, cull, ext.gaussian_phi, ext.gaussian_phi_backward)
    return (gx.to(points.dtype), gm.to(means.dtype), gp.to(precisions.dtype), gw.to(weight.dtype),
            gb.to(weight.dtype))


def _backward_none(g, x, mu, p, w, half, cull, phi_fn, phi_backward_fn):
    """Backward of reduce="none" given a backend's phi and phi-backward kernels.

    The output (N, K) is materialised anyway, so (M, G) phi is the smaller tensor; the two
    K x G products are plain GEMMs and the per-pair terms go to the backend's kernels.
    """
    flat_x = x.reshape(-1, 3)
    flat_g = g.reshape(-1, g.shape[-1])
    phi = phi_fn(flat_x, mu, p, half, cull)
    gw = flat_g.t() @ phi
    gb = flat_g.sum(dim=0)
    coef = ((flat_g @ w) * phi).contiguous()
    gx, gm, gp = phi_backward_fn(coef, flat_x, mu, p)
    return gx.reshape(x.shape), gm, gp, gw, gb


def _gpu_inputs(points, means, precisions, weight, cull_threshold):
    compute = _opmath(points.dtype)  # half inputs run in float32
    half = _reference.cull_half_widths(means, precisions, weight, cull_threshold)
    return compute, half, [t.to(compute).contiguous() for t in (points, means, precisions, weight)]


def _gpu_forward(forward_fn, points, means, precisions, weight, bias, reduce_max, cull_threshold):
    """The triton and cuda forwards: the same inputs and outputs around each one's kernel."""
    compute, half, (x, mu, p, w) = _gpu_inputs(points, means, precisions, weight, cull_threshold)
    b = bias.to(compute).contiguous() if bias is not None else torch.zeros(w.shape[0], dtype=compute,
                                                                            device=w.device)
    out, argmax = forward_fn(x, mu, p, w, b, half, cull_threshold is not None, reduce_max)
    return out.to(points.dtype), argmax


def _gpu_backward(backward_max_fn, phi_fn, phi_backward_fn, grad, points, means, precisions, weight, argmax,
                  reduce_max, cull_threshold):
    """The triton and cuda backwards: fused for reduce max, phi + GEMMs (_backward_none) otherwise."""
    compute, half, (x, mu, p, w) = _gpu_inputs(points, means, precisions, weight, cull_threshold)
    g = grad.to(compute).contiguous()
    cull = cull_threshold is not None
    if reduce_max:
        gx, gm, gp, gw, gb = backward_max_fn(g, x, mu, p, w, argmax.contiguous(), half, cull)
    else:
        gx, gm, gp, gw, gb = _backward_none(g, x, mu, p, w, half, cull, phi_fn, phi_backward_fn)
    return (gx.to(points.dtype), gm.to(means.dtype), gp.to(precisions.dtype), gw.to(weight.dtype),
            gb.to(weight.dtype))


def _triton_forward(*args):
    from ..triton_kernels import gaussian_mixture as tk

    return _gpu_forward(tk.forward, *args)


def _triton_backward(*args):
    from ..triton_kernels import gaussian_mixture as tk

    return _gpu_backward(tk.backward_max, tk.phi, tk.phi_backward, *args)


def _cuda_forward(*args):
    """The CUDA extension (csrc/cuda/gaussian_mixture.cu); half inputs run in float32."""
    return _gpu_forward(_ext.load("cuda").gaussian_mixture_forward, *args)


def _cuda_backward(*args):
    ext = _ext.load("cuda")
    return _gpu_backward(ext.gaussian_mixture_backward_max, ext.gaussian_phi, ext.gaussian_phi_backward, *args)


backends.register_op("gaussian_mixture",
                     {"reference": _reference_forward, "cpp": _cpp_forward, "triton": _triton_forward,
                      "cuda": _cuda_forward})
backends.register_op("gaussian_mixture_backward",
                     {"reference": _reference_backward, "cpp": _cpp_backward, "triton": _triton_backward,
                      "cuda": _cuda_backward})


# ---------------------------------------------------------------- custom ops


@_eager.custom_op("lucidops::gaussian_mixture")
def _mixture_op(points: Tensor, means: Tensor, precisions: Tensor, weight: Tensor, bias: Optional[Tensor],
                reduce_max: bool, cull_threshold: Optional[float]) -> Tuple[Tensor, Tensor]:
    return backends.dispatch("gaussian_mixture", points.device.type, points, means, precisions, weight, bias,
                             reduce_max, cull_threshold)


@_mixture_op.register_fake
def _(points, means, precisions, weight, bias, reduce_max, cull_threshold):
    b, n = points.shape[0], points.shape[1]
    k = weight.shape[0]
    if reduce_max:
        return points.new_empty((b, k)), points.new_empty((b, k), dtype=torch.long)
    return points.new_empty((b, n, k)), points.new_empty((0,), dtype=torch.long)


@_eager.custom_op("lucidops::gaussian_mixture_backward")
def _mixture_backward_op(grad: Tensor, points: Tensor, means: Tensor, precisions: Tensor, weight: Tensor,
                         argmax: Tensor, reduce_max: bool, cull_threshold: Optional[float]
                         ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    outs = backends.dispatch("gaussian_mixture_backward", points.device.type, grad, points, means, precisions,
                             weight, argmax, reduce_max, cull_threshold)
    return tuple(t.contiguous() for t in outs)


@_mixture_backward_op.register_fake
def _(grad, points, means, precisions, weight, argmax, reduce_max, cull_threshold):
    return (points.new_empty(points.shape), means.new_empty(means.shape), precisions.new_empty(precisions.shape),
            weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],)))


# vmap: clouds are independent, so a batch of point sets (shared Gaussians) folds into the
# clouds. The backward always forms the parameter gradients, sums over each example's
# clouds under vmap(grad(...)): it runs per example.
_mixture_op.register_vmap(_vmap.fold_first_argument(_mixture_op))


@_mixture_backward_op.register_vmap
def _(info, in_dims, *args):
    return _vmap.per_example(_mixture_backward_op, info, in_dims, args)


def _setup_context(ctx, inputs, output):
    points, means, precisions, weight, bias, reduce_max, cull_threshold = inputs
    _, argmax = output
    ctx.mark_non_differentiable(argmax)
    ctx.save_for_backward(points, means, precisions, weight, argmax)
    ctx.reduce_max = reduce_max
    ctx.cull_threshold = cull_threshold
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out, _grad_argmax):
    points, means, precisions, weight, argmax = ctx.saved_tensors
    gx, gm, gp, gw, gb = _mixture_backward(grad_out.contiguous(), points, means, precisions, weight, argmax,
                                              ctx.reduce_max, ctx.cull_threshold)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gm if need[1] else None, gp if need[2] else None, gw if need[3] else None,
            gb if (ctx.has_bias and need[4]) else None, None, None)


_mixture = _functorch.differentiable(_mixture_op, _backward, _setup_context)
_mixture_backward = _functorch.first_order_only(_mixture_backward_op)
# The mixer sum_g W[k, g] phi_g is a matrix product (G K multiply-adds per point); fvcore
# counts those once, phi and the max per element.
_flops.register(torch.ops.lucidops.gaussian_mixture, forward_flops,
                macs=lambda p, mu, prec, w, *_, **__: _numel(p[:-1]) * int(mu[0]) * int(w[0]))
_flops.register(torch.ops.lucidops.gaussian_mixture_backward, backward_flops)


# ---------------------------------------------------------------- validation and the public function


def _largest_magnitudes(named: List[Tuple[str, Tensor]]) -> Dict[str, Optional[float]]:
    """max |v| of each named tensor (all of one dtype and device), refusing NaN and inf; None
    for one whose values cannot be read. Data-dependent: one synchronisation on CUDA for all
    of them (one each made five per call)."""
    readable = {name: _validate.readable_values(value.detach()) for name, value in named}
    # max |v| is NaN or inf exactly when some v is: one pass, no (numel,) bool tensor.
    # torch.isfinite(values).all() cost 55 us on a (1024, 32) mixer, a tenth of a
    # one-cloud forward; this costs 9.
    maxima = {name: values.abs().amax() if values.numel() else values.new_zeros(())
              for name, values in readable.items() if values is not None}
    largest: Dict[str, Optional[float]] = dict.fromkeys(readable)
    if maxima:
        largest.update(zip(maxima, torch.stack(list(maxima.values())).tolist()))
    for name, value in largest.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be finite (it holds NaN or inf)")
    return largest


@dataclass(frozen=True)
class _Extents:
    """What the overflow checks know from the inputs' max |v|."""

    distance: float  # bounds every |x_i - mu_i|: max|x| + max|mu|
    precisions: float
    weight: float
    bias: float  # 0 without a bias
    limit: float  # the compute dtype's largest value


def _extents(largest: Dict[str, Optional[float]], dtype: torch.dtype) -> Optional[_Extents]:
    """The bounds, or None where some input's values cannot be read (no check is made then)."""
    if any(value is None for value in largest.values()):
        return None
    known = cast(Dict[str, float], largest)
    return _Extents(distance=known["points"] + known["means"], precisions=known["precisions"],
                    weight=known["weight"], bias=known.get("bias", 0.0),
                    limit=torch.finfo(_reference.opmath_dtype(dtype)).max)


def _no_overflow(extents: Optional[_Extents], g: int) -> None:
    """Refuse inputs whose finite values could overflow the compute dtype inside the op.

    With d = x - mu, every term of the quadratic form, and the squares d_i d_j of the
    precisions' gradient, are at most max(9 max|P|, 1) max|d|^2 (refused from half the dtype's
    largest value on), and the mixer's sums at most G max|W| + max|b| (phi <= 1, up to
    rounding; refused past the largest value). Unrefused, a point 2e19 from a mean in
    float32 made +inf - inf = NaN in the quadratic form, and the backends then disagreed
    (the kernels' max passes over NaN, the reference's does not)."""
    if extents is None:
        return
    e = extents
    quadratic = max(9.0 * e.precisions, 1.0) * e.distance * e.distance
    mixed = g * e.weight * (1 + 2.0 ** -10) + e.bias
    compute = "float64" if e.limit > 1e300 else "float32"
    advice = "pass float64 tensors" if compute == "float32" else "rescale the inputs"
    if not quadratic < e.limit / 2:
        raise ValueError(f"points lie up to {e.distance:.3g} from the means and precisions reach "
                         f"{e.precisions:.3g}: (x - mu)^T P (x - mu) can overflow {compute} (the "
                         f"compute dtype) and turn into NaN; {advice}")
    if not mixed <= e.limit:
        raise ValueError(f"weight (up to {e.weight:.3g} over {g} Gaussians) and bias (up to {e.bias:.3g}): "
                         f"the mixer's sums can overflow {compute} (the compute dtype); {advice}")


# Row-major (3, 3) of a precision from its upper triangle [p00, p01, p02, p11, p12, p22].
_TRIU_FLAT = np.array(_reference.TRIU_INDEX).reshape(-1)


def _positive_semidefinite(precisions: Tensor, made_in: torch.dtype, extents: Optional[_Extents]) -> None:
    """Refuse indefinite precisions, up to rounding in ``made_in``, the dtype they were given
    in (before autocast's float32). Away from its mean such a Gaussian's phi grows without
    bound: exp overflows to inf, a zero mixer weight makes that NaN, and the backends part
    ways (the kernels' max passes over NaN, the reference's does not). Eigenvalues of the
    (G, 3, 3) matrices in float64 on the CPU (in NumPy); data-dependent like
    _largest_magnitudes. A negative eigenvalue within rounding is refused too where the
    points lie far enough from the means for it to overflow phi: the bfloat16 tolerance, 1/16 of the largest
    eigenvalue, let exp(-q/2) reach inf 64 units from a mean."""
    values = _validate.readable_values(precisions, batch_first=True)
    if values is None or values.numel() == 0:
        return
    # reshape: under vmap the batch dims are in front of one example's (G, 6). NumPy on the
    # host, cheaper than the same steps through torch's dispatch (31 against 45 us, G = 32).
    rows = _validate.host_float64(values).reshape(-1, 6)
    eigenvalues = np.linalg.eigvalsh(rows[:, _TRIU_FLAT].reshape(-1, 3, 3))
    # A singular L L^T rounded to bfloat16 shows eigenvalues of -1e-3 of the largest; float32
    # factors multiplied on a GPU in TF32 (10-bit mantissa) about the same.
    relative = 8 * torch.finfo(made_in).eps
    if made_in == torch.float32:
        relative = max(relative, 2.0 ** -10)
    tolerance = relative * np.abs(eigenvalues).max(axis=-1)
    g = precisions.shape[-2]
    bad = sorted({int(i) % g for i in np.flatnonzero(eigenvalues[:, 0] < -tolerance)})
    if not bad:
        _tolerated_negative_part_fits(eigenvalues[:, 0], g, extents)
    if bad:
        shown = ", ".join(map(str, bad[:8])) + (" ..." if len(bad) > 8 else "")
        raise ValueError(f"precisions must be positive semidefinite: Gaussian(s) {shown} have a negative "
                         "eigenvalue, so phi grows without bound away from the mean and overflows (build "
                         "precisions as L L^T, as lucidops.nn.GaussianPointEncoder does)")


def _tolerated_negative_part_fits(smallest: np.ndarray, g: int, extents: Optional[_Extents]) -> None:
    """With d = x - mu, q >= lambda_min |d|^2 >= lambda_min 3 max|d_i|^2, so phi = exp(-q/2) is
    at most exp(-lambda_min 3 max|d_i|^2 / 2), and the mixer's sum G max|W| times that: refused
    where it could pass the compute dtype's largest value (inf, then NaN after a zero weight)."""
    worst = -float(smallest.min())
    if worst <= 0 or extents is None:
        return
    distance = extents.distance
    growth = worst * 3.0 * distance * distance / 2.0
    room = math.log(extents.limit) - math.log(max(g * extents.weight, 1.0))
    if not growth < room:
        raise ValueError(f"precisions must be positive semidefinite: an eigenvalue of {-worst:.3g}, within the "
                         "rounding allowed for the precisions' dtype, makes phi = exp(-q/2) overflow for points up "
                         f"to {distance:.3g} from the means (build precisions as L L^T in float32 or float64, or "
                         "bring the points nearer)")


def _shape_error(name: str, expected: str, value: Tensor) -> ValueError:
    return ValueError(f"{name} must have shape {expected}, got {tuple(value.shape)}")


def _check_threshold(cull_threshold) -> Optional[float]:
    if cull_threshold is None:
        return None
    return _validate.real_number(cull_threshold, "cull_threshold", "> 0", tensor_ok=True)


def gaussian_mixture(points: Tensor, means: Tensor, precisions: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                     *, reduce: str = "max", cull_threshold: Optional[float] = None) -> Tensor:
    """Gaussian mixture features of point clouds, fused with the mixer and the max-pool.

    Args:
        points: (..., N, 3) with N >= 1; any leading batch dims (e.g. (B, groups, group_size, 3)).
        means: (G, 3) Gaussian means.
        precisions: (G, 6) upper triangles [p00, p01, p02, p11, p12, p22] of the symmetric
            precision matrices: positive semidefinite (an indefinite one is a ValueError),
            positive definite for a bounded Gaussian.
        weight: (K, G) mixer weight; bias: (K,) or None.
        reduce: "max" (max over the N points, the global feature) or "none".
        cull_threshold: None for the dense mixture, or t > 0: a (point, Gaussian) pair
            outside the Gaussian's box of half-widths sqrt(2 ln(alpha_g / t) Sigma_g[i, i]),
            alpha_g = max_k |weight[k, g]|, contributes nothing (every Gaussian with
            alpha_g <= t contributes nothing anywhere); |culled - dense| <= G t per channel.

    All tensors share one floating dtype (float16, bfloat16, float32, float64; half runs in
    float32) and one device. Returns (..., K) for "max", (..., N, K) for "none". The max
    sends its gradient to the lowest point index attaining it, in every backend.
    Inside a ``torch.autocast`` region half inputs are cast to float32 first (autocast's
    rule for ``exp``), so a half-precision cloud meets float32 parameters without error.
    """
    precisions_dtype = precisions.dtype if isinstance(precisions, Tensor) else None
    points, means, precisions, weight, bias = _autocast.float32(points, means, precisions, weight, bias)
    _validate.floating_tensor(points, "points")
    if points.dim() < 2 or points.shape[-1] != 3:
        raise _shape_error("points", "(..., N, 3)", points)
    if points.shape[-2] == 0:
        raise ValueError("points must hold at least one point per cloud (N >= 1), got N = 0")
    for name, value in (("means", means), ("precisions", precisions), ("weight", weight)):
        _validate.tensor(value, name)
    if means.dim() != 2 or means.shape[1] != 3 or means.shape[0] == 0:
        raise _shape_error("means", "(G, 3) with G >= 1", means)
    g = means.shape[0]
    if precisions.dim() != 2 or precisions.shape != (g, 6):
        raise _shape_error("precisions", f"(G, 6) = ({g}, 6) to match means", precisions)
    if weight.dim() != 2 or weight.shape[1] != g or weight.shape[0] == 0:
        raise _shape_error("weight", f"(K, G) = (K, {g}) with K >= 1 to match means", weight)
    k = weight.shape[0]
    named = [("means", means), ("precisions", precisions), ("weight", weight)]
    if bias is not None:
        _validate.tensor(bias, "bias")
        if bias.dim() != 1 or bias.shape[0] != k:
            raise _shape_error("bias", f"({k},) to match weight", bias)
        named.append(("bias", bias))
    for name, value in named:
        if value.dtype != points.dtype:
            raise TypeError(f"{name} must have the dtype of points ({points.dtype}), got {value.dtype}")
        _validate.same_device(value, points, name, "points")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    threshold = _check_threshold(cull_threshold)
    extents = _extents(_largest_magnitudes([("points", points)] + named), points.dtype)
    _no_overflow(extents, g)
    assert precisions_dtype is not None  # a tensor: validated above
    _positive_semidefinite(precisions.detach(), precisions_dtype, extents)

    lead = points.shape[:-2]
    n = points.shape[-2]
    # The batch size explicitly (-1 is ambiguous for an empty batch), as a product that stays
    # symbolic under torch.export / dynamic torch.compile (int() would fix it to the traced size).
    flat = points.reshape(math.prod(lead), n, 3)
    out, _ = _mixture(flat, means, precisions, weight, bias, reduce == "max", threshold)
    if reduce == "max":
        return out.reshape(*lead, k)
    return out.reshape(*lead, n, k)
