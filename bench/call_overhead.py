"""Per-call cost of the ops on small inputs: plain eager calls run the op's body directly
(``lucidops.ops._eager``), against the same call through the custom op and PyTorch's own.

Where the kernel's work is a few microseconds, what a call costs is its Python and
dispatcher layers: this is batch-1 inference and one decoding step. For each op, forward
under ``torch.no_grad()`` and forward+backward (the forward then goes through the custom op,
which autograd must record; its backward op runs directly), each timed as ``CALLS``
back-to-back calls and reported per call:
- ``lucidops``: the default, direct when nothing records or traces the call;
- ``lucidops (custom op)``: every call through ``torch.ops.lucidops`` (the direct path off);
- PyTorch's nearest call: ``torch SDPA`` for attention, ``eager`` for the activations,
  ``naive`` (W + s sin(omega B A), the authors' formulation) and ``linear`` for sine LoRA.
``speedup_vs_custom_op`` is what the direct path saves.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List

import torch
import torch.nn.functional as F

import lucidops
from lucidops.ops import _eager

from .timing import measure_interleaved_ms

CALLS = 50


@contextmanager
def _through_custom_op() -> Iterator[None]:
    saved = _eager.enabled
    _eager.enabled = False
    try:
        yield
    finally:
        _eager.enabled = saved


def _cases(device: str, quick: bool) -> Dict[str, Dict]:
    """Each case: its tensors (the first ones get gradients), lucidops' call, PyTorch's calls."""
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device)

    sigma, omega, lora_scale = 0.7, 30.0, 0.5
    tiny_q, tiny_k = rand(1, 1, 1, 8), rand(1, 1, 4, 8)
    step_q, step_k, step_v = rand(1, 12, 1, 64), rand(1, 12, 256 if quick else 1024, 64), \
        rand(1, 12, 256 if quick else 1024, 64)
    x, w, a, b = rand(1, 64), rand(64, 64, scale=0.1), rand(4, 64, scale=0.1), rand(64, 4, scale=0.1)
    points, means = rand(1, 16, 3), rand(8, 3, scale=0.5)
    precisions = torch.tensor([1.0, 0.1, 0.0, 1.0, 0.1, 1.0]).repeat(8, 1).to(device)
    mixer = rand(16, 8)
    sdpa = F.scaled_dot_product_attention
    return {
        "attention B1 H1 Nq1 Nk4 d8": dict(
            tensors=(tiny_q, tiny_k, tiny_k.clone()), lucidops=lucidops.ops.attention, torch={"torch SDPA": sdpa}),
        f"attention decoding step B1 H12 Nq1 Nk{step_k.shape[2]} d64": dict(
            tensors=(step_q, step_k, step_v), lucidops=lucidops.ops.attention, torch={"torch SDPA": sdpa}),
        "sinc n=16": dict(
            tensors=(rand(16),), lucidops=lambda t: lucidops.ops.sinc(t, sigma),
            torch={"eager": lambda t: torch.sinc(t / (math.pi * sigma))}),
        "sine_lora_linear M=1 64x64 r=4": dict(
            tensors=(a, b, x, w), lucidops=lambda a, b, x, w: lucidops.ops.sine_lora_linear(
                x, w, a, b, omega=omega, scale=lora_scale),
            torch={"naive": lambda a, b, x, w: F.linear(x, w + lora_scale * torch.sin(omega * (b @ a))),
                   "linear": lambda a, b, x, w: F.linear(x, w)}),
        "gaussian_mixture B1 N16 G8 K16": dict(
            tensors=(points, means, precisions, mixer),
            lucidops=lambda *t: lucidops.ops.gaussian_mixture(*t), torch={}),
    }


def _loop(fn: Callable, tensors, grad: bool) -> Callable[[], None]:
    if not grad:
        def forward_calls():
            with torch.no_grad():
                for _ in range(CALLS):
                    fn(*tensors)
        return forward_calls
    leaves = tuple(t.detach().clone().requires_grad_() if i < 1 else t for i, t in enumerate(tensors))

    def training_calls():
        for _ in range(CALLS):
            out = fn(*leaves)
            torch.autograd.grad(out.sum(), leaves[0])
    return training_calls


def run(device: str, quick: bool = False) -> List[Dict]:
    rows = []
    for case, spec in _cases(device, quick).items():
        for mode, grad in (("forward", False), ("forward+backward", True)):
            steps: Dict[str, Callable[[], None]] = {"lucidops": _loop(spec["lucidops"], spec["tensors"], grad)}
            default = steps["lucidops"]

            def through_op(default=default):
                with _through_custom_op():
                    default()
            steps["lucidops (custom op)"] = through_op
            for name, fn in spec["torch"].items():
                steps[name] = _loop(fn, spec["tensors"], grad)
            times = measure_interleaved_ms(steps, device, warmup=3, rounds=10 if quick else 30,
                                           label=f"call_overhead {case} {mode} ")
            for name, ms in times.items():
                row = dict(family="call_overhead", case=case, mode=mode, impl=name, ms=ms / CALLS)
                for baseline in ("lucidops (custom op)", *spec["torch"]):
                    if baseline in times and baseline != name:
                        key = "custom_op" if baseline == "lucidops (custom op)" else baseline.replace(" ", "_")
                        row[f"speedup_vs_{key}"] = times[baseline] / ms
                rows.append(row)
    return rows


if __name__ == "__main__":  # python -m bench.call_overhead [--quick]
    import sys

    for r in run("cuda" if torch.cuda.is_available() else "cpu", "--quick" in sys.argv):
        print({k: (round(v * 1e3, 2) if k == "ms" else v) for k, v in r.items()})
