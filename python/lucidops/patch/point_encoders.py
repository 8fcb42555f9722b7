"""Swap the PointNet-style encoders of an existing model for distilled Gaussian encoders.

Two kinds of encoder are recognised (methods.md section 1):

* ``lucidops.models.PointNet``: the main encoder (conv1 -> [feature T-Net] -> conv2 ->
  conv3, then the max over points) is replaced by a ``GaussianPointEncoder(reduce="max")``
  distilled from :meth:`PointNet.point_features` on T-Net-transformed points (stage 2 of
  the paper's recipe). The input T-Net and the classifier head are kept: the *same*
  module objects, not copies. A PointNet inside a model is swapped for a
  :class:`~lucidops.train.DistilledPointNet` (input T-Net -> Gaussian encoder ->
  head); a PointNet that *is* the model (it has no parent to swap it in) keeps its
  identity: the Gaussian encoder is registered on it as the submodule
  ``gaussian_encoder`` and its instance ``forward`` / ``global_feature`` /
  ``point_features`` are redirected through it.
* a Point-MAE / Mamba3D patch ``Encoder``: any module with ``first_conv`` and
  ``second_conv`` submodules, taking neighbourhoods (B, G, n, 3) to tokens (B, G, C) by
  first_conv -> max -> concat -> second_conv -> max. It is replaced by a
  ``GaussianPointEncoder(reduce="max")`` (which takes (..., n, 3) to (..., C)) distilled
  from second_conv's per-point output (before the max), one neighbourhood per cloud.
  At the root, the same instance-forward redirection is used.

Everything is recorded on a :class:`~lucidops.patch.handle.PatchHandle`; ``revert()``
puts the original modules and forwards back (outputs bit for bit, module identity).
The original modules' parameters are never modified.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import torch
from torch import Tensor, nn

from .. import _validate
from .._dtypes import opmath_dtype
from ..models.pointnet import PointNet
from ..nn.gaussian_mixture import GaussianPointEncoder
from ..train.cubes import cloud_cubes, cubes_box
from ..train.distillation import cast_args_to, distill
from ..train.loop import seeded_rng
from ..train.pointnet_recipe import DistilledPointNet, encoder_point_features
from .handle import PatchHandle, child_slots
from .instance_method import InstanceMethod

KINDS = ("pointnet", "point_mae")

# What distill() gets unless distill_kwargs overrides it: small enough for a CPU in a
# minute or so; pass the paper's values (32 x 512 points, 30k steps) for real use.
DEFAULT_DISTILL = dict(steps=300, lr=1e-2, batch_size=16, points_per_cloud=256)


def is_point_mae_encoder(module: nn.Module) -> bool:
    """A Point-MAE / Mamba3D-style patch encoder: ``first_conv`` and ``second_conv`` submodules."""
    return (not isinstance(module, PointNet) and isinstance(getattr(module, "first_conv", None), nn.Module)
            and isinstance(getattr(module, "second_conv", None), nn.Module))


def _kind(module: nn.Module) -> Optional[str]:
    if isinstance(module, PointNet):
        return "pointnet"
    if is_point_mae_encoder(module):
        return "point_mae"
    return None


def _last_out_channels(seq: nn.Module, name: str) -> int:
    outs = [m.out_channels if isinstance(m, nn.Conv1d) else m.out_features
            for m in seq.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    if not outs:
        raise ValueError(f"{name} has no Conv1d or Linear layer to read its output width from")
    return outs[-1]


def point_mae_point_features(encoder: nn.Module, points: Tensor) -> Tensor:
    """A Point-MAE encoder's per-point features before its final max: (B, n, 3) -> (B, n, C).

    Follows Point-MAE's forward: f = first_conv(x); f = cat(max_n f expanded, f);
    second_conv(f). Each cloud of the batch is one neighbourhood.
    """
    x = points.transpose(1, 2)  # (B, 3, n)
    feature = cast(nn.Module, encoder.first_conv)(x)
    glob = feature.amax(dim=2, keepdim=True).expand(-1, -1, feature.shape[2])
    return cast(nn.Module, encoder.second_conv)(torch.cat([glob, feature], dim=1)).transpose(1, 2)


def _find(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """(path, module, kind) of the outermost encoders; '' is the root."""
    for name, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if isinstance(forward, InstanceMethod) and forward.__func__ in (_root_pointnet_forward,
                                                                         _root_point_mae_forward):
            # Its methods already run the first student: a second would be distilled from it
            # (and its replaced layers are out of the model while patched).
            raise RuntimeError(f"{'model' if not name else repr(name)} is already patched by "
                               "lucidops.patch.point_encoders; revert() that handle first (a copy of a patched "
                               "model has no handle and keeps its student for good: the encoder it replaced is "
                               "not in it; patch a copy of the unpatched model instead)")
    root_kind = _kind(model)
    if root_kind is not None:
        return [("", model, root_kind)]
    found = child_slots(model, lambda _path, m: _kind(m) is not None)
    out = []
    for path, module in found:
        # An encoder nested inside another found one goes with its container.
        if any(path.startswith(p + ".") for p, _ in found if p != path):
            continue
        kind = _kind(module)
        assert kind is not None  # child_slots kept only encoders
        out.append((path, module, kind))
    return out


def _default_clouds(seed: int):
    from ..data.synthetic import SyntheticShapes

    return SyntheticShapes(64, num_points=256, seed=seed)


def point_encoders(model: nn.Module, *, student_factory: Optional[Callable[[str, nn.Module, int], nn.Module]] = None,
                   distill_kwargs: Optional[Dict[str, Any]] = None, clouds=None, num_gaussians: int = 32,
                   seed: int = 0, progress: bool = False, allow_none: bool = False) -> PatchHandle:
    """Replace every PointNet-style encoder in ``model`` by a distilled Gaussian encoder.

    Args:
        model: the model to patch in place (see the module docstring for what is replaced).
        student_factory: ``(path, module, out_channels) -> GaussianPointEncoder`` builds
            each student (default: ``GaussianPointEncoder(num_gaussians, out_channels,
            cloud_range=..., cloud_center=...)`` of the cube around every cloud's cube).
        distill_kwargs: passed to :func:`lucidops.train.distill` (defaults:
            ``DEFAULT_DISTILL``, i.e. 300 steps, lr 1e-2, 16 clouds x 256 points).
        clouds: what the distillation samples in (see :func:`lucidops.train.distill`):
            their bounding cubes. For Point-MAE encoders pass neighbourhoods as the model
            sees them (centred groups, (M, n, 3)). Default: 64 ``SyntheticShapes`` clouds
            (normalised to [-1, 1]^3) seeded by ``seed``.
        num_gaussians: G of the default students.
        seed: seeds the students' initialisation and the point sampling (torch's global
            RNG state is left as it was).
        progress: show distillation progress bars.
        allow_none: when ``model`` has no point encoder, return an empty handle (with a
            note) instead of raising.

    Each student is distilled in float32 when the encoder is float16 or bfloat16 (AdamW's
    float16 steps overflow) and then takes the encoder's dtype and device.

    Returns:
        A :class:`PatchHandle`; ``handle.revert()`` (or leaving ``with handle:``) restores
        the original model.

    Raises:
        TypeError / ValueError for bad arguments; ValueError when ``model`` contains no
        PointNet or Point-MAE-style encoder (unless ``allow_none``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if student_factory is not None and not callable(student_factory):
        raise TypeError(f"student_factory must be callable or None, got {type(student_factory).__name__}")
    if distill_kwargs is None:
        distill_kwargs = {}
    if not isinstance(distill_kwargs, dict):
        raise TypeError(f"distill_kwargs must be a dict or None, got {type(distill_kwargs).__name__}")
    for key in ("teacher", "student", "clouds", "input_transform", "progress", "seed"):
        if key in distill_kwargs:
            raise TypeError(f"distill_kwargs must not set {key!r} (point_encoders sets it)")
    _validate.integer(num_gaussians, "num_gaussians", minimum=1)
    _validate.integer(seed, "seed")
    _validate.boolean(progress, "progress")
    _validate.boolean(allow_none, "allow_none")

    targets = _find(model)
    if not targets and allow_none:
        handle = PatchHandle(model)
        handle.notes.append("point_encoders: no PointNet or Point-MAE-style encoder found")
        return handle
    if not targets:
        raise ValueError(f"{type(model).__name__} contains no point encoder to patch: expected a "
                         "lucidops.models.PointNet or a Point-MAE-style Encoder (a module with "
                         "first_conv and second_conv)")
    if clouds is None:
        clouds = _default_clouds(seed)
    # The default students start in the box around every cloud's cube (also validates clouds
    # before any work): Gaussians started away from the data never learn.
    cube_center, cube_range = cubes_box(*cloud_cubes(clouds))
    kwargs = {**DEFAULT_DISTILL, **distill_kwargs}

    handle = PatchHandle(model, settings=dict(num_gaussians=num_gaussians, seed=seed, distill=dict(kwargs)))
    try:
        for i, (path, module, kind) in enumerate(targets):
            param = next(module.parameters(), None)
            dtype = param.dtype if param is not None else torch.get_default_dtype()
            device = param.device if param is not None else torch.device("cpu")
            teacher: Callable[..., Tensor]
            if kind == "pointnet":
                assert isinstance(module, PointNet)  # what _kind calls "pointnet"
                out_channels = cast(nn.Conv1d, module.conv3[0]).out_channels
                teacher = module.point_features
                transform = module.transform_points if module.input_tnet is not None else None
            else:
                second_conv = cast(nn.Module, module.second_conv)  # checked by is_point_mae_encoder
                out_channels = _last_out_channels(second_conv, f"{path or 'model'}.second_conv")
                # in the encoder's dtype: distill cannot see a closure's, and the student trains in float32
                teacher = cast_args_to(dtype, lambda x, m=module: point_mae_point_features(m, x))
                transform = None
            # The CPU's generator and the model's GPU's, forked: torch.manual_seed also reseeded
            # every GPU's generator for good.
            with seeded_rng(seed + i, device):
                student: nn.Module  # a GaussianPointEncoder, checked below
                if student_factory is None:
                    student = GaussianPointEncoder(num_gaussians, out_channels, cloud_range=cube_range,
                                                   cloud_center=cube_center)
                else:
                    student = student_factory(path, module, out_channels)
                if not isinstance(student, GaussianPointEncoder):
                    raise TypeError(f"student_factory must return a GaussianPointEncoder, got "
                                    f"{type(student).__name__}")
                if student.out_channels != out_channels:
                    raise ValueError(f"student_factory returned {student.out_channels} output channels for "
                                     f"{path or 'the model'!r}, which has {out_channels}")
            # A half-precision model's student trains in float32 and takes the model's dtype
            # after (AdamW's float16 steps overflow), as mixed precision keeps float32 master weights.
            student = student.to(device, opmath_dtype(dtype))
            # Each submodule's own mode, restored after: train(was_training) would flatten them
            # (a frozen BatchNorm of a training model would come back training).
            modes = {m: m.training for m in module.modules()}
            module.eval()  # BatchNorm statistics frozen: the teacher is the trained encoder as it infers
            try:
                distill(teacher, student, clouds, input_transform=transform, seed=seed + i, progress=progress,
                        device=device, desc=f"distill {path or kind}", **kwargs)
            finally:
                for m, mode in modes.items():
                    m.training = mode
            student.reduce = "max"
            student.eval()
            student.to(dtype)
            _install(handle, model, path, module, kind, student)
    except BaseException:
        handle.revert()  # leave the model as it was
        raise
    return handle


def _install(handle: PatchHandle, model: nn.Module, path: str, module: nn.Module, kind: str,
             student: GaussianPointEncoder) -> None:
    replaced: Tuple[str, ...]  # the layers the student does the work of
    if kind == "pointnet":
        assert isinstance(module, PointNet)  # what _kind calls "pointnet"
        if path:
            handle.swap_child(model, path, DistilledPointNet(student, module.head, module.input_tnet))
            return
        # The root keeps its identity: register the encoder on it and redirect its methods
        # to functions of its own modules (so that copies and reloaded models use theirs).
        after = "PointNet with its encoder replaced by a distilled GaussianPointEncoder"
        attrs = {"forward": InstanceMethod(_root_pointnet_forward, module),
                 "global_feature": InstanceMethod(_root_global_feature, module),
                 "point_features": InstanceMethod(_root_point_features, module),
                 "encoder_features": InstanceMethod(_root_encoder_features, module),
                 "transforms": InstanceMethod(_root_transforms, module)}
        replaced = ("conv1", "conv2", "conv3", "feature_tnet")
    else:
        if path:
            handle.swap_child(model, path, student)
            return
        after = "Point-MAE Encoder computed by a distilled GaussianPointEncoder"
        attrs = {"forward": InstanceMethod(_root_point_mae_forward, module)}
        replaced = ("first_conv", "second_conv")
    # One record for all the changes, so the handle's table shows one row per encoder. The
    # replaced layers leave the model while it is patched (revert() puts them back): kept,
    # they stayed in its parameters, state dict and parameter count (lucidops profile showed
    # a patched root PointNet 1% larger, where the same swap one level down is 0.43x).
    handle.set_instance_attrs(path, module, attrs, after=after, submodules={"gaussian_encoder": student},
                              hidden=replaced)


def _root_encoder(root: nn.Module) -> GaussianPointEncoder:
    return cast(GaussianPointEncoder, root.gaussian_encoder)


def _root_global_feature(root: PointNet, points: Tensor) -> Tensor:
    """A patched root PointNet's global feature: its distilled encoder over its input transform."""
    return _root_encoder(root)(root.transform_points(points))


def _root_point_features(root: PointNet, points: Tensor) -> Tensor:
    """Per-point pre-max features (B, N, K) of a patched root PointNet's distilled encoder."""
    return _root_encoder_features(root, root.transform_points(points))


def _root_encoder_features(root: PointNet, transformed_points: Tensor,
                           feature_transform: Optional[Tensor] = None) -> Tensor:
    """PointNet.encoder_features of a patched root: its distilled encoder's per-point features
    (B, N, K) of points already through the input transform (it has no feature transform)."""
    return encoder_point_features(_root_encoder(root), transformed_points, feature_transform)


def _root_transforms(root: PointNet, points: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """PointNet.transforms of a patched root: the input T-Net's, and no feature transform."""
    root._check_points(points)
    return (None if root.input_tnet is None else root.input_tnet(points.transpose(1, 2))), None


def _root_pointnet_forward(root: PointNet, points: Tensor, return_transforms: bool = False):
    """A patched root PointNet's forward: PointNet's signature, with the distilled encoder."""
    root._check_points(points)
    trans_in = None if root.input_tnet is None else root.input_tnet(points.transpose(1, 2))
    transformed = points if trans_in is None else points @ trans_in
    logits = root.head(_root_encoder(root)(transformed))
    # The Gaussian encoder has no feature transform; the input transform is the original T-Net's.
    return (logits, trans_in, None) if return_transforms else logits


def _root_point_mae_forward(root: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """A patched root Point-MAE encoder's forward: its distilled encoder's."""
    return cast(nn.Module, root.gaussian_encoder)(*args, **kwargs)


__all__ = ["point_encoders", "point_mae_point_features", "is_point_mae_encoder", "DEFAULT_DISTILL", "KINDS"]
