"""Many-head attention (methods.md section 2): lucidops against PyTorch's SDPA.

CPU: lucidops.ops.attention on the ``aten`` backend (PyTorch's own fused flash-attention
CPU kernel, adapted to the op's contract: so about SDPA's speed, not a lucidops kernel) and
on the ``cpp`` backend (lucidops' kernel, csrc/cpu/attention.cpp), against torch's SDPA and
the math reference (the ``reference`` backend and plain autograd through it), timed
interleaved: float32 ViT-like shapes (N = 197) at a fixed width of 192 with head dims
8..128; N = 1024 with 24 heads of dim 8 (causal and not), 12 of dim 16 and 3 of dim 64;
batch 1 with one head (N = 1024, d = 64) and three (N = 197, d = 64), fewer than the threads;
one query against 197 keys (a class token's attention) and against 1024 (a decoding step), d = 64;
and bfloat16, float16 and float64 at N = 197, the cases behind the CPU default (cpp in every dtype);
and attention dropout 0.1 (lucidops' fused dropout against SDPA's dropout_p, and against
lucidops' own kernel without dropout: the fused dropout's cost) at d = 8 and 64.
Rows carry speedup_vs_best_sdpa and speedup_vs_reference (lucidops[reference] in the same
run).

CUDA: bf16, d in {8, 16, 32, 64}, H in {12, 48, 96}, N in {197, 1024, 4096}, causal and
not, forward and forward+backward; lucidops[triton] against SDPA forced to each backend
(flash, efficient, cudnn, math) and FlexAttention where they run, and for d <= 32 the same
kernels with a candidate tiling (CANDIDATE) beside the shipped one. B is chosen so B*H*N is about
2^20 tokens (enough to fill an H100), the math backend is skipped when its score matrix
would exceed 4 GiB. Rows carry TFLOP/s (lucidops' FLOP formulas: 4 N^2 d per head
forward, 10 N^2 d backward; causal counts visible pairs only) and the ratio to a
measured bf16 matmul rate of the card; speedup_vs_best_sdpa compares to the fastest
SDPA backend that ran (the issue's targets: >= 1.5 for d <= 16, >= 0.9 for d = 64).
The grid runs the targets first, d = 16 and 64 at N = 1024 and then 4096 with one head count
each, then their other head counts, then the other (N, d), then two cases with attention
dropout 0.1 (FlexAttention has none; it sits those out);
``LUCIDOPS_BENCH_BUDGET_S`` stops it starting new cases after that many seconds
(bench/gpu_check.sh sets it to fit a short GPU session).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
from typing import Callable, Dict, List, Optional
from unittest import mock

import torch
import torch.nn.functional as F

import lucidops
from lucidops import backends
from lucidops.reference import attention as attention_reference
from lucidops.reference import attention_dropout

from .timing import measure_interleaved_ms, measure_ms

_ops = importlib.import_module("lucidops.ops.attention")


def _flops(b: int, h: int, n: int, d: int, causal: bool, mode: str, queries: Optional[int] = None) -> int:
    pairs = _ops.visible_pairs(n if queries is None else queries, n, causal)
    return b * h * pairs * d * (4 if mode == "forward" else 14)


def _sdpa(backend: Optional[str]) -> Callable:
    def fn(q, k, v, causal, dropout_p):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        kind = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH, "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None)}[backend]
        if kind is None:
            raise RuntimeError(f"this torch has no {backend} SDPA backend")
        with sdpa_kernel(kind):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout_p)
    return fn


def _flex() -> Optional[Callable]:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention)
    masks: Dict = {}
    last_case: List = [None]

    def fn(q, k, v, causal, dropout_p):
        if dropout_p:
            raise NotImplementedError("flex_attention has no dropout")
        # Each shape and mask compiles another variant, and past Dynamo's recompile limit (8)
        # flex_attention ran eager, materialising every score, under its own label: a new case
        # starts from an empty cache (at its warm-up; nothing else here is compiled by Dynamo).
        case = (tuple(q.shape), q.dtype, q.device, causal)
        if case != last_case[0]:
            torch._dynamo.reset()
            last_case[0] = case
        block_mask = None
        if causal:
            key = (q.shape[-2], q.device)
            if key not in masks:
                masks[key] = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, q.shape[-2], q.shape[-2],
                                               device=q.device)
            block_mask = masks[key]
        with _failing_on_recompile_limit():  # a fallback to eager is an error, reported as such
            return compiled(q, k, v, block_mask=block_mask)
    return fn


def _failing_on_recompile_limit():
    """Dynamo raises instead of running eager past its recompile limit, where torch has the setting."""
    config = torch._dynamo.config
    if hasattr(config, "fail_on_recompile_limit_hit"):
        return config.patch(fail_on_recompile_limit_hit=True)
    return contextlib.nullcontext()


def _lucidops(backend: str) -> Callable:
    def fn(q, k, v, causal, dropout_p):
        with lucidops.use_backend(backend):
            return lucidops.ops.attention(q, k, v, causal=causal, dropout_p=dropout_p)
    return fn


# A candidate tiling for small heads, timed beside the shipped one so that a GPU run can choose
# between them: one head per program, 128 x 64 forward tiles on 8 warps (FlexAttention's kind of
# tile: on the first H100 run it ran 1.3x-2.3x the best SDPA backend at d = 16, where the shipped
# 4 heads of 32 x 32 ran 0.6x-1.3x) and 64 x 64 backward tiles. Compiled for sm_90 in bf16 (d 16
# and 32): 133-166 registers forward, 136-255 backward, no local memory.
CANDIDATE = "lucidops[triton, 1 head 128x64]"
CANDIDATE_CONFIGS = {"forward": (1, 128, 64, 8), "backward": (1, 64, 64, 4)}


@contextlib.contextmanager
def small_head_candidate():
    """The Triton attention kernels with CANDIDATE_CONFIGS for head dims up to 32, restored after."""
    tk = importlib.import_module("lucidops.triton_kernels.attention")
    with mock.patch.dict(tk.FORWARD_CONFIGS, dict.fromkeys((16, 32), CANDIDATE_CONFIGS["forward"])), \
            mock.patch.dict(tk.BACKWARD_CONFIGS, dict.fromkeys((16, 32), CANDIDATE_CONFIGS["backward"])):
        yield


def _within_candidate(step: Callable[[], None]) -> Callable[[], None]:
    def candidate_step():
        with small_head_candidate():  # forward and backward both
            step()
    return candidate_step


def _step(fn, q, k, v, causal, dropout_p, mode) -> Callable[[], None]:
    if mode == "forward":
        def step():
            with torch.no_grad():
                fn(q, k, v, causal, dropout_p)
    else:
        grad = torch.randn_like(q)
        qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))

        def step():
            qg.grad = kg.grad = vg.grad = None
            fn(qg, kg, vg, causal, dropout_p).backward(grad)
    return step


def _time_each_on_cuda(impls: Dict[str, Callable], q, k, v, causal, dropout_p, mode, case) -> Dict[str, float]:
    """Each implementation timed on its own (CUDA events); one that cannot run is reported."""
    b, h, n, _ = q.shape
    times: Dict[str, float] = {}
    for name, fn in impls.items():
        if name == "sdpa[math]" and b * h * n * n * 4 > (4 << 30):
            continue  # the math backend materialises the (B, H, N, N) scores
        step = _step(fn, q, k, v, causal, dropout_p, mode)
        try:
            times[name] = measure_ms(_within_candidate(step) if name == CANDIDATE else step, "cuda")
        except Exception as exc:  # e.g. flash refusing a head dim, out of memory
            print(f"  attention {case} {mode} {name}: unavailable ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:100] if str(exc) else ''})")
            torch.cuda.empty_cache()
    return times


def _matmul_tflops(device: str) -> float:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = measure_ms(lambda: a @ a, device)
    return 2 * 8192 ** 3 / ms / 1e9


def _cases(device: str, quick: bool):
    """(B, H, N, d, causal, dtype, dropout_p), then the query count where it is not N, of each
    case. On CUDA the most telling come first (the
    issue's two targets, d = 16 and d = 64, at N = 1024 and 4096), so that a run cut short by
    its time budget (``LUCIDOPS_BENCH_BUDGET_S``) has measured those."""
    if device == "cuda":
        ds, hs, ns = ((64, 8), (12, 96), (1024, 197)) if quick else ((16, 64, 8, 32), (48, 12, 96), (1024, 4096, 197))
        targets = [(n, d) for n in (1024, 4096) if n in ns for d in (16, 64) if d in ds]
        # One head count of every target first (the first run's budget ended inside the d = 16
        # cases: d = 64 was never reached), then their other head counts, then the rest.
        first = [(n, d, hs[0]) for n, d in targets]
        rest = [(n, d, h) for n, d in targets for h in hs[1:]]
        rest += [(n, d, h) for n in ns for d in ds if (n, d) not in targets for h in hs]
        for n, d, h in first + rest:
            b = max(1, (1 << (18 if quick else 20)) // (h * n))
            for causal in (False, True):
                yield b, h, n, d, causal, torch.bfloat16, 0.0
        for d in (16, 64):
            if d in ds:  # dropout 0.1 on the two target head dims, 48 and 12 heads at N = 1024
                heads = 48 if d == 16 else 12
                yield max(1, (1 << (18 if quick else 20)) // (heads * 1024)), heads, 1024, d, False, torch.bfloat16, 0.1
        return
    for d in ((8, 64) if quick else (8, 16, 32, 64, 128)):
        h = 192 // d if d < 64 else 3  # fixed width 192 (ViT-Tiny), more heads as d shrinks
        yield (2 if quick else 8), h, 197, d, False, torch.float32, 0.0
    if quick:
        return
    # longer sequences, where the score rows outgrow the small-GEMM blocks
    for causal in (False, True):
        yield 2, 24, 1024, 8, causal, torch.float32, 0.0
    yield 2, 12, 1024, 16, False, torch.float32, 0.0
    yield 2, 3, 1024, 64, False, torch.float32, 0.0
    # batch 1 with fewer heads than most machines have threads: the cpp backward splits keys
    yield 1, 1, 1024, 64, False, torch.float32, 0.0
    yield 1, 3, 197, 64, False, torch.float32, 0.0
    # one query row per head (the cpp kernel's few-query path): a class token over a ViT's tokens,
    # and a decoding step over 1024 cached keys (where float32 d = 64 backwards go to aten on AVX2)
    yield 8, 6, 197, 64, False, torch.float32, 0.0, 1
    yield 1, 12, 1024, 64, False, torch.float32, 0.0, 1
    # the other dtypes, which check the CPU default (cpp in every dtype, ops/attention.py) against aten
    for dtype, dims in ((torch.bfloat16, (8, 64, 128)), (torch.float16, (64, 128)), (torch.float64, (8, 64))):
        for d in dims:
            yield 8, (192 // d if d < 64 else 3), 197, d, False, dtype, 0.0
    # attention dropout in training: lucidops' fused mask against SDPA's dropout_p
    for d in (8, 64):
        yield 8, (192 // d if d < 64 else 3), 197, d, False, torch.float32, 0.1


def _without_dropout(fn: Callable) -> Callable:
    return lambda q, k, v, causal, dropout_p: fn(q, k, v, causal, 0.0)


def _reference_autograd(q, k, v, causal, dropout_p):
    """Plain autograd through the reference, dropping by a fresh seed as the op does."""
    seed = attention_dropout.draw_seed(q.device) if dropout_p else None
    return attention_reference.attention(q, k, v, causal=causal, dropout_p=dropout_p, seed=seed)


def budget_s() -> Optional[float]:
    """Seconds after which no new case starts (``LUCIDOPS_BENCH_BUDGET_S``; unset: no limit):
    the full CUDA grid, FlexAttention compiling per shape, outlasts a short GPU session.
    A ValueError naming the variable for anything but a positive number (the bench runner
    asks before any benchmark starts)."""
    value = os.environ.get("LUCIDOPS_BENCH_BUDGET_S", "").strip()
    if not value:
        return None
    try:
        budget = float(value)
    except ValueError:
        budget = float("nan")
    if not 0 < budget < float("inf"):
        raise ValueError(f"LUCIDOPS_BENCH_BUDGET_S must be a positive number of seconds, got {value!r}")
    return budget


def run(device: str, quick: bool = False, on_rows: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """The rows of every case and mode; ``on_rows`` gets the rows so far after each of them,
    so that a run killed by a time limit mid-grid keeps the cases it measured."""
    rows: List[Dict] = []
    peak = _matmul_tflops(device) if device == "cuda" else None
    impls: Dict[str, Callable] = {}
    if device == "cuda":
        impls["lucidops[triton]"] = _lucidops("triton")
        # cuDNN's backend runs only when forced (last in SDPA's default order), so it is forced too.
        for backend in ("flash", "efficient", "cudnn", "math"):
            impls[f"sdpa[{backend}]"] = _sdpa(backend)
        flex = _flex()
        if flex is not None:
            impls["flex_attention"] = flex
    else:
        impls["lucidops[aten]"] = _lucidops("aten")
        if backends.backend_problem("cpp", "cpu") is None:
            impls["lucidops[cpp]"] = _lucidops("cpp")
        impls["lucidops[reference]"] = _lucidops("reference")
        impls["sdpa"] = _sdpa(None)
        impls["reference (autograd)"] = _reference_autograd
    budget = budget_s()
    started = time.perf_counter()
    cases = list(_cases(device, quick))
    for index, (b, h, n, d, causal, dtype, dropout_p, *queries) in enumerate(cases):
        nq = queries[0] if queries else n
        if index and budget is not None and time.perf_counter() - started > budget:  # the first always runs
            print(f"  attention: time budget of {budget:g} s spent; {len(cases) - index} of {len(cases)} cases "
                  "not measured", flush=True)
            break
        g = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, rows, d, device=device, dtype=dtype, generator=g) for rows in (nq, n, n))
        case = f"B{b} H{h} N{n} d{d}{' causal' if causal else ''} {str(dtype)[6:]}"
        case += f" {nq} {'query' if nq == 1 else 'queries'}" if nq != n else ""
        case += f" dropout {dropout_p:g}" if dropout_p else ""
        # aten's kernel draws its own dropout mask: lucidops runs dropout on cpp / reference only.
        # The lucidops kernel without dropout beside it measures what the fused dropout costs.
        runnable = {name: fn for name, fn in impls.items() if not (dropout_p and name == "lucidops[aten]")}
        if device == "cuda" and d <= 32 and not dropout_p:
            runnable[CANDIDATE] = impls["lucidops[triton]"]
        if dropout_p:
            kernel = "lucidops[triton]" if device == "cuda" else "lucidops[cpp]"
            if kernel in impls:
                runnable[f"{kernel}, no dropout"] = _without_dropout(impls[kernel])
        for mode in ("forward", "forward+backward"):
            if device == "cpu":  # interleaved, so that the ratios hold on a busy host
                steps = {name: _step(fn, q, k, v, causal, dropout_p, mode) for name, fn in runnable.items()}
                times = measure_interleaved_ms(steps, device)
            else:
                times = _time_each_on_cuda(runnable, q, k, v, causal, dropout_p, mode, case)
            baselines = [t for name, t in times.items() if name.startswith("sdpa")]
            for name, ms in times.items():
                tflops = _flops(b, h, n, d, causal, mode, nq) / ms / 1e9
                row = dict(family="attention", case=case, mode=mode, impl=name, ms=ms, tflops=tflops)
                if baselines:
                    row["speedup_vs_best_sdpa"] = min(baselines) / ms
                if device == "cpu" and "lucidops[reference]" in times:
                    row["speedup_vs_reference"] = times["lucidops[reference]"] / ms
                if peak:
                    row["fraction_of_bf16_matmul"] = tflops / peak
                rows.append(row)
            if on_rows is not None:
                on_rows(rows)
    return rows
