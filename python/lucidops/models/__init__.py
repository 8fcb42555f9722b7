"""Reference models: PointNet (baseline and distillation teacher)."""

from .pointnet import PointNet, TNet, feature_transform_regularizer

__all__ = ["PointNet", "TNet", "feature_transform_regularizer"]
from ..nn.gaussian_pointnet import GaussianPointNet  # noqa: E402,F401
__all__ += ["GaussianPointNet"]
