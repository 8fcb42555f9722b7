"""Distillation of Gaussian point encoders from PointNet-style teachers (methods.md section 1).

The student's per-point pre-max features are regressed onto a frozen teacher's per-point
pre-max activations with an L1 loss. The inputs are not dataset clouds: each batch draws
``batch_size`` clouds and, for each, ``points_per_cloud`` points uniformly at random in
that cloud's bounding cube (the axis-aligned cube, centred on the cloud's bounding box,
whose side is the box's longest side). ``clouds`` only fixes where the cubes are.

:func:`distill` is one stage. :func:`distill_pointnet` is the paper's three-stage recipe
for a :class:`lucidops.models.PointNet` with an input T-Net:

1. distil the T-Net's encoder (its shared MLP, up to the last conv + BN, before the ReLU)
   into a Gaussian encoder, and copy the T-Net's regressor head;
2. distil the main encoder on T-Net-transformed points: the uniform points of a cloud's
   cube go through that cloud's own input transform, computed by the teacher's T-Net on
   the cloud itself (a T-Net run on the uniform points gives other transforms, and the
   student then fails on real surfaces); the student sees the transformed points and the
   target is :meth:`~lucidops.models.PointNet.encoder_features` of them;
3. (when labelled data is given) fine-tune the whole student end to end with the copied
   classifier head, the Gaussian encoders' learning rates divided by 100.

Both run under ``torchrun``: when ``torch.distributed`` is initialised, the student is
wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, the clouds are sharded by
rank (cloud ``i`` goes to rank ``i % world_size``), each rank samples its own points, the
logged loss is averaged over ranks and only rank 0 shows a progress bar. The teacher's
parameters and buffers are broadcast from rank 0 first, so every rank distils the same
teacher.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.pointnet import PointNet, TNet
from ..nn.gaussian_mixture import GaussianPointEncoder
from ..nn.gaussian_pointnet import GaussianPointNet, GaussianTNet
from ..optim.natural_gradient import MODES, GaussianNaturalGradient, split_parameters

OPTIMIZERS = ("natural", "adamw")


@dataclass
class DistillResult:
    """What one distillation (or fine-tuning) stage did.

    ``losses[i]`` is the loss of step ``i`` (averaged over ranks under DDP): the L1 error
    for distillation, the cross-entropy for fine-tuning.
    """

    losses: List[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    stage: str = "distill"

    @property
    def final_loss(self) -> float:
        """Mean loss of the last 10% of the steps (at least one), less noisy than the last step."""
        if not self.losses:
            return math.nan
        tail = max(1, len(self.losses) // 10)
        return sum(self.losses[-tail:]) / tail


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------

def _dist_info() -> Tuple[bool, int, int]:
    """(distributed, rank, world_size)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_non_negative_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _owning_module(fn) -> Optional[nn.Module]:
    """The module behind a teacher callable: the module itself or a bound method's owner."""
    if isinstance(fn, nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, nn.Module) else None


def _as_teacher(teacher) -> Callable[[Tensor], Tensor]:
    if isinstance(teacher, PointNet):
        return teacher.point_features
    if not callable(teacher):
        raise TypeError(f"teacher must be a callable points (B, N, 3) -> features (B, N, K) or a PointNet, "
                        f"got {type(teacher).__name__}")
    return teacher


