"""Attention dropout as a counter-based hash: the rule every attention backend implements.

A fused kernel cannot store the (B, H, Nq, Nk) dropout mask (that is the memory fusion
saves), so forward and backward regenerate it from (seed, head, query, key). Every
backend (this reference, csrc/cpu/attention.cpp, triton_kernels/attention.py) computes
the same 32-bit hash with wrapping unsigned arithmetic, so for one seed they drop exactly
the same probabilities and their outputs agree to rounding:

    fmix(h)  = murmur3's 32-bit finaliser: h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13;
               h *= 0xC2B2AE35; h ^= h >> 16
    head_key = fmix(seed ^ fmix(bh * 0x9E3779B9 + 0x7F4A7C15))     bh = b * H + h
    row_key  = fmix(head_key ^ fmix(i * 0x9E3779B9 + 0x2545F491))   i: query index
    u        = fmix(row_key ^ (j * 0x85EBCA77)) >> 8                 j: key index, u in [0, 2^24)
    kept     = u >= threshold,   threshold = min(round(dropout_p * 2^24), 2^24 - 1)

The query index is hashed before it meets the head's key: added to it (as first written),
two heads whose keys differ by a multiple d of 0x9E3779B9 shared their masks row for row,
row i of one being row i + d of the other (about one layer call in nine of a ViT-B batch).
A kept probability is multiplied by 2^24 / (2^24 - threshold), the inverse of the exact
keep rate, so the output's expectation over seeds is the output without dropout; the
threshold keeps at least one level, so a dropout_p within 2^-25 of 1 stays unbiased instead
of dropping everything. The log-sum-exp is the softmax's, before dropout. The seed is a
32-bit value held in an int64 tensor, drawn per call from the default generator of q's device
(``draw_seed``), so ``torch.manual_seed`` makes runs repeatable.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

KEEP_BITS = 24
_LEVELS = 1 << KEEP_BITS
_MASK32 = 0xFFFFFFFF
FMIX_1, FMIX_2 = 0x85EBCA6B, 0xC2B2AE35
GOLDEN, HEAD_OFFSET, ROW_OFFSET, KEY_MULT = 0x9E3779B9, 0x7F4A7C15, 0x2545F491, 0x85EBCA77


def threshold(dropout_p: float) -> int:
    """The integer cut: a hash u in [0, 2^24) keeps its probability when u >= threshold (at
    least one of the 2^24 levels is kept)."""
    return min(int(round(float(dropout_p) * _LEVELS)), _LEVELS - 1)


def keep_scale(dropout_p: float) -> float:
    """What a kept probability is multiplied by: the inverse of the exact keep rate."""
    return _LEVELS / (_LEVELS - threshold(dropout_p))


class Parameters(NamedTuple):
    """What a backend needs to drop by this rule."""

    seed: Tensor
    threshold: int
    keep_scale: float


def parameters(dropout_p: float, seed: Optional[Tensor]) -> Optional[Parameters]:
    """None without dropout, else the seed (required) and the cut and scale for ``dropout_p``:
    the one place the backends read them from."""
    if not dropout_p:
        return None
    if seed is None:
        raise ValueError("attention dropout needs a seed tensor (dropout_p > 0)")
    return Parameters(seed, threshold(dropout_p), keep_scale(dropout_p))


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


def head_keys(seed: Tensor, bh: Tensor) -> Tensor:
    """The key of each (batch * H + head) index ``bh`` (int64 tensor) for ``seed``."""
    s = seed.to(torch.int64) & _MASK32
    return _fmix(s ^ _fmix((bh * GOLDEN + HEAD_OFFSET) & _MASK32))


def row_keys(head_key: Tensor, i: Tensor) -> Tensor:
    """The key of query row ``i`` (int64 tensor) under ``head_key``."""
    return _fmix(head_key ^ _fmix((i * GOLDEN + ROW_OFFSET) & _MASK32))


def keep_mask(seed: Tensor, batch: int, heads: int, nq: int, nk: int, dropout_p: float) -> Tensor:
    """Bool (B, H, Nq, Nk): True where the probability of query i for key j is kept."""
    device = seed.device
    bh = torch.arange(batch * heads, dtype=torch.int64, device=device).view(batch, heads, 1, 1)
    i = torch.arange(nq, dtype=torch.int64, device=device).view(1, 1, nq, 1)
    row_key = row_keys(head_keys(seed, bh), i)
    j = torch.arange(nk, dtype=torch.int64, device=device).view(1, 1, 1, nk)
    u = _fmix(row_key ^ ((j * KEY_MULT) & _MASK32)) >> (32 - KEEP_BITS)
    return u >= threshold(dropout_p)


def multiplier(seed: Optional[Tensor], q: Tensor, nk: int, dropout_p: float, dtype: torch.dtype) -> Optional[Tensor]:
    """(B, H, Nq, Nk) in ``dtype``: keep_scale where kept, 0 where dropped; None without dropout."""
    drop = parameters(dropout_p, seed)
    if drop is None:
        return None
    b, h, nq, _ = q.shape
    kept = keep_mask(drop.seed, b, h, nq, nk, dropout_p)
    return kept.to(dtype) * drop.keep_scale
