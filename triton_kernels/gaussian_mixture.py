"""Triton kernels for the 3D Gaussian point encoder mixture (methods.md section 1).

Forward: one program per (cloud, tile of BLOCK_N points, block of BLOCK_K channels). It
takes the Gaussians BLOCK_G at a time: phi of the tile's points for the block (BLOCK_N,
BLOCK_G), then the mixer as one tl.dot into a (BLOCK_N, BLOCK_K) register tile that starts
at the bias. In IEEE float32 (no TF32): the mixer stays exact to float32 rounding, as in the
other backends. A serial loop over single Gaussians with scalar loads (the first version)
held 119-186 registers per thread and waited on each Gaussian's loads in turn: the op took
1.7 ms with it on an H100, 0.8 with the CUDA kernel (bench/results/gpu-check). With culling, a block of
Gaussians none of whose boxes reaches the tile's bounding box is skipped for the whole tile,
as Gaussian-splatting rasterizers skip tiles (exact: rounding is monotonic, so every point of
the tile fails the per-point test too), and the per-point test zeroes the remaining pairs
outside their boxes. reduce "max" stores each tile's max and first arg-max; the tiles are
merged in point order by the launcher (the lowest point index wins ties).

Backward, reduce "max": one program per (block of channels, slice of clouds, block of
Gaussians) recomputes phi at the arg-max points of its channels for a BLOCK_K x BLOCK_G tile
(one block holds all Gaussians up to G = 128, the authors' largest configuration) and writes
per-program partial sums of the weight, mean and precision gradients and, per Gaussian block,
the per-channel point gradients (all summed by the launcher in a fixed order; a scatter
kernel then adds each point's channels in channel order, where scatter_add_'s atomics
would add them in arrival order: the backward is the same every run). Reduce "none": a phi kernel, two GEMMs in PyTorch (the
(N, K) output exists anyway) and a per-point-tile kernel for the point, mean and precision
terms.

Inputs reach the kernels in the compute precision (float32, or float64 for float64).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import torch
import triton
import triton.language as tl

# (BLOCK_N, BLOCK_K, BLOCK_G, num_warps) of the forward per compute dtype; aot_specs()
# enumerates the same values. BLOCK_G = 16, the smallest tl.dot width: the finest grain the
# tile skip can cull at. Compiled for sm_80/sm_90 (triton_kernels/aot.py), float32 holds 110-128
# registers per thread this way (4 warps: 168-212); float64 needs the smaller tile to keep
# off local memory (64 x 64 spilled 248-344 bytes per thread when culling).
FORWARD_CONFIGS: Dict[torch.dtype, Tuple[int, int, int, int]] = {
    torch.float32: (64, 64, 16, 8),
    torch.float64: (32, 32, 16, 4),
}
BACKWARD_BLOCK_K = 32
PHI_BLOCK_M = 64
# The backward kernels take the Gaussians in tiles of BLOCK_G (a grid axis over them when G >
# 128, the authors' largest configuration); two tile widths keep the ahead-of-time list short.
BLOCK_G_CHOICES = (32, 128)
# num_warps of the backward and phi kernels per BLOCK_G. With 4 warps the 128-wide tiles
# compiled to 0.3-1.7 KB of local memory per thread in fp32 (triton_kernels/aot.py), with 8
# to at most 56 bytes.
BLOCK_G_WARPS: Dict[int, int] = {32: 4, 128: 8}
BACKWARD_SPLITS = 64  # cloud slices of the max backward: partial sums are (splits, K, G)
SCATTER_BLOCK_N, SCATTER_BLOCK_K = 64, 64  # the point-gradient scatter: points x channels per step


@triton.jit
def _phi(d0, d1, d2, p00, p01, p02, p11, p12, p22):
    q = p00 * d0 * d0 + p11 * d1 * d1 + p22 * d2 * d2 + 2.0 * (p01 * d0 * d1 + p02 * d0 * d2 + p12 * d1 * d2)
    return tl.exp(-0.5 * q)


@triton.jit
def _culled(phi, d0, d1, d2, h0, h1, h2):
    """phi, zero outside the Gaussian's box of half-widths h (|d_i| > h_i on some axis)."""
    return tl.where((tl.abs(d0) > h0) | (tl.abs(d1) > h1) | (tl.abs(d2) > h2), 0.0, phi)


