"""Sine LoRA linear layer: the fused lucidops op against the authors' naive approach.

Side by side, frozen base weight, adapters trained:
- ``naive``: builds W0 + s sin(omega B A) (N_out x K_in) with autograd, which keeps it (and
  the phase) for backward, as the authors' code does;
- ``plain LoRA``: x W0^T + s (x A^T) B^T (no sine: the memory floor of an adapter);
- ``linear``: x W0^T, the cost floor;
- ``lucidops[<backend>]``: the fused op (cpp on CPU: recompute path; triton on GPU);
- ``lucidops[triton, fused tiles]``: triton with its tile-fused kernels at every batch size
  (the update regenerated inside the matmul, G = dY^T X reduced in the same kernel); by
  default it builds Weff and G in chunks for torch's matmul above 128 rows.
Also forward+backward with peft's lora_dropout (the adapter reads dropout(x)), and on a
half-precision x with float32 adapters (peft's default over a bf16/fp16 base).
Forward (no grad), forward+backward, bytes saved for backward (saved_tensors_hooks,
distinct storages, the frozen weight included for every implementation), and on CUDA the
peak allocator bytes of forward+backward. Full size: x (4096, 1024), W (1024, 1024) on
CPU; x (16384, 4096), W (4096, 4096), bf16 on CUDA; r = 16.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import lucidops
from lucidops import backends
from lucidops._dtypes import HALF_DTYPES
from lucidops.profile.report import saved_bytes

from .timing import measure_interleaved_ms, peak_mb_above

OMEGA, RANK = 100.0, 16


def _impls(device: str, scale: float) -> Dict[str, Callable]:
    def naive(x, w, a, b, bias):
        return F.linear(x, w + scale * torch.sin(OMEGA * (b @ a)), bias)

    def plain_lora(x, w, a, b, bias):
        return F.linear(x, w, bias) + scale * ((x @ a.T) @ b.T)

    def linear(x, w, a, b, bias):
        return F.linear(x, w, bias)

    impls: Dict[str, Callable] = {"naive": naive, "plain LoRA": plain_lora, "linear": linear}
    for backend in ("cpp", "triton", "reference"):
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is a correctness tool, not a fast path
        if backends.backend_problem(backend, device) is None:
            def fused(x, w, a, b, bias, _b=backend, adapter_input=None):
                with lucidops.use_backend(_b):
                    return lucidops.ops.sine_lora_linear(x, w, a, b, bias, omega=OMEGA, scale=scale,
                                                         adapter_input=adapter_input)
            impls[f"lucidops[{backend}]"] = fused
    if "lucidops[triton]" in impls:
        impls[FUSED_TILES] = impls["lucidops[triton]"]  # timed inside _fused_tiles(), see _setting
    return impls


FUSED_TILES = "lucidops[triton, fused tiles]"


@contextmanager
def _fused_tiles():
    """The triton backend keeps its tile-fused kernels at every batch size (by default it
    builds Weff and G in chunks above FUSED_MAX_ROWS rows): measures that crossover."""
    from lucidops.triton_kernels import lora as tk

    limit = tk.FUSED_MAX_ROWS
    tk.FUSED_MAX_ROWS = 1 << 62
    try:
        yield
    finally:
        tk.FUSED_MAX_ROWS = limit


def _setting(name: str):
    """The context a step of implementation ``name`` runs in: forward and backward alike."""
    return _fused_tiles() if name == FUSED_TILES else nullcontext()


def run(device: str, quick: bool = False, on_rows: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """The rows of every case and mode; ``on_rows`` gets the rows so far after each of them."""
    if device == "cuda":
        m, k, n, dtype = (2048, 1024, 1024, torch.bfloat16) if quick else (16384, 4096, 4096, torch.bfloat16)
    else:
        m, k, n, dtype = (512, 256, 256, torch.float32) if quick else (4096, 1024, 1024, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    bias = torch.randn(n, generator=g).to(device, dtype)
    a = (torch.randn(RANK, k, generator=g) / k ** 0.5).to(device, dtype).requires_grad_(True)
    b = (torch.randn(n, RANK, generator=g) * 0.01).to(device, dtype).requires_grad_(True)
    grad = torch.randn(m, n, generator=g).to(device, dtype)
    scale = 1.0 / k ** 0.5
    impls = _impls(device, scale)
    case = f"x ({m}, {k}) W ({n}, {k}) r={RANK} {str(dtype).replace('torch.', '')}"
    rows: List[Dict] = []
    with torch.no_grad():
        expected = impls["naive"](x.double(), w.double(), a.double(), b.double(), bias.double())

    # Forward at full batch and at serving batch sizes (unmerged adapter). Implementations
    # are timed interleaved, so the ratios between them hold on a busy machine.
    for rows_m in ([m] + [1, 16, 64]):
        xs = x[:rows_m].contiguous()
        row_case = case if rows_m == m else f"{case} M={rows_m}"

        def forward_step(name, fn, xs=xs):
            def step():
                with torch.no_grad(), _setting(name):
                    return fn(xs, w, a, b, bias)
            return step

        # At the serving sizes (M <= 64) the default already is the tile-fused path.
        steps = {name: forward_step(name, fn) for name, fn in impls.items() if rows_m == m or name != FUSED_TILES}
        times = measure_interleaved_ms(steps, device)
        for name, ms in times.items():
            row = dict(family="lora", case=row_case, mode="forward", impl=name, ms=ms)
            if rows_m == m and name != "linear" and name != "plain LoRA":
                out = steps[name]().double()
                row["rel_err_vs_fp64"] = ((out - expected).norm() / expected.norm()).item()
            rows.append(row)
        _ratios(rows, times, "forward", row_case)
        if on_rows is not None:
            on_rows(rows)

    # Forward + backward: adapters trained, frozen weight, x needs its gradient too.
    xg = x.clone().requires_grad_(True)

    def train_step(name, fn):
        def step():
            xg.grad = a.grad = b.grad = None
            with _setting(name):
                fn(xg, w, a, b, bias).backward(grad)
        return step

    steps = {name: train_step(name, fn) for name, fn in impls.items()}
    times = measure_interleaved_ms(steps, device)
    saved = {}
    for name in times:
        saved[name] = saved_bytes(functools.partial(impls[name], xg, w, a, b, bias))
        row = dict(family="lora", case=case, mode="forward+backward", impl=name, ms=times[name],
                   saved_for_backward_MB=saved[name] / 2**20)
        xg.grad = a.grad = b.grad = None  # else the baseline held the last step's dx, which the step frees
        mb = peak_mb_above(steps[name], device)
        if mb is not None:
            row["peak_MB_above_inputs"] = mb
        rows.append(row)
    _ratios(rows, times, "forward+backward", case)
    for row in rows:
        if row["mode"] == "forward+backward" and "plain LoRA" in saved and row["impl"] in saved:
            row["saved_vs_plain_lora"] = saved[row["impl"]] / saved["plain LoRA"]
    if on_rows is not None:
        on_rows(rows)
    rows += _with_adapter_dropout(device, scale, case, xg, w, a, b, bias, grad)
    if device == "cpu":
        if on_rows is not None:
            on_rows(rows)
        rows += _bfloat16_training(device, scale, case, xg, w, a, b, bias, grad)
    if dtype in HALF_DTYPES:
        if on_rows is not None:
            on_rows(rows)
        rows += with_float32_adapters(device, scale, case, xg, w, a.float(), b.float(), bias, grad)
    return rows


DROPOUT = 0.1


def _with_adapter_dropout(device: str, scale: float, case: str, xg, w, a, b, bias, grad) -> List[Dict]:
    """Forward+backward with peft's lora_dropout: the adapter reads u = dropout(x), the base x.
    The naive formulation then adds u (s sin(omega B A))^T to x W^T; lucidops computes
    op(u) + (x - u) W^T (``adapter_input``)."""
    def naive(x, u):
        return F.linear(x, w, bias) + F.linear(u, scale * torch.sin(OMEGA * (b @ a)))

    def plain_lora(x, u):
        return F.linear(x, w, bias) + scale * ((u @ a.T) @ b.T)

    impls: Dict[str, Callable] = {"naive": naive, "plain LoRA": plain_lora}
    impls.update(_lucidops_variants(device, scale, w, a, b, bias, adapter_input=True))
    return _time_training(device, case, f"forward+backward, lora_dropout {DROPOUT}", xg, a, b, grad, impls,
                          _call_dropped)


def with_float32_adapters(device: str, scale: float, case: str, xg, w, a, b, bias, grad) -> List[Dict]:
    """Forward+backward with float32 adapters a, b over a half-precision x, w (peft's default,
    ``autocast_adapter_dtype``). The naive formulation forms s sin(omega B A) in float32 and
    rounds it into the weight; plain LoRA runs in float32 on x cast up, as peft does; lucidops
    takes the float32 factors as they are. Rows carry the forward's error against float64."""
    a, b = a.detach().requires_grad_(True), b.detach().requires_grad_(True)

    def naive(x):
        return F.linear(x, w + (scale * torch.sin(OMEGA * (b @ a))).to(w.dtype), bias)

    def plain_lora(x):
        return F.linear(x, w, bias) + (scale * ((x.to(a.dtype) @ a.T) @ b.T)).to(x.dtype)

    impls: Dict[str, Callable] = {"naive": naive, "plain LoRA": plain_lora}
    impls.update(_lucidops_variants(device, scale, w, a, b, bias, adapter_input=False))
    rows = _time_training(device, case, "forward+backward, float32 adapters", xg, a, b, grad, impls, _call)
    with torch.no_grad():
        expected = F.linear(xg.double(), w.double() + scale * torch.sin(OMEGA * (b.double() @ a.double())),
                            bias.double())
    for row in rows:
        if row["impl"] != "plain LoRA":  # no sine: another function
            with torch.no_grad():
                out = impls[row["impl"]](xg).double()
            row["rel_err_vs_fp64"] = ((out - expected).norm() / expected.norm()).item()
    return rows


