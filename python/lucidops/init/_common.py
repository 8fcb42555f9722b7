"""Helpers shared by the initialisers: finding timm-style attention layers."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn


def attention_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, module) of every timm-style attention: a fused ``qkv`` Linear (D -> 3 H d_h),
    a ``proj`` Linear (H d_h -> D) and ints ``num_heads`` and ``head_dim``."""
    found = []
    for name, m in model.named_modules():
        qkv, proj = getattr(m, "qkv", None), getattr(m, "proj", None)
        heads, head_dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
        if (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)
                and isinstance(head_dim, int) and qkv.out_features == 3 * heads * head_dim
                and proj.in_features == heads * head_dim):
            found.append((name, m))
    return found


def require_attention(model: nn.Module, who: str) -> List[Tuple[str, nn.Module]]:
    """The attention layers ``who`` initialises: timm's ViT ``Attention`` or lucidops'
    ``ManyHeadAttention``. A look-alike (EVA-02's ``EvaAttention``: separate q/v biases the
    init would leave as they were, rotary embeddings that move its head offsets) is refused,
    before any change, as ``ManyHeadAttention.from_timm`` and the condition numbers refuse it."""
    from ..patch.timm_vit import is_vit_attention

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"model has no timm-style attention (fused qkv + proj Linear, num_heads, head_dim) "
                         f"for {who} to initialise")
    others = [(name, m) for name, m in layers if not is_vit_attention(m)]
    if others:
        shown = ", ".join(f"{name!r} ({type(m).__name__})" for name, m in others[:4]) + (" ..." if len(others) > 4
                                                                                        else "")
        raise ValueError(f"{who} takes only timm's ViT Attention and lucidops' ManyHeadAttention, whose every "
                         f"parameter it sets; {shown} only look like them (another class may add what it would not "
                         "set, as EVA-02's separate biases and rotary embeddings): nothing was changed")
    return layers


def rank_split(a: Tensor, rank: int) -> Tuple[Tensor, Tensor]:
    """Best rank-``rank`` factorisation a ~ L R^T via the SVD: L = U_r sqrt(S_r), R = V_r sqrt(S_r)."""
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, vh[:rank].T * root


def uniform(shape, bound: float, generator, dtype=torch.float64) -> Tensor:
    return (torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1) * bound


def cpu_generator(generator: Optional[torch.Generator]) -> None:
    """The initialisers draw on the CPU: refuse anything but None or a CPU generator up front."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (the weights are drawn on the CPU), got one on "
                         f"{generator.device}")