@triton.jit
def _axis_rows(table_ptr, offs_g, mask_g, other):
    """Rows g = offs_g of a (G, 3) table (the means, or the culling half-widths) as three
    (1, BLOCK_G) rows, one per axis (``other`` where masked)."""
    v0 = tl.load(table_ptr + offs_g * 3 + 0, mask=mask_g, other=other)
    v1 = tl.load(table_ptr + offs_g * 3 + 1, mask=mask_g, other=other)
    v2 = tl.load(table_ptr + offs_g * 3 + 2, mask=mask_g, other=other)
    return v0[None, :], v1[None, :], v2[None, :]


@triton.jit
def _precisions(prec_ptr, offs_g, mask_g):
    """The precisions [p00, p01, p02, p11, p12, p22] of Gaussians offs_g as (1, BLOCK_G) rows
    (0 where masked)."""
    p00 = tl.load(prec_ptr + offs_g * 6 + 0, mask=mask_g, other=0.0)
    p01 = tl.load(prec_ptr + offs_g * 6 + 1, mask=mask_g, other=0.0)
    p02 = tl.load(prec_ptr + offs_g * 6 + 2, mask=mask_g, other=0.0)
    p11 = tl.load(prec_ptr + offs_g * 6 + 3, mask=mask_g, other=0.0)
    p12 = tl.load(prec_ptr + offs_g * 6 + 4, mask=mask_g, other=0.0)
    p22 = tl.load(prec_ptr + offs_g * 6 + 5, mask=mask_g, other=0.0)
    return p00[None, :], p01[None, :], p02[None, :], p11[None, :], p12[None, :], p22[None, :]


