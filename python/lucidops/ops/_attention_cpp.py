"""The ``cpp`` backend of ``lucidops.ops.attention``: lucidops' own CPU kernel.

csrc/cpu/attention.cpp puts the keys in vector lanes and four query rows in registers,
which suits small heads most (2x-3x SDPA at d = 8, where PyTorch's flash CPU kernel pays
for small GEMM calls) and measured as fast or faster up to d = 128 in float32 (the CPU
default rule is ops/attention.py's CPP_MAX_HEAD_DIM).
This module adapts it to the op's contract (lucidops.reference.attention): it runs half
inputs in float32 (the kernel takes float32 and float64, strided), makes out_lo for
bfloat16 from the float32 output as the reference does, and forms
delta = rowsum(dO (O + O_lo)) - dL/dlse for the backward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext
from ..reference import attention as _reference
from ..reference import attention_dropout as _dropout


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; the test first spares a dispatcher call when it already is (the
    op's per-call overhead is a visible part of batch-1 inference)."""
    return t if t.dtype == dtype else t.to(dtype)


def _dense(t: Tensor, compute: torch.dtype) -> Tensor:
    """``t`` in the compute dtype; the kernel reads any strides but needs a unit one along d
    (so views of a qkv projection go in without a copy)."""
    return _reference.unit_last_stride(_as(t, compute))


def _mask_arg(key_padding_mask: Optional[Tensor], device) -> Tensor:
    if key_padding_mask is None:
        return torch.empty(0, dtype=torch.bool, device=device)
    return key_padding_mask.contiguous()


def _empty_problem(q: Tensor, k: Tensor) -> bool:
    return q.numel() == 0 or k.shape[2] == 0


def _dropout_args(dropout_p: float, seed: Optional[Tensor]) -> Tuple[int, int, float]:
    """(seed, threshold, keep scale) as the kernel takes them; threshold 0 is no dropout."""
    drop = _dropout.parameters(dropout_p, seed)
    if drop is None:
        return 0, 0, 1.0
    return int(drop.seed) & 0xFFFFFFFF, drop.threshold, drop.keep_scale


def forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
            scale: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, out_lo) as lucidops.reference.attention.forward, through the C++ kernel."""
    compute = _reference.opmath_dtype(q.dtype)
    b, h, nq, d = q.shape
    if _empty_problem(q, k):
        out = q.new_zeros((b, h, nq, d))
        return out, q.new_full((b, h, nq), float("-inf"), dtype=compute), _reference.low_part(out.to(compute), out)
    out_acc, lse = _ext.load("cpu").attention_forward(_dense(q, compute), _dense(k, compute),
                                                      _dense(v, compute), _mask_arg(key_padding_mask, q.device),
                                                      causal, scale, *_dropout_args(dropout_p, seed))
    out = _as(out_acc, q.dtype)
    return out, lse, _reference.low_part(out_acc, out)


def backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             out_lo: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float,
             dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the dtypes of q, k, v, through the C++ kernel (P recomputed from q, k, lse)."""
    if _empty_problem(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    compute = _reference.opmath_dtype(q.dtype)
    grad_c = _dense(grad_out, compute)
    full_out = _as(out, compute)
    if out_lo.numel():
        full_out = full_out + out_lo.to(compute)
    delta = (grad_c * full_out).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(compute)
    dq, dk, dv = _ext.load("cpu").attention_backward(grad_c, _dense(q, compute), _dense(k, compute),
                                                     _dense(v, compute), _as(lse, compute).contiguous(),
                                                     delta.contiguous(), _mask_arg(key_padding_mask, q.device),
                                                     causal, scale, *_dropout_args(dropout_p, seed))
    return _as(dq, q.dtype), _as(dk, k.dtype), _as(dv, v.dtype)
