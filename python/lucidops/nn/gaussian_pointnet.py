"""Gaussian PointNet (methods.md section 1, arXiv:2511.04797): PointNet with Gaussian encoders.

:class:`GaussianTNet`: a T-Net whose shared per-point MLP is a :class:`GaussianPointEncoder`
(points (B, N, 3) -> a (B, k, k) transform). :class:`GaussianPointNet`: an optional input
T-Net (Gaussian, or PointNet's own), then a Gaussian encoder in place of PointNet's
conv1..conv3 and feature T-Net (the global feature, (B, K)), then PointNet's MLP classifier
head. Both can be built standalone (random Gaussians, trained from scratch) or from the
modules of a distilled PointNet (:func:`lucidops.train.distill_pointnet`).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from .. import _validate
from .gaussian_mixture import GaussianPointEncoder

if TYPE_CHECKING:
    from ..models.pointnet import TNet


def _tnet_class() -> type:
    # Imported on use: lucidops.models exports GaussianPointNet, so a module-level import
    # of lucidops.models here would be circular when lucidops.nn is imported first.
    from ..models.pointnet import TNet

    return TNet


def _check_points(points: Any) -> None:
    """The same (B, N >= 1, 3) floating-point check as PointNet's (imported late: models imports nn)."""
    from ..models.pointnet import PointNet

    PointNet._check_points(points)


def _linear_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout))


def _check_encoder(name: str, encoder: Any) -> GaussianPointEncoder:
    if not isinstance(encoder, GaussianPointEncoder):
        raise TypeError(f"{name} must be a lucidops.nn.GaussianPointEncoder, got {type(encoder).__name__}")
    if encoder.reduce != "max":  # the T-Net and head read one global feature per cloud
        raise ValueError(f"{name} must have reduce='max' (one (B, K) feature per cloud), got reduce="
                         f"{encoder.reduce!r}: set {name}.reduce = 'max' (a distillation student has 'none')")
    return encoder