@triton.jit
def mixture_forward_kernel(x_ptr, mu_ptr, prec_ptr, half_ptr, w_ptr, b_ptr, out_ptr, pmax_ptr, pidx_ptr,
                           N, G, K, CULL: tl.constexpr, REDUCE_MAX: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    # One grid axis for (cloud, tile): CUDA caps axes 1 and 2 at 65535, which the tiles of a
    # cloud past 2M points would pass.
    n_tiles = tl.cdiv(N, BLOCK_N)
    b = (tl.program_id(0) // n_tiles).to(tl.int64)
    tile = tl.program_id(0) % n_tiles
    kb = tl.program_id(1)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    xb = x_ptr + b * N * 3
    offs_n3 = offs_n.to(tl.int64) * 3
    x0 = tl.load(xb + offs_n3 + 0, mask=mask_n, other=0.0)[:, None]
    x1 = tl.load(xb + offs_n3 + 1, mask=mask_n, other=0.0)[:, None]
    x2 = tl.load(xb + offs_n3 + 2, mask=mask_n, other=0.0)[:, None]
    bias = tl.load(b_ptr + offs_k, mask=mask_k, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=x0.dtype) + bias[None, :]
    if CULL:
        lo0 = tl.min(tl.where(mask_n[:, None], x0, float("inf")))
        lo1 = tl.min(tl.where(mask_n[:, None], x1, float("inf")))
        lo2 = tl.min(tl.where(mask_n[:, None], x2, float("inf")))
        hi0 = tl.max(tl.where(mask_n[:, None], x0, float("-inf")))
        hi1 = tl.max(tl.where(mask_n[:, None], x1, float("-inf")))
        hi2 = tl.max(tl.where(mask_n[:, None], x2, float("-inf")))
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        mask_g = offs_g < G
        m0, m1, m2 = _axis_rows(mu_ptr, offs_g, mask_g, 0.0)
        if CULL:
            # Padding gets -1 half-widths: it reaches no tile and no point.
            h0, h1, h2 = _axis_rows(half_ptr, offs_g, mask_g, -1.0)
            # The tile-level skip: a block of Gaussians none of whose boxes reaches the tile's
            # bounding box (negative half-widths: alpha_g <= t, padding) is skipped for the tile.
            reach = (h0 >= 0) & (lo0 - m0 <= h0) & (m0 - hi0 <= h0) & (lo1 - m1 <= h1) & (m1 - hi1 <= h1) \
                & (lo2 - m2 <= h2) & (m2 - hi2 <= h2)
            keep = tl.max(reach.to(tl.int32)) > 0
        else:
            keep = True
        if keep:
            d0 = x0 - m0
            d1 = x1 - m1
            d2 = x2 - m2
            p00, p01, p02, p11, p12, p22 = _precisions(prec_ptr, offs_g, mask_g)
            phi = _phi(d0, d1, d2, p00, p01, p02, p11, p12, p22)
            if CULL:
                phi = _culled(phi, d0, d1, d2, h0, h1, h2)
            # Padding Gaussians (phi = 1 there) meet zero weights: they add nothing.
            wt = tl.load(w_ptr + offs_k[None, :] * G + offs_g[:, None], mask=mask_g[:, None] & mask_k[None, :],
                         other=0.0)
            acc = tl.dot(phi, wt, acc, input_precision="ieee")
    if REDUCE_MAX:
        acc = tl.where(mask_n[:, None], acc, float("-inf"))
        top = tl.max(acc, axis=0)
        # The first row attaining the max: ties go to the lowest point index.
        first = tl.min(tl.where(acc == top[None, :], offs_n[:, None], N), axis=0)
        part = (b * n_tiles + tile) * K + offs_k
        tl.store(pmax_ptr + part, top, mask=mask_k)
        tl.store(pidx_ptr + part, first.to(tl.int64), mask=mask_k)
    else:
        rows = (b * N + offs_n.to(tl.int64)) * K
        tl.store(out_ptr + rows[:, None] + offs_k[None, :], acc, mask=mask_n[:, None] & mask_k[None, :])


@triton.jit
def mixture_max_backward_kernel(grad_ptr, x_ptr, arg_ptr, mu_ptr, prec_ptr, half_ptr, w_ptr, gx_ptr, gw_ptr, gmp_ptr,
                                B, N, G, K, CULL: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr):
    kb = tl.program_id(0)
    split = tl.program_id(1)
    gb = tl.program_id(2)
    n_kb = tl.num_programs(0)
    n_split = tl.num_programs(1)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    m0, m1, m2 = _axis_rows(mu_ptr, offs_g, mask_g, 0.0)
    p00, p01, p02, p11, p12, p22 = _precisions(prec_ptr, offs_g, mask_g)
    valid = mask_k[:, None] & mask_g[None, :]
    w = tl.load(w_ptr + offs_k[:, None] * G + offs_g[None, :], mask=valid, other=0.0)
    gw = tl.zeros((BLOCK_K, BLOCK_G), dtype=w.dtype)
    gm0 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    gm1 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    gm2 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    gp0 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    gp1 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    gp2 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    gp3 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    gp4 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    gp5 = tl.zeros((BLOCK_G,), dtype=w.dtype)
    cloud = split.to(tl.int64)  # int64 offsets, carried through the loop
    gx_block = gx_ptr + gb.to(tl.int64) * B * K * 3  # this Gaussian block's point gradients
    for _ in range(split, B, n_split):
        bk = cloud * K + offs_k
        gy = tl.load(grad_ptr + bk, mask=mask_k, other=0.0)
        n = tl.load(arg_ptr + bk, mask=mask_k, other=0)
        xp = x_ptr + (cloud * N + n) * 3
        cloud += n_split
        d0 = tl.load(xp + 0, mask=mask_k, other=0.0)[:, None] - m0
        d1 = tl.load(xp + 1, mask=mask_k, other=0.0)[:, None] - m1
        d2 = tl.load(xp + 2, mask=mask_k, other=0.0)[:, None] - m2
        phi = _phi(d0, d1, d2, p00, p01, p02, p11, p12, p22)
        if CULL:
            h0, h1, h2 = _axis_rows(half_ptr, offs_g, mask_g, 0.0)
            phi = _culled(phi, d0, d1, d2, h0, h1, h2)
        phi = tl.where(valid, phi, 0.0)
        gw += gy[:, None] * phi
        c = gy[:, None] * w * phi
        pd0 = p00 * d0 + p01 * d1 + p02 * d2
        pd1 = p01 * d0 + p11 * d1 + p12 * d2
        pd2 = p02 * d0 + p12 * d1 + p22 * d2
        gm0 += tl.sum(c * pd0, axis=0)
        gm1 += tl.sum(c * pd1, axis=0)
        gm2 += tl.sum(c * pd2, axis=0)
        hc = -0.5 * c
        gp0 += tl.sum(hc * d0 * d0, axis=0)
        gp1 += tl.sum(hc * 2.0 * d0 * d1, axis=0)
        gp2 += tl.sum(hc * 2.0 * d0 * d2, axis=0)
        gp3 += tl.sum(hc * d1 * d1, axis=0)
        gp4 += tl.sum(hc * 2.0 * d1 * d2, axis=0)
        gp5 += tl.sum(hc * d2 * d2, axis=0)
        tl.store(gx_block + bk * 3 + 0, -tl.sum(c * pd0, axis=1), mask=mask_k)
        tl.store(gx_block + bk * 3 + 1, -tl.sum(c * pd1, axis=1), mask=mask_k)
        tl.store(gx_block + bk * 3 + 2, -tl.sum(c * pd2, axis=1), mask=mask_k)
    tl.store(gw_ptr + (split.to(tl.int64) * K + offs_k[:, None]) * G + offs_g[None, :], gw, mask=valid)
    base = gmp_ptr + ((split.to(tl.int64) * n_kb + kb) * G + offs_g) * 9
    tl.store(base + 0, gm0, mask=mask_g)
    tl.store(base + 1, gm1, mask=mask_g)
    tl.store(base + 2, gm2, mask=mask_g)
    tl.store(base + 3, gp0, mask=mask_g)
    tl.store(base + 4, gp1, mask=mask_g)
    tl.store(base + 5, gp2, mask=mask_g)
    tl.store(base + 6, gp3, mask=mask_g)
    tl.store(base + 7, gp4, mask=mask_g)
    tl.store(base + 8, gp5, mask=mask_g)


@triton.jit
def scatter_points_kernel(arg_ptr, g_ptr, gx_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gx[b, n] = the sum of g[b, k] (3 components) over the channels k whose arg-max is point
    n. One program per (cloud, block of points) walks the channels in blocks, in order, so
    the sum is the same every run (scatter_add_ on CUDA adds with atomics in whatever order
    they land). Reads (B, K) arg-max indices and (B, K, 3) per-channel gradients."""
    # A 1-D grid of B * blocks programs (grid axis 0 takes 2^31 - 1; axis 1 only 65535).
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(N, BLOCK_N)
    b = pid // blocks
    offs_n = (pid % blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc0 = tl.zeros((BLOCK_N,), dtype=gx_ptr.dtype.element_ty)
    acc1 = tl.zeros((BLOCK_N,), dtype=gx_ptr.dtype.element_ty)
    acc2 = tl.zeros((BLOCK_N,), dtype=gx_ptr.dtype.element_ty)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mk = offs_k < K
        rows = b * K + offs_k
        arg = tl.load(arg_ptr + rows, mask=mk, other=-1)  # -1 matches no point
        hit = arg[None, :] == offs_n[:, None]
        g0 = tl.load(g_ptr + rows * 3, mask=mk, other=0.0)
        g1 = tl.load(g_ptr + rows * 3 + 1, mask=mk, other=0.0)
        g2 = tl.load(g_ptr + rows * 3 + 2, mask=mk, other=0.0)
        acc0 += tl.sum(tl.where(hit, g0[None, :], 0.0), axis=1)
        acc1 += tl.sum(tl.where(hit, g1[None, :], 0.0), axis=1)
        acc2 += tl.sum(tl.where(hit, g2[None, :], 0.0), axis=1)
    mn = offs_n < N
    out = gx_ptr + (b * N + offs_n) * 3
    tl.store(out, acc0, mask=mn)
    tl.store(out + 1, acc1, mask=mn)
    tl.store(out + 2, acc2, mask=mn)


@triton.jit
def phi_kernel(x_ptr, mu_ptr, prec_ptr, half_ptr, coef_ptr, phi_ptr, gx_ptr, gmp_ptr, M, G, CULL: tl.constexpr,
               BACKWARD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    """One program per (block of rows, block of Gaussians). BACKWARD=False: phi (M, G).
    BACKWARD=True: from coef = dL/dphi * phi (M, G), the point gradients per Gaussian block
    (G blocks, M, 3) and per-program partial sums of the mean and precision gradients."""
    pid = tl.program_id(0)
    gb = tl.program_id(1)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_g = gb * BLOCK_G + tl.arange(0, BLOCK_G)
    mask_g = offs_g < G
    valid = mask_m[:, None] & mask_g[None, :]
    rows = offs_m.to(tl.int64)
    m0, m1, m2 = _axis_rows(mu_ptr, offs_g, mask_g, 0.0)
    p00, p01, p02, p11, p12, p22 = _precisions(prec_ptr, offs_g, mask_g)
    d0 = tl.load(x_ptr + rows * 3 + 0, mask=mask_m, other=0.0)[:, None] - m0
    d1 = tl.load(x_ptr + rows * 3 + 1, mask=mask_m, other=0.0)[:, None] - m1
    d2 = tl.load(x_ptr + rows * 3 + 2, mask=mask_m, other=0.0)[:, None] - m2
    tile = rows[:, None] * G + offs_g[None, :]
    if BACKWARD:
        c = tl.load(coef_ptr + tile, mask=valid, other=0.0)
        pd0 = p00 * d0 + p01 * d1 + p02 * d2
        pd1 = p01 * d0 + p11 * d1 + p12 * d2
        pd2 = p02 * d0 + p12 * d1 + p22 * d2
        gx_rows = gx_ptr + (gb.to(tl.int64) * M + rows) * 3
        tl.store(gx_rows + 0, -tl.sum(c * pd0, axis=1), mask=mask_m)
        tl.store(gx_rows + 1, -tl.sum(c * pd1, axis=1), mask=mask_m)
        tl.store(gx_rows + 2, -tl.sum(c * pd2, axis=1), mask=mask_m)
        hc = -0.5 * c
        base = gmp_ptr + (pid.to(tl.int64) * G + offs_g) * 9
        tl.store(base + 0, tl.sum(c * pd0, axis=0), mask=mask_g)
        tl.store(base + 1, tl.sum(c * pd1, axis=0), mask=mask_g)
        tl.store(base + 2, tl.sum(c * pd2, axis=0), mask=mask_g)
        tl.store(base + 3, tl.sum(hc * d0 * d0, axis=0), mask=mask_g)
        tl.store(base + 4, tl.sum(hc * 2.0 * d0 * d1, axis=0), mask=mask_g)
        tl.store(base + 5, tl.sum(hc * 2.0 * d0 * d2, axis=0), mask=mask_g)
        tl.store(base + 6, tl.sum(hc * d1 * d1, axis=0), mask=mask_g)
        tl.store(base + 7, tl.sum(hc * 2.0 * d1 * d2, axis=0), mask=mask_g)
        tl.store(base + 8, tl.sum(hc * d2 * d2, axis=0), mask=mask_g)
    else:
        phi = _phi(d0, d1, d2, p00, p01, p02, p11, p12, p22)
        if CULL:
            h0, h1, h2 = _axis_rows(half_ptr, offs_g, mask_g, 0.0)
            phi = _culled(phi, d0, d1, d2, h0, h1, h2)
        tl.store(phi_ptr + tile, phi, mask=valid)


def _block_g(G: int) -> Tuple[int, int]:
    """(BLOCK_G, number of Gaussian blocks) of the backward and phi kernels."""
    block = next((b for b in BLOCK_G_CHOICES if G <= b), BLOCK_G_CHOICES[-1])
    return block, max(1, triton.cdiv(G, block))


def forward(points: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor, weight: torch.Tensor,
            bias: torch.Tensor, half: torch.Tensor, cull: bool, reduce_max: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """points (B, N, 3) and parameters in one compute dtype, contiguous -> (out, argmax)."""
    B, N, _ = points.shape
    G, K = means.shape[0], weight.shape[0]
    block_n, block_k, block_g, warps = FORWARD_CONFIGS[points.dtype]
    tiles = triton.cdiv(N, block_n)
    dev, dt = points.device, points.dtype
    if reduce_max:
        out = torch.empty(B, K, dtype=dt, device=dev)
        pmax = torch.empty(B, tiles, K, dtype=dt, device=dev)
        pidx = torch.empty(B, tiles, K, dtype=torch.long, device=dev)
    else:
        out = torch.empty(B, N, K, dtype=dt, device=dev)
        pmax = out  # unused by the kernel; pidx keeps its int64 type for one compiled signature
        pidx = torch.empty(1, dtype=torch.long, device=dev)
    if B == 0:
        return out, torch.empty(B, K, dtype=torch.long, device=dev) if reduce_max else torch.empty(0, dtype=torch.long, device=dev)
    grid = (B * tiles, triton.cdiv(K, block_k))
    mixture_forward_kernel[grid](points, means, precisions, half, weight, bias, out, pmax, pidx, N, G, K, CULL=cull,
                                 REDUCE_MAX=reduce_max, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_G=block_g,
                                 num_warps=warps)
    if not reduce_max:
        return out, torch.empty(0, dtype=torch.long, device=dev)
    # Merge the tiles: the max, and the lowest index among tiles attaining it.
    top = pmax.amax(dim=1)
    argmax = torch.where(pmax == top.unsqueeze(1), pidx, torch.full_like(pidx, N)).amin(dim=1)
    return top, argmax


def backward_max(grad, points, means, precisions, weight, argmax, half, cull: bool):
    B, N, _ = points.shape
    G, K = means.shape[0], weight.shape[0]
    # Out-of-range indices would read out of bounds: checked, as the cpu and cuda kernels do (one sync).
    if argmax.numel() > 0:
        low, high = torch.aminmax(argmax)
        if int(low) < 0 or int(high) >= N:
            raise ValueError(f"lucidops triton kernel: argmax out of range [0, {N}), got [{int(low)}, {int(high)}]")
    block_g, n_gb = _block_g(G)
    dev, dt = points.device, points.dtype
    n_kb = triton.cdiv(K, BACKWARD_BLOCK_K)
    splits = max(1, min(B, BACKWARD_SPLITS))
    gx_part = torch.empty(n_gb, B, K, 3, dtype=dt, device=dev)
    gw_part = torch.empty(splits, K, G, dtype=dt, device=dev)
    gmp_part = torch.empty(splits, n_kb, G, 9, dtype=dt, device=dev)
    if B > 0:
        mixture_max_backward_kernel[(n_kb, splits, n_gb)](grad, points, argmax, means, precisions, half, weight,
                                                         gx_part, gw_part, gmp_part, B, N, G, K, CULL=cull,
                                                         BLOCK_K=BACKWARD_BLOCK_K, BLOCK_G=block_g,
                                                         num_warps=BLOCK_G_WARPS[block_g])
    else:
        gw_part.zero_()
        gmp_part.zero_()
    gmp = gmp_part.sum(dim=(0, 1))
    gx_bk = (gx_part[0] if n_gb == 1 else gx_part.sum(dim=0)).contiguous()
    gx = torch.empty_like(points)
    if B > 0 and N > 0:
        scatter_points_kernel[(B * triton.cdiv(N, SCATTER_BLOCK_N),)](argmax.contiguous(), gx_bk, gx, N, K,
                                                                    BLOCK_N=SCATTER_BLOCK_N, BLOCK_K=SCATTER_BLOCK_K)
    return gx, gmp[:, :3].clone(), gmp[:, 3:].clone(), gw_part.sum(dim=0), grad.sum(dim=0)  # no aliasing outputs


def phi(points: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor, half: torch.Tensor, cull: bool):
    """phi (M, G) for points (M, 3)."""
    M, G = points.shape[0], means.shape[0]
    out = torch.empty(M, G, dtype=points.dtype, device=points.device)
    block_g, n_gb = _block_g(G)
    if M > 0:
        phi_kernel[(triton.cdiv(M, PHI_BLOCK_M), n_gb)](points, means, precisions, half, out, out, out, out, M, G,
                                                        CULL=cull, BACKWARD=False, BLOCK_M=PHI_BLOCK_M,
                                                        BLOCK_G=block_g, num_warps=BLOCK_G_WARPS[block_g])
    return out


def phi_backward(coef: torch.Tensor, points: torch.Tensor, means: torch.Tensor, precisions: torch.Tensor):
    """From coef = dL/dphi * phi (M, G): gradients of points (M, 3), means, precisions."""
    M, G = points.shape[0], means.shape[0]
    programs = triton.cdiv(M, PHI_BLOCK_M)
    block_g, n_gb = _block_g(G)
    gx_part = torch.empty(n_gb, M, 3, dtype=points.dtype, device=points.device)
    part = torch.zeros(max(programs, 1), G, 9, dtype=points.dtype, device=points.device)
    if M > 0:
        phi_kernel[(programs, n_gb)](points, means, precisions, means, coef, coef, gx_part, part, M, G, CULL=False,
                                     BACKWARD=True, BLOCK_M=PHI_BLOCK_M, BLOCK_G=block_g,
                                     num_warps=BLOCK_G_WARPS[block_g])
    total = part.sum(dim=0)
    gx = gx_part[0] if n_gb == 1 else gx_part.sum(dim=0)
    return gx, total[:, :3].clone(), total[:, 3:].clone()


_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


def aot_specs() -> Iterator[Dict]:
    """Every configuration the launchers above can pick, for ahead-of-time compilation."""
    block_gs = BLOCK_G_CHOICES
    for dt, torch_dtype in _DTYPES.items():
        block_n, block_k, forward_block_g, warps = FORWARD_CONFIGS[torch_dtype]
        yield dict(
            fn=scatter_points_kernel,
            signature={"arg_ptr": "*i64", "g_ptr": f"*{dt}", "gx_ptr": f"*{dt}", "N": "i32", "K": "i32",
                       "BLOCK_N": "constexpr", "BLOCK_K": "constexpr"},
            constexprs={"BLOCK_N": SCATTER_BLOCK_N, "BLOCK_K": SCATTER_BLOCK_K},
            num_warps=4,
        )
        for cull in (False, True):
            for reduce_max in (False, True):
                yield dict(
                    fn=mixture_forward_kernel,
                    signature={"x_ptr": f"*{dt}", "mu_ptr": f"*{dt}", "prec_ptr": f"*{dt}", "half_ptr": f"*{dt}",
                               "w_ptr": f"*{dt}", "b_ptr": f"*{dt}", "out_ptr": f"*{dt}", "pmax_ptr": f"*{dt}",
                               "pidx_ptr": "*i64", "N": "i32", "G": "i32", "K": "i32", "CULL": "constexpr",
                               "REDUCE_MAX": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr",
                               "BLOCK_G": "constexpr"},
                    constexprs={"CULL": cull, "REDUCE_MAX": reduce_max, "BLOCK_N": block_n, "BLOCK_K": block_k,
                                "BLOCK_G": forward_block_g},
                    num_warps=warps,
                )
            for block_g in block_gs:
                yield dict(
                    fn=mixture_max_backward_kernel,
                    signature={"grad_ptr": f"*{dt}", "x_ptr": f"*{dt}", "arg_ptr": "*i64", "mu_ptr": f"*{dt}",
                               "prec_ptr": f"*{dt}", "half_ptr": f"*{dt}", "w_ptr": f"*{dt}", "gx_ptr": f"*{dt}",
                               "gw_ptr": f"*{dt}", "gmp_ptr": f"*{dt}", "B": "i32", "N": "i32", "G": "i32",
                               "K": "i32", "CULL": "constexpr", "BLOCK_K": "constexpr", "BLOCK_G": "constexpr"},
                    constexprs={"CULL": cull, "BLOCK_K": BACKWARD_BLOCK_K, "BLOCK_G": block_g},
                    num_warps=BLOCK_G_WARPS[block_g],
                )
                for backward in (False, True):
                    if backward and cull:
                        continue  # the launcher never combines them
                    yield dict(
                        fn=phi_kernel,
                        signature={"x_ptr": f"*{dt}", "mu_ptr": f"*{dt}", "prec_ptr": f"*{dt}",
                                   "half_ptr": f"*{dt}", "coef_ptr": f"*{dt}", "phi_ptr": f"*{dt}",
                                   "gx_ptr": f"*{dt}", "gmp_ptr": f"*{dt}", "M": "i32", "G": "i32",
                                   "CULL": "constexpr", "BACKWARD": "constexpr", "BLOCK_M": "constexpr",
                                   "BLOCK_G": "constexpr"},
                        constexprs={"CULL": cull, "BACKWARD": backward, "BLOCK_M": PHI_BLOCK_M, "BLOCK_G": block_g},
                        num_warps=BLOCK_G_WARPS[block_g],
                    )


def describe_specs() -> List[str]:
    return [f"{s['fn'].__name__}{s['constexprs']} {s['signature']}" for s in aot_specs()]
