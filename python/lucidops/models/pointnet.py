"""PointNet classifier (Qi et al., CVPR 2017), the baseline and distillation teacher of
methods.md section 1. Written from the paper's description.

Layout: input T-Net (3x3) -> shared MLP 3 -> 64 -> [feature T-Net 64x64] -> 64 -> 128 -> 1024
(Conv1d kernel 1 + BatchNorm, ReLU except after the last) -> max over points -> head
1024 -> 512 -> 256 -> classes (BatchNorm + ReLU, dropout 0.3 before the last layer).
For 40 classes this has 3.47M parameters with the feature transform and 1.61M without,
the counts the 3DGPE paper reports.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union, cast

import torch
from torch import Tensor, nn

from .. import _validate


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 1), nn.BatchNorm1d(cout))


def _linear_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout))


class TNet(nn.Module):
    """Regresses a k x k transform from (B, k, N) features: shared MLP k-64-128-1024, max,
    then 512-256-k^2. The last layer starts at zero and the identity is added, so the
    transform starts as the identity."""

    def __init__(self, k: int):
        super().__init__()
        self.k = _validate.integer(k, "k", minimum=1)
        self.encoder = nn.ModuleList([_conv_bn(k, 64), _conv_bn(64, 128), _conv_bn(128, 1024)])
        self.regressor = nn.ModuleList([_linear_bn(1024, 512), _linear_bn(512, 256)])
        self.out = nn.Linear(256, k * k)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.encoder:
            x = torch.relu(layer(x))
        x = x.amax(dim=2)
        for layer in self.regressor:
            x = torch.relu(layer(x))
        eye = torch.eye(self.k, dtype=x.dtype, device=x.device)
        return self.out(x).view(-1, self.k, self.k) + eye


def feature_transform_regularizer(transform: Tensor) -> Tensor:
    """Mean over the batch of ||I - A A^T||_F^2 for transforms A (B, k, k) (the paper's L_reg)."""
    if not isinstance(transform, Tensor):
        raise TypeError(f"transform must be a torch.Tensor, got {type(transform).__name__}")
    if transform.dim() != 3 or transform.shape[1] != transform.shape[2]:
        raise ValueError(f"transform must have shape (B, k, k), got {tuple(transform.shape)}")
    eye = torch.eye(transform.shape[1], dtype=transform.dtype, device=transform.device)
    return ((eye - transform @ transform.transpose(1, 2)) ** 2).sum(dim=(1, 2)).mean()


class PointNet(nn.Module):
    """PointNet classifier on clouds (B, N, 3) -> logits (B, num_classes).

    Args:
        num_classes: output classes (40 for ModelNet40).
        feature_transform: the 64x64 feature T-Net (and its regulariser).
        input_transform: the 3x3 input T-Net.
        dropout: dropout probability before the last layer (the paper keeps 0.7).

    ``point_features(points)`` gives the main encoder's per-point pre-max activations
    (B, N, 1024), the output of its last conv + BN without ReLU, the distillation target;
    their max over points is ``global_feature(points)``.
    """

    def __init__(self, num_classes: int = 40, feature_transform: bool = True, input_transform: bool = True,
                 dropout: float = 0.3):
        super().__init__()
        _validate.integer(num_classes, "num_classes", minimum=1)
        for flag, name in ((feature_transform, "feature_transform"), (input_transform, "input_transform")):
            _validate.boolean(flag, name)
        dropout = _validate.probability(dropout, "dropout")
        self.num_classes = num_classes
        self.input_tnet = TNet(3) if input_transform else None
        self.conv1 = _conv_bn(3, 64)
        self.feature_tnet = TNet(64) if feature_transform else None
        self.conv2 = _conv_bn(64, 128)
        self.conv3 = _conv_bn(128, 1024)
        self.head = nn.Sequential(
            nn.Linear(1024, 512), nn.BatchNorm1d(512), nn.ReLU(),
            nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(256, num_classes),
        )

    @staticmethod
    def _check_points(points) -> None:
        if not isinstance(points, Tensor):
            raise TypeError(f"points must be a torch.Tensor, got {type(points).__name__}")
        if not points.is_floating_point():
            raise TypeError(f"points must be a floating-point tensor, got dtype {points.dtype}")
        if points.dim() != 3 or points.shape[2] != 3 or points.shape[1] == 0:
            raise ValueError(f"points must have shape (B, N, 3) with N >= 1, got {tuple(points.shape)}")

    def _encode(self, points: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """-> pre-max activations (B, 1024, N), input transform (B, 3, 3) or None, feature transform or None."""
        self._check_points(points)
        x = points.transpose(1, 2)  # (B, 3, N)
        trans_in = None
        if self.input_tnet is not None:
            trans_in = self.input_tnet(x)
            x = torch.bmm(trans_in.transpose(1, 2), x)  # points @ A, per cloud
        x = torch.relu(self.conv1(x))
        trans_feat = None
        if self.feature_tnet is not None:
            trans_feat = self.feature_tnet(x)
            x = torch.bmm(trans_feat.transpose(1, 2), x)
        x = torch.relu(self.conv2(x))
        return self.conv3(x), trans_in, trans_feat

    def transforms(self, points: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """The input (B, 3, 3) and feature (B, 64, 64) transforms this cloud gets (None without a T-Net)."""
        _, trans_in, trans_feat = self._encode(points)
        return trans_in, trans_feat

    def encoder_features(self, transformed_points: Tensor, feature_transform: Optional[Tensor] = None) -> Tensor:
        """Per-point pre-max activations (B, N, 1024) of points already through the input
        transform, with a given feature transform (B, 64, 64) or none.

        The T-Nets make PointNet's per-point features depend on the whole cloud; this is the
        per-point function *given* a cloud's transforms (see :meth:`transforms`), which is
        what a per-point student must learn: ``point_features(x)`` equals
        ``encoder_features(transform_points(x), transforms(x)[1])``.
        """
        self._check_points(transformed_points)
        if (feature_transform is None) != (self.feature_tnet is None):
            raise ValueError("feature_transform must be given exactly when the model has a feature T-Net")
        x = torch.relu(self.conv1(transformed_points.transpose(1, 2)))
        if feature_transform is not None:
            x = torch.bmm(feature_transform.transpose(1, 2), x)
        return self.conv3(torch.relu(self.conv2(x))).transpose(1, 2)

    def transform_points(self, points: Tensor) -> Tensor:
        """Points (B, N, 3) after the input T-Net (unchanged without one)."""
        self._check_points(points)
        if self.input_tnet is None:
            return points
        return points @ self.input_tnet(points.transpose(1, 2))

    def point_features(self, points: Tensor) -> Tensor:
        """Per-point pre-max activations (B, N, 1024) of the main encoder (last conv + BN, no ReLU)."""
        return self._encode(points)[0].transpose(1, 2)

    def global_feature(self, points: Tensor) -> Tensor:
        """(B, 1024): the max over points of :meth:`point_features`."""
        return self._encode(points)[0].amax(dim=2)

    def forward(self, points: Tensor, return_transforms: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Optional[Tensor], Optional[Tensor]]]:
        """Logits (B, num_classes); with ``return_transforms`` also the input and feature transforms."""
        pre_max, trans_in, trans_feat = self._encode(points)
        logits = self.head(pre_max.amax(dim=2))
        if return_transforms:
            return logits, trans_in, trans_feat
        return logits

    def regularization_loss(self, feature_transform: Optional[Tensor]) -> Tensor:
        """||I - A A^T||_F^2 of the feature transform (zero without one); weight it by 0.001 as the paper."""
        if feature_transform is None:
            return cast(Tensor, self.head[0].weight).new_zeros(())
        return feature_transform_regularizer(feature_transform)
