"""Run the benchmarks of every op family and write ``<out>/<device>.json`` and ``.md``.

    lucidops bench [--families activations] [--quick] [--out bench/results]
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

def _discover_families():
    """Every module of lucidops.bench with a run(device, quick) function: one per op family."""
    import pkgutil

    here = Path(__file__).resolve().parent
    return tuple(sorted(m.name for m in pkgutil.iter_modules([str(here)])
                        if m.name not in ("runner", "timing") and not m.name.startswith("_")))


FAMILIES = _discover_families()


def default_out() -> Path:
    # In a checkout (editable install) results belong in bench/results; elsewhere, here.
    repo_results = Path(__file__).resolve().parent / "results"
    return repo_results if repo_results.is_dir() else Path.cwd() / "lucidops-bench-results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: bench/results)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")


def _ratios(row: Dict) -> str:
    """Every speedup_vs_<baseline> key of a row, e.g. '2.10x vs eager'."""
    return ", ".join(f"{v:.2f}x vs {k[len('speedup_vs_'):]}" for k, v in row.items()
                     if k.startswith("speedup_vs_") and v)


def to_markdown(desc: Dict, rows: List[Dict]) -> str:
    lines = [f"# lucidops benchmarks on {desc['name']}", "",
             ", ".join(f"{k}: {v}" for k, v in desc.items()), "",
             "| family | case | mode | implementation | ms (median) | speed-up |",
             "|---|---|---|---|---:|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['case']} | {r['mode']} | {r['impl']} | {r['ms']:.3f} | {_ratios(r)} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    desc = device_description(device)
    print(f"benchmarking on {desc['name']} ({device}), torch {desc['torch']}", flush=True)
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    slug = device_slug(desc) + ("-quick" if args.quick else "")
    rows: List[Dict] = []
    for family in args.families:
        module = importlib.import_module(f"lucidops.bench.{family}")
        print(f"[{family}]", flush=True)
        rows += module.run(device, quick=args.quick)
        # Written after every family, so a run cut short by a time limit keeps what it measured.
        (out / f"{slug}.json").write_text(json.dumps({"machine": desc, "quick": args.quick, "results": rows}, indent=2))
        md = to_markdown(desc, rows)
        (out / f"{slug}.md").write_text(md)
    print(md)
    print(f"wrote {out / (slug + '.json')} and .md")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
