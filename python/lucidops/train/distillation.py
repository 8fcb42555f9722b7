"""One distillation stage of a Gaussian point encoder from a PointNet-style teacher (methods.md section 1).

The student's per-point pre-max features are regressed onto a frozen teacher's per-point
pre-max activations with an L1 loss. Each batch draws ``batch_size`` clouds and, for each,
``points_per_cloud`` points uniformly at random in that cloud's bounding cube
(:func:`~lucidops.train.cubes.cloud_cubes`); ``clouds`` only fixes where the cubes are.

Under ``torchrun`` (``torch.distributed`` initialised) the student is wrapped in
:class:`~torch.nn.parallel.DistributedDataParallel`, the clouds are sharded by rank (cloud
``i`` goes to rank ``i % world_size``), each rank samples its own points, the logged loss
is averaged over ranks and only rank 0 shows a progress bar. The teacher's parameters and
buffers are broadcast from rank 0 first, so every rank distils the same teacher.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from .._typing import DeviceLike
from ..models.pointnet import PointNet
from ..nn.gaussian_mixture import GaussianPointEncoder
from ..reference.gaussian_mixture import gaussian_phi
from .cubes import cloud_cubes, sample_cube_points
from .loop import (DistillResult, TrainingMode, broadcast_module, build_optimizers, check_common,
                   dist_info, dtype_of, optimizer_step, progress_bar, refuse_float16, resolve_device,
                   wrap_ddp)


def distill(teacher: Union[nn.Module, Callable[[Tensor], Tensor]], student: nn.Module, clouds=None, *,
            steps: int = 1000, lr: float = 1e-3,
            batch_size: int = 32, points_per_cloud: int = 512, optimizer: str = "natural",
            natural_gradient: str = "mahalanobis", gaussian_lr: float = 0.005, momentum: float = 0.9,
            weight_decay: float = 0.01, input_transform: Optional[Callable[..., Tensor]] = None,
            per_cloud: Optional[Sequence[Optional[Tensor]]] = None, spread_penalty: float = 0.0,
            seed: Optional[int] = None, progress: bool = True, device: Optional[DeviceLike] = None,
            desc: str = "distill"
            ) -> DistillResult:
    """Distil ``student`` from ``teacher``'s per-point pre-max activations (L1 loss), in place.

    Args:
        teacher: a callable points (B, N, 3) -> per-point features (B, N, K), e.g.
            ``pointnet.point_features``, or a :class:`~lucidops.models.PointNet` (its
            ``point_features`` is used). A module or a module's bound method gets the points
            in the module's dtype, any other callable in the student's. Frozen: run under
            ``no_grad`` and, when it is (or belongs to) an ``nn.Module``, in eval mode (its
            flags are restored afterwards).
        student: an ``nn.Module`` points (B, N, 3) -> (B, N, K), typically
            ``GaussianPointEncoder(reduce="none")``; not float16 (AdamW's float16 steps
            overflow: distil in float32 and convert after). A ``GaussianPointEncoder`` built with
            ``reduce="max"`` is switched to ``"none"`` for the distillation and back after.
        clouds: where to sample: a tensor (M, N, 3), a sequence of (N_i, 3) tensors, a
            dataset of clouds or (points, label) pairs (e.g. ``SyntheticShapes``), or
            ``None`` for the cube [-1, 1]^3. Each batch picks ``batch_size`` clouds at random
            (with replacement) and samples ``points_per_cloud`` points uniformly in each
            one's bounding cube (see :func:`cloud_cubes`).
        steps: optimisation steps.
        lr: AdamW learning rate (the mixer and any non-Gaussian parameter; every parameter
            when ``optimizer="adamw"``).
        batch_size: clouds per step and per rank (the paper: 32).
        points_per_cloud: query points per cloud (the paper: 512).
        optimizer: ``"natural"`` (default): :class:`GaussianNaturalGradient` (SGD with
            momentum, natural-gradient preconditioning) on every Gaussian encoder's means
            and factors and AdamW on the rest, split by :func:`split_parameters`, as the
            authors do; ``"adamw"``: AdamW on everything.
        natural_gradient: ``"mahalanobis"`` or ``"fisher"`` (see :class:`GaussianNaturalGradient`).
        gaussian_lr, momentum: the natural-gradient SGD's step size and momentum (the
            authors' 0.005 and 0.9).
        weight_decay: AdamW weight decay.
        input_transform: optional map applied to the sampled points before the *student*
            only (the teacher sees the raw points); :func:`distill_pointnet` passes the
            teacher's input T-Net here for stage 2. Called like the teacher (in its module's
            dtype when it is, or belongs to, a module); its output goes to the student in
            the student's dtype.
        per_cloud: optional tensors (each with one row per cloud of ``clouds``, or None) that
            condition the teacher and ``input_transform`` on the cloud a batch's points were
            drawn for: they are called as ``teacher(points, *rows)`` and
            ``input_transform(points, *rows)``. A PointNet's T-Nets make its per-point features
            depend on the whole cloud; :func:`distill_pointnet` passes each cloud's own
            transforms here, so the student learns the per-point function it will meet on
            real clouds.
        spread_penalty: ``lambda >= 0`` (default 0, the paper's plain L1): adds ``lambda *
            enc.spread()`` for every ``GaussianPointEncoder`` in the student to the loss,
            pulling the Gaussians' variances down so that inference-time culling skips more
            (the measured trade-off is in the README's Gaussian point encoder section).
        seed: seeds the point sampling (rank ``r`` uses ``seed + r``); ``None`` draws a seed
            from torch's global generator.
        progress: show a tqdm bar (rank 0 only).
        device: where to run (default: the student's device). The student and, when it is
            a module, the teacher are moved there.
        desc: the progress bar's label.

    Returns:
        A :class:`DistillResult` with the L1 loss of every step (without the spread penalty).
    """
    check_common(steps, lr, batch_size, points_per_cloud, optimizer, natural_gradient, gaussian_lr,
                  momentum, weight_decay)
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    teacher_fn = _as_teacher(teacher)
    if input_transform is not None and not callable(input_transform):
        raise TypeError(f"input_transform must be callable or None, got {type(input_transform).__name__}")
    if seed is not None:
        _validate.integer(seed, "seed")
    _validate.boolean(progress, "progress")
    spread_encoders = _spread_encoders(student, spread_penalty)

    distributed, rank, world = dist_info()
    dev = resolve_device(device, student)
    dtype = dtype_of(student)
    refuse_float16(student, "student", "distil a float32 student and convert it after, as patch.point_encoders "
                   "and distill_pointnet do for half-precision models (a teacher that is neither a module nor "
                   "a module's method gets the points in the student's dtype: wrap it in lucidops.train.cast_args_to)")
    student.to(dev)
    teacher_module = _owning_module(teacher_fn)
    # A module teacher reads points in its own dtype (a float32 PointNet, a float64 student),
    # and so does a module's input transform (a float16 model's T-Net, a float32 student).
    teacher_in = cast_args_to(dtype if teacher_module is None else dtype_of(teacher_module, dtype), teacher_fn)
    transform_in = None
    if input_transform is not None:
        transform_module = _owning_module(input_transform)
        transform_in = cast_args_to(dtype if transform_module is None else dtype_of(transform_module, dtype),
                                    input_transform)
    if teacher_module is not None:
        teacher_module.to(dev)
        if distributed:
            broadcast_module(teacher_module)

    centres, half = cloud_cubes(clouds)
    context = _check_per_cloud(per_cloud, clouds, centres.shape[0])
    # Shard the clouds by rank (cloud i -> rank i % world); a rank with none would idle.
    # The default single cube is shared by every rank (their seeds differ).
    if clouds is not None:
        if centres.shape[0] < world:
            raise ValueError(f"clouds: {centres.shape[0]} clouds cannot be sharded over {world} ranks")
        centres, half = centres[rank::world], half[rank::world]
        context = [None if t is None else t[rank::world] for t in context]
    centres, half = centres.to(dev, dtype), half.to(dev, dtype)
    context = [None if t is None else t.to(dev, dtype) for t in context]

    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed + rank)

    result = DistillResult(stage=desc)
    switched: Optional[GaussianPointEncoder] = None  # the student, when its reduce is switched to "none"
    old_reduce = ""
    try:
        # Switched inside the try: a setup error (DDP, no trainable parameter) used to leave the
        # caller's encoder in "none", returning per-point features.
        if isinstance(student, GaussianPointEncoder) and student.reduce != "none":
            switched, old_reduce = student, student.reduce
            student.reduce = "none"
        model = wrap_ddp(student, dev) if distributed else student
        opts = build_optimizers(student, optimizer, lr, gaussian_lr, natural_gradient, momentum, weight_decay)
        start = time.perf_counter()
        with TrainingMode([teacher_module], train=False), TrainingMode([student], train=True):
            bar = progress_bar(steps, progress and rank == 0, desc)
            for step in bar:
                idx = torch.randint(0, centres.shape[0], (batch_size,), device=dev, generator=gen)
                points = sample_cube_points(centres[idx], half[idx], points_per_cloud, gen)
                rows = [None if t is None else t[idx] for t in context]
                with torch.no_grad():
                    target = teacher_in(points, *rows)
                    # a frozen map (a T-Net) in its own dtype, as the teacher; the student reads its dtype
                    student_in = transform_in(points, *rows).to(dtype) if transform_in is not None else points
                if step == 0:
                    _check_target(target, batch_size, points_per_cloud)
                    if isinstance(student, GaussianPointEncoder):
                        _warn_if_gaussians_miss(student, student_in)
                out = model(student_in)
                if step == 0 and out.shape != target.shape:
                    raise ValueError(f"student output {tuple(out.shape)} does not match the teacher's per-point "
                                     f"features {tuple(target.shape)} (a student must return (B, N, K))")
                l1 = F.l1_loss(out, target.to(out.dtype))
                loss = (l1 + spread_penalty * sum(enc.spread() for enc in spread_encoders)) if spread_encoders else l1
                value = optimizer_step(opts, loss, distributed, world, logged=l1)
                if not math.isfinite(value):
                    raise FloatingPointError(f"{desc}: the loss became {value} at step {step}")
                result.losses.append(value)
                if rank == 0 and progress and (step % 10 == 0 or step == steps - 1):
                    bar.set_postfix(l1=f"{value:.4g}")
            bar.close()
    finally:
        if switched is not None:
            switched.reduce = old_reduce
    result.steps = len(result.losses)
    result.seconds = time.perf_counter() - start
    return result


def _warn_if_gaussians_miss(encoder: GaussianPointEncoder, points: Tensor) -> None:
    """Warn when no Gaussian responds to the sampled points (largest phi below 1e-6): their
    gradients vanish, and the student would learn its bias alone (e.g. clouds far from the
    cube the means started in)."""
    with torch.no_grad():
        sample = points.detach().reshape(-1, 3)[:4096].double()  # enough to see any coverage; bounded memory
        phi = gaussian_phi(sample, encoder.means.double(), encoder.precisions().double())  # (M, G)
        largest = float(phi.max()) if phi.numel() else 0.0
    if largest < 1e-6:
        warnings.warn(f"distill: the student's Gaussians do not reach the sampled points (largest response "
                      f"{largest:.3g}): they will not learn. Start them in the clouds' cube: "
                      "GaussianPointEncoder(cloud_range=..., cloud_center=...)", RuntimeWarning, stacklevel=3)


def _owning_module(fn) -> Optional[nn.Module]:
    """The module behind a teacher callable: the module itself or a bound method's owner."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def cast_args_to(dtype: torch.dtype, fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``fn`` with its tensor arguments cast to ``dtype``: a teacher closure over modules of
    ``dtype`` (distill sees the dtype of a module or of a module's method, not of a closure),
    whose student may train in another dtype."""
    return lambda *args: fn(*[None if t is None else t.to(dtype) for t in args])


def _as_teacher(teacher) -> Callable[[Tensor], Tensor]:
    if isinstance(teacher, PointNet):
        return teacher.point_features
    if not callable(teacher):
        raise TypeError(f"teacher must be a callable points (B, N, 3) -> features (B, N, K) or a PointNet, "
                        f"got {type(teacher).__name__}")
    return teacher


def _spread_encoders(student: nn.Module, spread_penalty) -> List[GaussianPointEncoder]:
    """The student's Gaussian encoders that ``spread_penalty`` applies to ([] when it is 0)."""
    if _validate.real_number(spread_penalty, "spread_penalty", ">= 0") == 0:
        return []
    encoders = [m for m in student.modules() if isinstance(m, GaussianPointEncoder)]
    if not encoders:
        raise ValueError("spread_penalty > 0 needs a student containing a lucidops.nn.GaussianPointEncoder")
    return encoders


def _check_per_cloud(per_cloud, clouds, count: int) -> List[Optional[Tensor]]:
    """``per_cloud`` as a list of tensors with ``count`` rows (or None entries); [] when None."""
    if per_cloud is None:
        return []
    if clouds is None:
        raise ValueError("per_cloud needs clouds: its rows are matched to them")
    if isinstance(per_cloud, Tensor) or not isinstance(per_cloud, (list, tuple)):
        raise TypeError(f"per_cloud must be a list or tuple of tensors (or None), got {type(per_cloud).__name__}")
    for i, t in enumerate(per_cloud):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"per_cloud[{i}] must be a tensor or None, got {type(t).__name__}")
        if t.dim() == 0 or t.shape[0] != count:
            raise ValueError(f"per_cloud[{i}] must have one row per cloud ({count}), got shape {tuple(t.shape)}")
    return list(per_cloud)


def _check_target(target, batch: int, n: int) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"teacher must return a tensor, got {type(target).__name__}")
    if target.dim() != 3 or target.shape[0] != batch or target.shape[1] != n:
        raise ValueError(f"teacher must return per-point features (B, N, K) = ({batch}, {n}, K), "
                         f"got {tuple(target.shape)}")


__all__ = ["distill"]
