"""Backend registry and selection.

Five backends: ``reference`` (pure PyTorch), ``cpp`` (the C++ CPU extension),
``aten`` (PyTorch's own ATen kernel for the op, e.g. the fused flash-attention CPU kernel
that torch's SDPA runs: not a lucidops kernel, registered only where PyTorch already has
the fast path; CPU tensors only), ``triton`` and ``cuda`` (the CUDA C++ extension).
Each op registers the backends it implements; a call picks the first available one in
the device's preference order, unless one is forced with ``use_backend(name)`` or
``LUCIDOPS_BACKEND=name``. A forced backend that cannot run raises
``BackendUnavailable``: it never falls back silently.
"""

from __future__ import annotations

import contextvars
import importlib.util
import os
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Tuple

import torch

from . import _autocast, _ext
from ._caller import user_stacklevel

BACKENDS: Tuple[str, ...] = ("reference", "cpp", "aten", "triton", "cuda")

# Fastest first. On the CPU the Triton interpreter is a correctness tool, never chosen
# automatically; on CUDA, Triton is the default kernel and the CUDA extension next.
DEFAULT_PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpp", "aten", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run this op on this input."""


@dataclass
class OpEntry:
    name: str
    impls: Dict[str, Callable]
    preference: Dict[str, Tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PREFERENCE))
    notes: Dict[str, str] = field(default_factory=dict)
    # Optional (device_type, *op args) -> preference order for this call, or None for the
    # static one: for ops whose fastest backend depends on the input's size.
    preference_for_call: Optional[Callable[..., Optional[Tuple[str, ...]]]] = None


_OPS: Dict[str, OpEntry] = {}
_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lucidops_backend", default=None)
_last_used: Dict[str, str] = {}
_warned: set = set()


def register_op(
    name: str,
    impls: Dict[str, Callable],
    preference: Optional[Dict[str, Tuple[str, ...]]] = None,
    notes: Optional[Dict[str, str]] = None,
    preference_for_call: Optional[Callable[..., Optional[Tuple[str, ...]]]] = None,
) -> OpEntry:
    """Register an op's backend implementations (all take the same arguments).

    ``preference_for_call(device_type, *args)`` may return the preference order for one
    call (e.g. by size), or None to use ``preference``; a forced backend overrides both.
    """
    unknown = set(impls) - set(BACKENDS)
    if unknown:
        raise ValueError(f"unknown backends {sorted(unknown)} for op {name!r}; known: {BACKENDS}")
    entry = OpEntry(name, dict(impls), dict(preference or DEFAULT_PREFERENCE), dict(notes or {}), preference_for_call)
    _OPS[name] = entry
    return entry


