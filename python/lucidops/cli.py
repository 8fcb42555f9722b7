"""The ``lucidops`` command.

    lucidops info                 backends available here per op, and why not
    lucidops bench [options]      benchmark the op families against their baselines
    lucidops build [cpu|cuda]     build the C++/CUDA extensions now (else on first use)
    lucidops aot                  compile every Triton kernel for sm_80/sm_90 (no GPU needed)
"""

from __future__ import annotations

import argparse
import platform
import sys
from typing import List, Optional


def _versions() -> List[str]:
    import torch

    lines = [f"python {platform.python_version()} on {platform.machine()} ({platform.system()})",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        lines.append(f"GPU: {torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))})")
    else:
        lines.append("GPU: none visible to torch")
    return lines


def info(build: bool = False) -> str:
    """The text ``lucidops info`` prints."""
    import lucidops  # registers every op
    from lucidops import _ext, backends

    if build:
        for kind in ("cpu", "cuda"):
            _ext.status(kind, build_if_needed=True)
    out = [f"lucidops {lucidops.__version__}"] + _versions()
    out.append(f"forced backend: {backends.forced_backend() or 'none (automatic)'}")
    out.append(f"Triton interpreter: {'on' if backends.triton_interpreting() else 'off'}")
    for name, entry in sorted(backends.registered_ops().items()):
        if name.endswith("_backward"):
            continue
        out.append(f"\n{name}")
        for device, table in backends.availability(name, ["cpu", "cuda"]).items():
            chosen = None
            for b in entry.preference.get(device, ()):
                if b in table and table[b] is None:
                    chosen = b
                    break
            out.append(f"  {device}: default -> {chosen or 'reference'}")
            for b, problem in table.items():
                out.append(f"    {b:<9} {'available' if problem is None else 'unavailable: ' + problem}")
        for backend, note in entry.notes.items():
            out.append(f"  note ({backend}): {note}")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="lucidops", description="fused kernels for explicit, well-conditioned networks")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="backends available here per op, and why not")
    p_info.add_argument("--build", action="store_true", help="build missing extensions first, to report real status")
    p_bench = sub.add_parser("bench", help="benchmark the op families against their baselines")
    p_build = sub.add_parser("build", help="build the extensions now")
    p_build.add_argument("kinds", nargs="*", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    sub.add_parser("aot", help="compile every Triton kernel ahead of time for sm_80 and sm_90")

    from lucidops.bench import runner

    runner.add_arguments(p_bench)
    args = parser.parse_args(argv)

    if args.command == "info":
        print(info(build=args.build))
        return 0
    if args.command == "bench":
        return runner.run(args)
    if args.command == "build":
        from lucidops import _ext

        status = 0
        for kind in args.kinds:
            try:
                module = _ext.build(kind)  # builds without a GPU too (nvcc is enough)
                print(f"{kind}: ok ({module.__file__})")
            except _ext.ExtensionUnavailable as err:
                print(f"{kind}: {err}")
                status = 1
        return status
    if args.command == "aot":
        from lucidops.triton_kernels import aot

        return aot.main([])
    return 2


if __name__ == "__main__":
    sys.exit(main())