class GaussianTNet(nn.Module):
    """A T-Net whose shared MLP is a Gaussian encoder: points (B, N, 3) -> transform (B, k, k).

    ``relu(encoder(points))`` (the max over points, then the ReLU PointNet's T-Net applies
    before its max: max and ReLU commute) feeds ``regressor`` (Linear + BatchNorm blocks,
    each followed by a ReLU) and ``out`` (a Linear to k*k); the identity is added.

    Args:
        k: the transform's size (3 for an input T-Net).
        num_gaussians: G of the encoder.
        out_channels: K of the encoder (PointNet's T-Net: 1024).
        hidden: widths of the regressor blocks (PointNet: 512, 256).
        cloud_range: the encoder's means start uniform in [-cloud_range, cloud_range]^3.

    ``out`` starts at zero, so a fresh T-Net is the identity transform.
    :meth:`from_tnet` builds one from a PointNet :class:`~lucidops.models.pointnet.TNet`
    and a distilled encoder; :meth:`from_modules` from any encoder, regressor and output layer.
    """

    def __init__(self, k: int = 3, num_gaussians: int = 32, out_channels: int = 1024,
                 hidden: tuple = (512, 256), cloud_range: float = 1.0):
        super().__init__()
        _validate.integer(k, "k", minimum=1)
        _validate.integer(num_gaussians, "num_gaussians", minimum=1)
        _validate.integer(out_channels, "out_channels", minimum=1)
        if not isinstance(hidden, (tuple, list)) or not hidden:
            raise ValueError(f"hidden must be a non-empty tuple of positive ints, got {hidden!r}")
        for i, h in enumerate(hidden):
            _validate.integer(h, f"hidden[{i}]", minimum=1)
        _validate.real_number(cloud_range, "cloud_range", "> 0")
        widths = [out_channels, *hidden]
        encoder = GaussianPointEncoder(num_gaussians, out_channels, cloud_range=cloud_range, reduce="max")
        regressor = nn.ModuleList([_linear_bn(a, b) for a, b in zip(widths[:-1], widths[1:])])
        out = nn.Linear(widths[-1], k * k)
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self._assign(encoder, regressor, out, k)

    def _assign(self, encoder: GaussianPointEncoder, regressor: nn.ModuleList, out: nn.Linear, k: int) -> None:
        _check_encoder("encoder", encoder)
        _validate.integer(k, "k", minimum=1)
        if not isinstance(regressor, nn.ModuleList):
            raise TypeError(f"regressor must be an nn.ModuleList, got {type(regressor).__name__}")
        if not isinstance(out, nn.Linear):
            raise TypeError(f"out must be an nn.Linear, got {type(out).__name__}")
        if out.out_features != k * k:
            raise ValueError(f"out must have k*k = {k * k} output features, got {out.out_features}")
        self.encoder = encoder
        self.regressor = regressor
        self.out = out
        self.k = k

    @classmethod
    def from_modules(cls, encoder: GaussianPointEncoder, regressor: nn.ModuleList, out: nn.Linear,
                     k: int = 3) -> "GaussianTNet":
        """A T-Net made of these modules (shared, not copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._assign(encoder, regressor, out, k)
        return self

    @classmethod
    def from_tnet(cls, tnet: TNet, encoder: GaussianPointEncoder) -> "GaussianTNet":
        """``encoder`` (distilled from ``tnet``'s shared MLP) with deep copies of ``tnet``'s
        regressor and output layer (``tnet`` is left untouched)."""
        if not isinstance(tnet, _tnet_class()):
            raise TypeError(f"tnet must be a lucidops.models.pointnet.TNet, got {type(tnet).__name__}")
        return cls.from_modules(encoder, copy.deepcopy(tnet.regressor), copy.deepcopy(tnet.out), tnet.k)

    def forward(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> transforms (B, k, k); apply one as ``points @ transform``."""
        _check_points(points)
        x = torch.relu(self.encoder(points))
        for layer in self.regressor:
            x = torch.relu(layer(x))
        eye = torch.eye(self.k, dtype=x.dtype, device=x.device)
        return self.out(x).view(-1, self.k, self.k) + eye


def _pointnet_head(in_channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    # PointNet's classifier: 512 -> 256 -> classes, BN + ReLU, dropout before the last layer.
    return nn.Sequential(
        nn.Linear(in_channels, 512), nn.BatchNorm1d(512), nn.ReLU(),
        nn.Linear(512, 256), nn.BatchNorm1d(256), nn.ReLU(),
        nn.Dropout(dropout), nn.Linear(256, num_classes),
    )


class GaussianPointNet(nn.Module):
    """PointNet with Gaussian encoders: points (B, N, 3) -> logits (B, num_classes).

    ``input_tnet`` (a :class:`GaussianTNet`, PointNet's own ``TNet``, or None) ->
    ``points @ transform`` -> ``encoder`` (a :class:`GaussianPointEncoder` with reduce="max",
    replacing PointNet's conv1..conv3 and feature T-Net; the global feature (B, K)) ->
    ``head`` (PointNet's MLP classifier).

    Args:
        num_classes: output classes (40 for ModelNet40).
        num_gaussians: G of the main encoder (the paper: 32).
        out_channels: K, the global feature's width (PointNet: 1024).
        input_transform: precede the encoder with a :class:`GaussianTNet`.
        tnet_gaussians: G of the T-Net's encoder (default: ``num_gaussians``).
        cloud_range: the Gaussians' means start uniform in [-cloud_range, cloud_range]^3.
        dropout: dropout probability before the head's last layer.

    With 40 classes and the defaults this has 1.40M parameters (the paper: 1.39M).
    :meth:`from_modules` and :meth:`from_distilled` build one from existing modules, e.g.
    those :func:`lucidops.train.distill_pointnet` distilled from a trained PointNet.
    """

    def __init__(self, num_classes: int = 40, num_gaussians: int = 32, out_channels: int = 1024,
                 input_transform: bool = True, tnet_gaussians: Optional[int] = None, cloud_range: float = 1.0,
                 dropout: float = 0.3):
        super().__init__()
        _validate.integer(num_classes, "num_classes", minimum=1)
        _validate.integer(num_gaussians, "num_gaussians", minimum=1)
        _validate.integer(out_channels, "out_channels", minimum=1)
        _validate.boolean(input_transform, "input_transform")
        if tnet_gaussians is None:
            tnet_gaussians = num_gaussians
        _validate.integer(tnet_gaussians, "tnet_gaussians", minimum=1)
        _validate.real_number(cloud_range, "cloud_range", "> 0")
        dropout = _validate.probability(dropout, "dropout")
        tnet = GaussianTNet(3, tnet_gaussians, cloud_range=cloud_range) if input_transform else None
        encoder = GaussianPointEncoder(num_gaussians, out_channels, cloud_range=cloud_range, reduce="max")
        self._assign(encoder, _pointnet_head(out_channels, num_classes, float(dropout)), tnet)

    def _assign(self, encoder: GaussianPointEncoder, head: nn.Module,
                input_tnet: Optional[Union[GaussianTNet, TNet]]) -> None:
        _check_encoder("encoder", encoder)
        if not isinstance(head, nn.Module):
            raise TypeError(f"head must be an nn.Module, got {type(head).__name__}")
        if input_tnet is not None and not isinstance(input_tnet, (GaussianTNet, _tnet_class())):
            raise TypeError(f"input_tnet must be a GaussianTNet, a PointNet TNet or None, "
                            f"got {type(input_tnet).__name__}")
        if input_tnet is not None and input_tnet.k != 3:
            raise ValueError(f"input_tnet must regress a 3x3 transform, got k={input_tnet.k}")
        self.input_tnet = input_tnet
        self.encoder = encoder
        self.head = head

    @classmethod
    def from_modules(cls, encoder: GaussianPointEncoder, head: nn.Module,
                     input_tnet: Optional[Union[GaussianTNet, TNet]] = None) -> "GaussianPointNet":
        """A model made of these modules (shared, not copied)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._assign(encoder, head, input_tnet)
        return self

    @classmethod
    def from_distilled(cls, result: Any, copy_modules: bool = False) -> "GaussianPointNet":
        """The model of a :class:`~lucidops.train.PointNetDistillResult` (or any
        Gaussian PointNet) as a plain ``GaussianPointNet``; ``copy_modules`` deep-copies them."""
        _validate.boolean(copy_modules, "copy_modules")
        model = getattr(result, "model", result)
        if not isinstance(model, GaussianPointNet):
            raise TypeError(f"result must be a PointNetDistillResult or a GaussianPointNet, "
                            f"got {type(result).__name__}")
        parts = (model.encoder, model.head, model.input_tnet)
        if copy_modules:
            parts = copy.deepcopy(parts)
        out = cls.from_modules(*parts)
        out.train(model.training)
        return out

    @property
    def num_classes(self) -> Optional[int]:
        """Output classes (the head's last Linear's width), None when the head has no Linear."""
        last = [m for m in self.head.modules() if isinstance(m, nn.Linear)]
        return last[-1].out_features if last else None

    def gaussian_encoders(self) -> Iterator[GaussianPointEncoder]:
        """Every Gaussian encoder of the model (the T-Net's first, when it has one)."""
        return (m for m in self.modules() if isinstance(m, GaussianPointEncoder))

    def set_cull_threshold(self, threshold: Optional[float], tnet: bool = True) -> None:
        """Set ``cull_threshold`` on the main encoder and (``tnet``) the Gaussian T-Net's encoder."""
        _validate.boolean(tnet, "tnet")
        self.encoder.cull_threshold = threshold
        if tnet and isinstance(self.input_tnet, GaussianTNet):
            self.input_tnet.encoder.cull_threshold = threshold

    def input_transform(self, points: Tensor) -> Optional[Tensor]:
        """The input T-Net's (B, 3, 3) transform of points (B, N, 3); None without a T-Net."""
        _check_points(points)
        if self.input_tnet is None:
            return None
        if isinstance(self.input_tnet, _tnet_class()):  # PointNet's T-Net takes (B, 3, N)
            return self.input_tnet(points.transpose(1, 2))
        return self.input_tnet(points)

    def transform_points(self, points: Tensor) -> Tensor:
        """Points (B, N, 3) after the input T-Net (unchanged without one)."""
        transform = self.input_transform(points)
        return points if transform is None else points @ transform

    def global_feature(self, points: Tensor) -> Tensor:
        """(B, K): the encoder's max over points of the transformed points."""
        return self.encoder(self.transform_points(points))

    def point_features(self, points: Tensor) -> Tensor:
        """Per-point pre-max features (B, N, K) of the main encoder."""
        return self.encoder.point_features(self.transform_points(points))

    def forward(self, points: Tensor) -> Tensor:
        """points (B, N, 3) -> logits (B, num_classes)."""
        return self.head(self.global_feature(points))


__all__ = ["GaussianTNet", "GaussianPointNet"]
