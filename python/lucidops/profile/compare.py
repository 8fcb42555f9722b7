"""Side-by-side profile of a model before and after patching.

    import copy
    patched = copy.deepcopy(model)
    lucidops.patch.timm_vit(patched)            # or any change
    cmp = lucidops.profile.compare(model, patched, x, png="compare.png")
    print(cmp)

``original`` and ``patched`` must be two module objects: patch a deep copy (a model
patched in place cannot be profiled before and after at the same time).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

# png_path_problem is lucidops.profile's too: one check for every PNG lucidops writes.
from ..demos._png import make_folder, png_path_error, png_path_problem  # noqa: F401
from .report import (Inputs, Progress, ProfileReport, _bytes, _check_model, _human, _seconds, _table,
                     _untimed_report, time_steps, timed, with_latencies)

# (field, label, formatter, ratio kind): "ratio" patched/original, "speedup" original/patched.
_ROWS: List[Tuple[str, str, Callable[[Any], str], str]] = [
    ("params", "params", lambda v: f"{v:,}", "ratio"),
    ("flops", "FLOPs (torch, 2/MAC)", _human, "ratio"),
    ("fvcore_flops", "FLOPs (fvcore, 1/MAC, fwd)", _human, "ratio"),
    ("peak_memory_bytes", "peak memory", _bytes, "ratio"),
    ("peak_rss_bytes", "peak RSS (process lifetime)", _bytes, "none"),
    ("latency_s", "latency (median)", _seconds, "speedup"),
]


RATIO_COLOR, SPEEDUP_COLOR = "#4c72b0", "#dd8452"


def _measured(value: Any) -> Any:
    """``value``, or None for a value that was not measured (a NaN latency)."""
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass
class ProfileComparison:
    """Two :class:`ProfileReport` s; ``str()`` shows them side by side with ratios."""

    original: ProfileReport
    patched: ProfileReport

    def ratios(self) -> Dict[str, Optional[float]]:
        """patched / original for every field, and ``speedup`` = original / patched latency;
        None where either side was not measured (None, or a NaN latency on the meta device)."""
        out: Dict[str, Optional[float]] = {}
        for key, _, _, kind in _ROWS:
            a, b = _measured(getattr(self.original, key)), _measured(getattr(self.patched, key))
            out[key] = (b / a) if (a and b is not None) else None
        a, b = _measured(self.original.latency_s), _measured(self.patched.latency_s)
        out["speedup"] = a / b if (a is not None and b) else None
        return out

    def to_dict(self) -> Dict[str, Any]:
        """Both reports' ``to_dict()`` and the patched/original ratios, as plain Python values."""
        return {"original": self.original.to_dict(), "patched": self.patched.to_dict(), "ratios": self.ratios()}

    def __str__(self) -> str:
        step = "forward + backward" if self.original.backward else "forward"
        ratios = self.ratios()
        rows = []
        for key, label, fmt, kind in _ROWS:
            if key == "peak_memory_bytes":
                label = f"peak memory ({self.original.memory_kind})"
            a, b = getattr(self.original, key), getattr(self.patched, key)
            if kind == "speedup":
                note = f"{ratios['speedup']:.2f}x speed-up" if ratios["speedup"] else "-"
            elif kind == "ratio" and ratios[key] is not None:
                note = f"{ratios[key]:.3f}"
            else:
                note = "-"
            rows.append((label, fmt(a) if a is not None else "n/a", fmt(b) if b is not None else "n/a", note))
        lines = [f"lucidops compare on {self.original.device} ({step})"]
        lines += _table(("metric", self.original.model, self.patched.model, "patched/original"), rows)
        for which in (self.original, self.patched):
            if which.fvcore_flops is None:
                lines.append(f"fvcore ({which.model}): {which.fvcore_error}")
        lines.append("peak RSS is the process's high-water mark so far: it only grows, compare it with care.")
        return "\n".join(lines)

    def plot(self, path: Union[str, os.PathLike]) -> None:
        """Write a bar chart of patched/original per metric (and the speed-up) to ``path`` (a PNG,
        whatever its suffix; its folder is made if it does not exist)."""
        try:
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ImportError("the PNG plot needs matplotlib: pip install lucidops[plot]") from err
        # A bare Figure renders with Agg and leaves pyplot's global backend alone.
        from matplotlib.figure import Figure

        ratios = self.ratios()
        labels: List[str] = []
        values: List[float] = []
        colors: List[str] = []  # by kind: ratios blue, the speed-up orange (absent on the meta device)
        for key, label, _, kind in _ROWS:
            ratio = ratios[key]
            if kind == "ratio" and ratio is not None:
                labels.append(label.split(" (")[0] if key != "fvcore_flops" else "FLOPs (fvcore)")
                values.append(ratio)
                colors.append(RATIO_COLOR)
        speedup = ratios["speedup"]
        if speedup is not None:
            labels.append("latency speed-up")
            values.append(speedup)
            colors.append(SPEEDUP_COLOR)
        fig = Figure(figsize=(7, 3.5))
        ax = fig.add_subplot()
        bars = ax.bar(range(len(values)), values, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, rotation=15, ha="right")
        ax.set_ylabel("patched / original")
        step = "fwd+bwd" if self.original.backward else "fwd"
        ax.set_title(f"{self.patched.model} vs {self.original.model} ({self.original.device}, {step})")
        for bar, v in zip(bars, values):
            ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        fig.tight_layout()
        make_folder(path)  # a folder that does not exist yet is made, as the demos make theirs
        fig.savefig(os.fspath(path), format="png", dpi=120)


