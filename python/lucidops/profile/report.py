"""One-call profile of a model: parameters, FLOPs (two counters), memory, latency, by module.

    rep = lucidops.profile.report(model, x, backward=True)
    print(rep)                      # a readable table
    rep.to_dict()                   # the same numbers as plain Python values
    cmp = lucidops.profile.compare(original, patched, x, png="cmp.png")

What each number means:

- ``flops``: torch's FlopCounterMode with lucidops' formulas, 2 FLOPs per multiply-add;
  the forward, plus the backward of ``output.sum()`` with ``backward=True``.
- ``fvcore_flops``: fvcore's FlopCountAnalysis with lucidops' op handles, 1 per
  multiply-add of a matrix product; forward only (fvcore traces with torch.jit). ``None``
  with ``fvcore_error`` saying why when fvcore is missing or cannot trace the model.
- ``peak_memory_bytes``: on CUDA, the growth of ``torch.cuda.max_memory_allocated`` over
  one step (forward, plus backward with ``backward=True``). On CPU, the bytes the forward
  saves for backward (activation memory of training; unique storages, the model's own
  parameters and buffers excluded), measured with grad enabled even when
  ``backward=False``; ``peak_rss_bytes`` beside it is the process's peak resident set
  size, which covers everything the process did before too.
- ``latency_s``: median wall time of one step over ``repeat`` runs after ``warmup`` runs.

On the meta device (a model built without memory, to count a large one) only the
parameters and FLOPs are counted: ``peak_memory_bytes`` is None and ``latency_s`` NaN
(nothing is computed there, so neither would mean anything); the table shows n/a.

The model runs as it is (train or eval mode, its dtype); ``device`` moves it (in place,
as ``nn.Module.to`` does: to "meta" drops its weights) and the inputs there.
``backward=True`` runs a plain backward and gives every leaf its own ``.grad`` back after
it, so no ``.grad`` field changes (gradient hooks run as in any backward). A model compiled in place (``model.compile()``) is counted as a ``torch.compile``'d
one, through its eager forward (:func:`lucidops.profile.eager_calls`).
"""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .. import _validate
from . import _run
from ._run import Inputs
from .flops import eager_calls, fvcore_handles, watched_by_counter

Progress = Optional[Callable[[str], None]]


@dataclass
class ModuleStats:
    """One row of :attr:`ProfileReport.by_module`: ``flops`` are the module's forward FLOPs,
    also in a ``backward=True`` report (PyTorch's module tracker charges backward ops to
    modules that do no arithmetic, such as Dropout and Identity, so no per-module backward
    split is given)."""

    depth: int
    params: int
    flops: int


