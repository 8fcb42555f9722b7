"""The 3D Gaussian point encoder (methods.md section 1, arXiv:2511.04797).

A drop-in for PointNet's shared per-point MLP + max-pool: G learned 3D Gaussians, a
linear "Gaussian basis mixer" G -> K, and a max over the points, all in one fused op
(:func:`lucidops.ops.gaussian_mixture`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import _autocast, _validate
from ..ops.gaussian_mixture import REDUCTIONS, _check_threshold, gaussian_mixture

# Packed lower-triangular factor layout: [l00, l10, l20, l11, l21, l22].
_DIAGONAL = (0, 3, 5)


def precision_from_factor(factor: Tensor) -> Tensor:
    """(G, 6) packed lower-triangular L -> (G, 6) upper triangle of P = L L^T.

    With L = [[a, 0, 0], [b, c, 0], [d, e, f]] stored as [a, b, d, c, e, f]:
    P = [[a^2, ab, ad], [ab, b^2 + c^2, bd + ce], [ad, bd + ce, d^2 + e^2 + f^2]].
    P is positive definite whenever the diagonal of L is non-zero.
    """
    a, b, d, c, e, f = factor.unbind(-1)
    products = [a * a, a * b, a * d, b * b + c * c, b * d + c * e, d * d + e * e + f * f]
    # Out of autocast: its rule for stack refuses a half dtype other than its own (a float16
    # encoder in a bfloat16 region: "Unexpected floating ScalarType in at::autocast::prioritize");
    # the products are in the factor's dtype either way.
    device = factor.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return torch.stack(products, dim=-1)  # no region (or a device without autocast: meta)
    with torch.autocast(device, enabled=False):
        return torch.stack(products, dim=-1)


def covariance_from_lower(l_mat: Tensor) -> Tensor:
    """Sigma = (L L^T)^-1 from lower-triangular L (G, 3, 3), by two triangular solves. A zero
    on L's diagonal (a singular precision) is a ValueError naming the Gaussians, not
    LAPACK's "diagonal element 1 is zero"."""
    try:
        return torch.cholesky_inverse(l_mat, upper=False)
    except torch.linalg.LinAlgError:
        bad = (l_mat.diagonal(dim1=-2, dim2=-1) == 0).any(-1).nonzero().flatten().tolist()
        raise ValueError(f"factor: Gaussian(s) {bad[:8]} have a zero on the diagonal of L, so the precision "
                         "L L^T is singular (infinite covariance); re-initialise them or keep L's diagonal "
                         "away from zero") from None


def _center(value) -> Tuple[float, float, float]:
    """``cloud_center`` as 3 finite floats (one number stands for all three)."""
    if isinstance(value, Tensor) or type(value).__module__ == "numpy":
        # A tensor or NumPy array of one number (0-d too) or three: a 0-d tensor was counted as
        # "1 number" and refused, a NumPy array of three "not a real number".
        flat = value.detach().cpu().reshape(-1).tolist() if isinstance(value, Tensor) else value.reshape(-1).tolist()
        value = flat if len(flat) != 1 else flat[0]
    items = list(value) if isinstance(value, (list, tuple)) else [value] * 3
    if len(items) != 3:
        raise ValueError(f"cloud_center must be a number or 3 numbers, got {len(items)}")
    x, y, z = (_validate.real_number(v, "cloud_center") for v in items)
    return (x, y, z)


