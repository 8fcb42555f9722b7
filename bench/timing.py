"""Timing and machine description shared by the benchmark modules."""

from __future__ import annotations

import platform
import re
import statistics
import time
from typing import Callable, Dict, Mapping, Optional

import torch


def measure_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, repeat: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds, after warm-up.

    On CUDA, triton.testing.do_bench (CUDA events, cache flushed between runs); on the
    CPU, perf_counter around each call.
    """
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def report_failure(what: str, exc: Exception) -> None:
    """One line for an implementation that raised: the run goes on without it."""
    print(f"  {what}: failed ({type(exc).__name__}: {exc})", flush=True)


def measure_interleaved_ms(fns: Mapping[str, Callable[[], object]], device: str, *, warmup: int = 2,
                           rounds: int = 10, label: str = "") -> Dict[str, float]:
    """Median wall time (ms) of each of ``fns``, for ratios between them on a shared machine.

    On the CPU the calls are interleaved: each round times every function once, in turn, so
    a slow spell of a busy host falls on all of them alike instead of on whichever happened
    to be running (timed one after another, the same code measured 0.73x and 1.00x of its
    baseline minutes apart). On CUDA each is timed by :func:`measure_ms`. A function that
    raises is reported by name (after ``label``, e.g. the case) and left out of the result.
    """
    def failed(name: str, exc: Exception) -> None:
        report_failure(f"{label}{name}", exc)

    working: Dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        try:
            fn()
        except Exception as exc:  # keep the others
            failed(name, exc)
            continue
        working[name] = fn
    if device == "cuda":
        times = {}
        for name, fn in working.items():
            try:  # a CUDA error can surface after the first call returned, at a later sync
                times[name] = measure_ms(fn, device)
            except Exception as exc:
                failed(name, exc)
        return times
    for _ in range(warmup):
        for fn in working.values():
            fn()
    samples: Dict[str, list] = {name: [] for name in working}
    for _ in range(rounds):
        for name, fn in working.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_mb_above(fn: Callable[[], object], device: str) -> Optional[float]:
    """On CUDA, the peak allocation (MiB) of one ``fn()`` above what was allocated before it;
    None on the CPU, where the caching allocator's statistics do not exist."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_description(device: str) -> Dict[str, object]:
    import lucidops

    desc: Dict[str, object] = {
        "device": device,
        "name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lucidops": lucidops.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    try:
        import triton

        desc["triton"] = triton.__version__
    except ImportError:
        desc["triton"] = None
    return desc


def device_slug(desc: Dict[str, object]) -> str:
    name = str(desc["name"])
    if desc["device"] == "cpu":
        name = f"cpu-{name}-{desc['threads']}threads"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