@dataclass
class ProfileReport:
    """What :func:`report` measured; ``str(report)`` is a table, ``to_dict()`` plain values."""

    model: str
    device: str
    backward: bool
    params: int
    trainable_params: int
    flops: int
    flops_by_op: Dict[str, int]
    fvcore_flops: Optional[int]
    fvcore_error: Optional[str]
    fvcore_unsupported: Dict[str, int]
    peak_memory_bytes: Optional[int]  # None: not measured (the meta device)
    memory_kind: str
    peak_rss_bytes: Optional[int]
    latency_s: float  # NaN: not measured (the meta device)
    latencies_s: List[float]
    by_module: Dict[str, ModuleStats] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        """Every field as plain Python values (ready for ``json.dump``)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        step = "forward + backward" if self.backward else "forward"
        lines = [f"lucidops profile: {self.model} on {self.device} ({step})"]
        rows = [
            ("params", f"{self.params:,}" + (f" ({self.trainable_params:,} trainable)"
                                              if self.trainable_params != self.params else "")),
            ("FLOPs (torch, 2/MAC)", _human(self.flops)),
            ("FLOPs (fvcore, 1/MAC, forward)", _human(self.fvcore_flops) if self.fvcore_flops is not None
             else f"n/a ({self.fvcore_error})"),
            (f"peak memory ({self.memory_kind})", _bytes(self.peak_memory_bytes)),
        ]
        if self.peak_rss_bytes is not None:
            rows.append(("peak RSS (process)", _bytes(self.peak_rss_bytes)))
        rows.append((f"latency (median of {len(self.latencies_s)})" if self.latencies_s else "latency",
                     _seconds(self.latency_s) if self.latencies_s else f"n/a (not run on {self.device})"))
        lines += _table(("metric", "value"), rows)
        ops = [(op, _human(n)) for op, n in sorted(self.flops_by_op.items(), key=lambda kv: -kv[1])]
        if ops:
            lines += ["", "FLOPs by op (torch counter)"] + _table(("op", "FLOPs"), ops)
        if self.fvcore_unsupported:
            skipped = ", ".join(f"{k} x{v}" for k, v in sorted(self.fvcore_unsupported.items()))
            lines.append(f"fvcore skipped (counted 0): {skipped}")
        if self.by_module:
            mods = [("  " * s.depth + (name.rsplit(".", 1)[-1] if name else "(model)"), f"{s.params:,}",
                     _human(s.flops)) for name, s in self.by_module.items()]
            lines += ["", "by module"] + _table(("module", "params", "forward FLOPs" if self.backward else "FLOPs"),
                                                mods)
        return "\n".join(lines)


# ---------------------------------------------------------------- formatting


def _human(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3f} {unit}"
    return f"{int(n)}"


def _bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _seconds(s: Optional[float]) -> str:
    if s is None or math.isnan(s):
        return "n/a"
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _table(header: Tuple[str, ...], rows: Sequence[Tuple[str, ...]]) -> List[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return [fmt(header), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]


# ---------------------------------------------------------------- validation and helpers


def _check_model(model: Any, name: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {type(model).__name__}")
    return model


def _check_device(device: Any, model: nn.Module, args: Tuple[Any, ...]) -> torch.device:
    if device is None:
        # The inputs' tensors at any depth (a dict, a list): top-level ones only took a
        # parameterless model with meta tensors in a dict for a CPU one, timed and measured.
        for t in list(model.parameters()) + list(model.buffers()) + _run.tensors(args):
            return t.device
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be 'cpu', 'cuda', 'meta' or a torch.device, got {device!r}") from err
    if dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'meta', got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here")
    return dev


def _move(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a namedtuple takes its fields one by one
        return type(value)(*(_move(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # moved as count_flops reads it
        return dataclasses.replace(value, **{f.name: _move(getattr(value, f.name), device)
                                             for f in dataclasses.fields(value) if f.init})
    return value


def _step(model: nn.Module, args: Tuple[Any, ...], backward: bool) -> Any:
    if not backward:
        with torch.no_grad():
            return model(*args)
    out = model(*args)
    _run.backward(out, model)
    return out


def _counted_step(model: nn.Module, args: Tuple[Any, ...], backward: bool, depth: int) -> FlopCounterMode:
    """A FlopCounterMode that watched one step of ``model`` (its eager original); the forward
    step runs under no_grad, and again with grad if PyTorch's module tracker fails there
    (see :func:`~lucidops.profile.flops.watched_by_counter`)."""
    return watched_by_counter(lambda: FlopCounterMode(display=False, depth=depth),
                              lambda: _step(model, args, backward),
                              step_with_grad=None if backward else lambda: model(*args))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_rss_bytes() -> Optional[int]:
    try:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (OSError, ValueError):
        return None
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes, Linux: KiB


def saved_tensor_bytes(model: nn.Module, args: Tuple[Any, ...]) -> int:
    """Bytes the forward ``model(*args)`` saves for backward: unique storages (a tensor and
    its views count once), the model's own state excluded (it exists anyway)."""
    own = [t for t in model_state_tensors(model) if t.device.type != "meta"]
    return saved_bytes(lambda: model(*args), exclude=own)


def model_state_tensors(model: nn.Module) -> List[Tensor]:
    """The tensors ``model`` keeps between calls: parameters, buffers, and the codes and tables
    of quantized adapters (held as a plain attribute, ``quantize_``), whose views the op saves
    for backward: they were counted as activations."""
    from ..quant import QuantizedAdapter

    tensors = list(model.parameters()) + list(model.buffers())
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, QuantizedAdapter):
                tensors += list(value.state().values())
    return tensors


