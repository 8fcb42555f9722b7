"""Fused attention for any head count and head dims 4..128 (methods.md section 2).

Forward: FlashAttention-style online softmax over key blocks, keeping the log-sum-exp
(natural log, float32) for the backward. Backward: one kernel for (dk, dv) looping
over query blocks, one for dq looping over key blocks (no atomics, deterministic);
delta_i = sum_c dout_ic out_ic - dlse_i is a cheap PyTorch reduction beforehand.

Small heads: the head dim is padded (with masks) to D_PAD = max(16, next power of two),
and one program holds G heads of the same batch element as a 3-D block (G, rows, D_PAD);
every ``tl.dot`` is a batched (G, M, K) x (G, K, N) product with M, N, K >= 16, so tensor
cores are fed even at d = 4, and G heads share one program's scheduling overhead.

Attention dropout regenerates its mask in every kernel from (seed, head, query, key) with
lucidops.reference.attention_dropout's hash, a few integer operations per score. DROPOUT is a
compile-time flag: a runtime branch left its code in every kernel, and the ahead-of-time
check found the fp32 d = 128 backward on sm_80 spilling 4.4 KB per thread (0.6 KB before).

Conventions (those of lucidops.reference.attention): top-left causal alignment (key j
is visible to query i iff j <= i, as SDPA's ``is_causal``), key padding mask True =
take part, a query row with no visible key gives out = 0, lse = -inf, zero gradients.
Inputs: strided (B, H, N, d) tensors (q, k, v, dout) with unit stride on d. The forward
stores out as (B, H, Nq, d) laid out (B, Nq, H, d), SDPA's order and the op's contract, so
merging heads back into tokens is a view; dq, dk, dv are contiguous.
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..reference import attention_dropout as _dropout
from ..reference.attention import empty_token_major, unit_last_stride

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# D_PAD -> (max heads per program, BLOCK_M, BLOCK_N, num_warps), forward and backward.
# G * BLOCK_M * BLOCK_N stays <= 4096 fp32 scores per program (registers). A batched dot
# puts the warps on the head dim first, so G > 1 is a multiple of num_warps: with fewer
# heads than warps, several warps would compute the same head's tile (the ahead-of-time
# check showed 2x the MMA instructions per warp at G = 2 with 4 warps).
FORWARD_CONFIGS: Dict[int, Tuple[int, int, int, int]] = {
    16: (4, 32, 32, 4), 32: (4, 32, 32, 4), 64: (1, 64, 64, 4), 128: (1, 64, 32, 4)}
BACKWARD_CONFIGS: Dict[int, Tuple[int, int, int, int]] = {
    16: (4, 32, 32, 4), 32: (4, 32, 32, 4), 64: (1, 32, 32, 4), 128: (1, 32, 32, 4)}
DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def padded_head_dim(d: int) -> int:
    return max(16, 1 << (int(d) - 1).bit_length())


def _config(table, d: int, heads: int) -> Tuple[int, int, int, int, int]:
    """(D_PAD, G, BLOCK_M, BLOCK_N, num_warps): G heads per program, or 1 head when there
    are fewer than G (two choices per D_PAD keep the ahead-of-time set small)."""
    d_pad = padded_head_dim(d)
    g_max, bm, bn, warps = table[d_pad]
    return d_pad, (g_max if heads >= g_max else 1), bm, bn, warps


def _precision(dtype: torch.dtype) -> str:
    # float32: three tf32 tensor-core products (hi*hi + hi*lo + lo*hi, error ~2^-22 of each
    # product), so fp32 tolerances hold. "ieee" multiplies on the FMA units, and with the
    # operands held per thread it compiled to 2-11 KB of local memory per thread at d >= 64.
    return "tf32x3" if dtype == torch.float32 else "tf32"


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """Batched (G, M, K) x (G, K, N) product accumulated in float32.

    UPCAST is set only under TRITON_INTERPRET for bfloat16: the interpreter stores bf16 as
    raw uint16 and its tl.dot multiplies those integers. bf16 x bf16 products are exact in
    float32, so the upcast changes nothing but the interpreter's bug; GPUs never take it.
    """
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    precision: tl.constexpr = "ieee" if UPCAST else PRECISION
    if a.shape[0] == 1:
        # One head: a 2-D product. A batched dot spreads the warps over the batch dim, so
        # with G = 1 every warp would compute the whole tile (4x the work and registers).
        c = tl.dot(tl.reshape(a, (a.shape[1], a.shape[2])), tl.reshape(b, (b.shape[1], b.shape[2])),
                   input_precision=precision)
        c = tl.reshape(c, (1, a.shape[1], b.shape[2]))
    else:
        c = tl.dot(a, b, input_precision=precision)
    return c


@triton.jit
def _dot_ds(ds, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """dS (float32) times b (the input dtype). For bfloat16, dS = P (dP - delta) is a
    cancelling difference and 8 mantissa bits lose ~1% of the gradient: split it into a
    high and a low bf16 part (two products, ~16 bits). fp16 keeps 11 bits: one product."""
    hi = ds.to(b.dtype)
    c = _dot(hi, b, PRECISION, UPCAST)
    if b.dtype == tl.bfloat16:
        c += _dot((ds - hi.to(tl.float32)).to(b.dtype), b, PRECISION, UPCAST)
    return c


@triton.jit
def _head_group(pid_bh, H, G: tl.constexpr):
    """A program's batch index and its G packed heads, as (G, 1, 1) int64 ids and an in-range mask.

    Packing G heads per program keeps every tl.dot at least 16 wide when d is small."""
    groups = tl.cdiv(H, G)
    heads = (pid_bh % groups) * G + tl.arange(0, G)
    return pid_bh // groups, heads[:, None, None].to(tl.int64), (heads < H)[:, None, None]


@triton.jit
def _visible(rows, cols, b, MASK, NQ, NK, has_mask, causal):
    """(1, len(rows), len(cols)) bool: key col visible to query row (rows/cols absolute)."""
    ok = (rows[None, :, None] < NQ) & (cols[None, None, :] < NK)
    if has_mask:  # runtime flags (uniform branches): 4x fewer compiled variants
        keep = tl.load(MASK + b.to(tl.int64) * NK + cols, mask=cols < NK, other=0)
        ok = ok & (keep != 0)[None, None, :]
    if causal:
        ok = ok & (cols[None, None, :] <= rows[None, :, None])
    return ok


@triton.jit
def _fmix32(h):
    """murmur3's 32-bit finaliser on uint32 tensors (the literals above 2^31 are uint32)."""
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _dropout_scale(SEED, bh, rows, cols, drop_threshold, keep_scale):
    """(G, len(rows), len(cols)) float32: keep_scale where query row keeps key col's probability,
    0 where it is dropped: lucidops.reference.attention_dropout's hash, bit for bit. bh is the
    (G, 1, 1) absolute (batch * H + head) index."""
    seed = tl.load(SEED).to(tl.uint32)
    head_key = _fmix32(seed ^ _fmix32(bh.to(tl.uint32) * 0x9E3779B9 + 0x7F4A7C15))
    row_key = _fmix32(head_key ^ _fmix32(rows[None, :, None].to(tl.uint32) * 0x9E3779B9 + 0x2545F491))
    u = _fmix32(row_key ^ (cols[None, None, :].to(tl.uint32) * 0x85EBCA77)) >> 8
    return tl.where(u >= drop_threshold, keep_scale, 0.0)


