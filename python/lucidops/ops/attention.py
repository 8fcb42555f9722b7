"""Many-head attention (methods.md section 2) as a custom op.

    lucidops.ops.attention(q, k, v, *, causal=False, key_padding_mask=None, scale=None, dropout_p=0.0)

``torch.ops.lucidops.attention(q, k, v, key_padding_mask, causal, scale, dropout_p=0.0, seed=None)`` returns
(out, lse, out_lo): out (B, H, Nq, d) in q's dtype, lse (B, H, Nq) the natural-log
log-sum-exp of each query's visible scores (float32; float64 for float64 inputs; -inf
for a query that sees no key), and out_lo, for bfloat16 the rounding residual of out
(saved for an accurate backward, see lucidops.reference.attention; empty otherwise).
``torch.ops.lucidops.attention_backward(grad_out, grad_lse, q, k, v, out, out_lo, lse,
key_padding_mask, causal, scale, dropout_p=0.0, seed=None)`` returns (dq, dk, dv); out and lse
are differentiable (a loss may use the lse), out_lo is not. With dropout_p > 0, seed (an int64
scalar tensor) fixes the dropout mask, which each backend regenerates from it in forward and
backward (lucidops.reference.attention_dropout); aten, whose kernel draws its own mask, is
not used then.

Backends: ``cpp`` (the CPU default: lucidops' kernel, csrc/cpu/attention.cpp, adapted in
ops/_attention_cpp.py; for every dtype and head dim where the C++ extension is built for
AVX-512, for all but float32 heads of 64 and more with 1024 keys or more where it is built for
AVX2 or narrower, forwards of 8 queries or fewer excepted), ``aten`` (the fallback when the C++
extension cannot build, and first for those float32 calls on AVX2 builds: PyTorch's own fused
flash-attention CPU kernel, the one torch's SDPA runs, adapted to this contract in
ops/_attention_aten.py; not a lucidops kernel),
``reference`` (lucidops.reference.attention, the math) and ``triton`` (the default on CUDA;
under TRITON_INTERPRET=1 it also runs CPU tensors, slowly, for testing).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, Optional, Tuple, Union, overload

import torch
from torch import Tensor

from .. import _autocast, _validate, backends
from ..profile import flops as _flops
from ..reference import attention as _reference
from ..reference import attention_dropout as _dropout
from ..reference.attention import empty_token_major  # the op's output layout, shared with the triton backend
from . import _attention_aten, _attention_cpp, _eager, _functorch, _vmap

MIN_HEAD_DIM = 4
MAX_HEAD_DIM = 128
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _triton_forward(*args):
    from ..triton_kernels import attention as tk

    return tk.forward(*args)


def _triton_backward(*args):
    from ..triton_kernels import attention as tk

    return tk.backward(*args)


_NOTES = {
    "cpu": "cpp (the default, every dtype and head dim, where the extension is built for AVX-512; built for "
           "AVX2 or narrower, all but float32 heads of 64 and more with 1024 keys or more outside forwards of 8 "
           "queries or fewer; half types read and "
           "written as they are, computed in float32): lucidops' kernel, keys in vector lanes and four query rows "
           "(six in the AVX2 forward) in registers, scores straight from the keys' rows for 8 queries or fewer; in "
           "parallel over heads and 64-row tasks (forward) or, under "
           "16 heads, ranges of keys (backward). aten (the fallback without the C++ "
           "extension, and the default for float32 heads of 64 and more with 1024 keys or more on AVX2 builds, "
           "where it measured faster): PyTorch's own fused flash-attention CPU kernel (what torch's SDPA runs on "
           "the CPU), not a lucidops kernel; forward and backward, masks, empty rows, NaN rows and the lse "
           "gradient adapted to the op; not under dropout (its kernel draws its own mask). reference: the "
           "PyTorch math.",
    "cuda": "triton: fused online-softmax forward and (dk, dv) / dq backward, several heads per program for d <= 32; "
            "dropout regenerated in-kernel (a compiled variant).",
}
_PREFERENCE = {"cpu": ("cpp", "aten", "reference"), "cuda": ("triton", "reference")}
# On the CPU cpp comes first for every dtype and head dim where the extension is built for
# AVX-512: measured faster than aten in each (README, Measured results; bench/attention.py).
# Built for AVX2 (16 vector registers of 8 floats), cpp beats aten in float32 up to d = 32,
# in float64 and in the half types; in float32 from d = 64 on it is faster forward and about
# even forward+backward up to 512 keys, and behind with 1024 keys or more (2026-12-07, AMD
# EPYC Zen 3: README, Measured results): there aten comes first. (Earlier that day cpp lost
# from d = 16 on, with register tiles sized for AVX-512 alone, then from d = 64 on at every
# length, before its forward and backward went over chunks of keys.) Until 2026-12-06 aten
# was the default for float64 (cpp's exp was libm's, scalar) and bfloat16 heads over 64 (cpp
# converted half inputs to float32 in Python first). Since the backward's 32-row blocks
# (2026-12-07, evening) cpp is about even with aten at d = 64 and 1024 keys and ahead in
# forward+backward from 2048 keys, but aten's forward stays about 2% ahead and d = 96 and 128
# still favour aten, so the rule stands.
# The forward with few query rows (a class token's attention, a decoding step) stays with
# cpp: with at most _attention_cpp.direct_score_rows() (8) rows per head it forms the scores
# from the keys' rows, and measured faster than aten there (1 query, 1024 keys, d = 64:
# 277 against 426 us; 4 queries 457 against 633; 8 even; 16 aten ahead). Its backward, whose
# scores take the same path, keeps the rule: measured before they did, cpp and aten were even
# at d = 64 and aten ahead at d = 128 (1 query, 2048 keys: 5.97 against 7.60 ms).
_ATEN_FIRST_DTYPES_ON_NARROW_VECTORS = (torch.float32,)
_ATEN_FIRST_HEAD_DIM = 64
_ATEN_FIRST_KEYS = 1024


def _preference_for_call(keys_index: int, device_type: str, first: Tensor, *rest) -> Optional[Tuple[str, ...]]:
    """The order for one call where it differs from _PREFERENCE: on the CPU without aten under
    dropout (PyTorch's kernel draws its own mask, which lucidops' backward cannot regenerate),
    and aten first for float32 heads of 64 and more with 1024 keys or more where the C++
    extension is built without AVX-512 (but in a forward of few queries, at most
    _attention_cpp.direct_score_rows()); on a GPU, float64 to the reference. ``first`` is q (forward, keys_index 0) or
    grad_out (backward), ``rest[keys_index]`` is k; both ops end with (dropout_p, seed)."""
    if device_type != "cpu":
        # The triton kernels take half and single precision; float64 on the GPU is the
        # reference's (the README's promise), not a TypeError from the first choice.
        return ("reference",) if first.dtype == torch.float64 else None
    if rest[-2]:
        return ("cpp", "reference")
    if (first.dtype in _ATEN_FIRST_DTYPES_ON_NARROW_VECTORS and first.shape[-1] >= _ATEN_FIRST_HEAD_DIM
            and rest[keys_index].shape[-2] >= _ATEN_FIRST_KEYS and 0 < _attention_cpp.vector_bytes() < 64
            and not (keys_index == 0 and first.shape[-2] <= _attention_cpp.direct_score_rows())):
        return ("aten", "cpp", "reference")
    return None


backends.register_op("attention", {"reference": _reference.forward, "aten": _attention_aten.forward,
                                   "cpp": _attention_cpp.forward, "triton": _triton_forward},
                     preference=_PREFERENCE, notes=_NOTES,
                     preference_for_call=functools.partial(_preference_for_call, 0))  # (q, k, ...)
backends.register_op("attention_backward", {"reference": _reference.backward, "aten": _attention_aten.backward,
                                            "cpp": _attention_cpp.backward, "triton": _triton_backward},
                     preference=_PREFERENCE, notes=_NOTES,
                     preference_for_call=functools.partial(_preference_for_call, 2))  # (grad_out, grad_lse, q, k, ...)


def _token_major_strides(b: int, h: int, nq: int, d: int) -> Tuple[int, int, int, int]:
    """empty_token_major's strides, without allocating: torch's contiguous strides of
    (B, Nq, H, d) (empty dims count as 1), with H and Nq swapped."""
    head = max(d, 1)
    row = head * max(h, 1)
    return row * max(nq, 1), head, row, 1


def _token_major(out: Tensor) -> Tensor:
    """``out`` with exactly empty_token_major's strides (the fake kernel's), copied only if its
    memory order differs. A backend's contiguous (B, H, Nq, d) output with one head or one query
    (ATen's kernel gives that layout for a contiguous q) is already in that order: only the
    strides of its size-1 dims differ, so it is restrided, not copied."""
    wanted = _token_major_strides(*out.shape)
    strides = out.stride()
    if strides == wanted:
        return out
    if all(have == want for size, have, want in zip(out.shape, strides, wanted) if size > 1):
        return out.as_strided(out.shape, wanted)
    b, h, nq, d = out.shape
    return empty_token_major(b, h, nq, d, like=out).copy_(out)


def _padding_rows_that_take_no_part(t: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
    """``t`` (v, or k in the backward) with its padding keys' rows zeroed where they could
    matter. Every backend weighs a padding key by p = 0 (and ds = 0), and 0 * NaN (or inf) is
    NaN: a NaN in a padding value (padding left as torch.empty) reached every row of out and
    of dq, one in a padding key every row of dq. On the CPU the rows are zeroed only when t
    holds a value that is not finite (one sum); elsewhere always (a copy of t), as reading the
    sum would synchronise the device."""
    if key_padding_mask is None or t.numel() == 0:
        return t
    if t.device.type == "cpu" and bool(torch.isfinite(t.sum())):
        return t
    return t.masked_fill(~key_padding_mask[:, None, :, None], 0.0)


@_eager.custom_op("lucidops::attention")
def _attention_op(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
                  scale: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    v = _padding_rows_that_take_no_part(v, key_padding_mask)  # k's scores are masked: no need
    out, lse, out_lo = backends.dispatch("attention", q.device.type, q, k, v, key_padding_mask, causal, scale,
                                         dropout_p, seed)
    # One output layout whichever backend ran, so that it always matches the fake kernel's.
    return _token_major(out), lse.contiguous(), out_lo.contiguous()


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@_attention_op.register_fake
def _(q, k, v, key_padding_mask, causal, scale, dropout_p=0.0, seed=None):
    b, h, nq, d = q.shape
    out_lo = q.new_empty((b, h, nq, d) if q.dtype == torch.bfloat16 else (0,))
    return empty_token_major(b, h, nq, d, like=q), q.new_empty((b, h, nq), dtype=_lse_dtype(q.dtype)), out_lo


@_eager.custom_op("lucidops::attention_backward")
def _attention_backward_op(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor,
                           out: Tensor, out_lo: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor],
                           causal: bool, scale: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None
                           ) -> Tuple[Tensor, Tensor, Tensor]:
    v = _padding_rows_that_take_no_part(v, key_padding_mask)  # as the forward saw it
    k = _padding_rows_that_take_no_part(k, key_padding_mask)  # dq = ds k, with ds = 0 on padding keys
    grads = backends.dispatch("attention_backward", q.device.type, grad_out, grad_lse, q, k, v, out, out_lo, lse,
                              key_padding_mask, causal, scale, dropout_p, seed)
    # Contiguous, as the fake kernel promises (a backend's zeros_like of an empty problem keeps
    # a permuted q's strides, which torch.compile's stride check rejects); free when they are.
    return tuple(g.contiguous() for g in grads)


@_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, out_lo, lse, key_padding_mask, causal, scale, dropout_p=0.0, seed=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# vmap: every tensor has the batch dim B first, and every (batch, head) is computed on its own,
# so the vmapped dim folds into B. Not under dropout: the batch index is part of the mask's hash,
# so a fold would give each example another mask, where vmap's randomness="same" (one seed)
# wants the same one and "different" (a batched seed) one per seed; those run per example.
@_attention_op.register_vmap
def _(info, in_dims, q, k, v, key_padding_mask, causal, scale, dropout_p=0.0, seed=None):
    if dropout_p:
        return _vmap.per_example(_attention_op, info, in_dims, (q, k, v, key_padding_mask, causal, scale, dropout_p,
                                                                seed))
    n = info.batch_size
    folded = (_vmap.fold(t, d, n) for t, d in zip((q, k, v, key_padding_mask), in_dims))
    return _vmap.unfold_all(_attention_op(*folded, causal, scale, dropout_p, seed), n)


@_attention_backward_op.register_vmap
def _(info, in_dims, grad_out, grad_lse, q, k, v, out, out_lo, lse, key_padding_mask, causal, scale,
      dropout_p=0.0, seed=None):
    if dropout_p:
        args = (grad_out, grad_lse, q, k, v, out, out_lo, lse, key_padding_mask, causal, scale, dropout_p, seed)
        return _vmap.per_example(_attention_backward_op, info, in_dims, args)
    n = info.batch_size
    if out_lo.numel() == 0:  # no bfloat16 low part: the (0,) marker, whatever its batching
        out_lo, in_dims = out_lo.new_empty(0), in_dims[:6] + (None,) + in_dims[7:]
    tensors = (grad_out, grad_lse, q, k, v, out, out_lo, lse, key_padding_mask)
    folded = (_vmap.fold(t, d, n) for t, d in zip(tensors, in_dims))  # the (0,) marker folds to (0,)
    return _vmap.unfold_all(_attention_backward_op(*folded, causal, scale, dropout_p, seed), n)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, causal, scale, dropout_p, seed = inputs
    out, lse, out_lo = output
    ctx.save_for_backward(q, k, v, out, out_lo, lse, key_padding_mask, seed)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p
    # An unused lse then arrives as None rather than zeros: no pass over it in backward.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse, _grad_out_lo):
    q, k, v, out, out_lo, lse, key_padding_mask, seed = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attention_backward(grad_out, grad_lse, q, k, v, out, out_lo, lse, key_padding_mask,
                                     ctx.causal, ctx.scale, ctx.dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None


_attention = _functorch.differentiable(_attention_op, _backward, _setup_context)
_attention_backward = _functorch.first_order_only(_attention_backward_op)


def visible_pairs(nq: int, nk: int, causal: bool) -> int:
    """Number of (query, key) pairs scored: all, or j <= i (top-left) when causal."""
    if not causal:
        return nq * nk
    full = max(0, min(nq, nk))  # rows i < nk see i + 1 keys, later rows see all nk
    return full * (full + 1) // 2 + max(0, nq - nk) * nk


def forward_flops(q_shape, k_shape, v_shape, mask_shape, causal, scale, *_, **__) -> int:
    """QK^T and PV: 2 matmuls of 2 flops per multiply-add over the visible pairs (a key
    padding mask is data, not shape, so it is not discounted)."""
    b, h, nq, d = q_shape
    return 4 * b * h * visible_pairs(nq, k_shape[2], bool(causal)) * d


def backward_flops(grad_shape, grad_lse_shape, q_shape, k_shape, v_shape, out_shape, out_lo_shape, lse_shape,
                   mask_shape, causal, scale, *_, **__) -> int:
    """QK^T recomputed, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q: 5 matmuls."""
    b, h, nq, d = q_shape
    return 10 * b * h * visible_pairs(nq, k_shape[2], bool(causal)) * d


# All of the forward is the two matrix products: fvcore counts each multiply-add once.
_flops.register(torch.ops.lucidops.attention, forward_flops, macs=lambda *a, **k: forward_flops(*a, **k) // 2)
_flops.register(torch.ops.lucidops.attention_backward, backward_flops)


def _check(q: Tensor, k: Tensor, v: Tensor, causal, key_padding_mask, scale) -> float:
    """Validate every argument (each error names it); return the scale as a float."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.floating_tensor(t, name)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (batch, heads, tokens, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        _validate.same_device(t, q, name, "q")
    b, h, _, d = q.shape
    if k.shape[0] != b or k.shape[1] != h or k.shape[3] != d:
        raise ValueError(f"k must be (B={b}, H={h}, Nk, d={d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q's head dim (last size) must be in {MIN_HEAD_DIM}..{MAX_HEAD_DIM}, got {d}")
    _validate.boolean(causal, "causal")
    if key_padding_mask is not None:
        _validate.tensor(key_padding_mask, "key_padding_mask")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = key takes part), "
                            f"got dtype {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (b, k.shape[2]):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = {(b, k.shape[2])}, "
                             f"got {tuple(key_padding_mask.shape)}")
        _validate.same_device(key_padding_mask, q, "key_padding_mask", "q")
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, Tensor):
        raise TypeError("scale must be a Python number, got a tensor")
    return _validate.real_number(scale, "scale")