def _cloud_points(item) -> Tensor:
    """A dataset item -> its (N, 3) points: a tensor, or the first element of a tuple/list/dict."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    elif isinstance(item, dict):
        item = item.get("points", item.get("pos"))
    if not isinstance(item, Tensor):
        raise TypeError(f"clouds: each cloud must be a tensor (N, 3) (or a (points, label) pair), "
                        f"got {type(item).__name__}")
    return item


def cloud_cubes(clouds) -> Tuple[Tensor, Tensor]:
    """Bounding cubes of ``clouds`` -> (centres (M, 3), half-sides (M,)), float64 on the CPU.

    ``clouds``: a tensor (M, N, 3) or (N, 3), a sequence of (N_i, 3) tensors, or a dataset
    whose items are tensors or (points, label) pairs; ``None`` means one cube, [-1, 1]^3.
    The cube of a cloud is centred on its bounding box and its half-side is half the box's
    longest side (a flat cloud still gets a solid cube).
    """
    if clouds is None:
        return torch.zeros(1, 3, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    if isinstance(clouds, Tensor):
        if clouds.dim() == 2:
            clouds = clouds.unsqueeze(0)
        if clouds.dim() != 3 or clouds.shape[-1] != 3 or clouds.shape[1] == 0:
            raise ValueError(f"clouds must have shape (M, N, 3) or (N, 3) with N >= 1, got {tuple(clouds.shape)}")
        items: Sequence[Tensor] = list(clouds.detach().double().cpu())
    else:
        try:
            n = len(clouds)
        except TypeError:
            raise TypeError(f"clouds must be a tensor, a sequence or a dataset of clouds, or None, "
                            f"got {type(clouds).__name__}") from None
        items = [_cloud_points(clouds[i]) for i in range(n)]
    if len(items) == 0:
        raise ValueError("clouds is empty")
    lo, hi = [], []
    for i, pts in enumerate(items):
        if pts.dim() != 2 or pts.shape[-1] != 3 or pts.shape[0] == 0:
            raise ValueError(f"clouds[{i}] must have shape (N, 3) with N >= 1, got {tuple(pts.shape)}")
        pts = pts.detach().double().cpu()
        if not torch.isfinite(pts).all():
            raise ValueError(f"clouds[{i}] has non-finite coordinates")
        lo.append(pts.amin(0))
        hi.append(pts.amax(0))
    lo_t, hi_t = torch.stack(lo), torch.stack(hi)
    centres = 0.5 * (lo_t + hi_t)
    half = 0.5 * (hi_t - lo_t).amax(1)
    # A single-point cloud has no extent; give it a tiny cube rather than a degenerate one.
    return centres, half.clamp_min(1e-6)


def sample_cube_points(centres: Tensor, half: Tensor, points_per_cloud: int,
                       generator: Optional[torch.Generator] = None) -> Tensor:
    """Uniform points in each cube: centres (B, 3), half-sides (B,) -> (B, points_per_cloud, 3)."""
    u = torch.rand(centres.shape[0], points_per_cloud, 3, dtype=centres.dtype, device=centres.device,
                   generator=generator)
    return centres[:, None, :] + (2.0 * u - 1.0) * half[:, None, None]


class _TrainingMode:
    """Sets modules' train/eval flags for a block and restores them afterwards."""

    def __init__(self, modules, train: bool):
        self.flags = [(m, sub, sub.training) for m in modules if m is not None for sub in m.modules()]
        self.train = train

    def __enter__(self):
        for _, sub, _ in self.flags:
            sub.training = self.train
        return self

    def __exit__(self, *exc):
        for _, sub, flag in self.flags:
            sub.training = flag


def _broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, src=0)


def _build_optimizers(student: nn.Module, optimizer: str, lr: float, gaussian_lr: float, natural_gradient: str,
                      momentum: float, weight_decay: float, lr_scale: Optional[Callable[[nn.Parameter], float]] = None
                      ) -> List[torch.optim.Optimizer]:
    if optimizer == "adamw":
        params = [p for p in student.parameters() if p.requires_grad]
        groups: List[Dict[str, Any]] = [{"params": params}]
        natural_groups: List[dict] = []
    else:
        split = split_parameters(student)
        natural_groups = [g for g in split.natural_gradient if all(p.requires_grad for p in g["params"])]
        groups = [{"params": [p for p in g["params"] if p.requires_grad]} for g in split.adamw]
        groups = [g for g in groups if g["params"]]
    if lr_scale is not None:
        # Split the AdamW groups per learning-rate scale (used by fine-tuning: encoders / 100).
        scaled: dict = {}
        for g in groups:
            for p in g["params"]:
                scaled.setdefault(lr_scale(p), []).append(p)
        groups = [{"params": ps, "lr": lr * s} for s, ps in scaled.items()]
        for g in natural_groups:
            g["lr"] = gaussian_lr * lr_scale(g["params"][0])
    opts: List[torch.optim.Optimizer] = []
    if groups:
        opts.append(torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay))
    if natural_groups:
        opts.append(GaussianNaturalGradient(natural_groups, lr=gaussian_lr, momentum=momentum, mode=natural_gradient))
    if not opts:
        raise ValueError("student has no trainable parameters")
    return opts


def _progress(steps: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(steps), disable=not enabled, desc=desc, dynamic_ncols=True)


