"""Datasets: procedural point clouds."""

from .synthetic import ROTATIONS, SHAPES, SyntheticShapes

__all__ = ["SyntheticShapes", "SHAPES", "ROTATIONS"]

from .modelnet import ModelNet40  # noqa: E402  (h5py is imported only when a ModelNet40 is built)

__all__ += ["ModelNet40"]
