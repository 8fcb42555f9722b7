"""End-to-end fine-tuning of a distilled classifier on labelled clouds (stage 3 of the recipe).

Cross-entropy on ``points_per_cloud`` distinct points of each labelled cloud; the Gaussian
encoders train at a small fraction of the other parameters' rates (the paper: 1/100).
Runs under ``torchrun`` like :func:`lucidops.train.distill` (the data sharded by rank).
"""

from __future__ import annotations

import math
import time
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from .._typing import DeviceLike
from ..nn.gaussian_mixture import GaussianPointEncoder
from .loop import (DistillResult, TrainingMode, build_optimizers, check_common, dist_info,
                   dtype_of, optimizer_step, progress_bar, refuse_float16, resolve_device, wrap_ddp)

SCHEDULES = ("constant", "cosine")


def finetune(model: nn.Module, data, *, steps: int = 1000, lr: float = 1e-3, batch_size: int = 32,
             points_per_cloud: int = 1024, encoder_lr_scale: float = 0.01, gaussian_lr: float = 0.005,
             natural_gradient: str = "mahalanobis", momentum: float = 0.9, weight_decay: float = 0.01,
             schedule: str = "constant", seed: Optional[int] = None, progress: bool = True,
             device: Optional[DeviceLike] = None) -> DistillResult:
    """Stage 3: fine-tune ``model`` (points (B, N, 3) -> logits) end to end on labelled clouds.

    ``data`` is a dataset of (points (N_i, 3), label) pairs; each step draws ``batch_size``
    of them (per rank; under DDP the dataset is sharded by rank) and ``points_per_cloud``
    distinct points of each (with replacement only when a cloud has fewer). Cross-entropy
    loss. Every parameter of a ``GaussianPointEncoder`` in ``model`` (means, factors, mixer)
    trains at its stage's rate times ``encoder_lr_scale`` (the paper divides by 100); the
    rest at ``lr`` with AdamW. ``schedule``: ``"constant"`` rates, or ``"cosine"``: every
    rate decays along a half cosine to 2% of its start by the last step. ``seed`` (an int)
    seeds the batch and point draws (rank ``r`` uses ``seed + r``; None draws one from
    torch's global generator); dropout in ``model`` draws from torch's global RNG. A model
    with float16 parameters is refused (AdamW's float16 steps overflow): fine-tune it in
    float32 and convert it after.
    """
    check_common(steps, lr, batch_size, points_per_cloud, "natural", natural_gradient, gaussian_lr,
                  momentum, weight_decay)
    _validate.real_number(encoder_lr_scale, "encoder_lr_scale", "> 0")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if seed is not None:  # checked here, as distill does: 1.5 reached manual_seed, "7" failed at seed + rank
        _validate.integer(seed, "seed")
    _validate.boolean(progress, "progress")
    n_items = _dataset_length(data, "data")
    distributed, rank, world = dist_info()
    if n_items < world:
        raise ValueError(f"data: {n_items} items cannot be sharded over {world} ranks")
    dev = resolve_device(device, model)
    dtype = dtype_of(model)
    refuse_float16(model, "model", "fine-tune it in float32 (model.float()) and convert it after")
    model.to(dev)
    local = list(range(rank, n_items, world))
    if seed is None:
        seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
    gen = torch.Generator()
    gen.manual_seed(seed + rank)

    encoder_params = {id(p) for m in model.modules() if isinstance(m, GaussianPointEncoder) for p in m.parameters()}
    opts = build_optimizers(model, "natural", lr, gaussian_lr, natural_gradient, momentum, weight_decay,
                             lr_scale=lambda p: encoder_lr_scale if id(p) in encoder_params else 1.0)
    base_rates = [[g["lr"] for g in opt.param_groups] for opt in opts]
    wrapped = wrap_ddp(model, dev) if distributed else model
    result = DistillResult(stage="finetune")
    start = time.perf_counter()
    with TrainingMode([model], train=True):
        bar = progress_bar(steps, progress and rank == 0, "finetune")
        for step in bar:
            if schedule == "cosine":
                _set_cosine_rates(opts, base_rates, step, steps)
            picks = torch.randint(0, len(local), (batch_size,), generator=gen).tolist()
            clouds, labels = [], []
            for j in picks:
                pts, label = _labelled(data[local[j]], local[j])
                clouds.append(pts[_pick_points(pts.shape[0], points_per_cloud, gen)])
                labels.append(label)
            points = torch.stack(clouds).to(dev, dtype)
            target = torch.stack(labels).long().to(dev)
            try:
                logits = wrapped(points)
            except ValueError as err:
                if "more than 1 value per channel" not in str(err):
                    raise
                # BatchNorm after the max-pool sees one value per channel for each cloud.
                raise ValueError(f"batch_size={batch_size}: a BatchNorm layer of model needs at least 2 "
                                 f"clouds per batch in training ({err})") from err
            loss = F.cross_entropy(logits, target)
            result.losses.append(optimizer_step(opts, loss, distributed, world))
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


def _dataset_length(data, name: str) -> int:
    """``len(data)`` of a dataset of (points, label) pairs, at least one; errors name ``name``."""
    try:
        n_items = len(data)
    except TypeError:
        raise TypeError(f"{name} must be a dataset of (points, label) pairs, got {type(data).__name__}") from None
    if n_items == 0:
        raise ValueError(f"{name} is empty: fine-tuning needs at least one (points, label) pair")
    return n_items


def _labelled(item, index: int, name: str = "data") -> Tuple[Tensor, Tensor]:
    """A dataset item as (points (N, C), label ()); errors name ``name[index]``."""
    where = f"{name}[{index}]"
    if not (isinstance(item, (tuple, list)) and len(item) >= 2):
        raise TypeError(f"{where} must be a (points, label) pair, got {type(item).__name__}")
    points, label = item[0], item[1]
    if not isinstance(points, Tensor):
        raise TypeError(f"{where}: points must be a tensor (N, 3), got {type(points).__name__}")
    if points.dim() != 2 or points.shape[0] == 0:
        raise ValueError(f"{where}: points must have shape (N, 3) with N >= 1, got {tuple(points.shape)}")
    label = torch.as_tensor(label)
    # One class index per cloud: a one-hot or soft label (C,) failed in reshape with a bare
    # RuntimeError ("shape '[]' is invalid"), and 1.5 was truncated to class 1.
    if label.numel() != 1:
        raise ValueError(f"{where}: label must be one class index (an int or a one-element tensor), "
                         f"got shape {tuple(label.shape)}")
    if label.is_floating_point() and not bool(label == label.round()):
        raise ValueError(f"{where}: label must be a class index, got {label.item()!r}")
    return points, label.reshape(())


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


__all__ = ["finetune", "SCHEDULES"]
