"""Timing and machine description shared by the benchmark modules."""

from __future__ import annotations

import platform
import re
import statistics
import time
from typing import Callable, Dict, List, Mapping, Optional

import torch


def measure_ms(fn: Callable[[], object], device: str, *, warmup: int = 3, repeat: int = 10) -> float:
    """Median wall time of ``fn()`` in milliseconds, after warm-up.

    On CUDA, :func:`cuda_event_ms` (CUDA events, L2 flushed and the GPU idle before each
    call, at least ``repeat`` samples); on the CPU, perf_counter around each call.
    """
    if device == "cuda":
        return cuda_event_ms({"fn": fn}, warmup=warmup, min_rounds=repeat)["fn"]
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


L2_FLUSH_BYTES = 256 << 20  # past any current GPU's L2 (H100: 50 MB)
CUDA_ROUNDS_TARGET_MS = 300.0  # rounds of short calls: about this much timed work, at most 200 rounds


def _l2_flush_buffer() -> torch.Tensor:
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")


def cuda_event_ms(fns: Mapping[str, Callable[[], object]], *, warmup: int = 3, min_rounds: int = 10,
                  label: str = "") -> Dict[str, float]:
    """Median CUDA-event time (ms) of one call of each of ``fns``, interleaved round by round.

    Before every call the L2 cache is flushed and the GPU drained, so a sample is one call's
    latency from an idle GPU: the host's launch overhead counts, as it does for a caller who
    waits for the result. (triton.testing.do_bench, used before, queued its flush just ahead
    of the start event, which hid up to the flush's length of host overhead at serving sizes;
    it takes its repetitions as milliseconds, which gave 34 ms calls a median of 2, and it
    timed each function in a window of its own.) At least ``min_rounds`` rounds, more for
    short calls. A function that raises is reported by name and left out."""
    flush = _l2_flush_buffer()
    working = dict(fns)
    for _ in range(warmup):
        for name, fn in list(working.items()):
            try:
                fn()
                torch.cuda.synchronize()  # an asynchronous error surfaces here, under its own name
            except Exception as exc:
                report_failure(f"{label}{name}", exc)
                del working[name]
    samples: Dict[str, List[float]] = {name: [] for name in working}

    def one_round() -> float:
        spent = 0.0
        for name, fn in list(working.items()):
            flush.zero_()
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            try:
                start.record()
                fn()
                end.record()
                end.synchronize()
            except Exception as exc:
                report_failure(f"{label}{name}", exc)
                del working[name], samples[name]
                continue
            samples[name].append(start.elapsed_time(end))
            spent += samples[name][-1]
        return spent

    first = one_round()
    rounds = max(min_rounds, min(200, int(CUDA_ROUNDS_TARGET_MS / max(first, 1e-3))))
    for _ in range(rounds - 1):
        one_round()
    return {name: statistics.median(values) for name, values in samples.items() if values}


def report_failure(what: str, exc: Exception) -> None:
    """One line for an implementation that raised: the run goes on without it."""
    print(f"  {what}: failed ({type(exc).__name__}: {exc})", flush=True)


def measure_interleaved_ms(fns: Mapping[str, Callable[[], object]], device: str, *, warmup: int = 2,
                           rounds: int = 10, label: str = "") -> Dict[str, float]:
    """Median wall time (ms) of each of ``fns``, for ratios between them on a shared machine.

    On the CPU the calls are interleaved: each round times every function once, in turn, so
    a slow spell of a busy host falls on all of them alike instead of on whichever happened
    to be running (timed one after another, the same code measured 0.73x and 1.00x of its
    baseline minutes apart). On CUDA too, by :func:`cuda_event_ms`. A function that raises is
    reported by name (after ``label``, e.g. the case) and left out of the result.
    """
    def failed(name: str, exc: Exception) -> None:
        report_failure(f"{label}{name}", exc)

    if device == "cuda":
        return cuda_event_ms(fns, warmup=warmup, min_rounds=rounds, label=label)
    working: Dict[str, Callable[[], object]] = {}
    for name, fn in fns.items():
        try:
            fn()
        except Exception as exc:  # keep the others
            failed(name, exc)
            continue
        working[name] = fn
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


def vector_isa() -> Optional[str]:
    """The widest vector instruction set of this CPU that the C++ kernels are built for
    (avx512, avx2, avx, sse; neon or sve on ARM), or None when the features are unknown. CPU
    names do not tell it: "AMD EPYC" covers AVX2-only and AVX-512 generations, and the
    kernels' speed differs between them several times over."""
    from lucidops._ext_sources import host_cpu_features

    features = set(host_cpu_features())
    for isa, flag in (("avx512", "avx512f"), ("avx2", "avx2"), ("avx", "avx"), ("sve", "sve"), ("neon", "asimd"),
                      ("sse", "sse2")):
        if flag in features:
            return isa
    return None


def device_description(device: str) -> Dict[str, object]:
    import lucidops

    desc: Dict[str, object] = {
        "device": device,
        "name": torch.cuda.get_device_name(0) if device == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "vector_isa": vector_isa() if device == "cpu" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "lucidops": lucidops.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device == "cuda":  # what the baselines run in: cuDNN convolutions take TF32 by default
        desc["cudnn"] = torch.backends.cudnn.version()
        desc["cudnn_tf32"] = torch.backends.cudnn.allow_tf32
        desc["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    try:
        import triton

        desc["triton"] = triton.__version__
    except ImportError:
        desc["triton"] = None
    return desc


def device_slug(desc: Dict[str, object]) -> str:
    name = str(desc["name"])
    if desc["device"] == "cpu":
        isa = desc.get("vector_isa")
        name = f"cpu-{name}{'-' + str(isa) if isa else ''}-{desc['threads']}threads"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