def _check_common(steps, lr, batch_size, points_per_cloud, optimizer, natural_gradient, gaussian_lr,
                  momentum, weight_decay):
    _check_positive_int("steps", steps)
    _check_positive_float("lr", lr)
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("points_per_cloud", points_per_cloud)
    _check_positive_float("gaussian_lr", gaussian_lr)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if natural_gradient not in MODES:
        raise ValueError(f"natural_gradient must be one of {MODES}, got {natural_gradient!r}")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")


def _resolve_device(device, student: nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(student.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype_of(student: nn.Module) -> torch.dtype:
    p = next(iter(student.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


# ----------------------------------------------------------------------------------------
# One distillation stage
# ----------------------------------------------------------------------------------------

def _step(opts, loss: Tensor, distributed: bool, world: int, logged: Optional[Tensor] = None) -> float:
    """One optimisation step on ``loss``; returns ``logged`` (default: the loss) averaged over
    the ranks (for logging)."""
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in opts:
        opt.step()
    logged = (loss if logged is None else logged).detach()
    if distributed:
        logged = logged.clone()
        torch.distributed.all_reduce(logged)
        logged = logged / world
    return float(logged)


def _spread_encoders(student: nn.Module, spread_penalty) -> List[GaussianPointEncoder]:
    """The student's Gaussian encoders that ``spread_penalty`` applies to ([] when it is 0)."""
    if _check_non_negative_float("spread_penalty", spread_penalty) == 0:
        return []
    encoders = [m for m in student.modules() if isinstance(m, GaussianPointEncoder)]
    if not encoders:
        raise ValueError("spread_penalty > 0 needs a student containing a lucidops.nn.GaussianPointEncoder")
    return encoders


def distill(teacher, student: nn.Module, clouds=None, *, steps: int = 1000, lr: float = 1e-3,
            batch_size: int = 32, points_per_cloud: int = 512, optimizer: str = "natural",
            natural_gradient: str = "mahalanobis", gaussian_lr: float = 0.005, momentum: float = 0.9,
            weight_decay: float = 0.01, input_transform: Optional[Callable[..., Tensor]] = None,
            per_cloud: Optional[Sequence[Optional[Tensor]]] = None, spread_penalty: float = 0.0,
            seed: Optional[int] = None, progress: bool = True, device=None, desc: str = "distill"
            ) -> DistillResult:
    """Distil ``student`` from ``teacher``'s per-point pre-max activations (L1 loss), in place.

    Args:
        teacher: a callable points (B, N, 3) -> per-point features (B, N, K), e.g.
            ``pointnet.point_features``, or a :class:`~lucidops.models.PointNet` (its
            ``point_features`` is used). Frozen: run under ``no_grad`` and, when it is (or
            belongs to) an ``nn.Module``, in eval mode (its flags are restored afterwards).
        student: an ``nn.Module`` points (B, N, 3) -> (B, N, K), typically
            ``GaussianPointEncoder(reduce="none")``. A ``GaussianPointEncoder`` built with
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
            teacher's input T-Net here for stage 2.
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
    _check_common(steps, lr, batch_size, points_per_cloud, optimizer, natural_gradient, gaussian_lr,
                  momentum, weight_decay)
    if not isinstance(student, nn.Module):
        raise TypeError(f"student must be an nn.Module, got {type(student).__name__}")
    teacher_fn = _as_teacher(teacher)
    if input_transform is not None and not callable(input_transform):
        raise TypeError(f"input_transform must be callable or None, got {type(input_transform).__name__}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    spread_encoders = _spread_encoders(student, spread_penalty)

    distributed, rank, world = _dist_info()
    dev = _resolve_device(device, student)
    dtype = _dtype_of(student)
    student.to(dev)
    teacher_module = _owning_module(teacher_fn)
    if teacher_module is not None:
        teacher_module.to(dev)
        if distributed:
            _broadcast_module(teacher_module)

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

    switched: Optional[GaussianPointEncoder] = None  # the student, when its reduce is switched to "none"
    old_reduce = ""
    if isinstance(student, GaussianPointEncoder) and student.reduce != "none":
        switched, old_reduce = student, student.reduce
        student.reduce = "none"
    model: nn.Module = student
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(student, device_ids=[dev.index] if dev.type == "cuda" else None)
    opts = _build_optimizers(student, optimizer, lr, gaussian_lr, natural_gradient, momentum, weight_decay)

    result = DistillResult(stage=desc)
    start = time.perf_counter()
    try:
        with _TrainingMode([teacher_module], train=False), _TrainingMode([student], train=True):
            bar = _progress(steps, progress and rank == 0, desc)
            for step in bar:
                idx = torch.randint(0, centres.shape[0], (batch_size,), device=dev, generator=gen)
                points = sample_cube_points(centres[idx], half[idx], points_per_cloud, gen)
                rows = [None if t is None else t[idx] for t in context]
                with torch.no_grad():
                    target = teacher_fn(points, *rows)
                    student_in = input_transform(points, *rows) if input_transform is not None else points
                if step == 0:
                    _check_target(target, batch_size, points_per_cloud)
                out = model(student_in)
                if step == 0 and out.shape != target.shape:
                    raise ValueError(f"student output {tuple(out.shape)} does not match the teacher's per-point "
                                     f"features {tuple(target.shape)} (a student must return (B, N, K))")
                l1 = F.l1_loss(out, target.to(out.dtype))
                loss = (l1 + spread_penalty * sum(enc.spread() for enc in spread_encoders)) if spread_encoders else l1
                value = _step(opts, loss, distributed, world, logged=l1)
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


# ----------------------------------------------------------------------------------------
# The three-stage recipe for PointNet (T-Net) teachers
# ----------------------------------------------------------------------------------------

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


@dataclass
class PointNetDistillResult:
    """The distilled model and what each stage of :func:`distill_pointnet` did."""

    model: DistilledPointNet
    tnet: Optional[DistillResult]
    encoder: DistillResult
    finetune: Optional[DistillResult]


def _labelled(item) -> Tuple[Tensor, Tensor]:
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise TypeError("finetune_data: items must be (points, label) pairs")
    return item[0], torch.as_tensor(item[1]).reshape(())


_SCHEDULES = ("constant", "cosine")


def _pick_points(n: int, count: int, gen: torch.Generator) -> Tensor:
    """Indices of ``count`` of a cloud's ``n`` points: distinct when ``n >= count`` (a cloud
    seen as at test time, no duplicated points), else drawn with replacement."""
    if n >= count:
        return torch.randperm(n, generator=gen)[:count]
    return torch.randint(0, n, (count,), generator=gen)


def _set_cosine_rates(opts, base_rates, step: int, steps: int, floor: float = 0.02) -> None:
    """Set every group's rate to its start rate times a half cosine from 1 (step 0) to
    ``floor`` (the last step)."""
    t = step / max(steps - 1, 1)
    factor = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    for opt, rates in zip(opts, base_rates):
        for g, rate in zip(opt.param_groups, rates):
            g["lr"] = rate * factor


def finetune(model: nn.Module, data, *, steps: int = 1000, lr: float = 1e-3, batch_size: int = 32,
             points_per_cloud: int = 1024, encoder_lr_scale: float = 0.01, gaussian_lr: float = 0.005,
             natural_gradient: str = "mahalanobis", momentum: float = 0.9, weight_decay: float = 0.01,
             schedule: str = "constant", seed: Optional[int] = None, progress: bool = True,
             device=None) -> DistillResult:
    """Stage 3: fine-tune ``model`` (points (B, N, 3) -> logits) end to end on labelled clouds.

    ``data`` is a dataset of (points (N_i, 3), label) pairs; each step draws ``batch_size``
    of them (per rank; under DDP the dataset is sharded by rank) and ``points_per_cloud``
    distinct points of each (with replacement only when a cloud has fewer). Cross-entropy
    loss. Every parameter of a ``GaussianPointEncoder`` in ``model`` (means, factors, mixer)
    trains at its stage's rate times ``encoder_lr_scale`` (the paper divides by 100); the
    rest at ``lr`` with AdamW. ``schedule``: ``"constant"`` rates, or ``"cosine"``: every
    rate decays along a half cosine to 2% of its start by the last step.
    """
    _check_common(steps, lr, batch_size, points_per_cloud, "natural", natural_gradient, gaussian_lr,
                  momentum, weight_decay)
    _check_positive_float("encoder_lr_scale", encoder_lr_scale)
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    try:
        n_items = len(data)
    except TypeError:
        raise TypeError(f"finetune_data must be a dataset of (points, label) pairs, got {type(data).__name__}") from None
    distributed, rank, world = _dist_info()
    if n_items < world:
        raise ValueError(f"finetune_data: {n_items} items cannot be sharded over {world} ranks")
    dev = _resolve_device(device, model)
    dtype = _dtype_of(model)
    model.to(dev)
    local = list(range(rank, n_items, world))
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    gen = torch.Generator()
    gen.manual_seed(seed + rank)

    encoder_params = {id(p) for m in model.modules() if isinstance(m, GaussianPointEncoder) for p in m.parameters()}
    opts = _build_optimizers(model, "natural", lr, gaussian_lr, natural_gradient, momentum, weight_decay,
                             lr_scale=lambda p: encoder_lr_scale if id(p) in encoder_params else 1.0)
    base_rates = [[g["lr"] for g in opt.param_groups] for opt in opts]
    wrapped: nn.Module = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    result = DistillResult(stage="finetune")
    start = time.perf_counter()
    with _TrainingMode([model], train=True):
        bar = _progress(steps, progress and rank == 0, "finetune")
        for step in bar:
            if schedule == "cosine":
                _set_cosine_rates(opts, base_rates, step, steps)
            picks = torch.randint(0, len(local), (batch_size,), generator=gen).tolist()
            clouds, labels = [], []
            for j in picks:
                pts, label = _labelled(data[local[j]])
                clouds.append(pts[_pick_points(pts.shape[0], points_per_cloud, gen)])
                labels.append(label)
            points = torch.stack(clouds).to(dev, dtype)
            target = torch.stack(labels).long().to(dev)
            loss = F.cross_entropy(wrapped(points), target)
            result.losses.append(_step(opts, loss, distributed, world))
            if rank == 0 and progress and (step % 10 == 0 or step == steps - 1):
                bar.set_postfix(ce=f"{result.losses[-1]:.4g}")
        bar.close()
    if distributed:
        # DDP syncs buffers at the start of each forward, so the last step's BatchNorm
        # statistics updates differ by rank: take rank 0's, as DDP would at the next forward.
        with torch.no_grad():
            for b in model.buffers():
                torch.distributed.broadcast(b.data, src=0)
    result.steps = len(result.losses)
    result.seconds = time.perf_counter() - start
    return result


def _apply(points: Tensor, transform: Optional[Tensor]) -> Tensor:
    """Points (B, N, 3) through an input transform (B, 3, 3), PointNet's ``points @ A``."""
    return points if transform is None else points @ transform


def _out_channels(conv_bn: nn.Module) -> int:
    """Output channels of a PointNet conv block (``Sequential(Conv1d, BatchNorm1d)``)."""
    return cast(nn.Conv1d, cast(nn.Sequential, conv_bn)[0]).out_channels


def _pointnet_transforms(teacher: PointNet, clouds, dev: torch.device, dtype: torch.dtype,
                         chunk: int = 256) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Every cloud's (input, feature) transforms under ``teacher`` (eval mode, no grad)."""
    if isinstance(clouds, Tensor):
        items = [clouds[i:i + chunk] for i in range(0, clouds.shape[0], chunk)]
    else:
        items = [_cloud_points(clouds[i])[None] for i in range(len(clouds))]
    ins, feats = [], []
    with torch.no_grad():
        for pts in items:
            a, f = teacher.transforms(pts.to(dev, dtype))
            ins.append(a)
            feats.append(f)
    join = lambda ts: None if ts[0] is None else torch.cat(ts)  # noqa: E731
    return join(ins), join(feats)


def distill_pointnet(teacher: PointNet, clouds=None, *, num_gaussians: int = 32, tnet_gaussians: Optional[int] = None,
                     steps: int = 1000, tnet_steps: Optional[int] = None, finetune_data=None,
                     finetune_steps: int = 0, finetune_lr: float = 1e-3, encoder_lr_scale: float = 0.01,
                     finetune_schedule: str = "constant", cloud_range: float = 1.0, seed: Optional[int] = None, progress: bool = True, device=None,
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

    ``distill_kwargs`` go to both :func:`distill` stages (lr, batch_size, points_per_cloud,
    optimizer, ...). The teacher is not modified (its train/eval flags are restored).
    """
    if not isinstance(teacher, PointNet):
        raise TypeError(f"teacher must be a lucidops.models.PointNet, got {type(teacher).__name__}")
    _check_positive_int("num_gaussians", num_gaussians)
    tnet_gaussians = num_gaussians if tnet_gaussians is None else _check_positive_int("tnet_gaussians", tnet_gaussians)
    tnet_steps = steps if tnet_steps is None else _check_positive_int("tnet_steps", tnet_steps)
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise ValueError(f"finetune_steps must be an int >= 0, got {finetune_steps!r}")
    if finetune_steps > 0 and finetune_data is None:
        raise ValueError("finetune_steps > 0 needs finetune_data (a dataset of (points, label) pairs)")
    if finetune_schedule not in _SCHEDULES:  # checked before the distillation stages spend their time
        raise ValueError(f"finetune_schedule must be one of {_SCHEDULES}, got {finetune_schedule!r}")
    for key in ("input_transform", "per_cloud", "desc"):
        if key in distill_kwargs:
            raise TypeError(f"distill_pointnet sets {key!r} itself")
    dtype = next(teacher.parameters()).dtype
    dev = torch.device(device) if device is not None else next(teacher.parameters()).device
    k = _out_channels(teacher.conv3)
    teacher.to(dev)
    if _dist_info()[0]:
        _broadcast_module(teacher)  # the T-Net stage's teacher is a lambda, which distill cannot broadcast
    tnet_result, gtnet = None, None
    with _TrainingMode([teacher], train=False):
        if teacher.input_tnet is not None:
            tnet = teacher.input_tnet
            tnet_enc = GaussianPointEncoder(tnet_gaussians, _out_channels(tnet.encoder[-1]),
                                            cloud_range=cloud_range, reduce="max").to(dev, dtype)
            tnet_result = distill(lambda x: tnet_point_features(tnet, x), tnet_enc, clouds, steps=tnet_steps,
                                  seed=seed, progress=progress, device=dev, desc="distill T-Net", **distill_kwargs)
            gtnet = GaussianTNet.from_tnet(tnet, tnet_enc)
        encoder = GaussianPointEncoder(num_gaussians, k, cloud_range=cloud_range, reduce="max").to(dev, dtype)
        stage2: Dict[str, Any] = {}
        if clouds is not None and (teacher.input_tnet is not None or teacher.feature_tnet is not None):
            # Each cloud's own T-Net transforms, applied to the points sampled in its cube: the
            # student learns the per-point function it meets on real clouds (a T-Net run on
            # uniform cube samples instead gives other transforms, and the student then fails on
            # surfaces).
            trans_in, trans_feat = _pointnet_transforms(teacher, clouds, dev, dtype)
            stage2 = dict(teacher=lambda x, a, f: teacher.encoder_features(_apply(x, a), f),
                          input_transform=lambda x, a, f: _apply(x, a), per_cloud=[trans_in, trans_feat])
        elif teacher.input_tnet is not None:
            stage2 = dict(teacher=teacher.point_features, input_transform=teacher.transform_points)
        else:
            stage2 = dict(teacher=teacher.point_features)
        enc_result = distill(stage2.pop("teacher"), encoder, clouds, steps=steps,
                             seed=None if seed is None else seed + 7919, progress=progress, device=dev,
                             desc="distill encoder", **stage2, **distill_kwargs)
    model = DistilledPointNet(encoder, copy.deepcopy(teacher.head), gtnet).to(dev)
    ft_result = None
    if finetune_steps > 0:
        pts_per_cloud = distill_kwargs.get("points_per_cloud", 1024)
        ft_result = finetune(model, finetune_data, steps=finetune_steps, lr=finetune_lr,
                             batch_size=distill_kwargs.get("batch_size", 32), points_per_cloud=pts_per_cloud,
                             encoder_lr_scale=encoder_lr_scale, schedule=finetune_schedule,
                             seed=None if seed is None else seed + 104729,
                             progress=progress, device=dev)
    model.eval()
    return PointNetDistillResult(model, tnet_result, enc_result, ft_result)


__all__ = [
    "distill", "distill_pointnet", "finetune", "DistillResult", "PointNetDistillResult", "DistilledPointNet",
    "GaussianTNet", "GaussianPointNet", "tnet_point_features", "cloud_cubes", "sample_cube_points", "OPTIMIZERS",
]