def saved_bytes(fn: Callable[[], Any], exclude: Sequence[Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward of ``fn()`` (a tensor and
    its views count once), leaving out the storages of ``exclude``."""
    own = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[Tuple[str, int], int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested)
            return t
        if ptr not in own and ptr != 0:
            seen[(str(t.device), ptr)] = storage.nbytes()
        return t  # the graph keeps the tensor alive, so a pointer cannot be reused meanwhile

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(seen.values())
    del out
    return total


def _by_module(model: nn.Module, counts: Dict[str, Dict[Any, int]], depth: int) -> Dict[str, ModuleStats]:
    root = type(model).__name__  # FlopCounterMode names modules "<RootClass>.<child>.<...>"

    def flops(name: str, module: nn.Module) -> int:
        key = root + ("." + name if name else "")
        if key in counts:
            return int(sum(counts[key].values()))
        # Never called itself (an nn.ModuleList, a dict of blocks): FlopCounterMode credits
        # nothing to it, so its row is the sum of its children's.
        return sum(flops(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children())

    rows: Dict[str, ModuleStats] = {}
    for name, module in model.named_modules():
        level = 0 if not name else name.count(".") + 1
        if level > depth:
            continue
        rows[name] = ModuleStats(depth=level, params=sum(p.numel() for p in module.parameters()),
                                 flops=flops(name, module))
    return rows


def _fvcore(model: nn.Module, args: Tuple[Any, ...]) -> Tuple[Optional[int], Optional[str], Dict[str, int]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its torch.jit.script use is deprecated
            from fvcore.nn import FlopCountAnalysis
    except ImportError:
        return None, "fvcore is not installed (pip install fvcore)", {}
    try:
        analysis = FlopCountAnalysis(model, args).set_op_handle(**fvcore_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit's deprecation and tracer warnings: noise here
            total = int(analysis.total())
        return total, None, {str(k): int(v) for k, v in analysis.unsupported_ops().items()}
    except Exception as err:  # fvcore traces with torch.jit: many models cannot be traced
        message = f"{type(err).__name__}: {err}".splitlines()[0]
        return None, "fvcore cannot trace the model: " + message[:200], {}


# ---------------------------------------------------------------- the report


def report(model: nn.Module, inputs: Inputs, *, backward: bool = False, device: Any = None, repeat: int = 10,
           warmup: int = 2, depth: int = 2, fvcore: bool = True, name: Optional[str] = None,
           progress: Progress = None) -> ProfileReport:
    """Profile ``model(*inputs)``: see the module docstring for what each field means.

    Args:
        model: the ``nn.Module`` to profile. A ``torch.compile``'d module (or one compiled in
            place) has its FLOPs counted on the eager original (the counters cannot watch a
            compiled one; the ops are the same) and its memory and latency measured as compiled.
        inputs: a tensor, or a tuple/list of the model's positional arguments (as
            :func:`count_flops`).
        backward: profile forward + backward of the output's sum (a training step), not
            the forward alone (run under ``torch.no_grad``).
        device: "cpu", "cuda", "meta" or a torch.device; moves the model (in place) and the
            inputs. Default: where the model's parameters are. On "meta" nothing is timed or
            measured, only counted (see the module docstring).
        repeat: timed runs; ``latency_s`` is their median.
        warmup: untimed runs before them (first-call compilation, allocator warm-up).
        depth: deepest submodule level in ``by_module`` (0: the model alone).
        fvcore: also count with fvcore (``False`` skips it, ``fvcore_flops`` None).
        name: the model's name in the table (default: its class name).
        progress: called with a short message before each stage (e.g. ``print``).
    """
    rep, step = _untimed_report(model, inputs, backward=backward, device=device, repeat=repeat, warmup=warmup,
                                depth=depth, fvcore=fvcore, name=name, progress=progress)
    if not timed(rep):
        return rep
    (latencies,) = time_steps([(rep.model, step)], {torch.device(rep.device)}, warmup=warmup, repeat=repeat,
                              progress=progress)
    return with_latencies(rep, latencies)


def timed(rep: ProfileReport) -> bool:
    """Whether ``rep``'s model is timed: not on the meta device, where ops compute nothing."""
    return torch.device(rep.device).type != "meta"


def with_latencies(rep: ProfileReport, latencies: List[float]) -> ProfileReport:
    """``rep`` with ``latencies`` (seconds) as its timed runs and their median as ``latency_s``
    (NaN when there are none)."""
    median = float(statistics.median(latencies)) if latencies else float("nan")
    return dataclasses.replace(rep, latency_s=median, latencies_s=list(latencies))


