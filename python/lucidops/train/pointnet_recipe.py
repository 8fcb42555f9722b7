"""The paper's three-stage recipe: a Gaussian PointNet distilled from a trained PointNet.

For a :class:`lucidops.models.PointNet` with an input T-Net:

1. distil the T-Net's encoder (its shared MLP, up to the last conv + BN, before the ReLU)
   into a Gaussian encoder, and copy the T-Net's regressor head;
2. distil the main encoder on T-Net-transformed points: the uniform points of a cloud's
   cube go through that cloud's own input transform, computed by the teacher's T-Net on
   the cloud itself (a T-Net run on the uniform points gives other transforms, and the
   student then fails on real surfaces); the student sees the transformed points and the
   target is :meth:`~lucidops.models.PointNet.encoder_features` of them;
3. (when labelled data is given) fine-tune the whole student end to end with the copied
   classifier head, the Gaussian encoders' learning rates divided by 100.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union, cast, overload

import torch
from torch import Tensor, nn

from .. import _validate
from .._dtypes import opmath_dtype
from .._typing import DeviceLike
from ..models.pointnet import PointNet, TNet, feature_transform_regularizer
from ..nn.gaussian_mixture import GaussianPointEncoder, _center
from ..nn.gaussian_pointnet import GaussianPointNet, GaussianTNet
from .cubes import box_center, cloud_cubes, cloud_points, cubes_bounds, half_side_about
from .distillation import cast_args_to, distill
from .finetuning import SCHEDULES, _dataset_length, _labelled, finetune
from .loop import DistillResult, TrainingMode, broadcast_module, dist_info, seeded_rng


def distill_pointnet(teacher: PointNet, clouds=None, *, num_gaussians: int = 32, tnet_gaussians: Optional[int] = None,
                     steps: int = 1000, tnet_steps: Optional[int] = None, finetune_data=None,
                     finetune_steps: int = 0, finetune_lr: float = 1e-3, encoder_lr_scale: float = 0.01,
                     finetune_schedule: str = "constant", cloud_range: Union[str, float] = 1.0,
                     cloud_center: Union[str, float, Sequence[float]] = "auto", seed: Optional[int] = None,
                     progress: bool = True, device: Optional[DeviceLike] = None,
                     **distill_kwargs: Any) -> PointNetDistillResult:
    """The three-stage recipe: a :class:`DistilledPointNet` from a trained ``teacher`` PointNet.

    1. (teacher with an input T-Net) a ``GaussianPointEncoder(tnet_gaussians, 1024)`` is
       distilled from the T-Net's per-point activations before its last ReLU
       (:func:`tnet_point_features`) for ``tnet_steps`` steps; the T-Net's regressor and
       output layer are copied (:class:`GaussianTNet`).
    2. a ``GaussianPointEncoder(num_gaussians, 1024)`` is distilled for ``steps`` steps
       from the teacher's main encoder (conv1..conv3): points sampled in a cloud's cube go
       through *that cloud's* input transform (and feature transform, for the teacher's
       targets), as they would at inference; the student sees the transformed points.
       A per-point student cannot see a feature transform, so with a feature T-Net it
       learns an average over the clouds' transforms and distils far worse: prefer a
       teacher built with ``feature_transform=False``.
    3. with ``finetune_data`` and ``finetune_steps > 0``, :func:`finetune` trains the whole
       model (Gaussian T-Net, encoder and a deep copy of the teacher's classifier head)
       end to end, Gaussian encoders at ``encoder_lr_scale`` times their rates, with
       ``finetune_schedule`` (``"constant"`` or ``"cosine"``, see :func:`finetune`).

    The Gaussian encoders' means start uniform in the cube of half-side ``cloud_range``
    around ``cloud_center`` (see :class:`GaussianPointEncoder`): Gaussians started away from
    the clouds never learn. ``cloud_center="auto"`` (default) takes the centre of the box
    around every cloud's cube (the origin for ``clouds=None``) for stage 1, and for stage 2
    the centre of the box around what that student sees: the cubes' points through each
    cloud's input transform. ``cloud_range="auto"`` likewise sizes each stage's cube to hold
    that box around the stage's centre (half the box's longest side about its own centre), as
    :func:`lucidops.patch.point_encoders` sizes its students (for clouds not near the unit
    cube, e.g. in millimetres); the default is 1.0. A number (or 3
    numbers for the centre) is used as given for both stages.

    A float16 or bfloat16 teacher's students (and the fine-tuning) train in float32 (AdamW's
    float16 steps overflow); the returned model has the teacher's dtype.

    ``seed`` (an int) makes the run reproducible: it seeds the point sampling of every stage,
    the encoders' initialisation and the fine-tuning's batches and dropout, without touching
    torch's global RNG state (the CPU's and, on CUDA, ``device``'s). ``None``: the encoders
    and dropout draw from the global RNG as it stands.

    ``distill_kwargs`` go to both :func:`distill` stages (lr, batch_size, points_per_cloud,
    optimizer, ...). The teacher is not modified (its train/eval flags are restored). Every
    argument of the three stages is checked before the first one starts.
    """
    if not isinstance(teacher, PointNet):
        raise TypeError(f"teacher must be a lucidops.models.PointNet, got {type(teacher).__name__}")
    _validate.integer(num_gaussians, "num_gaussians", minimum=1)
    if tnet_gaussians is None:
        tnet_gaussians = num_gaussians
    _validate.integer(tnet_gaussians, "tnet_gaussians", minimum=1)
    # Everything is checked before the distillation stages spend their time; finetune's own
    # checks ran only after them, and named finetune_lr "lr" and finetune_data "data".
    _validate.integer(steps, "steps", minimum=1)  # with tnet_steps given, stage 1 ran first
    tnet_steps = steps if tnet_steps is None else _validate.integer(tnet_steps, "tnet_steps", minimum=1)
    _validate.integer(finetune_steps, "finetune_steps", minimum=0)
    _validate.real_number(finetune_lr, "finetune_lr", "> 0")
    _validate.real_number(encoder_lr_scale, "encoder_lr_scale", "> 0")
    auto_range = isinstance(cloud_range, str) and cloud_range == "auto"
    if isinstance(cloud_range, str) and not auto_range:
        raise ValueError(f"cloud_range must be 'auto' or a number > 0, got {cloud_range!r}")
    if not auto_range:
        _validate.real_number(cloud_range, "cloud_range", "> 0")
    auto_center = isinstance(cloud_center, str) and cloud_center == "auto"
    if isinstance(cloud_center, str) and not auto_center:
        raise ValueError(f"cloud_center must be 'auto', a number or 3 numbers, got {cloud_center!r}")
    fixed_center = None if auto_center else _center(cloud_center)
    if seed is not None:
        _validate.integer(seed, "seed")
    _validate.boolean(progress, "progress")
    if finetune_steps > 0 and finetune_data is None:
        raise ValueError("finetune_steps > 0 needs finetune_data (a dataset of (points, label) pairs)")
    if finetune_schedule not in SCHEDULES:
        raise ValueError(f"finetune_schedule must be one of {SCHEDULES}, got {finetune_schedule!r}")
    if finetune_steps > 0:
        _dataset_length(finetune_data, "finetune_data")
        _labelled(finetune_data[0], 0, "finetune_data")  # a bad item failed after both stages
        batch = distill_kwargs.get("batch_size", 32)
        # The fine-tuned model keeps the teacher's head and input T-Net, BatchNorms after a max
        # included: one cloud per batch fails there in training, found after both stages.
        kept = [teacher.head] + ([teacher.input_tnet] if teacher.input_tnet is not None else [])
        if isinstance(batch, int) and batch < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                        for part in kept for m in part.modules()):
            raise ValueError(f"batch_size={batch}: fine-tuning (finetune_steps > 0) trains the teacher's head "
                             "and input T-Net, whose BatchNorm layers need at least 2 clouds per batch")
    for key in ("input_transform", "per_cloud", "desc"):
        if key in distill_kwargs:
            raise TypeError(f"distill_pointnet sets {key!r} itself")
    dtype = next(teacher.parameters()).dtype
    # A half-precision teacher's students train in float32 (AdamW's float16 steps overflow),
    # and the model takes the teacher's dtype at the end.
    train_dtype = opmath_dtype(dtype)
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    k = _out_channels(teacher.conv3)
    cubes = cloud_cubes(clouds) if auto_center or auto_range else None  # also checks clouds before any stage runs
    box = cubes_bounds(*cubes) if cubes is not None else None
    # Each stage's encoder starts in the cube around its centre that holds its box: about the
    # box's own centre for "auto", about a given centre otherwise (half the box's side would
    # leave the clouds outside).
    center: Sequence[float] = (box_center(*box) if box is not None and auto_center
                               else cast(Sequence[float], fixed_center))
    tnet_range = half_side_about(*box, center) if box is not None and auto_range else float(cloud_range)
    teacher.to(dev)
    if dist_info()[0]:
        broadcast_module(teacher)  # the T-Net stage's teacher is a lambda, which distill cannot broadcast
    tnet_result, gtnet = None, None
    with TrainingMode([teacher], train=False):
        if teacher.input_tnet is not None:
            tnet = teacher.input_tnet
            with seeded_rng(seed, dev):
                tnet_enc = GaussianPointEncoder(tnet_gaussians, _out_channels(tnet.encoder[-1]),
                                                cloud_range=tnet_range, cloud_center=center,
                                                reduce="max").to(dev, train_dtype)
            tnet_result = distill(cast_args_to(dtype, lambda x: tnet_point_features(tnet, x)), tnet_enc, clouds,
                                  steps=tnet_steps, seed=seed, progress=progress, device=dev, desc="distill T-Net",
                                  **distill_kwargs)
            gtnet = GaussianTNet.from_tnet(tnet, tnet_enc)
        stage2: Dict[str, Any] = {}
        stage2_center, stage2_range = center, tnet_range
        if clouds is not None and (teacher.input_tnet is not None or teacher.feature_tnet is not None):
            # Each cloud's own T-Net transforms, applied to the points sampled in its cube: the
            # student learns the per-point function it meets on real clouds (a T-Net run on
            # uniform cube samples instead gives other transforms, and the student then fails on
            # surfaces).
            trans_in, trans_feat = _pointnet_transforms(teacher, clouds, dev, dtype)
            stage2 = dict(teacher=cast_args_to(dtype, lambda x, a, f: teacher.encoder_features(_apply(x, a), f)),
                          input_transform=lambda x, a, f: _apply(x, a), per_cloud=[trans_in, trans_feat])
            if cubes is not None and trans_in is not None:
                moved = _transformed_box(*cubes, trans_in)
                stage2_center = box_center(*moved) if auto_center else stage2_center
                stage2_range = half_side_about(*moved, stage2_center) if auto_range else stage2_range
        elif teacher.input_tnet is not None:
            # Without clouds the cube is [-1, 1]^3 around the origin, which a linear transform
            # keeps as the centre.
            stage2 = dict(teacher=teacher.point_features, input_transform=teacher.transform_points)
        else:
            stage2 = dict(teacher=teacher.point_features)
        with seeded_rng(None if seed is None else seed + 7919, dev):
            encoder = GaussianPointEncoder(num_gaussians, k, cloud_range=stage2_range, cloud_center=stage2_center,
                                           reduce="max").to(dev, train_dtype)
        enc_result = distill(stage2.pop("teacher"), encoder, clouds, steps=steps,
                             seed=None if seed is None else seed + 7919, progress=progress, device=dev,
                             desc="distill encoder", **stage2, **distill_kwargs)
    model = DistilledPointNet(encoder, copy.deepcopy(teacher.head), gtnet).to(dev, train_dtype)
    ft_result = None
    if finetune_steps > 0:
        pts_per_cloud = distill_kwargs.get("points_per_cloud", 1024)
        ft_seed = None if seed is None else seed + 104729
        # The head's dropout draws from the global RNG: seeded too (per rank, as the batches are).
        with seeded_rng(None if ft_seed is None else ft_seed + dist_info()[1], dev):
            ft_result = finetune(model, finetune_data, steps=finetune_steps, lr=finetune_lr,
                                 batch_size=distill_kwargs.get("batch_size", 32), points_per_cloud=pts_per_cloud,
                                 encoder_lr_scale=encoder_lr_scale, schedule=finetune_schedule, seed=ft_seed,
                                 progress=progress, device=dev)
    model.eval()
    model.to(dtype)
    return PointNetDistillResult(model, tnet_result, enc_result, ft_result)


def tnet_point_features(tnet: TNet, points: Tensor) -> Tensor:
    """A PointNet T-Net's per-point activations before its last ReLU and the max: (B, N, 1024)."""
    x = points.transpose(1, 2)
    layers = list(tnet.encoder)
    for layer in layers[:-1]:
        x = torch.relu(layer(x))
    return layers[-1](x).transpose(1, 2)


