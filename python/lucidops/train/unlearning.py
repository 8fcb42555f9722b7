"""Gradient-difference unlearning (methods.md section 5, arXiv:2509.24166).

    history = lucidops.train.gradient_difference(peft_model, forget_ids, retain_ids, steps=100, lr=1e-3)

Each step descends the next-token cross-entropy on a retain batch and ascends it on a
forget batch: loss = CE(retain) - forget_weight * CE(forget). The history records, per
step, both losses and the norms of the MLP layers' LoRA parameters A, B and of their
gradients. For plain LoRA these grow without bound, and with them the update B A. Made
sine/tanh-bounded (:func:`lucidops.patch.peft_lora`), the update s f(omega B A) stays
bounded (|entries| <= s) even where A and B keep growing: the history's "weight_norm" is
the factors' norm, not the update's; ``lucidops.demos.unlearn.update_norms`` measures the
update (the unlearning demo records both).
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from ..patch.peft_lora import check_mlp_patterns, is_mlp_name
from .loop import TrainingMode


def _logits(output) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, (tuple, list)) and output:
        logits = output[0]
    if not isinstance(logits, Tensor):
        raise TypeError(f"model output must be a logits tensor or have .logits, got {type(output).__name__}")
    return logits


def sequence_loss(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean next-token cross-entropy of ``model`` on the token sequences ``ids`` (B, T)."""
    logits = _logits(model(ids))
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def _check_ids(ids, name: str) -> Tensor:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a LongTensor of token ids (N, T), got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() != 2:
        raise ValueError(f"{name} must be an integer tensor of shape (N, T), got {ids.dtype} {tuple(ids.shape)}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise ValueError(f"{name} needs at least one sequence of length >= 2, got shape {tuple(ids.shape)}")
    return ids.long()


def mlp_lora_parameters(model: nn.Module, mlp_patterns: Optional[Sequence[str]] = None, *,
                        trainable_only: bool = False) -> List[nn.Parameter]:
    """The LoRA parameters (names containing ``lora_``) of the model's MLP layers.

    With ``trainable_only``, only those with ``requires_grad``: the adapters being trained
    (what :func:`gradient_difference` tracks). A peft model keeps its inactive adapters'
    parameters, frozen, under the same layers; counted in, they made the unlearning
    history's norms measure adapters that never moved.
    """
    _validate.boolean(trainable_only, "trainable_only")
    check_mlp_patterns(mlp_patterns)
    return [p for n, p in model.named_parameters()
            if "lora_" in n and is_mlp_name(n.split(".lora_")[0], mlp_patterns)
            and (p.requires_grad or not trainable_only)]


def _norm(tensors: Iterable[Optional[Tensor]]) -> float:
    total = 0.0
    for t in tensors:
        if t is not None:
            total += float(t.detach().double().pow(2).sum())
    return math.sqrt(total)


def gradient_difference(model: nn.Module, forget: Tensor, retain: Tensor, *, steps: int, lr: float,
                        forget_weight: float = 1.0, batch_size: int = 8, optimizer: str = "adamw",
                        weight_decay: float = 0.0, mlp_patterns: Optional[Sequence[str]] = None,
                        progress: bool = True,
                        callback: Optional[Callable[[int, Dict[str, float]], None]] = None) -> Dict[str, List[float]]:
    """Gradient-difference unlearning: descent on ``retain``, ascent on ``forget``.

    Args:
        model: a causal LM returning logits (or an object with ``.logits``) for ids (B, T);
            only its parameters with ``requires_grad`` are trained (e.g. a peft model's LoRA).
        forget, retain: token ids (N, T) (lengths may differ between the two sets);
            batches of ``batch_size`` rows are taken in order, cycling.
        steps: number of optimizer steps (>= 1).
        lr: learning rate (> 0).
        forget_weight: weight of the ascent term (loss = CE(retain) - forget_weight CE(forget)).
        optimizer: "adamw" or "sgd".
        weight_decay: the optimizer's weight decay (0: the unbounded growth is not masked).
        mlp_patterns: regexes naming MLP layers (see :func:`lucidops.patch.peft_lora`).
        progress: show a tqdm progress bar.
        callback: called after every optimizer step as ``callback(step, record)`` with the
            step index and that step's four history values; the gradients of the step are
            still in ``p.grad`` then, so it can measure anything else on the model.
    Returns:
        dict of per-step lists: "forget_loss", "retain_loss" (before the step), "weight_norm"
        (after the step) and "grad_norm": the norms of the MLP layers' trainable LoRA
        parameters (the factors A and B themselves, which a bounded adapter does not bound;
        a peft model's inactive, frozen adapters are left out) and of their gradients. Every
        module's train/eval flag is restored afterwards.
    """
    from tqdm.auto import tqdm

    forget, retain = _check_ids(forget, "forget"), _check_ids(retain, "retain")
    _validate.integer(steps, "steps", minimum=1)
    _validate.integer(batch_size, "batch_size", minimum=1)
    _validate.real_number(lr, "lr", "> 0")
    _validate.real_number(forget_weight, "forget_weight")
    _validate.boolean(progress, "progress")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("model has no parameter with requires_grad=True to train")
    tracked = mlp_lora_parameters(model, mlp_patterns, trainable_only=True)
    if not tracked:
        raise ValueError("model has no trainable LoRA parameter in an MLP layer to track (names containing 'lora_' "
                         "under a module matching the MLP patterns, with requires_grad); pass mlp_patterns, or "
                         "activate the adapter to train")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable, got {type(callback).__name__}")
    opt: torch.optim.Optimizer
    if optimizer == "adamw":
        opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(trainable, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")

    device = trainable[0].device
    forget, retain = forget.to(device), retain.to(device)

    def batch(ids: Tensor, step: int) -> Tensor:
        idx = (torch.arange(batch_size) + step * batch_size) % ids.shape[0]
        return ids[idx.to(device)]

    history: Dict[str, List[float]] = {"forget_loss": [], "retain_loss": [], "weight_norm": [], "grad_norm": []}
    # Every module's flag is restored afterwards, not only the root's: model.train(was_training)
    # switched back on a dropout or BatchNorm the caller had put in eval mode.
    bar = tqdm(range(steps), desc="gradient difference", disable=not progress)
    try:
        with TrainingMode([model], train=True):
            for step in bar:
                opt.zero_grad(set_to_none=True)
                lf = sequence_loss(model, batch(forget, step))
                lr_ = sequence_loss(model, batch(retain, step))
                (lr_ - forget_weight * lf).backward()
                history["grad_norm"].append(_norm(p.grad for p in tracked))
                opt.step()
                history["forget_loss"].append(float(lf.detach()))
                history["retain_loss"].append(float(lr_.detach()))
                history["weight_norm"].append(_norm(tracked))
                if callback is not None:
                    callback(step, {key: values[-1] for key, values in history.items()})
                bar.set_postfix(forget=f"{history['forget_loss'][-1]:.3g}",
                                retain=f"{history['retain_loss'][-1]:.3g}", w=f"{history['weight_norm'][-1]:.3g}")
    finally:
        bar.close()
    return history
