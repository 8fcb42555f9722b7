"""Plumbing shared by the training loops of :mod:`lucidops.train` (distillation and fine-tuning).

Argument checks, the optimizer split (natural gradient for Gaussians, AdamW for the rest),
train/eval flags, one optimisation step with the loss averaged over ranks, and the DDP
pieces: every loop runs under ``torchrun`` when ``torch.distributed`` is initialised.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _validate
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


def dist_info() -> Tuple[bool, int, int]:
    """(distributed, rank, world_size)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def check_common(steps, lr, batch_size, points_per_cloud, optimizer, natural_gradient, gaussian_lr,
                  momentum, weight_decay):
    _validate.integer(steps, "steps", minimum=1)
    _validate.real_number(lr, "lr", "> 0")
    _validate.integer(batch_size, "batch_size", minimum=1)
    _validate.integer(points_per_cloud, "points_per_cloud", minimum=1)
    _validate.real_number(gaussian_lr, "gaussian_lr", "> 0")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if natural_gradient not in MODES:
        raise ValueError(f"natural_gradient must be one of {MODES}, got {natural_gradient!r}")
    # Through _validate, as lr is: a numpy float is a number (isinstance(x, (int, float)) refused
    # it with a range message), a string a TypeError.
    _validate.probability(momentum, "momentum")  # [0, 1)
    _validate.real_number(weight_decay, "weight_decay", ">= 0")


def resolve_device(device, student: nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(student.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def dtype_of(module: nn.Module, default: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype of ``module``'s first floating parameter, else ``default`` (else torch's default dtype)."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    if p is not None:
        return p.dtype
    return default if default is not None else torch.get_default_dtype()


def refuse_float16(module: nn.Module, name: str, instead: str) -> None:
    """A module with float16 parameters is refused by name before it is trained in place:
    AdamW's float16 steps overflow (the squared gradients and eps underflow to 0, and the
    step divides by it)."""
    if any(p.dtype == torch.float16 for p in module.parameters()):
        raise TypeError(f"{name} has float16 parameters: it would be trained in place, and AdamW's float16 steps "
                        f"overflow them to inf; {instead}")


class TrainingMode:
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


def broadcast_module(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (in place)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, src=0)


def wrap_ddp(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` in :class:`~torch.nn.parallel.DistributedDataParallel` (one device per rank)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def build_optimizers(student: nn.Module, optimizer: str, lr: float, gaussian_lr: float, natural_gradient: str,
                      momentum: float, weight_decay: float, lr_scale: Optional[Callable[[nn.Parameter], float]] = None
                      ) -> List[torch.optim.Optimizer]:
    if optimizer == "adamw":
        params = [p for p in student.parameters() if p.requires_grad]
        groups: List[Dict[str, Any]] = [{"params": params}]
        natural_groups: List[dict] = []
    else:
        split = split_parameters(student)
        # The natural gradient needs a Gaussian's means and factor together; where one of them is
        # frozen, the other trains with AdamW (before, it was silently left out of every optimizer).
        trainable = [all(p.requires_grad for p in g["params"]) for g in split.natural_gradient]
        natural_groups = [g for g, t in zip(split.natural_gradient, trainable) if t]
        partly_frozen = [g for g, t in zip(split.natural_gradient, trainable) if not t]
        groups = [{"params": [p for p in g["params"] if p.requires_grad]} for g in split.adamw + partly_frozen]
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


def progress_bar(steps: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(steps), disable=not enabled, desc=desc, dynamic_ncols=True)


def optimizer_step(opts, loss: Tensor, distributed: bool, world: int, logged: Optional[Tensor] = None) -> float:
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


@contextlib.contextmanager
def seeded_rng(seed: Optional[int], dev: torch.device) -> Iterator[None]:
    """Draws from torch's global RNG inside the block (module initialisation, dropout) follow
    ``seed``, on the CPU and on a CUDA ``dev``; the global state is restored afterwards.
    ``None``: the block draws from the global RNG as it stands."""
    if seed is None:
        yield
        return
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:  # only the forked device: torch.manual_seed would reseed every GPU
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


__all__ = [
    "OPTIMIZERS", "DistillResult", "dist_info",
    "check_common", "resolve_device", "dtype_of", "TrainingMode", "broadcast_module",
    "wrap_ddp", "build_optimizers", "progress_bar", "optimizer_step", "seeded_rng",
]
