"""Procedural point-cloud classification data: ``SyntheticShapes``.

Each sample is drawn from the surface of one of the shapes in ``SHAPES``, stretched per
axis, rotated, jittered and (by default) normalised into [-1, 1]^3. The labels are a
balanced shuffle fixed by the seed and the dataset length; sample ``i``'s points then come
from its own generator seeded by (s, i), so a dataset is the same whatever the access order
or worker split (a dataset of another length draws other labels).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import _validate


def _sphere(rng, n):
    v = rng.normal(size=(n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _cube(rng, n):
    p = rng.uniform(-1, 1, size=(n, 3))
    axis = rng.integers(0, 3, size=n)
    p[np.arange(n), axis] = rng.choice([-1.0, 1.0], size=n)
    return p


def _cylinder(rng, n):
    # Side area 2 pi r h = 4 pi, each cap pi (r = 1, h = 2): pick the part by area.
    theta = rng.uniform(0, 2 * math.pi, n)
    part = rng.choice(3, size=n, p=[4 / 6, 1 / 6, 1 / 6])
    r = np.where(part == 0, 1.0, np.sqrt(rng.uniform(0, 1, n)))
    z = np.where(part == 0, rng.uniform(-1, 1, n), np.where(part == 1, 1.0, -1.0))
    return np.stack([r * np.cos(theta), r * np.sin(theta), z], 1)


def _cone(rng, n):
    # Lateral area pi r l (l = sqrt(5)), base pi r^2.
    lateral = math.sqrt(5.0)
    theta = rng.uniform(0, 2 * math.pi, n)
    side = rng.uniform(0, 1, n) < lateral / (lateral + 1)
    t = np.sqrt(rng.uniform(0, 1, n))  # radius fraction, area-uniform
    z = np.where(side, 1 - 2 * t, -1.0)
    return np.stack([t * np.cos(theta), t * np.sin(theta), z], 1)


def _torus(rng, n, major=1.0, minor=0.35):
    # Rejection on the tube angle: the area element grows with the distance to the axis.
    out = np.empty((0, 3))
    while len(out) < n:
        u = rng.uniform(0, 2 * math.pi, 2 * n)
        v = rng.uniform(0, 2 * math.pi, 2 * n)
        keep = rng.uniform(0, 1, 2 * n) < (major + minor * np.cos(v)) / (major + minor)
        u, v = u[keep], v[keep]
        ring = major + minor * np.cos(v)
        out = np.concatenate([out, np.stack([ring * np.cos(u), ring * np.sin(u), minor * np.sin(v)], 1)])
    return out[:n]


def _triangles(rng, n, tris):
    tris = np.asarray(tris, dtype=np.float64)
    areas = 0.5 * np.linalg.norm(np.cross(tris[:, 1] - tris[:, 0], tris[:, 2] - tris[:, 0]), axis=1)
    idx = rng.choice(len(tris), size=n, p=areas / areas.sum())
    a, b = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    flip = a + b > 1
    a, b = np.where(flip, 1 - a, a), np.where(flip, 1 - b, b)
    t = tris[idx]
    return t[:, 0] + a[:, None] * (t[:, 1] - t[:, 0]) + b[:, None] * (t[:, 2] - t[:, 0])


def _pyramid(rng, n):
    base = [(-1, -1, -1), (1, -1, -1), (1, 1, -1), (-1, 1, -1)]
    apex = (0, 0, 1)
    tris = [(base[0], base[1], base[2]), (base[0], base[2], base[3])]
    tris += [(base[i], base[(i + 1) % 4], apex) for i in range(4)]
    return _triangles(rng, n, tris)


def _octahedron(rng, n):
    tris = [((sx, 0, 0), (0, sy, 0), (0, 0, sz)) for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]
    return _triangles(rng, n, tris)


def _tetrahedron(rng, n):
    v = [(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)]
    return _triangles(rng, n, [(v[0], v[1], v[2]), (v[0], v[1], v[3]), (v[0], v[2], v[3]), (v[1], v[2], v[3])])


def _plane(rng, n):
    p = rng.uniform(-1, 1, size=(n, 3))
    p[:, 2] = 0.0
    return p


def _helix(rng, n, turns=3.0, tube=0.15):
    t = rng.uniform(0, 1, n)
    angle = 2 * math.pi * turns * t
    centre = np.stack([np.cos(angle), np.sin(angle), 2 * t - 1], 1)
    return centre + tube * _sphere(rng, n)


def _dumbbell(rng, n):
    p = 0.5 * _sphere(rng, n)
    p[:, 0] += np.where(rng.uniform(0, 1, n) < 0.5, -1.0, 1.0)
    return p


def _box_surface(rng, half):
    """One point on the surface of each box of half-widths ``half`` (m, 3), area-uniform: the
    face pair normal to axis i is picked by its area, 4 half_j half_k."""
    m = len(half)
    areas = np.stack([half[:, 1] * half[:, 2], half[:, 0] * half[:, 2], half[:, 0] * half[:, 1]], 1).cumsum(1)
    face = (rng.uniform(0, 1, m)[:, None] * areas[:, -1:] > areas).sum(1)
    p = rng.uniform(-1, 1, size=(m, 3)) * half
    rows = np.arange(m)
    p[rows, face] = rng.choice([-1.0, 1.0], size=m) * half[rows, face]
    return p


def _cross(rng, n, half_width=0.15):
    # Three orthogonal bars (boxes 2 x 0.3 x 0.3) through the origin: the surface of their
    # union, so each bar's faces by area (a box's end caps are 0.09 of its 2.58) and none of the
    # points a bar's surface has inside another bar (the crossing).
    out = np.empty((0, 3))
    while len(out) < n:
        m = 2 * n
        axis = rng.integers(0, 3, size=m)  # the bars have equal areas
        half = np.full((m, 3), half_width)
        half[np.arange(m), axis] = 1.0
        p = _box_surface(rng, half)
        inside_other = np.zeros(m, dtype=bool)
        for bar in range(3):
            across = [j for j in range(3) if j != bar]
            inside = (np.abs(p[:, bar]) < 1.0) & (np.abs(p[:, across]) < half_width).all(1)
            inside_other |= inside & (axis != bar)
        out = np.concatenate([out, p[~inside_other]])
    return out[:n]


SHAPES: Dict[str, Callable] = {
    "sphere": _sphere, "cube": _cube, "cylinder": _cylinder, "cone": _cone, "torus": _torus,
    "pyramid": _pyramid, "octahedron": _octahedron, "tetrahedron": _tetrahedron, "plane": _plane,
    "helix": _helix, "dumbbell": _dumbbell, "cross": _cross,
}
ROTATIONS = ("so3", "z", None)


def _rotation(rng, kind) -> np.ndarray:
    if kind is None:
        return np.eye(3)
    if kind == "z":
        a = rng.uniform(0, 2 * math.pi)
        return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])
    # Uniform on SO(3): QR of a Gaussian matrix with the sign of R's diagonal fixed.
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


class SyntheticShapes(Dataset):
    """Procedural point clouds of ``num_classes`` shapes; items are (points (N, 3) float32, label int64).

    Args:
        num_samples: dataset length.
        num_points: points per cloud, or (low, high) for a random count in [low, high] per
            sample (then batch with a collate that pads or samples, as clouds differ in size).
        num_classes: the first ``num_classes`` entries of ``SHAPES`` (at most 12).
        seed: with the other arguments, fixes every sample, whatever the access order or
            worker split. The labels are a balanced shuffle of the whole dataset, so a
            dataset of another length or class count draws other labels (and points).
        rotation: "so3" (uniform random rotation), "z" (about the z axis) or None.
        scale_range: per-axis stretch factors drawn uniformly from this range.
        jitter: standard deviation of the Gaussian point noise (clipped at 5 standard deviations).
        normalize: centre the bounding box and scale so the cloud fits [-1, 1]^3 (max |coord| = 1).

    Labels are balanced (counts differ by at most one) and shuffled by seed.
    """

    def __init__(self, num_samples: int, num_points: Union[int, Tuple[int, int]] = 1024, num_classes: int = 10,
                 seed: int = 0, rotation: Optional[str] = "so3", scale_range: Sequence[float] = (0.75, 1.25),
                 jitter: float = 0.01, normalize: bool = True):
        _validate.integer(num_samples, "num_samples", minimum=1)
        if isinstance(num_points, (tuple, list)):
            if len(num_points) != 2:
                raise ValueError(f"num_points must be an int or a (low, high) pair, got {len(num_points)} values")
            low, high = (_validate.integer(v, f"num_points[{i}]", minimum=1) for i, v in enumerate(num_points))
            if low > high:
                raise ValueError(f"num_points must be (low, high) with low <= high, got {num_points!r}")
            num_points = (low, high)
        else:  # a numpy integer too, like num_classes
            num_points = _validate.integer(num_points, "num_points", minimum=1)
        _validate.integer(num_classes, "num_classes", minimum=1, maximum=len(SHAPES))
        _validate.integer(seed, "seed", minimum=0)
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        # A bare number used to fail inside len() with a message that named no argument.
        if not isinstance(scale_range, (tuple, list, np.ndarray)):
            raise TypeError(f"scale_range must be a (low, high) pair of numbers, got {type(scale_range).__name__}")
        if len(scale_range) != 2:
            raise ValueError(f"scale_range must be a (low, high) pair, got {len(scale_range)} values")
        scale_low, scale_high = (_validate.real_number(v, f"scale_range[{i}]", "> 0")
                                 for i, v in enumerate(scale_range))
        if scale_low > scale_high:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        _validate.real_number(jitter, "jitter", ">= 0")
        self.num_samples = num_samples
        self.num_points = num_points
        self.num_classes = num_classes
        self.seed = seed
        self.rotation = rotation
        self.scale_range = (scale_low, scale_high)
        self.jitter = float(jitter)
        self.normalize = _validate.boolean(normalize, "normalize")
        self.class_names = list(SHAPES)[:num_classes]
        labels = np.arange(num_samples) % num_classes
        np.random.default_rng([seed, 0xC1A55]).shuffle(labels)
        self.labels = torch.from_numpy(labels).long()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        index = _validate.dataset_index(index, self.num_samples, "sample")
        rng = np.random.default_rng([self.seed, int(index)])
        label = int(self.labels[index])
        if isinstance(self.num_points, tuple):
            n = int(rng.integers(self.num_points[0], self.num_points[1] + 1))
        else:
            n = self.num_points
        pts = SHAPES[self.class_names[label]](rng, n)
        pts = pts * rng.uniform(*self.scale_range, size=3)
        pts = pts @ _rotation(rng, self.rotation).T
        if self.jitter > 0:
            pts = pts + np.clip(rng.normal(0.0, self.jitter, size=pts.shape), -5 * self.jitter, 5 * self.jitter)
        if self.normalize:
            pts = pts - 0.5 * (pts.max(0) + pts.min(0))
            pts = pts / max(np.abs(pts).max(), 1e-12)
        return torch.from_numpy(pts).float(), torch.tensor(label, dtype=torch.long)