class DistilledPointNet(GaussianPointNet):
    """A :class:`~lucidops.nn.GaussianPointNet` assembled from existing modules:
    ``DistilledPointNet(encoder, head, input_tnet=None)`` (what :func:`distill_pointnet` returns).

    Kept for its positional constructor (used by ``lucidops.patch.point_encoders``); the
    modules are shared, not copied. ``input_tnet`` may be a :class:`GaussianTNet`, PointNet's
    own ``TNet`` or None.
    """

    def __init__(self, encoder: GaussianPointEncoder, head: nn.Module,
                 input_tnet: Optional[Union[GaussianTNet, TNet]] = None):
        nn.Module.__init__(self)
        self._assign(encoder, head, input_tnet)

    @overload
    def forward(self, points: Tensor, return_transforms: Literal[False] = False) -> Tensor: ...

    @overload
    def forward(self, points: Tensor, return_transforms: Literal[True]) -> Tuple[Tensor, Optional[Tensor], None]: ...

    def forward(self, points: Tensor, return_transforms: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Optional[Tensor], None]]:
        """Logits (B, num_classes); with ``return_transforms``, PointNet's (logits, input
        transform or None, None), so that PointNet training code calling a swapped-in model
        this way keeps running (the Gaussian encoder has no feature transform: None, which a
        feature-transform regulariser must skip)."""
        if not return_transforms:
            return super().forward(points)
        transform = self.input_transform(points)
        return self.head(self.encoder(_apply(points, transform))), transform, None

    # PointNet's other methods, so that a PointNet swapped for this one level down in a model
    # (lucidops.patch.point_encoders) serves the same calls as a patched root PointNet.

    def transforms(self, points: Tensor) -> Tuple[Optional[Tensor], None]:
        """PointNet's (input transform (B, 3, 3) or None, feature transform): always None."""
        return self.input_transform(points), None

    def encoder_features(self, transformed_points: Tensor, feature_transform: Optional[Tensor] = None) -> Tensor:
        """PointNet.encoder_features: the encoder's per-point features (B, N, K) of points
        already through the input transform."""
        return encoder_point_features(self.encoder, transformed_points, feature_transform)

    def regularization_loss(self, feature_transform: Optional[Tensor]) -> Tensor:
        """PointNet.regularization_loss: zero, as there is no feature transform (a given one is
        regularised as PointNet does, ||I - A A^T||_F^2)."""
        if feature_transform is None:
            return self.encoder.means.new_zeros(())
        return feature_transform_regularizer(feature_transform)