def _bfloat16_training(device: str, scale: float, case: str, xg, w, a, b, bias, grad) -> List[Dict]:
    """Forward+backward of the same case in bfloat16 (the CPU case is float32 otherwise): every
    implementation on bfloat16 x, W, A, B, where the cpp path runs its full-size products in
    bfloat16 when oneDNN has a bfloat16 GEMM."""
    x16, w16, bias16, grad16 = (t.detach().to(torch.bfloat16) for t in (xg, w, bias, grad))
    x16.requires_grad_(True)
    a16, b16 = (t.detach().to(torch.bfloat16).requires_grad_(True) for t in (a, b))

    baselines = _impls(device, scale)  # the float32 case's formulas, bound to the bfloat16 tensors
    impls: Dict[str, Callable] = {name: functools.partial(baselines[name], w=w16, a=a16, b=b16, bias=bias16)
                                  for name in ("naive", "plain LoRA")}
    impls.update(_lucidops_variants(device, scale, w16, a16, b16, bias16, adapter_input=False))
    return _time_training(device, case.replace("float32", "bfloat16"), "forward+backward", x16, a16, b16, grad16,
                          impls, _call)


def _lucidops_variants(device: str, scale: float, w, a, b, bias, adapter_input: bool) -> Dict[str, Callable]:
    """The lucidops implementations but the forced fused tiles, bound to w, a, b and bias:
    called as fn(x, u) with the adapter's input u when ``adapter_input``, else fn(x)."""
    variants: Dict[str, Callable] = {}
    for name, fn in _impls(device, scale).items():
        if name.startswith("lucidops[") and name != FUSED_TILES:
            def with_input(x, u, _fn=fn):
                return _fn(x, w, a, b, bias, adapter_input=u)

            def plain(x, _fn=fn):
                return _fn(x, w, a, b, bias)

            variants[name] = with_input if adapter_input else plain
    return variants