def compare(original: nn.Module, patched: nn.Module, inputs: Inputs, *, backward: bool = False,
            png: Optional[Union[str, os.PathLike]] = None, device: Any = None, repeat: int = 10, warmup: int = 2,
            depth: int = 1, fvcore: bool = True, names: Tuple[str, str] = ("original", "patched"),
            progress: Progress = None) -> ProfileComparison:
    """Profile ``original`` and ``patched`` (two modules: patch a ``copy.deepcopy``) on the
    same ``inputs`` as :func:`lucidops.profile.report` does; ``png`` writes a bar chart of the
    ratios (needs matplotlib: ``pip install lucidops[plot]``; its folder is made if missing, a
    path that cannot be written is refused before any profiling). The two models are timed in
    alternation, one run of each per round, so that a slow spell of a busy host falls on
    both (timed one after the other, the same pair measured 0.78x and 1.00x minutes apart).
    Other arguments as :func:`report`."""
    _check_model(original, "original")
    _check_model(patched, "patched")
    if original is patched:
        raise ValueError("original and patched are the same module object: patch a copy.deepcopy(original)")
    if png is not None:
        if not isinstance(png, (str, os.PathLike)):
            raise TypeError(f"png must be a file path, got {type(png).__name__}")
        try:  # fail before minutes of profiling, not after
            import matplotlib  # noqa: F401
        except ImportError as err:
            raise ImportError("png= needs matplotlib: pip install lucidops[plot]") from err
        # The demos' check (one set of rules for every PNG lucidops writes): a folder, a name
        # ending in a separator or an unwritable place is refused now, not after the profiling.
        error = png_path_error(png)
        if error is not None:
            raise type(error)(f"png: {error}")
    if not (isinstance(names, (tuple, list)) and len(names) == 2 and all(isinstance(n, str) for n in names)):
        raise ValueError(f"names must be two strings, got {names!r}")
    kwargs = dict(backward=backward, device=device, repeat=repeat, warmup=warmup, depth=depth, fvcore=fvcore,
                  progress=progress)
    first, first_step = _untimed_report(original, inputs, name=names[0], **kwargs)
    second, second_step = _untimed_report(patched, inputs, name=names[1], **kwargs)
    # A model on the meta device is not timed (its latency stays NaN, as report's).
    to_time = [(rep, step) for rep, step in ((first, first_step), (second, second_step)) if timed(rep)]
    times = time_steps([(rep.model, step) for rep, step in to_time], {torch.device(rep.device) for rep, _ in to_time},
                       warmup=warmup, repeat=repeat, progress=progress) if to_time else []
    latencies = {id(rep): t for (rep, _), t in zip(to_time, times)}
    result = ProfileComparison(with_latencies(first, latencies.get(id(first), [])),
                               with_latencies(second, latencies.get(id(second), [])))
    if png is not None:
        result.plot(png)
    return result
