"""sinc and gaussian: every lucidops backend against eager PyTorch and torch.compile.

Forward, and forward + backward (gradient for x), float32 and bfloat16, 16M elements (1M in
the short run). The eager baselines compute the same functions the usual way:
``torch.sinc(x / (pi sigma))`` and ``torch.exp(-x^2 / (2 sigma^2))``.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Dict, List, Optional

import torch

import lucidops
from lucidops import backends

from .timing import measure_interleaved_ms, report_failure

SIGMA = 0.7
# bfloat16: the training dtype, where the kernels convert tiles themselves.
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}

EAGER = {
    "sinc": lambda x: torch.sinc(x / (math.pi * SIGMA)),
    "gaussian": lambda x: torch.exp(-(x * x) / (2 * SIGMA * SIGMA)),
}


def _candidates(kind: str, device: str) -> Dict[str, Callable]:
    impls: Dict[str, Callable] = {"eager": EAGER[kind]}
    try:
        impls["torch.compile"] = torch.compile(EAGER[kind], dynamic=False)
    except Exception as exc:  # pragma: no cover - no compiler
        print(f"  torch.compile unavailable: {exc}")
    op = getattr(lucidops.ops, kind)
    for backend in backends.BACKENDS:
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is a correctness tool, not a fast path
        if backend not in backends.registered_ops()[kind].impls:
            continue  # e.g. aten: not every op has every backend
        if backends.backend_problem(backend, device) is None:
            def run(x, _b=backend):
                with lucidops.use_backend(_b):
                    return op(x, SIGMA)
            impls[f"lucidops[{backend}]"] = run
    return impls


def run(device: str, quick: bool = False) -> List[Dict]:
    n = (1 << 20) if quick else (1 << 24)
    rows = []
    for dtype, kind in itertools.product(DTYPES, ("sinc", "gaussian")):
        x = (torch.randn(n, device=device) * 3).to(dtype)
        grad = torch.randn(n, device=device).to(dtype)
        impls = _candidates(kind, device)
        expected = EAGER[kind](x.double())
        for mode in ("forward", "forward+backward"):
            steps: Dict[str, Callable[[], object]] = {}
            errors: Dict[str, Optional[float]] = {}
            for name, fn in impls.items():
                # The first call (where torch.compile compiles) inside the try: a failing
                # implementation is reported and left out, the others still run.
                try:
                    if mode == "forward":
                        def forward_step(fn=fn):
                            with torch.no_grad():
                                return fn(x)
                        out = forward_step()
                        errors[name] = ((out.double() - expected.double()).norm() / expected.double().norm()).item()
                        steps[name] = forward_step
                    else:
                        xg = x.clone().requires_grad_(True)

                        def train_step(fn=fn, xg=xg):
                            xg.grad = None
                            fn(xg).backward(grad)
                        train_step()
                        errors[name] = None
                        steps[name] = train_step
                except Exception as exc:
                    report_failure(f"{kind} {mode} {name}", exc)
            # Interleaved, so that the ratios to eager hold on a busy host.
            times = measure_interleaved_ms(steps, device, label=f"{kind} {mode} ")
            for name, ms in times.items():
                row = dict(family="activations", case=f"{kind} n={n} {DTYPES[dtype]}", mode=mode, impl=name, ms=ms,
                           rel_err_vs_fp64=errors[name])
                if "eager" in times:
                    row["speedup_vs_eager"] = times["eager"] / ms
                rows.append(row)
    return rows
