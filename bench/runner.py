"""Run the benchmarks of every op family and write ``<out>/<device>.json``, ``.md`` and PNGs.

    lucidops bench [--full] [--families activations ...] [--device cpu cuda] [--out bench/results]

The default is a short run on small sizes (seconds on a CPU); ``--full`` uses the sizes
the README reports. Every device this machine has is benchmarked (the CPU, and the GPU
when torch sees one) unless ``--device`` narrows it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Dict, List

import torch

from .timing import device_description, device_slug

# Modules of lucidops.bench that are not op families.
NOT_FAMILIES = ("runner", "timing", "plots", "make_gaussian_trained")  # helpers and scripts, not families


def _discover_families():
    """Every module of lucidops.bench with a run(device, quick) function: one per op family."""
    import pkgutil

    here = Path(__file__).resolve().parent
    return tuple(sorted(m.name for m in pkgutil.iter_modules([str(here)])
                        if m.name not in NOT_FAMILIES and not m.name.startswith("_")))


FAMILIES = _discover_families()


def default_out() -> Path:
    # In a checkout (editable install) results belong in bench/results; elsewhere, here.
    repo_results = Path(__file__).resolve().parent / "results"
    return repo_results if repo_results.is_dir() else Path.cwd() / "lucidops-bench-results"


def available_devices() -> List[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--full", action="store_true", help="the sizes the README reports (minutes, not seconds)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default: bench/results in a checkout, ./lucidops-bench-results otherwise)")
    parser.add_argument("--device", nargs="+", choices=["cpu", "cuda"], default=None,
                        help="default: every device here (the CPU, and the GPU when there is one)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG charts")


def _ratios(row: Dict) -> str:
    """Every speedup_vs_<baseline> key of a row, e.g. '2.10x vs eager'."""
    return ", ".join(f"{v:.2f}x vs {k[len('speedup_vs_'):]}" for k, v in row.items()
                     if k.startswith("speedup_vs_") and v)


def _memory(row: Dict) -> str:
    """The memory a row measured: bytes saved for backward, CUDA peak, and their ratios to a baseline."""
    parts = []
    if row.get("saved_bytes") is not None:
        parts.append(f"saved {row['saved_bytes'] / 2**20:.3g} MiB")
    if row.get("saved_for_backward_MB") is not None:
        parts.append(f"saved {row['saved_for_backward_MB']:.3g} MiB")
    if row.get("peak_MB_above_inputs") is not None:
        parts.append(f"peak +{row['peak_MB_above_inputs']:.3g} MiB")
    what = {"saved": "saved bytes", "peak": "peak"}
    for key, value in row.items():
        kind, _, baseline = key.partition("_vs_")
        if kind in what and baseline and value is not None:
            parts.append(f"{value:.3g}x {baseline.replace('_', ' ')}'s {what[kind]}")
    return ", ".join(parts)


def to_markdown(desc: Dict, rows: List[Dict]) -> str:
    lines = [f"# lucidops benchmarks on {desc['name']}", "",
             ", ".join(f"{k}: {v}" for k, v in desc.items()), "",
             "| family | case | mode | implementation | ms (median) | speed-up | memory |",
             "|---|---|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['case']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {_ratios(r)} "
                     f"| {_memory(r)} |")
    return "\n".join(lines) + "\n"


def bench_device(device: str, families: List[str], full: bool, out: Path, plots: bool = True) -> List[Dict]:
    """Benchmark ``families`` on one device; write its JSON, Markdown and PNGs; return the rows."""
    from tqdm import tqdm

    desc = device_description(device)
    slug = device_slug(desc) + ("" if full else "-short")
    rows: List[Dict] = []
    md = to_markdown(desc, rows)
    progress = tqdm(families, desc=f"bench {device}", unit="family", file=sys.stderr, dynamic_ncols=True)
    for family in progress:
        progress.set_postfix_str(family)
        module = importlib.import_module(f"lucidops.bench.{family}")
        rows += module.run(device, quick=not full)
        # Written after every family, so a run cut short by a time limit keeps what it measured.
        (out / f"{slug}.json").write_text(json.dumps({"machine": desc, "full": full, "results": rows}, indent=2))
        md = to_markdown(desc, rows)
        (out / f"{slug}.md").write_text(md)
    progress.close()
    print(md, flush=True)
    written = [out / f"{slug}.json", out / f"{slug}.md"]
    if plots:
        from .plots import write_family_plots

        written += write_family_plots(rows, str(desc["name"]), out, slug)
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    devices: List[str] = args.device or available_devices()
    if "cuda" in devices and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU here", file=sys.stderr)
        return 2
    out = args.out or default_out()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # an existing file, a read-only place: said before any benchmark runs
        print(f"error: --out: cannot use {str(out)!r} as the results folder ({err.strerror})", file=sys.stderr)
        return 2
    for device in devices:
        desc = device_description(device)
        print(f"benchmarking on {desc['name']} ({device}), torch {desc['torch']}, "
              f"{'full' if args.full else 'short (--full for the README sizes)'}", flush=True)
        bench_device(device, args.families, args.full, out, plots=not args.no_plots)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
