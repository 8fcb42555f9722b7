"""Structured (impulse) initialisation of ViT attention (methods.md section 7).

Gives attention a convolution's inductive bias through initialisation only. Head i of
every block is assigned an offset of a k x k kernel, ordered centre, then ring by ring,
cross before corners (for k = 3: centre, up, left, right, down, then the four corners);
with more heads than taps the order repeats. With P = LayerNorm(position embedding of
the patch tokens) (N x D), P+ its pseudo-inverse truncated to rank d (head dim) and
T_i the shift matrix of the offset over the patch grid (T_i[p, p + offset] = 1),

    A_i = P+ T_i P+^T  (D x D, rank <= d),   A_i = W_Q^i W_K^i^T  by the SVD,

with W_Q^i, W_K^i each Frobenius-normalised and scaled by ``qk_scale``, so that the
position part of each head's initial attention logits, P W_Q W_K^T P^T, is a projected
shift that peaks at the head's offset. V and proj come from
A = v_alpha U(+-sqrt(3/D)) - v_beta I split the same way (rank = attention width).

Open choice, the truncation of P+: methods.md reads "rank-d" (d = head dim), but with a
random (timm default) position embedding the projected shift of a rank-d P+ peaks at
the offset for only ~40-50% of interior queries once d/N is small (measured: d = 32,
N = 196; d = 16, N = 64). The default keeps every singular value of P above
``pinv_rcond`` times the largest (at least d of them), which peaks correctly for
97-100% of interior queries over the shapes tried; ``pinv_rank=head_dim`` gives the
literal reading.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate
from ._common import cpu_generator, rank_split, require_attention, uniform


def kernel_offsets(kernel_size: int) -> List[Tuple[int, int]]:
    """(dy, dx) taps of a kernel_size x kernel_size kernel in head order: centre, then ring
    by ring (Chebyshev distance), within a ring by Manhattan distance (cross before
    corners), then row-major."""
    kernel_size = _validate.integer(kernel_size, "kernel_size", minimum=1)  # a float or bool: TypeError
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    r = kernel_size // 2
    taps = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1)]
    return sorted(taps, key=lambda t: (max(abs(t[0]), abs(t[1])), abs(t[0]) + abs(t[1]), t))


def shift_matrix(grid: Tuple[int, int], offset: Tuple[int, int], dtype=torch.float64) -> torch.Tensor:
    """(N x N) matrix with T[p, q] = 1 where patch q = patch p + offset inside the grid."""
    gh, gw = grid
    dy, dx = offset
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ty, tx = ys + dy, xs + dx
    inside = ((ty >= 0) & (ty < gh) & (tx >= 0) & (tx < gw)).flatten()
    src = torch.arange(gh * gw)[inside]
    dst = (ty * gw + tx).flatten()[inside]
    t = torch.zeros(gh * gw, gh * gw, dtype=dtype)
    t[src, dst] = 1.0
    return t


def _patch_positions(model: nn.Module) -> Tuple[torch.Tensor, Tuple[int, int]]:
    pos = getattr(model, "pos_embed", None)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3 or grid is None:
        raise ValueError("model must be a timm ViT with a learned pos_embed (1, tokens, D) and "
                         "patch_embed.grid_size for impulse_")
    gh, gw = int(grid[0]), int(grid[1])
    n = gh * gw
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 0))
    if pos.shape[1] != prefix + n:
        raise ValueError(f"model.pos_embed has {pos.shape[1]} tokens; expected {prefix} prefix + {n} patches")
    return pos[0, prefix:].detach().double(), (gh, gw)


@torch.no_grad()
def impulse_(model: nn.Module, kernel_size: int = 3, qk_scale: float = 7.0, v_alpha: float = 0.4,
             v_beta: float = 0.4, pos_scale: Optional[float] = None, pinv_rcond: float = 0.2,
             pinv_rank: Optional[int] = None, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Impulse-initialise the attention of every block of a timm ViT in place.

    Args:
        model: a timm VisionTransformer (``pos_embed``, ``patch_embed.grid_size``,
            blocks whose attention is timm's ViT ``Attention`` or lucidops'
            ``ManyHeadAttention``; a look-alike of another class, such as EVA-02's, is refused).
        kernel_size: odd size of the conv kernel whose taps the heads imitate.
        qk_scale: Frobenius norm given to each head's W_Q and W_K.
        v_alpha, v_beta: V/proj from A = v_alpha U(+-sqrt(3/D)) - v_beta I.
        pos_scale: if given, multiply ``model.pos_embed`` by it first, so positions
            dominate patch content in the first block's input (the paper's "scaled
            position embedding"); P is LayerNorm-ed, so the scale does not change A_i.
        pinv_rcond: keep singular values of P above pinv_rcond * max in P+ (at least
            head_dim of them); ignored when ``pinv_rank`` is given.
        pinv_rank: fixed rank for P+ (e.g. the head dim, the literal reading).
        generator: optional CPU ``torch.Generator`` for the random part of V/proj (the weights
            are computed on the CPU in float64 and copied to the model's device and dtype).

    Each block uses its own ``norm1`` for the LayerNorm of P (identity affine at init).
    Biases of qkv and proj are zeroed. Returns ``model``.
    """
    layers = require_attention(model, "impulse_")
    offsets = kernel_offsets(kernel_size)
    qk_scale = _validate.real_number(qk_scale, "qk_scale", "> 0")
    v_alpha, v_beta = _validate.real_number(v_alpha, "v_alpha"), _validate.real_number(v_beta, "v_beta")
    pinv_rcond = _validate.real_number(pinv_rcond, "pinv_rcond", "> 0")
    if pinv_rank is not None:
        _validate.integer(pinv_rank, "pinv_rank", minimum=1)
    pos, grid = _patch_positions(model)  # validates the model before anything is changed
    if pos.device.type == "meta":
        raise ValueError("impulse_ computes the attention from pos_embed's values, which a model on the meta device "
                         "does not have: initialise it on a real device")
    cpu_generator(generator)
    for name, attn in layers:  # every layer checked before the first is changed (pos_embed too)
        if pos.shape[1] != cast(nn.Linear, attn.qkv).in_features:
            raise ValueError(f"model.pos_embed width {pos.shape[1]} differs from the attention width "
                             f"{cast(nn.Linear, attn.qkv).in_features} of {name!r}")
        hd, dim = cast(int, attn.head_dim), cast(nn.Linear, attn.qkv).in_features
        if hd > dim:  # failed in rank_split after pos_embed was already scaled
            raise ValueError(f"head_dim ({hd}) of {name!r} must be <= the model width ({dim}) for a rank-head_dim "
                             "split")
    # The same position in every token (all zeros, say) leaves nothing to attend by: every
    # W_Q and W_K came out zero, uniform attention, silently.
    centred = pos.double() - pos.double().mean(dim=1, keepdim=True)  # what each block's LayerNorm sees
    if int(torch.linalg.matrix_rank(centred)) < 2:
        raise ValueError("model.pos_embed holds (nearly) the same position for every patch: impulse_ builds the "
                         "attention from the position embeddings, so they must differ (initialise them first)")
    if pos_scale is not None:
        pos_scale = _validate.real_number(pos_scale, "pos_scale", "> 0")
        cast(torch.Tensor, model.pos_embed).mul_(pos_scale)  # a timm ViT's pos_embed (checked just above)
        pos, grid = _patch_positions(model)
    pos = pos.cpu()  # everything below is computed on the CPU in float64, then copied to the model
    norms = {id(m.attn): getattr(m, "norm1", None) for m in model.modules() if hasattr(m, "attn")}
    shifts = {}
    for _, attn in layers:
        # attention_layers only returns modules whose qkv/proj are Linear and heads/head_dim ints
        qkv, proj = cast(nn.Linear, attn.qkv), cast(nn.Linear, attn.proj)
        dim, heads, hd = qkv.in_features, cast(int, attn.num_heads), cast(int, attn.head_dim)
        inner = heads * hd
        norm = norms.get(id(attn))
        if isinstance(norm, nn.LayerNorm):
            p = F.layer_norm(pos, norm.normalized_shape,
                             norm.weight.double().cpu() if norm.weight is not None else None,
                             norm.bias.double().cpu() if norm.bias is not None else None, norm.eps)
        else:
            p = F.layer_norm(pos, (dim,), eps=1e-6)
        u, s, vh = torch.linalg.svd(p, full_matrices=False)
        numerical_rank = int((s > s[0] * 1e-10).sum())
        r = pinv_rank if pinv_rank is not None else max(hd, int((s > pinv_rcond * s[0]).sum()))
        r = min(r, numerical_rank)
        p_plus = (vh[:r].T / s[:r]) @ u[:, :r].T  # (D, N) truncated pseudo-inverse
        wq = torch.zeros(inner, dim, dtype=torch.float64)
        wk = torch.zeros(inner, dim, dtype=torch.float64)
        for h in range(heads):
            offset = offsets[h % len(offsets)]
            if offset not in shifts:
                shifts[offset] = shift_matrix(grid, offset)
            left, right = rank_split(p_plus @ shifts[offset] @ p_plus.T, hd)
            left = left * (qk_scale / left.norm().clamp_min(1e-30))
            right = right * (qk_scale / right.norm().clamp_min(1e-30))
            wq[h * hd:(h + 1) * hd] = left.T
            wk[h * hd:(h + 1) * hd] = right.T
        a = v_alpha * uniform((dim, dim), math.sqrt(3.0 / dim), generator) - v_beta * torch.eye(dim, dtype=torch.float64)
        w_v, w_o = rank_split(a, min(inner, dim))
        if inner > dim:  # pad: the extra value channels start at zero
            w_v = torch.cat([w_v, w_v.new_zeros(dim, inner - dim)], 1)
            w_o = torch.cat([w_o, w_o.new_zeros(dim, inner - dim)], 1)
        qkv.weight.copy_(torch.cat([wq, wk, w_v.T], 0).to(qkv.weight))
        proj.weight.copy_(w_o.to(proj.weight))  # x @ W_V @ W_O with W_O = w_o.T, so proj.weight = w_o
        if qkv.bias is not None:
            qkv.bias.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    return model