def encoder_point_features(encoder: GaussianPointEncoder, transformed_points: Tensor,
                           feature_transform: Optional[Tensor] = None) -> Tensor:
    """PointNet.encoder_features computed by a distilled encoder: per-point features (B, N, K)
    of points already through the input transform; it has no feature transform to take."""
    if feature_transform is not None:
        raise ValueError("feature_transform must be None: this PointNet's encoder is a distilled "
                         "GaussianPointEncoder, which has no feature transform")
    PointNet._check_points(transformed_points)
    return encoder.point_features(transformed_points)


@dataclass
class PointNetDistillResult:
    """The distilled model and what each stage of :func:`distill_pointnet` did."""

    model: DistilledPointNet
    tnet: Optional[DistillResult]
    encoder: DistillResult
    finetune: Optional[DistillResult]


def _transformed_box(centres: Tensor, halves: Tensor, transforms: Tensor) -> Tuple[Tensor, Tensor]:
    """(low, high) (3,) of the box around every cube's points through its cloud's input
    transform (``points @ A``): cube ``c + h u`` (u in [-1, 1]^3) maps into
    ``c A +- h sum_i |A_ij|``."""
    a = transforms.detach().double().cpu()
    mid = (centres[:, None, :] @ a)[:, 0, :]  # (M, 3)
    reach = halves[:, None] * a.abs().sum(1)  # (M, 3)
    return (mid - reach).amin(0), (mid + reach).amax(0)


