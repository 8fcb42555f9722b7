"""Reference scaled dot-product attention (methods.md section 2), in plain PyTorch.

Layout as torch's SDPA: q (B, H, Nq, d), k and v (B, H, Nk, d). With scores
s_ij = scale * q_i . k_j restricted to the keys query i may see (``key_padding_mask``
True, and j <= i when ``causal``: SDPA's top-left alignment),

    lse_i = log sum_j exp(s_ij)        out_i = sum_j exp(s_ij - lse_i) v_j

A query that sees no key gets out_i = 0, lse_i = -inf and zero gradient (never NaN).
The backward takes dL/dout and dL/dlse: with P the probabilities and
delta_i = sum_c dout_ic out_ic - dlse_i,
    dv = P^T dout,  dS = P * (dout v^T - delta),  dq = scale dS k,  dk = scale dS^T q.
Computed in float32 for half inputs, in float64 for float64 inputs.

bfloat16 keeps 8 mantissa bits: a delta from the rounded output is off by ~2^-9 |out|,
and dS = P (dP - delta) cancels, so gradients would be off by ~1%. The forward therefore
also returns ``out_lo = bf16(out_fp32 - bf16(out_fp32))`` for bfloat16 (empty otherwise),
and the backward uses out + out_lo (~16 bits) for delta.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .._dtypes import opmath_dtype  # noqa: F401  (callers also read it here)

from . import attention_dropout as _dropout


def unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dim has unit stride (what the fused CPU kernels need: a
    model's views of one qkv projection qualify), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def empty_token_major(b: int, h: int, nq: int, d: int, *, like: Tensor, dtype: Optional[torch.dtype] = None
                      ) -> Tensor:
    """An uninitialised (B, H, Nq, d) tensor laid out as (B, Nq, H, d) in memory: the layout of
    the op's output, as SDPA's. A model's ``out.transpose(1, 2).reshape(B, Nq, H * d)`` is then
    a view, not a copy, so the projection after attention saves the same storage as the op
    (measured: the copy made a patched ViT-S save 6% more for backward)."""
    return torch.empty((b, nq, h, d), dtype=dtype or like.dtype, device=like.device).transpose(1, 2)


def visible(nq: int, nk: int, causal: bool, key_padding_mask: Optional[Tensor], device) -> Optional[Tensor]:
    """Bool mask broadcastable to (B, H, Nq, Nk): True where query i may see key j (None: all)."""
    mask = None
    if causal:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=device).tril()  # j <= i
    if key_padding_mask is not None:
        kpm = key_padding_mask.to(device=device, dtype=torch.bool)[:, None, None, :]
        mask = kpm if mask is None else (mask & kpm)
    return mask


def _probabilities(q, k, causal, key_padding_mask, scale) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    mask = visible(q.shape[-2], k.shape[-2], causal, key_padding_mask, q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # Rows without a visible key: take the log-sum-exp of zeros instead (finite, so that
    # neither the value nor autograd through it meets -inf - -inf), then report -inf.
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    safe_lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1)
    p = torch.exp(s - safe_lse[..., None])  # exactly 0 where s = -inf
    lse = safe_lse.masked_fill(empty.squeeze(-1), float("-inf"))
    return p, lse, mask


def low_part(out_acc: Tensor, out: Tensor) -> Tensor:
    """bf16 rounding residual of a bfloat16 output (an empty tensor for other dtypes)."""
    if out.dtype != torch.bfloat16:
        return out.new_empty((0,))
    return (out_acc - out.to(out_acc.dtype)).to(torch.bfloat16)


def forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
            scale: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(out in q's dtype, lse in the compute precision (float32, float64 for float64 q), out_lo).
    With ``dropout_p`` > 0 the probabilities are dropped by lucidops.reference.attention_dropout's
    rule for ``seed``; lse stays the softmax's."""
    compute = opmath_dtype(q.dtype)
    p, lse, _ = _probabilities(q.to(compute), k.to(compute), causal, key_padding_mask, scale)
    kept = _dropout.multiplier(seed, q, k.shape[-2], dropout_p, compute)
    if kept is not None:
        p = p * kept
    out_acc = torch.matmul(p, v.to(compute))
    out = out_acc.to(q.dtype)
    return out, lse, low_part(out_acc, out)


def backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             out_lo: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float,
             dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the dtypes of q, k, v. Recomputes P from q, k (lse is not trusted).
    With dropout (Z the kept multiplier): dv = (P Z)^T dout, dS = P * (Z dout v^T - delta);
    delta = rowsum(dout out) - dlse still holds, as out already contains Z."""
    compute = opmath_dtype(q.dtype)
    q64, k64, v64, do, o = (t.to(compute) for t in (q, k, v, grad_out, out))
    if out_lo.numel():
        o = o + out_lo.to(compute)
    p, _, _ = _probabilities(q64, k64, causal, key_padding_mask, scale)
    delta = (do * o).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute)
    dp = torch.matmul(do, v64.transpose(-1, -2))
    kept = _dropout.multiplier(seed, q, k.shape[-2], dropout_p, compute)
    if kept is None:
        dv = torch.matmul(p.transpose(-1, -2), do)
    else:
        dv = torch.matmul((p * kept).transpose(-1, -2), do)
        dp = dp * kept
    ds = p * (dp - delta[..., None])
    dq = torch.matmul(ds, k64) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q64) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tensor:
    """Plain, differentiable attention (autograd through PyTorch ops), output in q's dtype.

    Fully-masked rows give zeros with zero gradient. ``dropout_p`` > 0 needs ``seed`` (see
    lucidops.reference.attention_dropout).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    compute = opmath_dtype(q.dtype)
    p, _, _ = _probabilities(q.to(compute), k.to(compute), causal, key_padding_mask, scale)
    kept = _dropout.multiplier(seed, q, k.shape[-2], dropout_p, compute)
    if kept is not None:
        p = p * kept
    return torch.matmul(p, v.to(compute)).to(q.dtype)
