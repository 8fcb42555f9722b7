"""The ``cpp`` backend of ``lucidops.ops.attention``: lucidops' own CPU kernel.

csrc/cpu/attention.cpp puts the keys in vector lanes and four query rows in registers,
which suits small heads most (2x-4x SDPA at d = 8, where PyTorch's flash CPU kernel pays
for small GEMM calls). Built for AVX-512 it measured faster than PyTorch's kernel up to
d = 128 in every dtype, so it is the CPU default there; built for AVX2 it is the default for
all but float32 heads of 64 and more with 1024 keys or more, and for forwards of 8 queries or
fewer, whose scores it forms from the keys' rows (ops/attention.py).
This module adapts it to the op's contract (lucidops.reference.attention). The kernel reads
and writes every dtype as it is (half types computed in float32, converted row by row as it
loads them), returns out_lo for bfloat16 itself and forms the backward's
delta = rowsum(dO (O + O_lo)) - dL/dlse row by row.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext
from ..reference import attention as _reference
from ..reference import attention_dropout as _dropout


_vector_bytes: Optional[int] = None
_direct_score_rows: Optional[int] = None


def vector_bytes(load: bool = True) -> int:
    """Bytes per vector register the C++ kernels were compiled for (64 with AVX-512, 32 with
    AVX2; 0 when the extension is unavailable): the op's CPU default depends on it. With
    ``load`` False, 0 unless the extension is already imported (a first load may build it,
    which takes a minute)."""
    global _vector_bytes, _direct_score_rows
    if _vector_bytes is None:
        if _ext.status("cpu") is not None or not (load or _ext.is_loaded("cpu")):
            return 0
        module = _ext.load("cpu")
        _vector_bytes, _direct_score_rows = int(module.VECTOR_BYTES), int(module.ATTENTION_DIRECT_SCORE_ROWS)
    return _vector_bytes


def direct_score_rows() -> int:
    """Query rows per head up to which the kernel forms scores from the keys' rows, with no
    transposed K (csrc/lucidops.h, kAttentionDirectScoreRows). Read with vector_bytes, which
    the op's CPU default asks first, so an extension disabled since is not loaded again."""
    global _direct_score_rows
    if _direct_score_rows is None:
        _direct_score_rows = int(_ext.load("cpu").ATTENTION_DIRECT_SCORE_ROWS)
    return _direct_score_rows


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` in ``dtype``; the test first spares a dispatcher call when it already is (the
    op's per-call overhead is a visible part of batch-1 inference)."""
    return t if t.dtype == dtype else t.to(dtype)


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
    """(out, lse, out_lo) as lucidops.reference.attention.forward, through the C++ kernel, which
    reads any strides with a unit one along d (so views of a qkv projection go in without a copy)."""
    if _empty_problem(q, k):
        b, h, nq, d = q.shape
        out = q.new_zeros((b, h, nq, d))
        compute = _reference.opmath_dtype(q.dtype)
        return out, q.new_full((b, h, nq), float("-inf"), dtype=compute), _reference.low_part(out.to(compute), out)
    dense = _reference.unit_last_stride
    return _ext.load("cpu").attention_forward(dense(q), dense(k), dense(v), _mask_arg(key_padding_mask, q.device),
                                              causal, scale, *_dropout_args(dropout_p, seed))


def backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             out_lo: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float,
             dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) in the dtype of q (that of k and v), through the C++ kernel (P recomputed
    from q, k, lse; delta = rowsum(dO (O + O_lo)) - dL/dlse formed there, row by row)."""
    if _empty_problem(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    compute = _reference.opmath_dtype(q.dtype)
    dense = _reference.unit_last_stride
    lse_grad = q.new_empty((0,), dtype=compute) if grad_lse is None else _as(grad_lse, compute).contiguous()
    return _ext.load("cpu").attention_backward(dense(_as(grad_out, q.dtype)), dense(q), dense(k), dense(v),
                                               dense(_as(out, q.dtype)), _as(out_lo, q.dtype).contiguous(),
                                               _as(lse, compute).contiguous(), lse_grad,
                                               _mask_arg(key_padding_mask, q.device), causal, scale,
                                               *_dropout_args(dropout_p, seed))
