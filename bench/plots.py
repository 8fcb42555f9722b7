"""PNG charts of benchmark results: one per op family and device, speed-ups as bars.

matplotlib is optional (``pip install lucidops[plot]``); :func:`write_family_plots`
says so and returns nothing when it is missing. The charts of a results file written
without them (``lucidops bench --no-plots``, as bench/gpu_check.sh does), beside it or in DIR:

    python -m lucidops.bench.plots <results>.json [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence


def speedup_keys(rows: Sequence[Dict]) -> List[str]:
    """The baselines a set of rows is compared with (``speedup_vs_<name>``), in first-seen order."""
    keys: List[str] = []
    for row in rows:
        for key, value in row.items():
            if key.startswith("speedup_vs_") and value and key not in keys:
                keys.append(key)
    return keys


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_family(rows: Sequence[Dict], title: str, path: Path) -> Path:
    """Horizontal bars, one per (case, mode, implementation), one panel per baseline, on a
    log axis with the baseline's 1x marked: left of the line is slower, right is faster."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    keys = speedup_keys(rows)
    labels = [f"{r['case']} | {r['mode']} | {r['impl']}" for r in rows]
    height = 0.8 + 0.28 * len(rows)
    label_width = 0.065 * max(len(label) for label in labels)  # inches, at 7 pt
    fig, axes = plt.subplots(1, len(keys), figsize=(label_width + 4.0 * len(keys), height), sharey=True, squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r.get(key) or 0.0 for r in rows]
        colors = ["#2b8a3e" if v >= 1 else "#c92a2a" for v in values]
        positions = range(len(rows))
        ax.barh(list(positions), [v if v > 0 else float("nan") for v in values], color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"speed-up vs {key[len('speedup_vs_'):]} (higher is faster)")
        for y, v in zip(positions, values):
            if v > 0:
                ax.text(v, y, f" {v:.2f}x", va="center", fontsize=7)
    axes[0][0].set_yticks(range(len(rows)))
    axes[0][0].set_yticklabels(labels, fontsize=7)
    axes[0][0].invert_yaxis()
    for label, row in zip(axes[0][0].get_yticklabels(), rows):
        if str(row["impl"]).startswith("lucidops"):
            label.set_fontweight("bold")  # ours, among the baselines
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # never clip the long labels
    plt.close(fig)
    return path


def write_family_plots(rows: Sequence[Dict], machine: str, out: Path, slug: str) -> List[Path]:
    """One PNG per family that has ratios: ``<out>/<slug>-<family>.png``."""
    if not matplotlib_available():
        print("plots skipped: matplotlib is not installed (pip install lucidops[plot])", flush=True)
        return []
    written = []
    for family in dict.fromkeys(r["family"] for r in rows):
        family_rows = [r for r in rows if r["family"] == family]
        if speedup_keys(family_rows):
            written.append(plot_family(family_rows, f"{family} on {machine}", out / f"{slug}-{family}.png"))
    return written


def main(argv: Optional[List[str]] = None) -> int:
    """Write ``<out>/<stem>-<family>.png`` for every family of a results JSON."""
    parser = argparse.ArgumentParser(description="PNG charts of a `lucidops bench` results JSON")
    parser.add_argument("results", type=Path, help="a <device>.json that lucidops bench wrote")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs (default: the JSON's)")
    args = parser.parse_args(argv)
    if not matplotlib_available():
        print("error: the charts need matplotlib (pip install lucidops[plot])", file=sys.stderr)
        return 1
    try:
        data = json.loads(args.results.read_text())
    except (OSError, ValueError) as err:
        print(f"error: cannot read {args.results}: {err}", file=sys.stderr)
        return 2
    # The results folder also holds other JSON (the AOT resource report): say so, not KeyError.
    if not (isinstance(data, dict) and isinstance(data.get("results"), list)
            and isinstance(data.get("machine"), dict) and "name" in data["machine"]):
        print(f"error: {args.results} is not a lucidops bench results file (no 'results' and 'machine')",
              file=sys.stderr)
        return 2
    out = args.out or args.results.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # an existing file (/dev/null), a place that takes no folders (/proc)
        print(f"error: --out: cannot use {str(out)!r} as the charts' folder ({err.strerror})", file=sys.stderr)
        return 2
    written = write_family_plots(data["results"], str(data["machine"]["name"]), out, args.results.stem)
    print("wrote " + (", ".join(str(p) for p in written) or "nothing (no family has a speed-up)"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
