"""The ``aten`` backend of ``lucidops.ops.attention``: PyTorch's own fused CPU kernel.

Not a lucidops kernel: forward and backward call ATen's flash-attention CPU kernels
(``aten::_scaled_dot_product_flash_attention_for_cpu`` and its ``_backward``, the ones
``F.scaled_dot_product_attention`` uses on the CPU), and this module adapts them to the
op's contract (see lucidops.reference.attention for the math):

- key_padding_mask (bool, True = key takes part) becomes a float additive mask
  (B, 1, 1, Nk) of 0 / -inf; the kernel accepts no bool mask. An all-True mask is
  dropped (it cannot change the result).
- A query that sees no key: the kernel gives out = 0 but lse = 0; the op reports
  lse = -inf. The backward hands the kernel lse = 0 for those rows again, so that
  P = exp(-inf - 0) = 0 there and their gradients are exactly zero (never NaN).
- dL/dlse: the kernel's backward has no lse gradient input. With
  delta_i = sum_c dout_ic out_ic - dlse_i, dS = P * (dout v^T - delta). Padding q and k
  with a zero column (scores unchanged), v with a ones column, out with a zero column
  and dout with dlse as column d + 1 gives dP' = dP + dlse and delta' = delta_out,
  so dS' = P * (dP - delta_out + dlse) = dS exactly; the extra columns are dropped.
- The kernels read garbage when the head dim is not unit-stride, and crash on
  Nq = 0: such inputs are made unit-stride, and empty sizes are answered here
  (zeros, lse = -inf) without calling the kernel.
- Causal is top-left (j <= i) as in the reference, also for Nq != Nk.
- A scale <= 0 with causal masking gave NaN: the kernel appears to scale its masked -inf
  scores too (-inf times a negative scale is +inf, times 0 NaN; torch's own SDPA does the
  same). Such a scale is applied to q beforehand and the kernel gets scale 1 (dq scaled back).

Every dtype the op accepts runs (fp16 / bf16 with fp32 accumulation, fp32, fp64). For
bfloat16 the kernel's own fp32 output is not returned, so ``out_lo`` (the rounding
residual the reference keeps) is zeros and the backward's delta uses the rounded
output, as SDPA's does (gradient error ~3e-3 relative, within bf16 tolerance).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..backends import BackendUnavailable
from ..reference.attention import unit_last_stride

_forward_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_backward_kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _additive_mask(key_padding_mask: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """(B, 1, 1, Nk) of 0 / -inf in the accumulation dtype, or None when every key takes part."""
    if key_padding_mask is None or bool(key_padding_mask.all()):
        return None
    mask_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    zeros = torch.zeros(key_padding_mask.shape, dtype=mask_dtype, device=key_padding_mask.device)
    return zeros.masked_fill(~key_padding_mask, float("-inf"))[:, None, None, :]


def empty_rows(key_padding_mask: Optional[Tensor], nq: int, nk: int, causal: bool) -> Optional[Tensor]:
    """Bool (B, 1, Nq), True for queries that see no key; None when every query sees one."""
    if key_padding_mask is None:
        return None
    b = key_padding_mask.shape[0]
    # First valid key per batch element (nk when there is none); under top-left causal
    # masking query i sees key j only for j <= i.
    any_valid = key_padding_mask.any(dim=1)
    first = torch.where(any_valid, key_padding_mask.to(torch.uint8).argmax(dim=1),
                        torch.full((b,), nk, device=key_padding_mask.device))
    rows = torch.arange(nq, device=key_padding_mask.device)
    empty = ~any_valid[:, None].expand(b, nq)
    if causal:
        empty = empty | (first[:, None] > rows[None, :])
    return empty[:, None, :]


def _may_hold_nan(t: Tensor) -> bool:
    """False when ``t`` certainly holds no NaN. A NaN anywhere makes the sum NaN; so can
    +inf + -inf, a false alarm that the exact test after it clears. The sum is one fast
    pass (0.05 ms against 1.9 ms for isnan().any() on a (1, 12, 1024, 128) bfloat16 tensor,
    2-core Xeon), so the common, clean call pays little."""
    return bool(t.sum().isnan())


def nan_score_rows(q: Tensor, k: Tensor, key_padding_mask: Optional[Tensor], causal: bool) -> Tensor:
    """Bool (B, H, Nq), True for queries that see a key but only NaN scores (a NaN query, or
    NaN in every key they see). Exact, a few passes: run it where _may_hold_nan said q or k may.

    PyTorch's CPU kernel takes the row max by comparisons that NaN loses, so such a row
    comes back as zeros with a finite lse: a diverged query that looks healthy. The
    reference (and the cpp and triton kernels) give NaN there. A row with some NaN scores
    and some finite ones already comes back NaN.
    """
    q_nan = q.isnan().any(dim=-1)  # (B, H, Nq)
    k_nan = k.isnan().any(dim=-1)  # (B, H, Nk)
    b, h, nq = q_nan.shape
    nk = k_nan.shape[-1]
    finite_key = ~k_nan if key_padding_mask is None else ~k_nan & key_padding_mask[:, None, :]
    has_finite = finite_key.any(dim=-1, keepdim=True)  # (B, H, 1)
    if causal:  # top-left: query i sees keys j <= i, so it needs the first finite key at or before i
        first = torch.where(has_finite[..., 0], finite_key.to(torch.uint8).argmax(dim=-1),
                            torch.full((b, h), nq, device=q.device))  # none: past every query
        has_finite = first[..., None] <= torch.arange(nq, device=q.device)
    nan_scores = q_nan | ~has_finite
    no_key = empty_rows(key_padding_mask, nq, nk, causal)  # (B, 1, Nq): these stay zero rows
    return nan_scores if no_key is None else nan_scores & ~no_key


def _without_non_finite_padding_keys(k: Tensor, key_padding_mask: Optional[Tensor], mask: Optional[Tensor]
                                     ) -> Tensor:
    """``k`` with its padding keys zeroed when one holds NaN or inf, else ``k`` itself (run it
    where k's sum is not finite). The kernel adds the -inf mask to the scores, and NaN + -inf
    or inf + -inf is NaN: a NaN or inf in a padding key (padding left as torch.empty) reached
    every row, forward and backward. It takes no part."""
    if key_padding_mask is None or mask is None or bool(torch.isfinite(k).all()):
        return k
    return k.masked_fill(~key_padding_mask[:, None, :, None], 0.0)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_scale(q: Tensor, scale: float) -> Tuple[Tensor, float]:
    """(q, scale) for the kernel: a positive scale as it is; one <= 0 folded into q (module docstring)."""
    return (q, scale) if scale > 0 else (q * scale, 1.0)


def _no_dropout(dropout_p: float) -> None:
    """ATen's kernel draws its own dropout mask, which no lucidops backward can regenerate:
    the op never picks aten under dropout, and forcing it says so."""
    if dropout_p:
        raise BackendUnavailable("the aten attention backend (PyTorch's flash CPU kernel) does not run lucidops' "
                                 "attention dropout; use the cpp or reference backend")


def forward(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor], causal: bool,
            scale: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, lse, out_lo) as lucidops.reference.attention.forward, through ATen's CPU kernel."""
    _no_dropout(dropout_p)
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out_lo = q.new_zeros((b, h, nq, d)) if q.dtype == torch.bfloat16 else q.new_empty((0,))
    if q.numel() == 0 or nk == 0:  # nothing to attend (the kernel crashes on Nq = 0)
        return q.new_zeros((b, h, nq, d)), q.new_full((b, h, nq), float("-inf"), dtype=_lse_dtype(q.dtype)), out_lo
    mask = _additive_mask(key_padding_mask, q.dtype)
    q, kernel_scale = _kernel_scale(q, scale)  # before the screen: inf * a zero scale is NaN
    k_sum = k.sum()  # one pass over k for both screens
    q_may_hold_nan, k_may_hold_nan = _may_hold_nan(q), bool(k_sum.isnan())
    if mask is not None and not bool(k_sum.isfinite()):
        k = _without_non_finite_padding_keys(k, key_padding_mask, mask)
    out, lse = _forward_kernel(unit_last_stride(q), unit_last_stride(k), unit_last_stride(v), 0.0, causal,
                               attn_mask=mask, scale=kernel_scale)
    # The kernel returns lse in (B, Nq, H) memory order: one pass makes it contiguous and
    # marks rows without a key (each extra pass is another OpenMP region).
    lse_out = torch.empty((b, h, nq), dtype=lse.dtype, device=lse.device)
    if mask is None:
        lse_out.copy_(lse)
    else:
        no_key = empty_rows(key_padding_mask, nq, nk, causal)
        assert no_key is not None  # a mask comes only from a key_padding_mask
        torch.where(no_key, lse.new_full((), float("-inf")), lse, out=lse_out)
    if q_may_hold_nan or k_may_hold_nan:  # in place: out keeps the kernel's memory layout
        poisoned = nan_score_rows(q, k, key_padding_mask, causal)
        out.masked_fill_(poisoned[..., None], float("nan"))
        lse_out.masked_fill_(poisoned, float("nan"))
    # out follows q's memory order (torch 2.14): token-major, the op's layout, for a model's views
    # of one qkv projection; for a contiguous q contiguous, which the op copies (restrides with
    # one head or one query).
    return out, lse_out, out_lo


def backward(grad_out: Tensor, grad_lse: Optional[Tensor], q: Tensor, k: Tensor, v: Tensor, out: Tensor,
             out_lo: Tensor, lse: Tensor, key_padding_mask: Optional[Tensor], causal: bool, scale: float,
             dropout_p: float = 0.0, seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) through ATen's CPU flash backward; dL/dlse by the padded-column identity."""
    _no_dropout(dropout_p)
    nk = k.shape[2]
    if q.numel() == 0 or nk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    mask = _additive_mask(key_padding_mask, q.dtype)
    # The kernel recomputes P = exp(s - lse): rows that see no key need a finite lse
    # (their scores are all -inf, so any finite value gives P = 0).
    kernel_lse = lse.masked_fill(torch.isneginf(lse), 0.0) if mask is not None else lse
    # Non-finite padding keys and values arrive zeroed (ops.attention's backward does it for
    # every backend), so dk and dv stay finite as in the forward.
    q, kernel_scale = _kernel_scale(q, scale)
    q, k, v, out, grad_out = (unit_last_stride(t) for t in (q, k, v, out, grad_out))
    if grad_lse is not None and bool(grad_lse.any()):
        d = q.shape[-1]

        def pad(t: Tensor, column: Tensor) -> Tensor:
            return torch.cat([t, column.to(t.dtype).expand(*t.shape[:-1], 1)], dim=-1)

        zero, one = q.new_zeros(()), q.new_ones(())
        dq, dk, dv = _backward_kernel(pad(grad_out, grad_lse[..., None]), pad(q, zero), pad(k, zero), pad(v, one),
                                      pad(out, zero), kernel_lse, 0.0, causal, attn_mask=mask, scale=kernel_scale)
        dq, dk, dv = dq[..., :d], dk[..., :d], dv[..., :d]
    else:
        dq, dk, dv = _backward_kernel(grad_out, q, k, v, out, kernel_lse, 0.0, causal, attn_mask=mask,
                                      scale=kernel_scale)
    if kernel_scale != scale:  # the kernel differentiated with respect to scale * q
        dq = dq * scale
    # The kernel returns (B, N, H, d) memory order; the op's fake kernel promises contiguous.
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