def _time_training(device: str, case: str, mode: str, xg, a, b, grad, impls: Dict[str, Callable],
                   call: Callable) -> List[Dict]:
    """Rows of forward+backward time (interleaved) and bytes saved for backward of each
    implementation, run as call(fn, x) with x = xg (trained: x, a and b)."""
    def train_step(fn):
        def step():
            xg.grad = a.grad = b.grad = None
            call(fn, xg).backward(grad)
        return step

    times = measure_interleaved_ms({name: train_step(fn) for name, fn in impls.items()}, device)
    rows = [dict(family="lora", case=case, mode=mode, impl=name, ms=ms,
                 saved_for_backward_MB=saved_bytes(functools.partial(call, impls[name], xg)) / 2**20)
            for name, ms in times.items()]
    _ratios(rows, times, mode, case)
    return rows


def _call(fn: Callable, x):
    return fn(x)


def _call_dropped(fn: Callable, x):
    return fn(x, F.dropout(x, DROPOUT))


def _ratios(rows: List[Dict], times: Dict[str, float], mode: str, case: str) -> None:
    for row in rows:
        if row["mode"] == mode and row["case"] == case and row["impl"] in times:
            if "naive" in times:
                row["speedup_vs_naive"] = times["naive"] / row["ms"]


if __name__ == "__main__":  # python -m bench.lora [--quick]
    import sys

    for r in run("cuda" if torch.cuda.is_available() else "cpu", quick="--quick" in sys.argv):
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()})