def registered_ops() -> Dict[str, OpEntry]:
    """Every registered op by name, with its implementations and preference orders (a copy)."""
    return dict(_OPS)


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` for every lucidops op called inside the block."""
    token = _forced.set(_check_name(name, "backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    """The backend forced by ``use_backend`` or ``LUCIDOPS_BACKEND``, if any."""
    name = _forced.get()
    if name is not None:
        return name
    env = os.environ.get("LUCIDOPS_BACKEND", "").strip()
    return _check_name(env, "LUCIDOPS_BACKEND") if env else None


def triton_interpreting() -> bool:
    """True when lucidops' Triton kernels were imported in interpreter mode."""
    if importlib.util.find_spec("triton") is None:
        return False
    from .triton_kernels import INTERPRETED

    return INTERPRETED


def backend_problem(backend: str, device_type: str) -> Optional[str]:
    """None when ``backend`` can run on ``device_type`` here, else the reason it cannot."""
    if backend == "reference":
        return None
    if backend == "cpp":
        if device_type != "cpu":
            return f"the cpp backend runs CPU tensors only (got {device_type})"
        return _ext.status("cpu")
    if backend == "aten":
        if device_type != "cpu":
            return f"the aten backend runs CPU tensors only (got {device_type})"
        return None
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors only (got {device_type})"
        return _ext.status("cuda")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed"
        if device_type == "cuda":
            import torch

            return None if torch.cuda.is_available() else "no CUDA GPU visible to torch"
        if device_type == "cpu":
            if triton_interpreting():
                return None
            return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1 before importing lucidops)"
        return f"triton does not run on {device_type}"
    raise ValueError(f"unknown backend {backend!r}")


def select(op: str, device_type: str, args: Tuple = ()) -> str:
    """The backend ``op`` uses for a tensor on ``device_type`` now (for these call ``args``,
    when the op chooses by input)."""
    entry = _OPS[op]
    forced = forced_backend()
    if forced is not None:
        if forced not in entry.impls:
            raise BackendUnavailable(
                f"backend {forced!r} is forced but op {op!r} has no {forced} implementation "
                f"(it has: {', '.join(entry.impls)})"
            )
        problem = backend_problem(forced, device_type)
        if problem:
            raise BackendUnavailable(f"backend {forced!r} is forced for op {op!r} but cannot run: {problem}")
        return forced
    order = entry.preference_for_call(device_type, *args) if entry.preference_for_call and args else None
    for name in order or entry.preference.get(device_type, ("reference",)):
        if name not in entry.impls:
            continue
        problem = backend_problem(name, device_type)
        if problem is None:
            return name
        _warn_extension_passed_over(name, device_type, problem)
    return "reference"


# The extension each extension backend runs on its own device type.
_EXTENSION_OF = {("cpp", "cpu"): "cpu", ("cuda", "cuda"): "cuda"}


def _warn_extension_passed_over(name: str, device_type: str, problem: str) -> None:
    """Once per extension: automatic selection passed over it for a reason the user can fix
    (no compiler, no ninja, a failed build, which dispatch reports itself), not silently, since
    the next backend can be many times slower. LUCIDOPS_DISABLE_EXT=1 is a choice, not a problem."""
    kind = _EXTENSION_OF.get((name, device_type))
    if kind is not None and not problem.startswith("disabled by LUCIDOPS_DISABLE_EXT"):
        _warn_next_backend_once(kind, f"lucidops {kind} extension unavailable: {problem}")


def _warn_next_backend_once(kind: str, unavailable: str) -> None:
    """The one warning per extension ``kind`` that ops run on the next backend instead,
    attributed to the user's call."""
    if kind in _warned:
        return
    _warned.add(kind)
    warnings.warn(f"{unavailable}; lucidops uses the next backend instead (`lucidops info` lists what runs where)",
                  RuntimeWarning, stacklevel=user_stacklevel())


def on_device_of(device_type: str, args: Tuple) -> ContextManager:
    """For CUDA, a context making the device of the first tensor in ``args`` the current one.

    Triton launches on the current device's stream; PyTorch's own ops (and the CUDA
    extension's bindings, with their CUDAGuard) first switch to their inputs' device. Without
    this, a layer on cuda:1 while cuda:0 is current (a model split over GPUs, e.g. peft with
    device_map="auto") would launch its Triton kernels on the wrong GPU."""
    if device_type == "cuda":
        for value in args:
            if isinstance(value, torch.Tensor):
                return torch.cuda.device(value.device)
    return nullcontext()


def dispatch(op: str, device_type: str, *args: Any) -> Any:
    """Run ``op`` on the selected backend.

    In automatic mode an extension that fails to build is reported once (with its log)
    and the next backend in the preference order is used; a forced backend raises.
    """
    entry = _OPS[op]
    failed: List[str] = []
    while True:
        name = select(op, device_type, args)
        if name in failed:  # status() did not record the failure: say so rather than loop forever
            raise BackendUnavailable(f"backend {name!r} of op {op!r} failed and is still selected")
        try:
            with _autocast.disabled(device_type), on_device_of(device_type, args):
                result = entry.impls[name](*args)
        except _ext.ExtensionUnavailable as err:
            if forced_backend() is not None:
                raise BackendUnavailable(f"backend {name!r} is forced for op {op!r} but cannot run: {err}") from err
            _warn_next_backend_once(err.kind, str(err))
            failed.append(name)
            continue  # status() now reports the failure, so select() moves on
        _last_used[op] = name
        return result


def last_used(op: str) -> Optional[str]:
    """The backend that ran the most recent call of ``op`` in this process."""
    return _last_used.get(op)


def availability(op: str, device_types: List[str]) -> Dict[str, Dict[str, Optional[str]]]:
    """For ``lucidops info``: per device type, per implemented backend, None or the reason."""
    entry = _OPS[op]
    return {dev: {b: backend_problem(b, dev) for b in BACKENDS if b in entry.impls} for dev in device_types}
