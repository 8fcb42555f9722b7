"""Reference models: PointNet (baseline and distillation teacher)."""

from .pointnet import PointNet, TNet, feature_transform_regularizer

__all__ = ["PointNet", "TNet", "feature_transform_regularizer"]
