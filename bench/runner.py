"""Run the benchmarks of every op family and write ``<out>/<device>.json``, ``.md`` and PNGs.

    lucidops bench [--full] [--families activations ...] [--device cpu cuda] [--out bench/results]

The default is a short run on small sizes (seconds on a CPU); ``--full`` uses the sizes
the README reports. Every device this machine has is benchmarked (the CPU, and the GPU
when torch sees one) unless ``--device`` narrows it. ``--families`` replaces those
families' rows in an existing results file of the same machine and size and keeps the others.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

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


def to_markdown(desc: Dict, rows: List[Dict], measured: Optional[Dict[str, str]] = None) -> str:
    """The rows as one Markdown table under the machine's description; ``measured`` (family:
    date) says when each family ran where a file holds rows of more than one run."""
    lines = [f"# lucidops benchmarks on {desc['name']}", "",
             ", ".join(f"{k}: {v}" for k, v in desc.items()), ""]
    if measured and len(set(measured.values())) > 1:
        lines += ["measured: " + ", ".join(f"{f} {d}" for f, d in measured.items()), ""]
    lines += ["| family | case | mode | implementation | ms (median) | speed-up | memory |",
              "|---|---|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['case']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {_ratios(r)} "
                     f"| {_memory(r)} |")
    return "\n".join(lines) + "\n"


_SAME_RUN_KEYS = ("device", "name", "threads", "vector_isa", "torch", "cuda", "triton", "lucidops", "python")


def _family_index(family: str) -> int:
    """Where ``family`` sorts: in FAMILIES' order, so that a merged file reads like one whole run."""
    return FAMILIES.index(family) if family in FAMILIES else len(FAMILIES)


def _earlier_rows(path: Path, desc: Dict, full: bool) -> Tuple[List[Dict], Dict[str, str]]:
    """The rows of an earlier results file of the same machine, software and size, and when
    each of its families was measured; nothing from any other file."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return [], {}
    except (OSError, ValueError) as err:
        print(f"replacing {path}: unreadable ({err})", flush=True)
        return [], {}
    results = data.get("results") if isinstance(data, dict) else None
    if not (isinstance(results, list) and all(isinstance(r, dict) and "family" in r for r in results)):
        print(f"replacing {path}: not a lucidops results file", flush=True)
        return [], {}
    machine = data.get("machine", {})
    # The header names one set of versions for every row: rows measured under another torch,
    # CUDA, Triton or lucidops are replaced, not relabelled.
    if data.get("full") != full or any(machine.get(k) != desc.get(k) for k in _SAME_RUN_KEYS):
        print(f"replacing {path}: another machine, software version or size", flush=True)
        return [], {}
    rows = list(data.get("results", []))
    dates = data.get("measured", {})  # files written before it have one run's date only
    measured = {f: dates.get(f, machine.get("date")) for f in dict.fromkeys(r["family"] for r in rows)}
    return rows, measured


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so that a run killed mid-write
    (a time limit's SIGTERM) leaves the previous complete file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def bench_device(device: str, families: List[str], full: bool, out: Path, plots: bool = True) -> List[Dict]:
    """Benchmark ``families`` on one device; write its JSON, Markdown and PNGs; return the rows.

    An earlier ``<slug>.json`` of the same machine and size keeps its other families' rows:
    only the families run now are replaced. The files are rewritten after every family, and
    after every case of a family whose ``run`` takes ``on_rows`` (called with its rows so
    far), so that a run cut short by a time limit keeps what it measured.
    """
    from tqdm import tqdm

    desc = device_description(device)
    slug = device_slug(desc) + ("" if full else "-short")
    json_path, md_path = out / f"{slug}.json", out / f"{slug}.md"
    earlier, measured = _earlier_rows(json_path, desc, full)
    kept_families = [f for f in dict.fromkeys(r["family"] for r in earlier) if f not in families]
    if kept_families:
        print(f"{json_path.name}: keeping the earlier rows of {', '.join(kept_families)}", flush=True)
    rows: List[Dict] = []
    started: List[str] = []
    md = ""

    def save(family: str, family_rows: List[Dict]) -> str:
        # The family's chart shows its earlier rows: it goes when they do, here, not when the
        # family starts (a run stopped before its first case kept the rows and lost the chart).
        out.joinpath(f"{slug}-{family}.png").unlink(missing_ok=True)
        measured[family] = str(desc["date"])
        dates = dict(sorted(measured.items(), key=lambda item: _family_index(item[0])))
        # A family's earlier rows go only once it has started: a run stopped in the first
        # family keeps the earlier rows of the ones it never reached.
        kept = [r for r in earlier if r["family"] not in started]
        merged = sorted(kept + rows + family_rows, key=lambda r: _family_index(r["family"]))
        _replace(json_path, json.dumps({"machine": desc, "full": full, "measured": dates, "results": merged}, indent=2))
        md = to_markdown(desc, merged, dates)
        _replace(md_path, md)
        return md

    progress = tqdm(families, desc=f"bench {device}", unit="family", file=sys.stderr, dynamic_ncols=True)
    for family in progress:
        progress.set_postfix_str(family)
        started.append(family)
        module = importlib.import_module(f"lucidops.bench.{family}")
        takes_rows = "on_rows" in inspect.signature(module.run).parameters
        per_case = {"on_rows": functools.partial(save, family)} if takes_rows else {}
        family_rows = module.run(device, quick=not full, **per_case)
        md = save(family, family_rows)
        rows += family_rows
    progress.close()
    print(md, flush=True)
    written = [json_path, md_path]
    if plots:
        from .plots import write_family_plots

        written += write_family_plots(rows, str(desc["name"]), out, slug)
    print("wrote " + ", ".join(str(p) for p in written), flush=True)
    return rows


def run(args: argparse.Namespace) -> int:
    devices: List[str] = list(dict.fromkeys(args.device or available_devices()))  # each once
    families: List[str] = list(dict.fromkeys(args.families))
    if "cuda" in devices and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU here", file=sys.stderr)
        return 2
    from .attention import budget_s

    try:  # read by the attention family, maybe minutes of other families in: said up front
        budget_s()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or default_out()
    try:
        out.mkdir(parents=True, exist_ok=True)
        # mkdir passes an existing folder nothing can be written in (/proc): the results file
        # then failed with a traceback after the benchmarks had run.
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:  # an existing file, a read-only place: said before any benchmark runs
        # Named as the user gave it: without --out, the default folder (the flag was not given).
        what = "--out" if args.out else "the default results folder (pass --out DIR for another)"
        print(f"error: {what}: cannot use {str(out)!r} as the results folder ({err.strerror})", file=sys.stderr)
        return 2
    for device in devices:
        desc = device_description(device)
        print(f"benchmarking on {desc['name']} ({device}), torch {desc['torch']}, "
              f"{'full' if args.full else 'short (--full for the README sizes)'}", flush=True)
        bench_device(device, families, args.full, out, plots=not args.no_plots)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