def _apply(points: Tensor, transform: Optional[Tensor]) -> Tensor:
    """Points (B, N, 3) through an input transform (B, 3, 3), PointNet's ``points @ A``."""
    return points if transform is None else points @ transform


def _out_channels(conv_bn: nn.Module) -> int:
    """Output channels of a PointNet conv block (``Sequential(Conv1d, BatchNorm1d)``)."""
    return cast(nn.Conv1d, cast(nn.Sequential, conv_bn)[0]).out_channels


def _pointnet_transforms(teacher: PointNet, clouds, dev: torch.device, dtype: torch.dtype,
                         chunk: int = 256) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Every cloud's (input, feature) transforms under ``teacher`` (eval mode, no grad).
    ``clouds`` in any form :func:`~lucidops.train.cubes.cloud_cubes` takes, one (N, 3) cloud too."""
    if isinstance(clouds, Tensor):
        if clouds.dim() == 2:  # one cloud, as distill's cube sampling reads it
            clouds = clouds.unsqueeze(0)
        items = [clouds[i:i + chunk] for i in range(0, clouds.shape[0], chunk)]
    else:
        items = [cloud_points(clouds[i])[None] for i in range(len(clouds))]
    ins, feats = [], []
    with torch.no_grad():
        for pts in items:
            a, f = teacher.transforms(pts.to(dev, dtype))
            ins.append(a)
            feats.append(f)
    join = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return join(ins), join(feats)


__all__ = ["distill_pointnet", "DistilledPointNet", "PointNetDistillResult", "tnet_point_features"]