@triton.jit
def attention_forward_kernel(
    Q, K, V, MASK, SEED, O, O_LO, LSE,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    H, NQ, NK, HEAD_DIM, qk_scale, first_batch, drop_threshold, keep_scale,
    has_mask, causal, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
    STORE_LO: tl.constexpr, DROPOUT: tl.constexpr = False, UPCAST: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h3, h_ok = _head_group(pid_bh, H, G)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b.to(tl.int64) * sqb + h3 * sqh + rows[None, :, None].to(tl.int64) * sqn + offs_d[None, None, :]
    q = tl.load(q_ptrs, mask=h_ok & (rows[None, :, None] < NQ) & d_ok[None, None, :], other=0.0)

    m_i = tl.full((G, BLOCK_M), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((G, BLOCK_M), dtype=tl.float32)
    acc = tl.zeros((G, BLOCK_M, D_PAD), dtype=tl.float32)
    hi = NK
    if causal:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)  # later keys are invisible to every row here
    k_base = K + b.to(tl.int64) * skb + h3 * skh
    v_base = V + b.to(tl.int64) * svb + h3 * svh
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        c_ok = cols < NK
        kt = tl.load(k_base + cols[None, None, :].to(tl.int64) * skn + offs_d[None, :, None],
                     mask=h_ok & d_ok[None, :, None] & c_ok[None, None, :], other=0.0)  # (G, D_PAD, BLOCK_N)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale  # log2 domain
        s = tl.where(_visible(rows, cols, b, MASK, NQ, NK, has_mask, causal), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        # A row that has seen no visible key yet keeps m = -inf; use 0 so exp2 gives 0, not NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, :, None])
        l_i = l_i * alpha + tl.sum(p, 2)
        if DROPOUT:  # after the sum: the softmax normalises over every visible key
            p = p * _dropout_scale(SEED, (first_batch + b).to(tl.int64) * H + h3, rows, cols, drop_threshold,
                                   keep_scale)
        v = tl.load(v_base + cols[None, :, None].to(tl.int64) * svn + offs_d[None, None, :],
                    mask=h_ok & c_ok[None, :, None] & d_ok[None, None, :], other=0.0)  # (G, BLOCK_N, D_PAD)
        acc = acc * alpha[:, :, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, :, None]  # rows without a visible key: acc = 0, so 0
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    row_ids = (b.to(tl.int64) * H + h3) * NQ + rows[None, :, None]  # (G, BLOCK_M, 1)
    r_ok = h_ok & (rows[None, :, None] < NQ)
    out_low = out.to(O.dtype.element_ty)
    o_ptrs = O + b.to(tl.int64) * sob + h3 * soh + rows[None, :, None].to(tl.int64) * son + offs_d[None, None, :]
    tl.store(o_ptrs, out_low, mask=r_ok & d_ok[None, None, :])
    if STORE_LO:  # bfloat16: keep the rounding residual, for an accurate delta in the backward
        tl.store(O_LO + row_ids * HEAD_DIM + offs_d[None, None, :],
                 (out - out_low.to(tl.float32)).to(O_LO.dtype.element_ty), mask=r_ok & d_ok[None, None, :])
    tl.store(LSE + tl.reshape(row_ids, (G, BLOCK_M)), lse, mask=tl.reshape(r_ok, (G, BLOCK_M)))


@triton.jit
def _load_lse2(LSE, row_ids, ok):
    """log2-domain lse; +inf for rows without a visible key (and padding), so exp2(s - lse2) = 0.

    The backward recomputes each probability as exp2(s - lse2) from a score rounded apart from
    the forward's and an lse rounded at its own magnitude: with scores of 1e8 (float32 q, k of
    1e4) the exponent was off by up to 32, so a probability came back as 2^32, and dv as inf,
    dq and dk as NaN (bfloat16). A probability is at most 1, and the backward keeps it there."""
    lse = tl.load(LSE + row_ids, mask=ok, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def attention_backward_dkdv_kernel(
    Q, K, V, MASK, SEED, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, NQ, NK, HEAD_DIM, qk_scale, scale, first_batch, drop_threshold, keep_scale,
    has_mask, causal, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr = False, UPCAST: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h3, h_ok = _head_group(pid_bh, H, G)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    kv_ok = h_ok & (cols[None, :, None] < NK) & d_ok[None, None, :]
    c3 = cols[None, :, None].to(tl.int64)
    k = tl.load(K + b.to(tl.int64) * skb + h3 * skh + c3 * skn + offs_d[None, None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * svb + h3 * svh + c3 * svn + offs_d[None, None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros((G, BLOCK_N, D_PAD), dtype=tl.float32)
    dv = tl.zeros((G, BLOCK_N, D_PAD), dtype=tl.float32)
    lo = 0
    if causal:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M  # earlier queries see none of these keys
    q_base = Q + b.to(tl.int64) * sqb + h3 * sqh
    do_base = DO + b.to(tl.int64) * sdb + h3 * sdh
    row_base = (b.to(tl.int64) * H + h3) * NQ  # (G, 1, 1) into the contiguous LSE / DELTA
    for start_m in range(lo, NQ, BLOCK_M):
        rows = start_m + offs_m
        r_ok = h_ok & (rows[None, None, :] < NQ)  # (G, 1, BLOCK_M)
        qt = tl.load(q_base + rows[None, None, :].to(tl.int64) * sqn + offs_d[None, :, None],
                     mask=r_ok & d_ok[None, :, None], other=0.0)  # (G, D_PAD, BLOCK_M)
        st = _dot(k, qt, PRECISION, UPCAST) * qk_scale  # (G, BLOCK_N, BLOCK_M)
        row_ids = row_base + rows[None, None, :]  # (G, 1, BLOCK_M)
        lse2 = _load_lse2(LSE, row_ids, r_ok)
        vis = tl.permute(_visible(rows, cols, b, MASK, NQ, NK, has_mask, causal), (0, 2, 1))
        pt = tl.where(vis, tl.minimum(tl.exp2(st - lse2), 1.0), 0.0)  # see _load_lse2 for the 1
        do = tl.load(do_base + rows[None, None, :].to(tl.int64) * sdn + offs_d[None, :, None],
                     mask=r_ok & d_ok[None, :, None], other=0.0)  # (G, D_PAD, BLOCK_M): dout transposed
        kept_pt = pt
        if DROPOUT:  # dV takes P Z, dS = P (Z dP - delta)
            zt = tl.permute(_dropout_scale(SEED, (first_batch + b).to(tl.int64) * H + h3, rows, cols,
                                           drop_threshold, keep_scale), (0, 2, 1))
            kept_pt = pt * zt
        dv += _dot(kept_pt.to(do.dtype), tl.permute(do, (0, 2, 1)), PRECISION, UPCAST)
        dpt = _dot(v, do, PRECISION, UPCAST)  # (G, BLOCK_N, BLOCK_M)
        if DROPOUT:
            dpt = dpt * zt
        delta = tl.load(DELTA + row_ids, mask=r_ok, other=0.0)
        dst = pt * (dpt - delta)
        dk += _dot_ds(dst, tl.permute(qt, (0, 2, 1)), PRECISION, UPCAST)
    out_ids = ((b.to(tl.int64) * H + h3) * NK + c3) * HEAD_DIM + offs_d[None, None, :]
    tl.store(DK + out_ids, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out_ids, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def attention_backward_dq_kernel(
    Q, K, V, MASK, SEED, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn,
    H, NQ, NK, HEAD_DIM, qk_scale, scale, first_batch, drop_threshold, keep_scale,
    has_mask, causal, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, PRECISION: tl.constexpr,
    DROPOUT: tl.constexpr = False, UPCAST: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h3, h_ok = _head_group(pid_bh, H, G)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < HEAD_DIM
    r_ok = h_ok & (rows[None, :, None] < NQ)  # (G, BLOCK_M, 1)
    q = tl.load(Q + b.to(tl.int64) * sqb + h3 * sqh + rows[None, :, None].to(tl.int64) * sqn
                + offs_d[None, None, :], mask=r_ok & d_ok[None, None, :], other=0.0)
    row_ids = (b.to(tl.int64) * H + h3) * NQ + rows[None, :, None]  # (G, BLOCK_M, 1)
    do = tl.load(DO + b.to(tl.int64) * sdb + h3 * sdh + rows[None, :, None].to(tl.int64) * sdn
                 + offs_d[None, None, :], mask=r_ok & d_ok[None, None, :], other=0.0)
    lse2 = _load_lse2(LSE, row_ids, r_ok)
    delta = tl.load(DELTA + row_ids, mask=r_ok, other=0.0)
    dq = tl.zeros((G, BLOCK_M, D_PAD), dtype=tl.float32)
    hi = NK
    if causal:
        hi = tl.minimum(NK, (pid_m + 1) * BLOCK_M)
    k_base = K + b.to(tl.int64) * skb + h3 * skh
    v_base = V + b.to(tl.int64) * svb + h3 * svh
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        t_ok = h_ok & d_ok[None, :, None] & (cols < NK)[None, None, :]
        c3 = cols[None, None, :].to(tl.int64)
        kt = tl.load(k_base + c3 * skn + offs_d[None, :, None], mask=t_ok, other=0.0)  # (G, D_PAD, BLOCK_N)
        vt = tl.load(v_base + c3 * svn + offs_d[None, :, None], mask=t_ok, other=0.0)
        s = _dot(q, kt, PRECISION, UPCAST) * qk_scale
        vis = _visible(rows, cols, b, MASK, NQ, NK, has_mask, causal)
        p = tl.where(vis, tl.minimum(tl.exp2(s - lse2), 1.0), 0.0)  # see _load_lse2 for the 1
        dp = _dot(do, vt, PRECISION, UPCAST)
        if DROPOUT:
            dp = dp * _dropout_scale(SEED, (first_batch + b).to(tl.int64) * H + h3, rows, cols, drop_threshold,
                                     keep_scale)
        ds = p * (dp - delta)
        dq += _dot_ds(ds, tl.permute(kt, (0, 2, 1)), PRECISION, UPCAST)
    tl.store(DQ + row_ids * HEAD_DIM + offs_d[None, None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=r_ok & d_ok[None, None, :])


def _upcast(dtype: torch.dtype) -> bool:
    from . import INTERPRETED

    return bool(INTERPRETED) and dtype == torch.bfloat16


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in DTYPES:
        raise TypeError(f"the triton attention kernels take float16, bfloat16 or float32, got {q.dtype} "
                        "(float64 runs on the reference backend)")


def _dropout_args(dropout_p: float, seed: Optional[torch.Tensor], q: torch.Tensor) -> Tuple[torch.Tensor, int, float]:
    """(seed pointer, threshold, keep scale) for the kernels; threshold 0 is no dropout (the
    pointer is then never read)."""
    drop = _dropout.parameters(dropout_p, seed)
    if drop is None:
        return torch.zeros(1, dtype=torch.int64, device=q.device), 0, 1.0
    if drop.seed.device != q.device:
        raise ValueError(f"the dropout seed must be on q's device {q.device}, got {drop.seed.device}")
    return drop.seed.to(torch.int64).reshape(1), drop.threshold, drop.keep_scale


def _mask_arg(key_padding_mask: Optional[torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    if key_padding_mask is None:
        return torch.empty(1, dtype=torch.uint8, device=q.device)  # never read (has_mask=0)
    return key_padding_mask.to(torch.bool).contiguous().view(torch.uint8)


# CUDA caps grid axes 1 and 2 at 65535. Axis 1 holds (batch, head group), so a large batch
# goes in several launches over batch slices; the kernels index through the slices' own
# pointers and strides (a contiguous tensor's batch slice is contiguous too).
MAX_GRID_Y = 65535


def _batch_slices(bsz: int, head_groups: int) -> List[slice]:
    """Batch slices of at most MAX_GRID_Y (batch, head group) pairs each."""
    if head_groups > MAX_GRID_Y:
        raise ValueError(f"the triton attention takes at most {MAX_GRID_Y} head groups per batch element, "
                         f"got {head_groups}")
    step = MAX_GRID_Y // head_groups
    return [slice(b0, min(b0 + step, bsz)) for b0 in range(0, bsz, step)]


def _strides(*tensors: torch.Tensor) -> List[int]:
    """The (batch, head, token) strides of each (B, H, N, d) tensor, in order."""
    return [s for t in tensors for s in t.stride()[:3]]


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
            causal: bool, scale: float, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (B, H, Nq, d) in q's dtype, lse (B, H, Nq) float32, out_lo: for bfloat16 the
    rounding residual of out (B, H, Nq, d), else empty). Dropout by
    lucidops.reference.attention_dropout's rule for ``seed``."""
    _check_dtype(q)
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    bsz, heads, nq, d = q.shape
    nk = k.shape[2]
    out = empty_token_major(bsz, heads, nq, d, like=q)
    lse = torch.empty((bsz, heads, nq), dtype=torch.float32, device=q.device)
    store_lo = q.dtype == torch.bfloat16
    out_lo = torch.empty(out.shape if store_lo else (0,), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out, lse, out_lo
    d_pad, g, bm, bn, warps = _config(FORWARD_CONFIGS, d, heads)
    mask = _mask_arg(key_padding_mask, q)
    seed_arg, threshold, keep_scale = _dropout_args(dropout_p, seed, q)
    lo = out_lo if store_lo else out
    head_groups = triton.cdiv(heads, g)
    for b in _batch_slices(bsz, head_groups):
        grid = (triton.cdiv(nq, bm), (b.stop - b.start) * head_groups)
        attention_forward_kernel[grid](
            q[b], k[b], v[b], mask if key_padding_mask is None else mask[b], seed_arg, out[b], lo[b], lse[b],
            *_strides(q, k, v, out), heads, nq, nk, d, float(scale) * LOG2E, b.start, threshold, keep_scale,
            has_mask=int(key_padding_mask is not None), causal=int(bool(causal)), G=g, BLOCK_M=bm, BLOCK_N=bn,
            D_PAD=d_pad, PRECISION=_precision(q.dtype), STORE_LO=store_lo, DROPOUT=threshold > 0,
            UPCAST=_upcast(q.dtype), num_warps=warps)
    return out, lse, out_lo


# Batch elements per slice of _delta's float32 temporaries: about 2^26 elements (256 MiB) each.
DELTA_SLICE_ELEMENTS = 1 << 26


def _delta(grad_out: torch.Tensor, out: torch.Tensor, out_lo: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) (B, H, Nq) in float32, O = out + out_lo (the forward's float32 output
    split in two). Slice by slice of the batch: whole, its float32 temporaries took 12 bytes
    per element at once, 6x the bf16 tensors themselves (24 GiB at 2^31 elements)."""
    bsz, heads, nq, d = out.shape
    delta = torch.empty((bsz, heads, nq), dtype=torch.float32, device=out.device)
    step = max(1, DELTA_SLICE_ELEMENTS // max(1, heads * nq * d))
    for start in range(0, bsz, step):
        b = slice(start, start + step)
        acc = out[b].to(torch.float32, copy=True)  # a float32 out's .float() is out itself
        if out_lo.numel():
            acc.add_(out_lo[b])  # in float32, as out.float() + out_lo.float()
        delta[b] = acc.mul_(grad_out[b]).sum(-1)
    return delta


def backward(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor, out: torch.Tensor, out_lo: torch.Tensor, lse: torch.Tensor,
             key_padding_mask: Optional[torch.Tensor], causal: bool, scale: float, dropout_p: float = 0.0,
             seed: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v."""
    _check_dtype(q)
    q, k, v = (unit_last_stride(t) for t in (q, k, v))
    bsz, heads, nq, d = q.shape
    nk = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if bsz * heads == 0 or nk == 0 or nq == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    grad_out = unit_last_stride(grad_out.to(q.dtype))  # the op's out layout is read as it is
    delta = _delta(grad_out, out, out_lo)
    if grad_lse is not None:
        delta = delta - grad_lse.float()
    delta = delta.contiguous()
    lse = lse.to(torch.float32).contiguous()
    mask = _mask_arg(key_padding_mask, q)
    seed_arg, threshold, keep_scale = _dropout_args(dropout_p, seed, q)
    d_pad, g, bm, bn, warps = _config(BACKWARD_CONFIGS, d, heads)
    meta = dict(has_mask=int(key_padding_mask is not None), causal=int(bool(causal)), G=g, BLOCK_M=bm, BLOCK_N=bn,
                D_PAD=d_pad, PRECISION=_precision(q.dtype), DROPOUT=threshold > 0, UPCAST=_upcast(q.dtype),
                num_warps=warps)
    strides = _strides(q, k, v, grad_out)
    head_groups = triton.cdiv(heads, g)
    for b in _batch_slices(bsz, head_groups):
        groups = (b.stop - b.start) * head_groups
        inputs = (q[b], k[b], v[b], mask if key_padding_mask is None else mask[b], seed_arg, grad_out[b], lse[b],
                  delta[b])
        common = (heads, nq, nk, d, float(scale) * LOG2E, float(scale), b.start, threshold, keep_scale)
        attention_backward_dkdv_kernel[(triton.cdiv(nk, bn), groups)](*inputs, dk[b], dv[b], *strides, *common, **meta)
        attention_backward_dq_kernel[(triton.cdiv(nq, bm), groups)](*inputs, dq[b], *strides, *common, **meta)
    return dq, dk, dv


def _spec(fn, pointers, index_type, floats, constexprs, warps) -> Dict:
    """The signature in the kernel's argument order: every argument that is not a pointer,
    a float or a constexpr is an integer (strides, sizes, runtime flags)."""
    def kind(name: str) -> str:
        if name in pointers:
            return pointers[name]
        return "fp32" if name in floats else "constexpr" if name in constexprs else index_type

    signature = {name: kind(name) for name in fn.arg_names}
    return dict(fn=fn, signature=signature, constexprs=constexprs, num_warps=warps)


def aot_specs() -> Iterator[Dict]:
    """Every configuration the launchers can pick: dtype x D_PAD x G (1 or the table's) x
    dropout or not, with 32-bit and 64-bit integer arguments (Triton picks by magnitude); the
    mask and causal flags are runtime arguments."""
    for torch_dtype, dt in DTYPES.items():
        precision = _precision(torch_dtype)
        for index_type in ("i32", "i64"):
            for table, kind in ((FORWARD_CONFIGS, "fwd"), (BACKWARD_CONFIGS, "bwd")):
                for (d_pad, (g_max, bm, bn, warps)), dropout in itertools.product(table.items(), (False, True)):
                    for g in sorted({1, g_max}):
                        cx = dict(G=g, BLOCK_M=bm, BLOCK_N=bn, D_PAD=d_pad, PRECISION=precision, DROPOUT=dropout,
                                  UPCAST=False)
                        if kind == "fwd":
                            ptrs = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "MASK": "*u8", "SEED": "*i64",
                                    "O": f"*{dt}", "O_LO": f"*{dt}", "LSE": "*fp32"}
                            fwd = dict(cx, STORE_LO=torch_dtype == torch.bfloat16)
                            yield _spec(attention_forward_kernel, ptrs, index_type, ("qk_scale", "keep_scale"), fwd,
                                        warps)
                        else:
                            floats = ("qk_scale", "scale", "keep_scale")
                            ptrs = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "MASK": "*u8", "SEED": "*i64",
                                    "DO": f"*{dt}", "LSE": "*fp32", "DELTA": "*fp32", "DK": f"*{dt}", "DV": f"*{dt}"}
                            yield _spec(attention_backward_dkdv_kernel, ptrs, index_type, floats, cx, warps)
                            ptrs = {"Q": f"*{dt}", "K": f"*{dt}", "V": f"*{dt}", "MASK": "*u8", "SEED": "*i64",
                                    "DO": f"*{dt}", "LSE": "*fp32", "DELTA": "*fp32", "DQ": f"*{dt}"}
                            yield _spec(attention_backward_dq_kernel, ptrs, index_type, floats, cx, warps)


def describe_specs() -> List[str]:
    return [f"{s['fn'].__name__}{s['constexprs']}" for s in aot_specs()]