class GaussianPointEncoder(nn.Module):
    """Point cloud (..., N, 3) -> global feature (..., K) (or per-point (..., N, K)).

    Args:
        num_gaussians: G, the number of Gaussians (32 in the paper, 128 for Mamba3D).
        out_channels: K, the feature width (1024 as a PointNet global feature).
        cloud_range: the means start uniform in the cube of half-side ``cloud_range``
            around ``cloud_center`` (methods.md: "uniform in the cloud's bounding cube").
        cloud_center: that cube's centre, a number or 3 numbers (default the origin: clouds
            normalised to [-cloud_range, cloud_range]^3). Gaussians started far from the
            data never respond to it and never learn (their gradients vanish).
        reduce: "max" (the global feature) or "none" (the per-point pre-max features,
            what distillation regresses).
        off_diagonal_init: standard deviation of L's initial off-diagonal entries
            (L starts near the identity, so every Gaussian starts isotropic).

    Parameters: ``means`` (G, 3), ``factor`` (G, 6) the packed lower-triangular L with
    precision P = L L^T, and ``mixer`` (an ``nn.Linear(G, K)``).

    ``cull_threshold`` (None by default) enables the kernel's box culling when set to
    t > 0; meant for inference (its gradients are those of the culled function). Like
    train/eval mode it is a setting, not a parameter: the state dict does not hold it (set it
    again after ``load_state_dict`` into a fresh encoder; pickle and deepcopy keep it).
    """

    def __init__(self, num_gaussians: int = 32, out_channels: int = 1024, cloud_range: float = 1.0,
                 reduce: str = "max", off_diagonal_init: float = 0.01,
                 cloud_center: Union[float, Sequence[float]] = 0.0):
        super().__init__()
        for name, value in (("num_gaussians", num_gaussians), ("out_channels", out_channels)):
            _validate.integer(value, name, minimum=1)
        _validate.real_number(cloud_range, "cloud_range", "> 0")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        self.num_gaussians = num_gaussians
        self.out_channels = out_channels
        self.cloud_range = float(cloud_range)
        self.cloud_center = _center(cloud_center)
        self.reduce = reduce
        self.off_diagonal_init = _validate.real_number(off_diagonal_init, "off_diagonal_init", ">= 0")
        self._cull_threshold: Optional[float] = None
        self.means = nn.Parameter(torch.empty(num_gaussians, 3))
        self.factor = nn.Parameter(torch.empty(num_gaussians, 6))
        self.mixer = nn.Linear(num_gaussians, out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Means uniform in the cloud's cube (``cloud_center`` +- ``cloud_range``), factors the
        identity plus normal(0, ``off_diagonal_init``) below the diagonal, the mixer as a new
        ``nn.Linear``'s."""
        with torch.no_grad():
            self.means.uniform_(-self.cloud_range, self.cloud_range)
            self.means.add_(torch.tensor(self.cloud_center, dtype=self.means.dtype, device=self.means.device))
            self.factor.normal_(0.0, self.off_diagonal_init)
            self.factor[:, list(_DIAGONAL)] = 1.0
        self.mixer.reset_parameters()

    @property
    def cull_threshold(self) -> Optional[float]:
        return self._cull_threshold

    @cull_threshold.setter
    def cull_threshold(self, value: Optional[float]) -> None:
        self._cull_threshold = _check_threshold(value)

    def precisions(self) -> Tensor:
        """(G, 6) upper triangles of P = L L^T."""
        return precision_from_factor(self.factor)

    def covariances(self) -> Tensor:
        """(G, 3, 3) Sigma = P^-1 (for inspection and natural-gradient preconditioning)."""
        # cholesky_inverse has no half kernels: half factors are inverted in float32, returned in their dtype.
        compute = torch.promote_types(self.factor.dtype, torch.float32)
        l_mat = torch.zeros(self.num_gaussians, 3, 3, dtype=compute, device=self.factor.device)
        rows, cols = torch.tril_indices(3, 3)
        # tril_indices order is (0,0), (1,0), (1,1), (2,0), (2,1), (2,2); the packing is a, b, d, c, e, f.
        l_mat[:, rows, cols] = self.factor[:, [0, 1, 3, 2, 4, 5]].to(compute)
        return covariance_from_lower(l_mat).to(self.factor.dtype)

    def spread(self) -> Tensor:
        """The Gaussians' mean per-axis variance, mean over g of trace(Sigma_g) / 3, in units of
        ``cloud_range ** 2`` (a differentiable scalar).

        The culling box of Gaussian g has half-widths proportional to sqrt(Sigma_g[i, i]), so
        adding ``lambda * spread()`` to a training loss (``lucidops.train.distill``'s
        ``spread_penalty``) keeps the Gaussians compact and lets culling skip more of the cloud.
        """
        return self.covariances().diagonal(dim1=-2, dim2=-1).mean() / self.cloud_range ** 2

    def forward(self, points: Tensor) -> Tensor:
        """points (..., N, 3) in this module's dtype -> (..., K) or (..., N, K)."""
        if (isinstance(points, Tensor) and points.is_floating_point()
                and _autocast.float32_dtype(points) != _autocast.float32_dtype(self.means)):
            # The op would name means, a parameter the caller never passed. In an autocast
            # region float64 points still meet float32 means (the op's autocast rule).
            raise TypeError(f"points are {points.dtype} but this GaussianPointEncoder is {self.means.dtype}: "
                            f"convert one of them (points.to({self.means.dtype}) or encoder.to({points.dtype}))")
        try:
            return gaussian_mixture(points, self.means, self.precisions(), self.mixer.weight, self.mixer.bias,
                                    reduce=self.reduce, cull_threshold=self._cull_threshold)
        except ValueError as err:
            if str(err).startswith("precisions must be finite"):  # precisions: not what the caller passed
                raise ValueError(self._precisions_problem()) from err
            raise

    def point_features(self, points: Tensor) -> Tensor:
        """The per-point pre-max features (..., N, K) whatever ``reduce`` is set to, through this
        module's own call (its hooks run)."""
        saved = self.reduce
        self.reduce = "none"
        try:
            return self(points)
        finally:
            self.reduce = saved

    def _precisions_problem(self) -> str:
        """Why precisions() is not finite, in terms of this module (error path only)."""
        factor = self.factor.detach()
        if not bool(torch.isfinite(factor).all()):
            return "GaussianPointEncoder: its factor holds NaN or inf (a diverged training step?)"
        return (f"GaussianPointEncoder: its precisions L L^T overflow {factor.dtype} (|factor| up to "
                f"{float(factor.abs().max()):.3g}, {factor.dtype} holds up to {torch.finfo(factor.dtype).max:.3g}): "
                "run the encoder in float32 (encoder.float())")

    def extra_repr(self) -> str:
        return (f"num_gaussians={self.num_gaussians}, out_channels={self.out_channels}, "
                f"cloud_range={self.cloud_range:g}, "
                + (f"cloud_center={self.cloud_center}, " if any(self.cloud_center) else "")
                + f"reduce={self.reduce!r}, cull_threshold={self._cull_threshold}")