def time_steps(steps: Sequence[Tuple[str, Callable[[], Any]]], devices: Iterable[torch.device], *, warmup: int,
               repeat: int, progress: Progress = None) -> List[List[float]]:
    """Wall times (seconds) of ``repeat`` runs of each (name, step) after ``warmup`` runs, one
    list per step; ``devices`` are synchronised around each run.

    Several steps run in alternation, one run of each per round, so that a slow spell of a
    busy host falls on all of them alike instead of on whichever ran then.
    """
    say = progress or (lambda message: None)
    label = " / ".join(name for name, _ in steps)
    latencies: List[List[float]] = [[] for _ in steps]
    devices = list(devices)
    for i in range(warmup + repeat):
        say(f"{label}: {'warm-up' if i < warmup else 'timing'} run {i + 1 if i < warmup else i + 1 - warmup}"
            f"/{warmup if i < warmup else repeat}")
        for times, (_, step) in zip(latencies, steps):
            for device in devices:
                _sync(device)
            start = time.perf_counter()
            step()
            for device in devices:
                _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return latencies


def _untimed_report(model: nn.Module, inputs: Inputs, *, backward: bool, device: Any, repeat: int, warmup: int,
                    depth: int, fvcore: bool, name: Optional[str], progress: Progress
                    ) -> Tuple[ProfileReport, Callable[[], Any]]:
    """Every field of :func:`report` but the latencies (NaN, empty), and the step to time."""
    model = _check_model(model)
    args = _run.check_inputs(inputs)
    dev = _check_device(device, model, args)
    repeat = _validate.integer(repeat, "repeat", minimum=1)
    warmup = _validate.integer(warmup, "warmup", minimum=0)
    depth = _validate.integer(depth, "depth", minimum=0)
    if name is not None and not isinstance(name, str):  # failed in the timing's label, after the counting
        raise TypeError(f"name must be a str or None, got {type(name).__name__}")
    _validate.boolean(backward, "backward")  # "False" would have profiled a training step
    _validate.boolean(fvcore, "fvcore")
    say = progress or (lambda message: None)
    if device is not None:
        model.to(dev)
        args = _move(args, dev)
    # A torch.compile'd model (or one compiled in place): FLOPs counted on its eager original
    # (the same ops; the counters cannot watch a compiled one), memory and latency measured
    # on the compiled model itself.
    with eager_calls(model) as counted:
        label = name or type(counted).__name__
        say(f"{label}: counting FLOPs")
        counter = _counted_step(counted, args, backward, depth)
        counts = counter.get_flop_counts()
        flops_by_op = {str(op): int(n) for op, n in counts.get("Global", {}).items()}
        # per module: the forward alone (see ModuleStats)
        module_counts = _counted_step(counted, args, False, depth).get_flop_counts() if backward else counts
        by_module = _by_module(counted, module_counts, depth)

        fv_total: Optional[int] = None
        fv_error: Optional[str] = "skipped (fvcore=False)"
        fv_unsupported: Dict[str, int] = {}
        if fvcore:
            say(f"{label}: counting FLOPs with fvcore")
            fv_total, fv_error, fv_unsupported = _fvcore(counted, args)

    peak: Optional[int] = None
    if dev.type == "meta":  # nothing is allocated or computed there: no number would mean anything
        memory_kind = "not measured on meta"
    elif dev.type == "cuda":
        say(f"{label}: measuring memory")
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        _step(model, args, backward)
        _sync(dev)
        peak = int(torch.cuda.max_memory_allocated(dev) - before)
        memory_kind = "CUDA allocated, one step"
    else:
        say(f"{label}: measuring memory")
        peak = saved_tensor_bytes(model, args)
        memory_kind = "saved for backward"
    rss = _peak_rss_bytes()

    return ProfileReport(
        model=label, device=str(dev), backward=bool(backward),
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        flops=int(counter.get_total_flops()), flops_by_op=flops_by_op,
        fvcore_flops=fv_total, fvcore_error=fv_error, fvcore_unsupported=fv_unsupported,
        peak_memory_bytes=peak, memory_kind=memory_kind, peak_rss_bytes=rss,
        latency_s=float("nan"), latencies_s=[],
        by_module=by_module,
    ), lambda: _step(model, args, backward)