# Overloads so that type checkers know the result's type from return_lse.
@overload
def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = ..., key_padding_mask: Optional[Tensor] = ...,
              scale: Optional[float] = ..., dropout_p: float = ..., return_lse: Literal[False] = ...) -> Tensor: ...


@overload
def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = ..., key_padding_mask: Optional[Tensor] = ...,
              scale: Optional[float] = ..., dropout_p: float = ..., return_lse: Literal[True]) -> Tuple[Tensor, Tensor]:
    ...


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, key_padding_mask: Optional[Tensor] = None,
              scale: Optional[float] = None, dropout_p: float = 0.0, return_lse: bool = False
              ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Scaled dot-product attention for any head count and head dims 4..128.

    Args:
        q: (B, H, Nq, d) queries; float16, bfloat16, float32 or float64 (half inputs
            accumulate in float32). Any strides (a unit stride on d avoids a copy).
        k, v: (B, H, Nk, d) keys and values, q's dtype and device; Nk may differ from Nq.
        causal: key j is visible to query i only when j <= i (SDPA's top-left alignment).
        key_padding_mask: optional bool (B, Nk), True for keys that take part.
        scale: score multiplier, default 1 / sqrt(d).
        dropout_p: attention dropout in [0, 1), applied whenever it is > 0 (as SDPA's; pass
            0 in eval mode). Fused: the mask is never stored, every backend regenerates the
            same one from a seed drawn from q's device's default generator
            (lucidops.reference.attention_dropout), so ``torch.manual_seed`` repeats it.
        return_lse: also return the log-sum-exp (B, H, Nq) of each row's scores (the
            softmax's, before dropout).
    Returns:
        out (B, H, Nq, d) in q's dtype (and lse). A query that sees no key gets zeros,
        lse = -inf and zero gradient.
    """
    q, k, v = _autocast.lower_precision(q, k, v)  # as autocast treats SDPA
    scale_value = _check(q, k, v, causal, key_padding_mask, scale)
    _validate.boolean(return_lse, "return_lse")  # a truthy "no" returned a tuple
    dropout_value = _validate.probability(dropout_p, "dropout_p")
    seed = _dropout.draw_seed(q.device) if dropout_value else None
    out, lse, _ = _attention(q, k, v, key_padding_mask, causal, scale_value, dropout_value, seed)
    return (out, lse) if return_lse else out
