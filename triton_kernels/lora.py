"""Triton kernels for sine and bounded LoRA linear layers (methods.md sections 3 and 5).

The full-rank update s fn(omega B A) (N_out x K_in) is never kept, and for inputs of up to
FUSED_MAX_ROWS rows (the serving case) it never reaches global memory:

- ``lora_matmul_kernel`` computes out[m, j] = sum_i in[m, i] Weff(i, j) (+ epilogue, bias)
  where, with LORA, Weff(i, j) = W(i, j) + s fn(omega sum_r L[i, r] R[r, j]) is
  regenerated tile by tile inside the reduction loop (phase in float32, "ieee" dot: a
  tf32 phase would be off by ~1e-3 omega |BA| radians). All operands are addressed by
  strides, so one kernel serves the forward (in = x, W^T, L = A^T, R = B^T) and dx
  (in = dY, W, L = B, R = A), plus the plain products of the "output" placement (LORA
  off; EPILOGUE 1 adds s fn(omega U E), EPILOGUE 2 adds U E, with U (M, r) float32).
  Regenerating, it splits its reduction into slices when the output has few tiles
  (reduction_splits), so that a one-row input still spreads the update's work over the GPU.
  With QUANT (methods.md 4, placement "weight") L and R are quantized adapter factors:
  the kernel reads their uint8 codes and float16 side data (per-group scale and minimum,
  or a codebook) and dequantizes each tile in float32, so neither the dequantized
  factors nor the update reach global memory. Adapters are frozen: no dA/dB.
- ``lora_update_kernel`` writes a column chunk of Weff (same addressing, plain or quantized
  factors) for inputs of more rows, where rebuilding every tile per row block would cost
  more than the matmul: chunk by chunk, torch's matmul multiplies it (_materialized_matmul).
- ``lora_wgrad_kernel`` forms a tile of G = dY^T X (looping over M), optionally stores it
  as dW, then multiplies by s omega fn'(omega B A) (regenerated) and reduces the tile
  into per-tile partials of dA = B^T H and dB = H A^T, formed for a group of G's rows at
  a time and summed in a fixed order (deterministic, no atomics; _wgrad).
- ``lora_wgrad_chunk_kernel`` does that reduction for rows of G formed by torch's matmul,
  for inputs of more than FUSED_MAX_ROWS rows (_wgrad).
- ``lora_output_grad_kernel`` (placement "output"): Gz = dY s fn'(omega U B^T) tile by
  tile, reduced over N into dU = omega Gz B, or over M into dB = omega Gz^T U.

Rank r is padded to 16-wide chunks with masks, so every tl.dot dimension is >= 16.
Plain factors are read in their own dtype, x's or float32 under a half x (peft's float32
adapters), and used in float32: the phase never sees them rounded. float64 inputs are not
supported here (use the reference or cpp backend).
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
import triton
import triton.language as tl

FN_CODES = {"sin": 0, "tanh": 1}
BLOCK_R = 16
# (BLOCK_M, BLOCK_J, BLOCK_I, num_warps) for lora_matmul_kernel: small M, large M.
MATMUL_CONFIGS: Tuple[Tuple[int, int, int, int], ...] = ((16, 64, 64, 4), (64, 128, 32, 8))
# 65 to 128 rows when the kernel regenerates the update: one 128-row block computes each
# tile's phase and fn once. With 8 warps it compiles without register spills
# (triton_kernels/aot.py); the plain products spill at this size and keep MATMUL_CONFIGS[1].
REGEN_LARGE_M_CONFIG: Tuple[int, int, int, int] = (128, 128, 32, 8)
# Above this many rows the forward and dx stop regenerating. Every BLOCK_M-row block would
# redo the phase and fn of the whole N_out x K_in update: per element of a tile, r float32
# FMAs ("ieee") and one fn on the CUDA cores against BLOCK_M multiply-adds on the tensor
# cores, which do about 16x more multiply-adds per clock (H100: 2048 bf16 against 128 fp32
# per SM), so at M = 16384 the update's work would outweigh the matmul. Instead
# lora_update_kernel builds Weff once per call, a column chunk of at most
# MATERIALIZE_CHUNK_BYTES at a time, and torch's matmul (cuBLAS) multiplies each chunk: one
# phase and fn per element per call, as the C++ backend does, and the extra memory is one
# chunk. The weight gradient too: above this, G = dY^T X (a product as large as the
# forward's) is torch's matmul, a group of G's rows at a time (wgrad_group_rows: the group's
# rows and its factor partials within MATERIALIZE_CHUNK_BYTES), and lora_wgrad_chunk_kernel
# reduces each group, instead of lora_wgrad_kernel's 64x64 tiles (sized for small M, not
# tuned for a 16384-deep reduction). In half precision that rounds G to x's dtype before the
# fn' term, as the naive implementation does; the fused kernel keeps it in float32.
# Unmeasured on a GPU: bench/lora.py times both ways ("lucidops[triton, fused tiles]").
FUSED_MAX_ROWS = REGEN_LARGE_M_CONFIG[0]
# (most rows, config) of a regenerating product: the first block that holds every row, so
# each tile of the update is regenerated once per call. With 16-row blocks up to 64 rows
# (the first version), 64 rows regenerated the whole update four times: the forward at M = 64
# ran 0.29x the naive implementation's speed on an H100 where M = 16 ran 0.94x
# (bench/results/gpu-check). 64 x 128 x 32 with 8 warps uses at most 40 bytes of local
# memory per thread on sm_90 and 208 on sm_80 (float32 x; 32 for half), no more than the
# 16-row tiles (120 / 208) or the 128-row ones (168 / 680; triton_kernels/aot.py).
REGEN_CONFIGS: Tuple[Tuple[int, Tuple[int, int, int, int]], ...] = (
    (16, MATMUL_CONFIGS[0]), (64, (64, 128, 32, 8)), (FUSED_MAX_ROWS, REGEN_LARGE_M_CONFIG))
MATERIALIZE_CHUNK_BYTES = 8 << 20
# Up to FUSED_MAX_ROWS rows a regenerating product has few output tiles (M = 1, N_out = 4096:
# 64 programs of 4 warps, fewer than an H100's 132 SMs), each looping over all of K_in: its
# reduction is split into slices until the grid has about this many programs (4 per SM).
SPLIT_TARGET_PROGRAMS = 512
# (BLOCK_I, BLOCK_J, num_warps) for lora_update_kernel.
UPDATE_CONFIG: Tuple[int, int, int] = (64, 64, 4)
# (BLOCK_N, BLOCK_K, BLOCK_M, num_warps) for lora_wgrad_kernel.
WGRAD_CONFIG = (64, 64, 32, 4)
# R_PAD -> (BLOCK_M, BLOCK_N, num_warps) for lora_output_grad_kernel. At R_PAD = 64 the 64x64
# tiles compiled to 8 KB of local memory per thread on sm_80 (triton_kernels/aot.py), 32x32 to
# 32 bytes (libdevice sin's table, no spills).
OUTPUT_GRAD_CONFIGS: Dict[int, Tuple[int, int, int]] = {16: (64, 64, 4), 32: (64, 64, 4), 64: (32, 32, 4)}
OUTPUT_R_PADS = tuple(OUTPUT_GRAD_CONFIGS)
_SMALL_M = 64


@triton.jit
def _bounded(z, FN: tl.constexpr):
    if FN == 0:
        f = tl.sin(z)
    else:
        # tanh from exp(-2|z|): no overflow for any finite z.
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        f = tl.where(z < 0, -t, t)
    return f


@triton.jit
def _bounded_derivative(z, FN: tl.constexpr):
    if FN == 0:
        d = tl.cos(z)
    else:
        t = _bounded(z, 1)
        d = 1.0 - t * t
    return d


@triton.jit
def _dot_fp32_accurate(a, b, acc):
    """acc + a @ b on the tensor cores; float32 operands as "tf32x3" (three tf32 passes, error
    ~2^-22 of each product, where the default tf32 would be ~2^-11): float32 callers get
    float32 accuracy. Half-precision operands are exact products either way."""
    if a.dtype == tl.float32:
        out = tl.dot(a, b, acc, input_precision="tf32x3")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _factor_tile(ptr, t0_ptr, t1_ptr, flat, mask, group_size, QUANT: tl.constexpr, METHOD: tl.constexpr):
    """float32 tile of an adapter factor at element offsets ``flat`` (0 where masked).

    Plain (QUANT off): ptr[flat] cast to float32; t0_ptr, t1_ptr and group_size are unused.
    Quantized: ptr holds row-major uint8 codes and ``flat`` indexes them. METHOD 0
    (uniform): code * scale[g] + minimum[g] with g = flat // group_size, as
    QuantizedTensor.dequantize computes it (a group may straddle rows). METHOD 1 (kmeans):
    codebook[code]; QuantizedTensor.kernel_tensors pads the codebook to 256 entries, so
    any uint8 code stays in bounds."""
    if QUANT:
        code = tl.load(ptr + flat, mask=mask, other=0)
        if METHOD == 0:
            g = flat // group_size
            s = tl.load(t0_ptr + g, mask=mask, other=0.0).to(tl.float32)
            lo = tl.load(t1_ptr + g, mask=mask, other=0.0).to(tl.float32)
            v = code.to(tl.float32) * s + lo   # masked: 0 * 0 + 0
        else:
            v = tl.load(t0_ptr + code.to(tl.int32), mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(ptr + flat, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _phase_tile(l_ptr, l0_ptr, l1_ptr, r_ptr, r0_ptr, r1_ptr, offs_i, offs_j, mask_i, mask_j, R,
                stride_li, stride_lr, stride_rr, stride_rj, group_l, group_r,
                QUANT: tl.constexpr, METHOD: tl.constexpr,
                BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """float32 (BLOCK_I, BLOCK_J) tile of sum_r L[i, r] R[r, j] (see lora_matmul_kernel for how
    L and R are addressed): an "ieee" float32 dot over 16-wide rank chunks, 0 where masked."""
    p = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        lf = _factor_tile(l_ptr, l0_ptr, l1_ptr, offs_i.to(tl.int64)[:, None] * stride_li + offs_r[None, :] * stride_lr,
                          mask_i[:, None] & mask_r[None, :], group_l, QUANT, METHOD)
        rf = _factor_tile(r_ptr, r0_ptr, r1_ptr, offs_r[:, None] * stride_rr + offs_j.to(tl.int64)[None, :] * stride_rj,
                          mask_r[:, None] & mask_j[None, :], group_r, QUANT, METHOD)
        p = tl.dot(lf, rf, p, input_precision="ieee")
    return p


@triton.jit
def _update_tile(l_ptr, l0_ptr, l1_ptr, r_ptr, r0_ptr, r1_ptr, offs_i, offs_j, mask_i, mask_j, R,
                 stride_li, stride_lr, stride_rr, stride_rj, group_l, group_r, omega, scale,
                 FN: tl.constexpr, QUANT: tl.constexpr, METHOD: tl.constexpr,
                 BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr):
    """float32 (BLOCK_I, BLOCK_J) tile s fn(omega sum_r L[i, r] R[r, j]) of the update."""
    p = _phase_tile(l_ptr, l0_ptr, l1_ptr, r_ptr, r0_ptr, r1_ptr, offs_i, offs_j, mask_i, mask_j, R,
                    stride_li, stride_lr, stride_rr, stride_rj, group_l, group_r, QUANT, METHOD,
                    BLOCK_I, BLOCK_J, BLOCK_R)
    return scale * _bounded(omega * p, FN)


@triton.jit
def lora_update_kernel(
    w_ptr, l_ptr, l0_ptr, l1_ptr, r_ptr, r0_ptr, r1_ptr, out_ptr,
    I, J, R, j_start,
    stride_wi, stride_wj, stride_li, stride_lr, stride_rr, stride_rj, stride_oi, stride_oj,
    group_l, group_r, omega, scale,
    FN: tl.constexpr, QUANT: tl.constexpr, METHOD: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[i, j - j_start] = W(i, j) + s fn(omega sum_r L[i, r] R[r, j]) for j_start <= j < J,
    rounded to out's dtype: the columns [j_start, J) of Weff, addressed as in
    lora_matmul_kernel (rows i < I), written by out's strides."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_j = j_start + pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_i = offs_i < I
    mask_j = offs_j < J
    offs_i64 = offs_i.to(tl.int64)
    mask = mask_i[:, None] & mask_j[None, :]
    w = tl.load(w_ptr + offs_i64[:, None] * stride_wi + offs_j.to(tl.int64)[None, :] * stride_wj, mask=mask,
                other=0.0)
    weff = w.to(tl.float32) + _update_tile(l_ptr, l0_ptr, l1_ptr, r_ptr, r0_ptr, r1_ptr, offs_i, offs_j, mask_i,
                                           mask_j, R, stride_li, stride_lr, stride_rr, stride_rj, group_l, group_r,
                                           omega, scale, FN, QUANT, METHOD, BLOCK_I, BLOCK_J, BLOCK_R)
    tl.store(out_ptr + offs_i64[:, None] * stride_oi + (offs_j - j_start)[None, :] * stride_oj,
             weff.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lora_matmul_kernel(
    in_ptr, w_ptr, l_ptr, l0_ptr, l1_ptr, r_ptr, r0_ptr, r1_ptr, bias_ptr, u_ptr, e_ptr, out_ptr,
    M, I, J, R,
    stride_im, stride_ii, stride_wi, stride_wj, stride_li, stride_lr, stride_rr, stride_rj,
    stride_um, stride_ur, stride_er, stride_ej,
    group_l, group_r, omega, scale, i_split, stride_os,
    FN: tl.constexpr, LORA: tl.constexpr, QUANT: tl.constexpr, METHOD: tl.constexpr, EPILOGUE: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[m, j] = sum_i in[m, i] (W(i, j) [+ s fn(omega sum_r L[i, r] R[r, j])]) [+ epilogue] [+ bias].

    L[i, r] is the element at offset i * stride_li + r * stride_lr of l_ptr, R[r, j] at
    r * stride_rr + j * stride_rj. With QUANT (LORA on) l_ptr / r_ptr are the factors'
    contiguous codes, the strides run over the flattened factor, which is also where its
    uniform groups (group_l, group_r elements) are counted, and l0/l1, r0/r1 are the side
    tables (see _factor_tile); otherwise the tables and groups are unused.

    Split reduction: program_id(2) = s sums only i in [s i_split, (s + 1) i_split) (i_split a
    multiple of BLOCK_I) and writes its partial sum at out_ptr + s stride_os; with more than
    one split the caller adds the partials and the bias (HAS_BIAS off, no epilogue)."""
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    mask_m = offs_m < M
    mask_j = offs_j < J
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    i_begin = pid_s * i_split
    for i0 in range(i_begin, tl.minimum(I, i_begin + i_split), BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        offs_i64 = offs_i.to(tl.int64)
        a = tl.load(in_ptr + offs_m[:, None] * stride_im + offs_i64[None, :] * stride_ii,
                    mask=mask_m[:, None] & mask_i[None, :], other=0.0)
        # int64 on both sides: output feature j of a weight.t() view sits j * K_in elements in, past
        # 2^31 for a (256000, 18432) LM head; int32 offs_j * stride_wj would wrap.
        w = tl.load(w_ptr + offs_i64[:, None] * stride_wi + offs_j.to(tl.int64)[None, :] * stride_wj,
                    mask=mask_i[:, None] & mask_j[None, :], other=0.0)
        if LORA:  # Weff's tile, rounded to the input's dtype as the materialized path rounds it
            w = (w.to(tl.float32) + _update_tile(l_ptr, l0_ptr, l1_ptr, r_ptr, r0_ptr, r1_ptr, offs_i, offs_j, mask_i,
                                                 mask_j, R, stride_li, stride_lr, stride_rr, stride_rj, group_l,
                                                 group_r, omega, scale, FN, QUANT, METHOD, BLOCK_I, BLOCK_J,
                                                 BLOCK_R)).to(a.dtype)
        elif w.dtype == tl.float32:
            # float32 A in U = x A^T (a float32 factor over a half x): raise x, never round A
            a = a.to(tl.float32)
        else:
            w = w.to(a.dtype)
        if UPCAST:
            a = a.to(tl.float32)
            w = w.to(tl.float32)
        acc = _dot_fp32_accurate(a, w, acc)
    if EPILOGUE != 0:
        z = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            uf = tl.load(u_ptr + offs_m[:, None] * stride_um + offs_r[None, :] * stride_ur,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            ef = tl.load(e_ptr + offs_r[:, None] * stride_er + offs_j.to(tl.int64)[None, :] * stride_ej,
                         mask=mask_r[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
            z = tl.dot(uf, ef, z, input_precision="ieee")
        if EPILOGUE == 1:
            acc += scale * _bounded(omega * z, FN)
        else:
            acc += z
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_j, mask=mask_j, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[:, None] * J + offs_j[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_j[None, :])


@triton.jit
def _reduce_into_factor_partials(g, a_ptr, b_ptr, pa_ptr, pb_ptr, offs_n, offs_k, mask_n, mask_k, tile_n, tile_k,
                                 pb_rows, row0, K, R, omega, scale, FN: tl.constexpr,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    """H = g s omega fn'(omega B A) on a (BLOCK_N, BLOCK_K) tile of G = dY^T X (rows offs_n,
    columns offs_k, float32), reduced into that tile's partials for a group of G's rows from
    row0 on: rows offs_n - row0 of pb[tile_k] ((pb_rows, R) each) get H A^T, columns offs_k
    of pa[tile_n] (tile_n counted within the group) get B^T H (each tile its own slice;
    summed afterwards)."""
    # Plain factors (QUANT off): the side tables and groups are unused, b_ptr stands in.
    p = _phase_tile(b_ptr, b_ptr, b_ptr, a_ptr, a_ptr, a_ptr, offs_n, offs_k, mask_n, mask_k, R, R, 1, K, 1, 1, 1,
                    False, 0, BLOCK_N, BLOCK_K, BLOCK_R)
    # Masked rows/columns have g = 0, so h = 0 there and they add nothing below.
    h = g * (scale * omega) * _bounded_derivative(omega * p, FN)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        bf = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :],
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        af = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :],
                     mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        part_b = tl.dot(h, tl.trans(af), input_precision="ieee")          # (BLOCK_N, BLOCK_R)
        part_a = tl.dot(tl.trans(bf), h, input_precision="ieee")          # (BLOCK_R, BLOCK_K)
        tl.store(pb_ptr + tile_k.to(tl.int64) * pb_rows * R + (offs_n - row0)[:, None] * R + offs_r[None, :], part_b,
                 mask=mask_n[:, None] & mask_r[None, :])
        tl.store(pa_ptr + tile_n.to(tl.int64) * R * K + offs_r[:, None] * K + offs_k[None, :], part_a,
                 mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def lora_wgrad_kernel(
    dy_ptr, x_ptr, a_ptr, b_ptr, dw_ptr, pa_ptr, pb_ptr,
    M, N, K, R, tile_n0, pb_rows, omega, scale,
    FN: tl.constexpr, NEED_DW: tl.constexpr, NEED_LORA: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Tiles of G's rows from tile_n0 on (program_id(0) counts from there); with NEED_LORA
    their partials go to a group's pa and pb (pb_rows rows per K tile, see _wgrad)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = (tile_n0 + pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_k = offs_k < K
    g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        offs_m64 = offs_m.to(tl.int64)
        dyt = tl.load(dy_ptr + offs_m64[None, :] * N + offs_n[:, None],
                      mask=mask_m[None, :] & mask_n[:, None], other=0.0)
        xx = tl.load(x_ptr + offs_m64[:, None] * K + offs_k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            xx = xx.to(tl.float32)
        g = _dot_fp32_accurate(dyt, xx, g)
    if NEED_DW:
        tl.store(dw_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], g.to(dw_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_k[None, :])
    if NEED_LORA:
        _reduce_into_factor_partials(g, a_ptr, b_ptr, pa_ptr, pb_ptr, offs_n, offs_k, mask_n, mask_k, pid_n, pid_k,
                                     pb_rows, tile_n0 * BLOCK_N, K, R, omega, scale, FN, BLOCK_N, BLOCK_K, BLOCK_R)


@triton.jit
def lora_wgrad_chunk_kernel(
    g_ptr, a_ptr, b_ptr, pa_ptr, pb_ptr, K, R, n_start, n_stop, pb_rows, omega, scale,
    FN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """lora_wgrad_kernel's reduction for the group of rows [n_start, n_stop) of G = dY^T X
    already formed (contiguous (n_stop - n_start, K) at g_ptr, any float dtype), into the
    group's partials laid out as the fused kernel lays them out."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = n_start + pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n = offs_n < n_stop
    mask_k = offs_k < K
    g = tl.load(g_ptr + (offs_n - n_start)[:, None].to(tl.int64) * K + offs_k[None, :],
                mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
    _reduce_into_factor_partials(g, a_ptr, b_ptr, pa_ptr, pb_ptr, offs_n, offs_k, mask_n, mask_k,
                                 pid_n, pid_k, pb_rows, n_start, K, R, omega, scale, FN, BLOCK_N, BLOCK_K, BLOCK_R)


@triton.jit
def lora_output_grad_kernel(
    dy_ptr, u_ptr, b_ptr, out_ptr, M, N, R, omega, scale,
    FN: tl.constexpr, REDUCE_OVER_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
):
    """REDUCE_OVER_N: out = dU (M, R) float32 = omega Gz B; else out = dB (N, R) = omega Gz^T U.

    The float32 products are "tf32x3" (three tf32 tensor-core passes, error ~2^-22 of each
    product): as "ieee" (FMA units) this kernel compiled to 5-9 KB of local memory per thread
    at R_PAD = 64 (triton_kernels/aot.py reports it); tf32x3 and OUTPUT_GRAD_CONFIGS keep it
    under about 0.5 KB."""
    pid = tl.program_id(0)
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    if REDUCE_OVER_N:
        offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        u = tl.load(u_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            b = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :],
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            z = tl.dot(u, tl.trans(b), input_precision="tf32x3")
            dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :],
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            gz = dy * scale * _bounded_derivative(omega * z, FN)
            acc = tl.dot(gz, b, acc, input_precision="tf32x3")
        tl.store(out_ptr + offs_m[:, None] * R + offs_r[None, :], (omega * acc).to(out_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_r[None, :])
    else:
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        b = tl.load(b_ptr + offs_n[:, None] * R + offs_r[None, :],
                    mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
        acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
        for m0 in range(0, M, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            mask_m = offs_m < M
            offs_m64 = offs_m.to(tl.int64)
            u = tl.load(u_ptr + offs_m64[:, None] * R + offs_r[None, :],
                        mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            z = tl.dot(u, tl.trans(b), input_precision="tf32x3")
            dy = tl.load(dy_ptr + offs_m64[:, None] * N + offs_n[None, :],
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            gz = dy * scale * _bounded_derivative(omega * z, FN)
            acc = tl.dot(tl.trans(gz), u, acc, input_precision="tf32x3")
        tl.store(out_ptr + offs_n[:, None] * R + offs_r[None, :], (omega * acc).to(out_ptr.dtype.element_ty),
                 mask=mask_n[:, None] & mask_r[None, :])


# --------------------------------------------------------------------------- launchers

def _check_dtype(x: torch.Tensor) -> None:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the triton backend of bounded_lora_linear takes float16, bfloat16 or float32 x, "
                        f"got {x.dtype} (use the reference or cpp backend)")


def _upcast(*tensors: torch.Tensor) -> bool:
    """True only under TRITON_INTERPRET with bfloat16 operands: the interpreter stores bf16
    as raw uint16 and its tl.dot multiplies those integers. bf16 products are exact in
    float32, so upcasting changes nothing but that bug; GPUs never take this path."""
    from . import INTERPRETED

    return bool(INTERPRETED) and any(t.dtype == torch.bfloat16 for t in tensors)


def _matmul_config(rows: int, regenerates: bool) -> Tuple[int, int, int, int]:
    if regenerates:
        return next((config for most, config in REGEN_CONFIGS if rows <= most), REGEN_CONFIGS[-1][1])
    return MATMUL_CONFIGS[0] if rows <= _SMALL_M else MATMUL_CONFIGS[1]


def _matmul(inp: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, lora: Optional[Tuple] = None,
            quant: Optional[Tuple] = None, epilogue: int = 0, u: Optional[torch.Tensor] = None,
            e: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, fn: int = 0, omega: float = 0.0,
            scale: float = 0.0) -> torch.Tensor:
    """out (M, J) = inp (M, I) @ Weff (I, J) [+ epilogue] [+ bias], every operand by strides.

    lora = (L (I, r), R (r, J)) regenerates Weff = w + scale fn(omega L R) tile by tile;
    quant = (method code, r, left, right) does so from quantized factors (see _quant_matmul).
    Above FUSED_MAX_ROWS rows these two build Weff in chunks instead (_materialized_matmul)."""
    m, i_dim = inp.shape
    j_dim = w.shape[1]
    if out.numel() == 0:
        return out
    if bias is not None:
        bias = bias.contiguous()  # the kernel reads bias[j] at unit stride
    if i_dim == 0 and epilogue == 0 and bias is None:
        return out.zero_()
    regenerates = lora is not None or quant is not None
    block_m, block_j, block_i, warps = _matmul_config(m, regenerates)
    dummy = _dummy_fp32(inp.device)
    if quant is not None:
        method, r, left, right = quant
    else:
        # Plain factors: no side tables (the dummy is never read), strides of the tensors.
        method = 0
        l, rm = lora if lora is not None else (w, w)
        r = l.shape[1] if lora is not None else (u.shape[1] if u is not None else 0)
        left = (l, dummy, dummy, 1, l.stride(0), l.stride(1))
        right = (rm, dummy, dummy, 1, rm.stride(0), rm.stride(1))
    if regenerates and m > FUSED_MAX_ROWS:
        return _materialized_matmul(inp, w, out, left, right, r, method, quant is not None, bias, fn, omega, scale)
    lq, l0, l1, group_l, stride_li, stride_lr = left
    rq, r0, r1, group_r, stride_rr, stride_rj = right
    u_t = u if u is not None else dummy
    e_t = e if e is not None else w
    tiles_m, tiles_j = triton.cdiv(m, block_m), triton.cdiv(j_dim, block_j)
    splits = reduction_splits(tiles_m * tiles_j, i_dim, block_i) if regenerates else 1
    i_split = triton.cdiv(max(i_dim, 1), block_i * splits) * block_i
    splits = max(1, triton.cdiv(i_dim, i_split))  # no empty slice
    # Several slices write float32 partial sums, added below in a fixed order (deterministic).
    target = out if splits == 1 else torch.empty((splits, m, j_dim), dtype=torch.float32, device=out.device)
    lora_matmul_kernel[(tiles_m, tiles_j, splits)](
        inp, w, lq, l0, l1, rq, r0, r1, bias if bias is not None else w, u_t, e_t, target,
        m, i_dim, j_dim, r,
        inp.stride(0), inp.stride(1), w.stride(0), w.stride(1), stride_li, stride_lr, stride_rr, stride_rj,
        u_t.stride(0) if u is not None else 0, u_t.stride(1) if u is not None else 0,
        e_t.stride(0), e_t.stride(1), max(int(group_l), 1), max(int(group_r), 1), float(omega), float(scale),
        i_split, m * j_dim if splits > 1 else 0,
        FN=fn, LORA=regenerates, QUANT=quant is not None, METHOD=method,
        EPILOGUE=epilogue, HAS_BIAS=bias is not None and splits == 1, UPCAST=_upcast(inp, w),
        BLOCK_M=block_m, BLOCK_J=block_j, BLOCK_I=block_i, BLOCK_R=BLOCK_R, num_warps=warps,
    )
    if splits > 1:
        total = target.sum(0)
        if bias is not None:
            total += bias.float()
        out.copy_(total)
    return out


def reduction_splits(tiles: int, i_dim: int, block_i: int) -> int:
    """Slices of the reduction over I for a regenerating product with ``tiles`` output tiles:
    enough that the grid has about SPLIT_TARGET_PROGRAMS programs, at most one per BLOCK_I
    block. Each (BLOCK_I, BLOCK_J) tile of the update is still regenerated once per row block,
    so the split adds parallelism, not work."""
    return max(1, min(triton.cdiv(i_dim, block_i), triton.cdiv(SPLIT_TARGET_PROGRAMS, max(tiles, 1))))


def materialize_chunk_columns(rows: int, columns: int, element_size: int, block: int = UPDATE_CONFIG[1]) -> int:
    """Columns of a (rows x columns) matrix formed per chunk (Weff's columns): as many whole ``block``s as fit in MATERIALIZE_CHUNK_BYTES, at least one
    block, at most all columns. Every chunk but the last is a whole number of blocks."""
    fit = MATERIALIZE_CHUNK_BYTES // max(rows * element_size, 1) // block * block
    return max(1, min(columns, max(block, fit)))


def _materialized_matmul(inp, w, out, left, right, r, method, quant, bias, fn, omega, scale) -> torch.Tensor:
    """out = inp @ Weff [+ bias] for many rows: Weff's columns built chunk by chunk by
    lora_update_kernel (in inp's dtype, laid out like w so reads and writes both coalesce),
    each multiplied by torch.addmm / torch.mm straight into its columns of out."""
    m, i_dim = inp.shape
    j_dim = w.shape[1]
    lq, l0, l1, group_l, stride_li, stride_lr = left
    rq, r0, r1, group_r, stride_rr, stride_rj = right
    block_i, block_j, warps = UPDATE_CONFIG
    step = materialize_chunk_columns(i_dim, j_dim, inp.element_size())
    column_major = w.stride(0) == 1 and w.stride(1) != 1
    # One buffer for every chunk (the last may use part of it): the extra memory is one chunk.
    buffer = torch.empty_strided((i_dim, step), (1, i_dim) if column_major else (step, 1), dtype=inp.dtype,
                                 device=inp.device)
    for j0 in range(0, j_dim, step):
        width = min(step, j_dim - j0)
        chunk = buffer[:, :width]
        if i_dim > 0:
            lora_update_kernel[(triton.cdiv(i_dim, block_i), triton.cdiv(width, block_j))](
                w, lq, l0, l1, rq, r0, r1, chunk, i_dim, j0 + width, r, j0,
                w.stride(0), w.stride(1), stride_li, stride_lr, stride_rr, stride_rj, chunk.stride(0), chunk.stride(1),
                max(int(group_l), 1), max(int(group_r), 1), float(omega), float(scale),
                FN=fn, QUANT=quant, METHOD=method, BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_R=BLOCK_R,
                num_warps=warps,
            )
        columns = out[:, j0:j0 + width]
        if bias is not None:
            torch.addmm(bias[j0:j0 + width], inp, chunk, out=columns)
        else:
            torch.mm(inp, chunk, out=columns)
    return out


_DUMMIES: Dict[torch.device, torch.Tensor] = {}


def _dummy_fp32(device) -> torch.Tensor:
    # Never read (its kernel branch is compiled out); a 2-D fp32 tensor keeps one signature.
    key = torch.device(device)
    if key not in _DUMMIES:
        _DUMMIES[key] = torch.zeros((1, 1), dtype=torch.float32, device=key)
    return _DUMMIES[key]


def _r_pad(r: int) -> int:
    for pad in OUTPUT_R_PADS:
        if r <= pad:
            return pad
    raise ValueError(f"the triton backend's 'output' placement supports rank r <= {OUTPUT_R_PADS[-1]}, got r={r} "
                     f"(use the cpp or reference backend)")


def forward(x, weight, a, b, bias, fn: str, placement: str, omega: float, scale: float) -> torch.Tensor:
    """y (M, N_out) for 2-D x (M, K_in)."""
    _check_dtype(x)
    x = x.contiguous()
    m = x.shape[0]
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    code = FN_CODES[fn]
    if placement == "weight":
        # in = x, Weff^T (K, N) = W^T + s fn(omega A^T B^T): L = A^T (K, r), R = B^T (r, N).
        return _matmul(x, weight.t(), out, lora=(a.t(), b.t()), bias=bias, fn=code, omega=omega, scale=scale)
    _r_pad(a.shape[0])
    u = torch.empty((m, a.shape[0]), dtype=torch.float32, device=x.device)
    _matmul(x, a.t(), u)                                       # U = x A^T, float32
    return _matmul(x, weight.t(), out, epilogue=1, u=u, e=b.t(), bias=bias, fn=code, omega=omega, scale=scale)


def backward(grad, x, weight, a, b, fn: str, placement: str, omega: float, scale: float, need_x: bool,
             need_weight: bool, need_bias: bool, need_lora: bool):
    """(dx, dweight, dbias, dA, dB); unneeded gradients are empty (0,) tensors."""
    _check_dtype(x)
    x, grad = x.contiguous(), grad.contiguous()
    a, b = a.contiguous(), b.contiguous()
    m, k = x.shape
    n, r = b.shape
    code = FN_CODES[fn]
    empty = x.new_empty(0)
    grad_x = grad_w = grad_a = grad_b = empty
    if placement == "weight":
        if need_x:
            # dX = dY Weff: in = dY (M, N), Weff (N, K) = W + s fn(omega B A): L = B, R = A.
            grad_x = _matmul(grad, weight, torch.empty((m, k), dtype=x.dtype, device=x.device), lora=(b, a),
                             fn=code, omega=omega, scale=scale)
        if need_weight or need_lora:
            grad_w, grad_a, grad_b = _wgrad(grad, x, a, b, code, omega, scale, need_weight, need_lora, weight.dtype)
    else:
        r_pad = _r_pad(r)
        if need_x or need_lora:
            u = torch.empty((m, r), dtype=torch.float32, device=x.device)
            _matmul(x, a.t(), u)
            du = torch.empty((m, r), dtype=torch.float32, device=x.device)
            _output_grad(grad, u, b, du, True, code, omega, scale, r_pad)
            if need_lora:
                grad_b = torch.empty((n, r), dtype=b.dtype, device=x.device)
                _output_grad(grad, u, b, grad_b, False, code, omega, scale, r_pad)
                grad_a = _matmul(du.t(), x, torch.empty((r, k), dtype=torch.float32, device=x.device)).to(a.dtype)
            if need_x:
                grad_x = _matmul(grad, weight, torch.empty((m, k), dtype=x.dtype, device=x.device), epilogue=2,
                                 u=du, e=a)
        if need_weight:
            grad_w, _, _ = _wgrad(grad, x, a, b, code, omega, scale, True, False, weight.dtype)
    # The bias gradient is a plain column sum of dY (torch's reduction).
    grad_bias = grad.sum(0, dtype=torch.float32).to(weight.dtype) if need_bias else empty
    return grad_x, grad_w, grad_bias, grad_a, grad_b


def wgrad_group_rows(n: int, k: int, r: int, g_element_size: int = 0, block_n: int = WGRAD_CONFIG[0],
                     block_k: int = WGRAD_CONFIG[1]) -> int:
    """Rows of G = dY^T X (N x K) that _wgrad handles at once: whole ``block_n`` blocks
    whose float32 factor partials, pa (one (r, k) slice per block) and pb (one (rows, r)
    slice per ``block_k`` columns), and, when G's rows are formed into a buffer, those rows
    (``g_element_size`` bytes an element) fit in MATERIALIZE_CHUNK_BYTES; at least one block,
    at most all n rows (rounded up to a block)."""
    per_block = block_n * k * g_element_size + 4 * r * (k + triton.cdiv(k, block_k) * block_n)
    fit = MATERIALIZE_CHUNK_BYTES // max(per_block, 1) * block_n
    return max(block_n, min(triton.cdiv(max(n, 1), block_n) * block_n, fit))


def _wgrad(grad, x, a, b, code, omega, scale, need_weight, need_lora, w_dtype):
    """(dW, dA, dB) of the weight placement (dW and the factors' gradients as asked, else
    empty). Up to FUSED_MAX_ROWS rows lora_wgrad_kernel forms G's tiles itself; past it G is
    torch's matmul a chunk of rows at a time and lora_wgrad_chunk_kernel reduces each chunk.
    The factor partials (and G's rows, when dW is not wanted) are formed for one group of
    G's rows at a time, within MATERIALIZE_CHUNK_BYTES (wgrad_group_rows), and summed group
    by group in a fixed order (deterministic): kept for all of G at once the partials took
    N K r / 8 bytes, 32 MiB at 4096 x 4096 and r = 16 (the bf16 dW's size twice)."""
    m, k = x.shape
    n, r = b.shape
    block_n, block_k, block_m, warps = WGRAD_CONFIG
    tiles_k = triton.cdiv(k, block_k)
    chunked = m > FUSED_MAX_ROWS
    # Without the adapter the factors are not read: x stands in for them, so dW alone has one
    # compiled variant per dtype whatever the factors' dtype.
    a_arg, b_arg = (a, b) if need_lora else (x, x)
    dw = torch.empty((n, k), dtype=w_dtype, device=x.device) if need_weight else _dummy_fp32(x.device)
    empty = x.new_empty(0)
    buffered = chunked and not need_weight  # else G's rows go straight into dW's
    if need_lora:
        group = wgrad_group_rows(n, k, r, x.element_size() if buffered else 0, block_n, block_k)
    else:  # dW alone: no partials, no buffer; one group
        group = triton.cdiv(max(n, 1), block_n) * block_n
    if need_lora:
        pa = torch.empty((triton.cdiv(group, block_n), r, k), dtype=torch.float32, device=x.device)
        pb = torch.empty((tiles_k, group, r), dtype=torch.float32, device=x.device)
        grad_a = torch.zeros((r, k), dtype=torch.float32, device=x.device)
        grad_b = torch.zeros((n, r), dtype=torch.float32, device=x.device)
    else:
        pa = pb = _dummy_fp32(x.device)
    g_buffer = torch.empty((group, k), dtype=x.dtype, device=x.device) if buffered else None
    for n0 in range(0, n if k > 0 else 0, group):
        rows = min(group, n - n0)
        tiles = triton.cdiv(rows, block_n)
        if chunked:
            g = dw[n0:n0 + rows] if g_buffer is None else g_buffer[:rows]
            torch.mm(grad[:, n0:n0 + rows].t(), x, out=g)
            if need_lora:
                lora_wgrad_chunk_kernel[(tiles, tiles_k)](
                    g, a_arg, b_arg, pa, pb, k, r, n0, n0 + rows, group, float(omega), float(scale),
                    FN=code, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_R=BLOCK_R, num_warps=warps,
                )
        else:
            lora_wgrad_kernel[(tiles, tiles_k)](
                grad, x, a_arg, b_arg, dw, pa, pb, m, n, k, r, n0 // block_n, group, float(omega), float(scale),
                # FN only matters with the adapter: one compiled variant for every plain dW = dY^T X.
                FN=code if need_lora else 0, NEED_DW=need_weight, NEED_LORA=need_lora, UPCAST=_upcast(x),
                BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=block_m, BLOCK_R=BLOCK_R, num_warps=warps,
            )
        if need_lora:
            grad_a += pa[:tiles].sum(0)
            grad_b[n0:n0 + rows] = pb[:, :rows].sum(0)
    grad_w = dw if need_weight else empty
    if not need_lora:
        return grad_w, empty, empty
    return grad_w, grad_a.to(a.dtype), grad_b.to(b.dtype)


def _output_grad(grad, u, b, out, reduce_over_n: bool, code, omega, scale, r_pad):
    m, n = grad.shape
    r = b.shape[1]
    block_m, block_n, warps = OUTPUT_GRAD_CONFIGS[r_pad]
    if out.numel() == 0:
        return out
    if (m == 0 and not reduce_over_n) or (n == 0 and reduce_over_n):
        return out.zero_()
    programs = triton.cdiv(m, block_m) if reduce_over_n else triton.cdiv(n, block_n)
    lora_output_grad_kernel[(programs,)](
        grad, u, b, out, m, n, r, float(omega), float(scale),
        FN=code, REDUCE_OVER_N=reduce_over_n, BLOCK_M=block_m, BLOCK_N=block_n, R_PAD=r_pad, num_warps=warps,
    )
    return out


# --------------------------------------------------------------------------- quantized adapters

QUANT_METHODS = {"uniform": 0, "kmeans": 1}


def _quant_matmul(inp: torch.Tensor, w: torch.Tensor, out: torch.Tensor, left: Tuple, right: Tuple, r: int,
                  method: str, bias: Optional[torch.Tensor], fn: int, omega: float, scale: float) -> torch.Tensor:
    """out (M, J) = inp (M, I) @ (w + scale fn(omega Q(L) Q(R))) (I, J) [+ bias].

    left / right = (codes, table0, table1, group_size, stride_row, stride_col): the stored
    factor's kernel tensors and the flat-index strides of L (I, r) / R (r, J) over it."""
    if out.numel() == 0:
        return out
    for t in (left[0], right[0]):
        if t.numel() >= 2 ** 31:
            raise ValueError(f"the triton backend indexes quantized factors with int32: {t.numel()} elements is "
                             f"too many (use the cpp or reference backend)")
    return _matmul(inp, w, out, quant=(QUANT_METHODS[method], r, left, right), bias=bias, fn=fn, omega=omega,
                   scale=scale)


def quant_forward(x, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, bias, method: str, group_a: int,
                  group_b: int, fn: str, omega: float, scale: float) -> torch.Tensor:
    """y (M, N_out) = x (W + scale fn(omega Q(B) Q(A)))^T + bias for 2-D x, with the factors
    dequantized tile by tile inside the kernel (placement "weight").

    a_codes (r, K_in) and b_codes (N_out, r): contiguous uint8 codes; a_t0/a_t1, b_t0/b_t1:
    float16 scales/minimums per group (uniform) or the 256-entry padded codebook twice
    (kmeans), as QuantizedTensor.kernel_tensors() returns them."""
    _check_dtype(x)
    x = x.contiguous()
    m, k = x.shape
    n, r = b_codes.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    # in = x, Weff^T (K, N): L = A^T (A[r, i] at flat r K + i), R = B^T (B[j, r] at flat j r_ + r).
    return _quant_matmul(x, weight.t(), out, (a_codes, a_t0, a_t1, group_a, 1, k), (b_codes, b_t0, b_t1, group_b, 1, r),
                         r, method, bias, FN_CODES[fn], omega, scale)


def quant_backward(grad, x, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, method: str, group_a: int,
                   group_b: int, fn: str, omega: float, scale: float, need_x: bool, need_weight: bool,
                   need_bias: bool):
    """(dx, dweight, dbias) of quant_forward; the adapter is frozen. dx = dY Weff with the
    factors dequantized in the kernel again; dweight = dY^T X needs no adapter at all."""
    _check_dtype(x)
    x, grad = x.contiguous(), grad.contiguous()
    m, k = x.shape
    n, r = b_codes.shape
    empty = x.new_empty(0)
    grad_x = grad_w = empty
    if need_x:
        # in = dY (M, N), Weff (N, K): L = B (B[i, r] at flat i r_ + r), R = A (A[r, j] at flat r K + j).
        grad_x = _quant_matmul(grad, weight, torch.empty((m, k), dtype=x.dtype, device=x.device),
                               (b_codes, b_t0, b_t1, group_b, r, 1), (a_codes, a_t0, a_t1, group_a, k, 1),
                               r, method, None, FN_CODES[fn], omega, scale)
    if need_weight:
        # NEED_LORA off: the adapter operands are never read (weight stands in for them).
        grad_w, _, _ = _wgrad(grad, x, weight, weight, 0, omega, scale, True, False, weight.dtype)
    grad_bias = grad.sum(0, dtype=torch.float32).to(weight.dtype) if need_bias else empty
    return grad_x, grad_w, grad_bias


# --------------------------------------------------------------------------- ahead-of-time specs

_DTYPES = ("fp16", "bf16", "fp32")


def _matmul_spec(in_t, w_t, out_t, *, lora, epilogue, has_bias, fn, config, quant_method=None, factor_t=None,
                 e_t=None):
    """lora_matmul_kernel as _matmul launches it; quant_method (a QUANT_METHODS code) for
    quantized factors: uint8 codes and float16 side tables instead of plain factors and
    the fp32 dummy. factor_t: the plain factors' dtype (default w_t); e_t: the epilogue's
    factor (default w_t, which stands in when there is no epilogue)."""
    block_m, block_j, block_i, warps = config
    quant = quant_method is not None
    factor_t, table_t = ("u8", "fp16") if quant else (factor_t or w_t, "fp32")
    ints = ["M", "I", "J", "R", "stride_im", "stride_ii", "stride_wi", "stride_wj", "stride_li", "stride_lr",
            "stride_rr", "stride_rj", "stride_um", "stride_ur", "stride_er", "stride_ej", "group_l", "group_r"]
    signature = {"in_ptr": f"*{in_t}", "w_ptr": f"*{w_t}",
                 "l_ptr": f"*{factor_t}", "l0_ptr": f"*{table_t}", "l1_ptr": f"*{table_t}",
                 "r_ptr": f"*{factor_t}", "r0_ptr": f"*{table_t}", "r1_ptr": f"*{table_t}",
                 "bias_ptr": f"*{w_t}", "u_ptr": "*fp32", "e_ptr": f"*{e_t or w_t}", "out_ptr": f"*{out_t}"}
    signature.update({name: "i32" for name in ints})
    signature.update({"omega": "fp32", "scale": "fp32", "i_split": "i32", "stride_os": "i32"})
    constexprs = {"FN": fn, "LORA": lora or quant, "QUANT": quant, "METHOD": quant_method if quant else 0,
                  "EPILOGUE": epilogue, "HAS_BIAS": has_bias, "UPCAST": False,
                  "BLOCK_M": block_m, "BLOCK_J": block_j, "BLOCK_I": block_i, "BLOCK_R": BLOCK_R}
    signature.update({name: "constexpr" for name in constexprs})
    return dict(fn=lora_matmul_kernel, signature=signature, constexprs=constexprs, num_warps=warps)


def _update_spec(dt, fn, quant_method=None, factor_t=None):
    """lora_update_kernel as _materialized_matmul launches it (plain factors of dtype
    factor_t, default dt, or quantized ones)."""
    block_i, block_j, warps = UPDATE_CONFIG
    quant = quant_method is not None
    factor_t, table_t = ("u8", "fp16") if quant else (factor_t or dt, "fp32")
    signature = {"w_ptr": f"*{dt}", "l_ptr": f"*{factor_t}", "l0_ptr": f"*{table_t}", "l1_ptr": f"*{table_t}",
                 "r_ptr": f"*{factor_t}", "r0_ptr": f"*{table_t}", "r1_ptr": f"*{table_t}", "out_ptr": f"*{dt}"}
    ints = ["I", "J", "R", "j_start", "stride_wi", "stride_wj", "stride_li", "stride_lr", "stride_rr", "stride_rj",
            "stride_oi", "stride_oj", "group_l", "group_r"]
    signature.update({name: "i32" for name in ints})
    signature.update({"omega": "fp32", "scale": "fp32"})
    constexprs = {"FN": fn, "QUANT": quant, "METHOD": quant_method if quant else 0,
                  "BLOCK_I": block_i, "BLOCK_J": block_j, "BLOCK_R": BLOCK_R}
    signature.update({name: "constexpr" for name in constexprs})
    return dict(fn=lora_update_kernel, signature=signature, constexprs=constexprs, num_warps=warps)


def _factor_dtypes(dt: str) -> Tuple[str, ...]:
    """The plain factors' dtypes the ops pass with x of dtype dt: dt, and float32 under a half x."""
    return (dt,) if dt == "fp32" else (dt, "fp32")


def aot_specs() -> Iterator[Dict]:
    """Every configuration the launchers above can pick, for ahead-of-time compilation."""
    for dt in _DTYPES:
        # The sizes _matmul_config tells apart: REGEN_CONFIGS' row counts for the regenerating
        # products (weight placement, plain or quantized factors), _SMALL_M and one more for
        # the plain ones, each config listed once.
        for rows in (REGEN_CONFIGS[0][0], _SMALL_M, _SMALL_M + 1):
            config, regen = _matmul_config(rows, regenerates=False), _matmul_config(rows, regenerates=True)
            plain = rows >= _SMALL_M
            for ft in _factor_dtypes(dt):
                for fn in FN_CODES.values():
                    for has_bias in (False, True):
                        # weight placement forward and dx; output placement forward (epilogue 1, B^T)
                        yield _matmul_spec(dt, dt, dt, lora=True, epilogue=0, has_bias=has_bias, fn=fn, config=regen,
                                           factor_t=ft)
                        if plain:
                            yield _matmul_spec(dt, dt, dt, lora=False, epilogue=1, has_bias=has_bias, fn=fn,
                                               config=config, e_t=ft)
                    if dt != "fp32":  # split reductions write float32 partials (no bias), plain or quantized
                        # (quantized factors are uint8 codes whatever the plain factors' dtype: listed once)
                        methods = (None, *QUANT_METHODS.values()) if ft == dt else (None,)
                        for method in methods:
                            yield _matmul_spec(dt, dt, "fp32", lora=True, epilogue=0, has_bias=False, fn=fn,
                                               config=regen, quant_method=method, factor_t=ft)
                if plain:  # U = x A^T (fp32 out); output-placement dx (epilogue 2, A)
                    yield _matmul_spec(dt, ft, "fp32", lora=False, epilogue=0, has_bias=False, fn=0, config=config)
                    yield _matmul_spec(dt, dt, dt, lora=False, epilogue=2, has_bias=False, fn=0, config=config,
                                       e_t=ft)
            if dt != "fp32" and plain:  # dA = dU^T x (fp32 in and out); for fp32 this is the U spec above
                yield _matmul_spec("fp32", dt, "fp32", lora=False, epilogue=0, has_bias=False, fn=0, config=config)
            # quantized adapters: forward (with or without bias) and dx (no bias)
            for method in QUANT_METHODS.values():
                for fn in FN_CODES.values():
                    for has_bias in (False, True):
                        yield _matmul_spec(dt, dt, dt, lora=True, epilogue=0, has_bias=has_bias, fn=fn,
                                           config=regen, quant_method=method)
        for fn in FN_CODES.values():
            for method in (None, *QUANT_METHODS.values()):
                yield _update_spec(dt, fn, method)
            if dt != "fp32":
                yield _update_spec(dt, fn, factor_t="fp32")
        block_n, block_k, block_m, warps = WGRAD_CONFIG
        for fn in FN_CODES.values():
            for ft in _factor_dtypes(dt):
                yield dict(fn=lora_wgrad_chunk_kernel,
                           signature={"g_ptr": f"*{dt}", "a_ptr": f"*{ft}", "b_ptr": f"*{ft}", "pa_ptr": "*fp32",
                                      "pb_ptr": "*fp32", "K": "i32", "R": "i32", "n_start": "i32",
                                      "n_stop": "i32", "pb_rows": "i32", "omega": "fp32", "scale": "fp32",
                                      "FN": "constexpr",
                                      "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_R": "constexpr"},
                           constexprs={"FN": fn, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_R": BLOCK_R},
                           num_warps=warps)
                for need_dw, need_lora in ((True, False), (False, True), (True, True)):
                    if not need_lora and (fn != 0 or ft != dt):
                        continue  # without the adapter the launcher passes FN 0 and x for the factors
                    dw_t = dt if need_dw else "fp32"
                    yield dict(fn=lora_wgrad_kernel,
                               signature={"dy_ptr": f"*{dt}", "x_ptr": f"*{dt}", "a_ptr": f"*{ft}",
                                          "b_ptr": f"*{ft}", "dw_ptr": f"*{dw_t}", "pa_ptr": "*fp32",
                                          "pb_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "R": "i32",
                                          "tile_n0": "i32", "pb_rows": "i32", "omega": "fp32", "scale": "fp32",
                                          "FN": "constexpr", "NEED_DW": "constexpr", "NEED_LORA": "constexpr",
                                          "UPCAST": "constexpr",
                                          "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "BLOCK_M": "constexpr",
                                          "BLOCK_R": "constexpr"},
                               constexprs={"FN": fn, "NEED_DW": need_dw, "NEED_LORA": need_lora, "UPCAST": False,
                                           "BLOCK_N": block_n,
                                           "BLOCK_K": block_k, "BLOCK_M": block_m, "BLOCK_R": BLOCK_R},
                               num_warps=warps)
                for reduce_over_n in (True, False):
                    for r_pad, (block_m2, block_n2, warps2) in OUTPUT_GRAD_CONFIGS.items():
                        out_t = "fp32" if reduce_over_n else ft  # dU, or dB in B's dtype
                        yield dict(fn=lora_output_grad_kernel,
                                   signature={"dy_ptr": f"*{dt}", "u_ptr": "*fp32", "b_ptr": f"*{ft}",
                                              "out_ptr": f"*{out_t}", "M": "i32", "N": "i32", "R": "i32",
                                              "omega": "fp32", "scale": "fp32", "FN": "constexpr",
                                              "REDUCE_OVER_N": "constexpr", "BLOCK_M": "constexpr",
                                              "BLOCK_N": "constexpr", "R_PAD": "constexpr"},
                                   constexprs={"FN": fn, "REDUCE_OVER_N": reduce_over_n, "BLOCK_M": block_m2,
                                               "BLOCK_N": block_n2, "R_PAD": r_pad},
                                   num_warps=warps2)


def describe_specs() -> List[str]:
    return [f"{s['fn'].__name__}{s['constexprs']} {s['signature']}" for s in aot_specs()]
