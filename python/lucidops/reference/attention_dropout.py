"""Attention dropout as a counter-based hash: the rule every attention backend implements.

A fused kernel cannot store the (B, H, Nq, Nk) dropout mask (that is the memory fusion
saves), so forward and backward regenerate it from (seed, head, query, key). Every
backend (this reference, csrc/cpu/attention.cpp, triton_kernels/attention.py) computes
the same 32-bit hash with wrapping unsigned arithmetic, so for one seed they drop exactly
the same probabilities and their outputs agree to rounding:

    fmix(h)  = murmur3's 32-bit finaliser: h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13;
               h *= 0xC2B2AE35; h ^= h >> 16
    head_key = fmix(seed ^ fmix(bh * 0x9E3779B9 + 0x7F4A7C15))     bh = b * H + h
    row_key  = fmix(head_key + i * 0x9E3779B9)                       i: query index
    u        = fmix(row_key ^ (j * 0x85EBCA77)) >> 8                 j: key index, u in [0, 2^24)
    kept     = u >= threshold,   threshold = round(dropout_p * 2^24)

A kept probability is multiplied by 2^24 / (2^24 - threshold), the inverse of the exact
keep rate, so the output's expectation over seeds is the output without dropout
(dropout_p = 1 drops everything: the output is zeros). The log-sum-exp is the softmax's,
before dropout. The seed is a 32-bit value held in an int64 tensor, drawn per call from
the default generator of q's device (``draw_seed``), so ``torch.manual_seed`` makes runs
repeatable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

KEEP_BITS = 24
_LEVELS = 1 << KEEP_BITS
_MASK32 = 0xFFFFFFFF
FMIX_1, FMIX_2 = 0x85EBCA6B, 0xC2B2AE35
GOLDEN, HEAD_OFFSET, KEY_MULT = 0x9E3779B9, 0x7F4A7C15, 0x85EBCA77


def threshold(dropout_p: float) -> int:
    """The integer cut: a hash u in [0, 2^24) keeps its probability when u >= threshold."""
    return int(round(float(dropout_p) * _LEVELS))


def keep_scale(dropout_p: float) -> float:
    """What a kept probability is multiplied by: the inverse of the exact keep rate (0 when none is kept)."""
    kept = _LEVELS - threshold(dropout_p)
    return _LEVELS / kept if kept else 0.0


def draw_seed(device: torch.device) -> Tensor:
    """A fresh 32-bit seed, an int64 scalar on ``device``, from that device's default generator."""
    return torch.randint(0, 1 << 32, (), dtype=torch.int64, device=device)


def _fmix(h: Tensor) -> Tensor:
    """murmur3's finaliser on int64 tensors holding uint32 values (products wrap mod 2^64,
    whose low 32 bits are the uint32 product's)."""
    h = h ^ (h >> 16)
    h = (h * FMIX_1) & _MASK32
    h = h ^ (h >> 13)
    h = (h * FMIX_2) & _MASK32
    return h ^ (h >> 16)


def keep_mask(seed: Tensor, batch: int, heads: int, nq: int, nk: int, dropout_p: float) -> Tensor:
    """Bool (B, H, Nq, Nk): True where the probability of query i for key j is kept."""
    device = seed.device
    s = seed.to(torch.int64) & _MASK32
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    head_key = _fmix(s ^ _fmix((bh * GOLDEN + HEAD_OFFSET) & _MASK32))
    i = torch.arange(nq, dtype=torch.int64, device=device).view(1, 1, nq, 1)
    row_key = _fmix((head_key + i * GOLDEN) & _MASK32)
    j = torch.arange(nk, dtype=torch.int64, device=device).view(1, 1, 1, nk)
    u = _fmix(row_key ^ ((j * KEY_MULT) & _MASK32)) >> (32 - KEEP_BITS)
    return u >= threshold(dropout_p)


def multiplier(seed: Optional[Tensor], q: Tensor, nk: int, dropout_p: float, dtype: torch.dtype) -> Optional[Tensor]:
    """(B, H, Nq, Nk) in ``dtype``: keep_scale where kept, 0 where dropped; None without dropout."""
    if not dropout_p:
        return None
    if seed is None:
        raise ValueError("attention dropout needs a seed tensor (dropout_p > 0)")
    b, h, nq, _ = q.shape
    kept = keep_mask(seed, b, h, nq, nk, dropout_p)
    return kept.to(dtype) * keep_scale(dropout_p)
