"""Where distillation samples its points: each cloud's bounding cube (methods.md section 1).

The inputs of a distillation are not dataset clouds but points drawn uniformly at random
in a cloud's bounding cube (the axis-aligned cube, centred on the cloud's bounding box,
whose side is the box's longest side).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor


def cloud_points(item) -> Tensor:
    """A dataset item -> its (N, 3) points: a tensor, or the first element of a tuple/list/dict."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    elif isinstance(item, dict):
        item = item.get("points", item.get("pos"))
    if not isinstance(item, Tensor):
        raise TypeError(f"clouds: each cloud must be a tensor (N, 3) (or a (points, label) pair), "
                        f"got {type(item).__name__}")
    return item


def cloud_cubes(clouds) -> Tuple[Tensor, Tensor]:
    """Bounding cubes of ``clouds`` -> (centres (M, 3), half-sides (M,)), float64 on the CPU.

    ``clouds``: a tensor (M, N, 3) or (N, 3), a sequence of (N_i, 3) tensors, or a dataset
    whose items are tensors or (points, label) pairs; ``None`` means one cube, [-1, 1]^3.
    The cube of a cloud is centred on its bounding box and its half-side is half the box's
    longest side (a flat cloud still gets a solid cube).
    """
    if clouds is None:
        return torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    if isinstance(clouds, Tensor):
        if clouds.dim() == 2:
            clouds = clouds.unsqueeze(0)
        if clouds.dim() != 3 or clouds.shape[-1] != 3 or clouds.shape[1] == 0:
            raise ValueError(f"clouds must have shape (M, N, 3) or (N, 3) with N >= 1, got {tuple(clouds.shape)}")
        items: Sequence[Tensor] = list(clouds.detach().double().cpu())
    else:
        try:
            n = len(clouds)
        except TypeError:
            raise TypeError(f"clouds must be a tensor, a sequence or a dataset of clouds, or None, "
                            f"got {type(clouds).__name__}") from None
        items = [cloud_points(clouds[i]) for i in range(n)]
    if len(items) == 0:
        raise ValueError("clouds is empty")
    lo, hi = [], []
    for i, pts in enumerate(items):
        if pts.dim() != 2 or pts.shape[-1] != 3 or pts.shape[0] == 0:
            raise ValueError(f"clouds[{i}] must have shape (N, 3) with N >= 1, got {tuple(pts.shape)}")
        pts = pts.detach().double().cpu()
        if not torch.isfinite(pts).all():
            raise ValueError(f"clouds[{i}] has non-finite coordinates")
        lo.append(pts.amin(0))
        hi.append(pts.amax(0))
    lo_t, hi_t = torch.stack(lo), torch.stack(hi)
    centres = 0.5 * (lo_t + hi_t)
    half = 0.5 * (hi_t - lo_t).amax(1)
    # A single-point cloud has no extent; give it a tiny cube rather than a degenerate one.
    return centres, half.clamp_min(1e-6)


def cubes_bounds(centres: Tensor, halves: Tensor) -> Tuple[Tensor, Tensor]:
    """(low, high) (3,) of the box around every cube (``cloud_cubes``' centres (M, 3) and
    half-sides (M,))."""
    return (centres - halves[:, None]).amin(0), (centres + halves[:, None]).amax(0)


def box_center(low: Tensor, high: Tensor) -> List[float]:
    """The centre of the box [low, high] (3,)."""
    return ((low + high) / 2).tolist()


def cubes_box(centres: Tensor, halves: Tensor) -> Tuple[List[float], float]:
    """The box around every cube: its centre and half its longest side, where a Gaussian
    encoder for all the clouds starts."""
    low, high = cubes_bounds(centres, halves)
    return box_center(low, high), float((high - low).max() / 2)


def half_side_about(low: Tensor, high: Tensor, center: Sequence[float]) -> float:
    """Half-side of the smallest cube around ``center`` that holds the box [low, high] (3,):
    half the box's longest side when ``center`` is its centre, more when it is not."""
    c = torch.as_tensor(center, dtype=low.dtype)
    return float(torch.maximum(c - low, high - c).max())


def sample_cube_points(centres: Tensor, half: Tensor, points_per_cloud: int,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform points in each cube: centres (B, 3), half-sides (B,) -> (B, points_per_cloud, 3)."""
    u = torch.rand(centres.shape[0], points_per_cloud, 3, dtype=centres.dtype, device=centres.device,
                   generator=generator)
    return centres[:, None, :] + (2.0 * u - 1.0) * half[:, None, None]


__all__ = ["cloud_points", "cloud_cubes", "sample_cube_points"]
