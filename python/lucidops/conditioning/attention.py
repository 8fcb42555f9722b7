"""Condition numbers of attention blocks (methods.md section 2, arXiv:2505.20802).

For a self-attention layer with heads A_i = softmax(Q_i K_i^T / sqrt(d)) V_i (N x d),
the attention block is A = [A_1 ... A_h] (N x D). Its condition number
kappa(A) = sigma_max(A) / sigma_min(A) (over the min(N, D) singular values) is what the
paper relates to the head count. Computed in float64 per batch element, from the
layer's actual input, for timm ViT ``Attention`` and lucidops ``ManyHeadAttention``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, cast

import torch
from torch import Tensor, nn

from .tokens import condition_number


@dataclass
class LayerConditioning:
    """kappa of one layer's attention block: ``block`` (B,), ``heads`` (B, H)."""

    name: str
    block: Tensor
    heads: Tensor




def _looks_like_attention(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("qkv", "num_heads", "head_dim"))


def _in_float64(norm: nn.Module, t: Tensor) -> Tensor:
    """Apply a (q/k) norm with float64 copies of its parameters, leaving the module as is."""
    if isinstance(norm, nn.Identity):
        return t
    state = {k: v.detach().double() if v.is_floating_point() else v for k, v in norm.state_dict().items()}
    return torch.func.functional_call(norm, state, (t,))


def head_outputs(module: nn.Module, x: Tensor) -> Tensor:
    """The per-head attention outputs A_i of ``module`` on input x (B, N, C), float64,
    shape (B, H, N, d), from the module's own projections and norms (no dropout)."""
    b, n, _ = x.shape
    # ``module`` is duck-typed (timm Attention or ManyHeadAttention, see patch.timm_vit.is_vit_attention)
    h, d = cast(int, module.num_heads), cast(int, module.head_dim)
    qkv_proj = cast(nn.Linear, module.qkv)
    x64 = x.detach().double()
    w = qkv_proj.weight.detach().double()
    bias = qkv_proj.bias.detach().double() if qkv_proj.bias is not None else None
    qkv = nn.functional.linear(x64, w, bias).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q = _in_float64(cast(nn.Module, module.q_norm), q)
    k = _in_float64(cast(nn.Module, module.k_norm), k)
    scale = float(getattr(module, "scale", d ** -0.5))
    p = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return p @ v


@torch.no_grad()
def attention_condition_numbers(model: nn.Module, x: Tensor) -> List[LayerConditioning]:
    """Per attention layer (in forward order) and head, kappa of the attention block on x.

    Runs ``model(x)`` once with forward pre-hooks that capture each attention layer's
    input; returns one :class:`LayerConditioning` per layer: ``block`` = kappa([A_1..A_h])
    per batch element, ``heads`` = kappa(A_i) per batch element and head.
    """
    from ..patch.timm_vit import is_vit_attention  # here: lucidops.nn imports this package, patch imports nn

    captured = []
    hooks = []
    for name, module in model.named_modules():
        if is_vit_attention(module):
            hooks.append(module.register_forward_pre_hook(
                lambda mod, args, kwargs, _name=name: captured.append((_name, mod, args, kwargs)), with_kwargs=True))
    if not hooks:
        others = sorted({type(m).__name__ for m in model.modules() if _looks_like_attention(m)})
        raise ValueError("model has no timm ViT Attention or lucidops ManyHeadAttention module"
                         + (f"; its {', '.join(others)} (rotary embeddings, separate biases, ...) are not supported"
                            if others else ""))
    # Each module's own mode comes back, not the root's: train() is recursive, and a model in
    # train mode often keeps a frozen part (BatchNorm, a backbone) in eval.
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        model(x)
    finally:
        for m, training in modes:
            m.training = training
        for hook in hooks:
            hook.remove()
    results = []
    for name, module, args, kwargs in captured:
        # The block is modelled unmasked: a mask (timm passes attn_mask, e.g. NaFlexViT's
        # padding) would make the diagnostic that of another function, silently.
        mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
        if mask is not None or kwargs.get("is_causal", args[2] if len(args) > 2 else False):
            raise ValueError(f"attention_condition_numbers models unmasked, non-causal attention, but layer {name!r} "
                             "was called with an attention mask or is_causal (e.g. padded tokens): its kappa would be "
                             "of another function")
        heads = head_outputs(module, args[0])  # (B, H, N, d)
        b, h, n, d = heads.shape
        block = heads.permute(0, 2, 1, 3).reshape(b, n, h * d)
        results.append(LayerConditioning(name, condition_number(block), condition_number(heads)))
    return results
