"""Datasets: procedural point clouds."""

from .synthetic import ROTATIONS, SHAPES, SyntheticShapes

__all__ = ["SyntheticShapes", "SHAPES", "ROTATIONS"]
