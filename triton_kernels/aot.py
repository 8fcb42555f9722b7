"""Compile every Triton kernel configuration ahead of time for NVIDIA GPUs, no GPU needed.

    python -m lucidops.triton_kernels.aot [--arch 80 90]

The interpreter (TRITON_INTERPRET=1) checks what kernels compute on the CPU but accepts
code a GPU compiler rejects (a 16x8 tl.dot, say); compiling to cubin for sm_80 and
sm_90 catches that. Every launcher config is fixed (no autotuning to skip a bad one), so
a configuration that asks for more shared memory than the card grants would fail at its
first launch: that is checked here too. Each configuration's registers and local memory
per thread are listed, read from the cubin with the cuobjdump that ships with Triton:
local memory is mostly register spills, which cost speed, not correctness (libdevice's
sin also keeps a 32-byte table there). Must run without TRITON_INTERPRET: interpreted
kernels have no compiler front end.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

# Shared memory one block may use (the opt-in maximum, cudaDevAttrMaxSharedMemoryPerBlockOptin):
# A100 163 KiB, H100/H200 227 KiB. Triton raises OutOfResources at launch above it.
MAX_SHARED_BYTES: Dict[int, int] = {80: 166912, 90: 232448}


def _discover_families() -> Tuple[str, ...]:
    """Every module of lucidops.triton_kernels that defines aot_specs()."""
    import pkgutil

    from lucidops import triton_kernels

    names = []
    for info in pkgutil.iter_modules(triton_kernels.__path__):
        if info.name != "aot" and "def aot_specs(" in _source(info):
            names.append(info.name)
    return tuple(sorted(names))


def _source(info) -> str:
    path = getattr(info.module_finder, "path", None)
    if path is None:
        return ""
    try:
        with open(os.path.join(path, info.name + ".py")) as f:
            return f.read()
    except (OSError, TypeError):
        return ""


# Op-family modules with an aot_specs() generator.
FAMILIES: Tuple[str, ...] = _discover_families()


def compile_spec(spec: Dict, arch: int):
    """Compile one spec for sm_<arch>; returns the compiled kernel (raises on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec.get("constexprs"))
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def iter_specs(families: Iterable[str] = FAMILIES):
    for family in families:
        module = importlib.import_module(f"lucidops.triton_kernels.{family}")
        for spec in module.aot_specs():
            yield family, spec


@dataclass
class Compiled:
    """One configuration's outcome: ``failure`` is '' when it compiled and fits the card."""

    name: str
    arch: int
    failure: str = ""
    shared_bytes: int = 0
    registers: Optional[int] = None  # None when cuobjdump is unavailable
    local_bytes: Optional[int] = None  # local memory per thread: register spills, stack, local arrays


def _cuobjdump() -> Optional[str]:
    try:
        from triton.backends import nvidia
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return path if os.access(path, os.X_OK) else None


def resource_usage(cubin: bytes) -> Tuple[Optional[int], Optional[int]]:
    """(registers per thread, local bytes per thread) of a single-kernel cubin, from
    ``cuobjdump --dump-resource-usage`` ("REG:128 STACK:0 SHARED:0 LOCAL:0 ..."), or
    (None, None) when Triton ships no cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    if "REG" not in fields:
        raise RuntimeError(f"cannot read the resource usage from cuobjdump's output: {text[-300:]!r}")
    return int(fields["REG"]), int(fields.get("LOCAL", 0)) + int(fields.get("STACK", 0))


def describe(spec: Dict, arch: int) -> str:
    """Kernel, arch, constexprs, the pointer arguments' types in order and the scalar types it
    was compiled for (fp32 or fp64, i32 or i64 indices), one name per configuration:
    "attention_forward_kernel sm_90 {'G': 1, ...} (*bf16,*bf16,...,*u8) [fp32,i32]"."""
    types = [t for t in spec["signature"].values() if t != "constexpr"]
    pointers = [t for t in types if t.startswith("*")]
    scalars = sorted({t for t in types if not t.startswith("*")})
    return f"{spec['fn'].__name__} sm_{arch} {spec.get('constexprs')} ({','.join(pointers)}) [{','.join(scalars)}]"


def check_spec(spec: Dict, arch: int, name: str = "") -> Compiled:
    """Compile one spec for sm_<arch> and check that it fits the card's shared memory;
    never raises (the failure is in the result)."""
    result = Compiled(name=name or describe(spec, arch), arch=arch)
    try:
        kernel = compile_spec(spec, arch)
        if not kernel.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        result.shared_bytes = int(kernel.metadata.shared)
        result.registers, result.local_bytes = resource_usage(kernel.asm["cubin"])
        limit = MAX_SHARED_BYTES.get(arch)
        if limit is not None and result.shared_bytes > limit:
            raise RuntimeError(f"needs {result.shared_bytes} bytes of shared memory, sm_{arch} grants {limit}")
    except Exception as exc:  # report every failing configuration, not just the first
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        result.failure = f"{result.name} {spec['signature']}: {type(exc).__name__}: {last}"
    return result


def _compile_job(job: Tuple[str, int, int]) -> Compiled:
    """Worker: check spec number ``index`` of ``family`` for ``arch``."""
    family, index, arch = job
    module = importlib.import_module(f"lucidops.triton_kernels.{family}")
    spec = list(module.aot_specs())[index]
    return check_spec(spec, arch, f"{family}.{describe(spec, arch)}")


def exit_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies. The compile workers
    call it, so that a killed `lucidops aot` (or a killed test run that started it) does not
    leave them compiling for minutes; elsewhere a no-op."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def compile_all(archs: Sequence[int] = (80, 90), families: Iterable[str] = FAMILIES,
                jobs: int = 0) -> List[Compiled]:
    """Compile everything (in ``jobs`` processes, default one per core); one
    :class:`Compiled` per configuration and arch."""
    from . import INTERPRETED

    if INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    work = []
    for family in families:
        module = importlib.import_module(f"lucidops.triton_kernels.{family}")
        work += [(family, i, arch) for i in range(len(list(module.aot_specs()))) for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    from tqdm.auto import tqdm

    # Minutes for every family: a bar on a terminal (none in a log: disable=None).
    bar = tqdm(total=len(work), desc="lucidops aot", unit="config", disable=None, dynamic_ncols=True)
    with bar:
        if jobs == 1:
            results = []
            for job in work:
                results.append(_compile_job(job))
                bar.update()
        else:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(jobs, initializer=exit_with_parent) as pool:
                results = []
                for result in pool.map(_compile_job, work, chunksize=1):
                    results.append(result)
                    bar.update()
    return results


def summary(results: Sequence[Compiled]) -> List[str]:
    """Lines for the log: every failure, every configuration that uses local memory (register
    spills, mostly), and per arch the largest shared memory and register counts."""
    lines = [f"FAILED {r.failure}" for r in results if r.failure]
    lines += [f"LOCAL {r.local_bytes} bytes/thread ({r.registers} registers): {r.name}"
              for r in results if not r.failure and r.local_bytes]
    for arch in sorted({r.arch for r in results}):
        ok = [r for r in results if r.arch == arch and not r.failure]
        if not ok:
            continue
        widest = max(ok, key=lambda r: r.shared_bytes)
        line = (f"sm_{arch}: largest shared memory {widest.shared_bytes} of {MAX_SHARED_BYTES.get(arch, '?')} "
                f"bytes ({widest.name})")
        with_regs = [r for r in ok if r.registers is not None]
        if with_regs:
            local = [r.local_bytes for r in with_regs if r.local_bytes]
            registers = max(r.registers for r in with_regs if r.registers is not None)
            line += (f"; registers up to {registers}; {len(local)} of {len(ok)} use "
                     f"local memory (up to {max(local, default=0)} bytes/thread)")
        else:
            line += "; no cuobjdump, registers not read"
        lines.append(line)
    return lines


def write_json(results: Sequence[Compiled], path: str) -> None:
    """One record per configuration and arch, with the Triton version that compiled them."""
    import json
    from dataclasses import asdict

    import triton

    with open(path, "w") as f:
        json.dump({"triton": triton.__version__, "max_shared_bytes": MAX_SHARED_BYTES,
                   "configurations": [asdict(r) for r in results]}, f, indent=1)
        f.write("\n")


# Compute capabilities taken: sm_50 (Maxwell, the oldest CUDA 12 targets) to sm_12x (Blackwell).
MIN_ARCH, MAX_ARCH = 50, 129


def compute_capability(text: str) -> int:
    """A compute capability as the integer the compiler takes: "80", "8.0" (TORCH_CUDA_ARCH_LIST's
    form) and "sm_80" all give 80; one outside [MIN_ARCH, MAX_ARCH] ("-5", "7") is refused."""
    value = str(text).strip().lower().removeprefix("sm_")
    try:
        major, _, minor = value.partition(".")
        if minor and not (minor.isascii() and minor.isdigit() and len(minor) == 1):
            raise ValueError  # "9.10" would read as 100
        arch = int(major) * 10 + int(minor) if minor else int(major)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a compute capability: {text!r} (write 80, 8.0 or sm_80)") from None
    if not MIN_ARCH <= arch <= MAX_ARCH:
        raise argparse.ArgumentTypeError(f"compute capability {text!r} is out of range: give one in "
                                         f"[{MIN_ARCH}, {MAX_ARCH}] (80, 8.0 or sm_80 for an A100)")
    return arch


def _check_json_path(parser: argparse.ArgumentParser, path: str) -> None:
    """Refuse a --json path that cannot be written before compiling (minutes), not after."""
    if os.path.isdir(path):
        parser.error(f"argument --json: {path!r} is a folder, not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.exists(folder):
        parser.error(f"argument --json: the folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        parser.error(f"argument --json: {folder!r} is not a folder")
    try:  # a folder that exists but takes no files (read-only, /proc): found now, not after compiling
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        parser.error(f"argument --json: cannot write in {folder!r} ({err.strerror})")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        parser.error(f"argument --json: {path!r} is not writable")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m lucidops.triton_kernels.aot`` and ``lucidops aot``."""
    parser.add_argument("--arch", type=compute_capability, nargs="+", default=[80, 90],
                        help=f"compute capabilities: 80 90, or 8.0 9.0, or sm_80 sm_90 ({MIN_ARCH} to {MAX_ARCH})")
    parser.add_argument("--family", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="kernel families (default: all)")
    parser.add_argument("--jobs", type=int, default=0, help="processes (default: one per core)")
    parser.add_argument("--json", metavar="PATH", help="also write every configuration's resources as JSON")


def main(argv=None, prog: Optional[str] = None) -> int:
    """The command; ``prog`` names it in usage and error lines (``lucidops aot`` from the CLI)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error(f"--jobs must be 0 (one per core) or a number of processes, got {args.jobs}")
    if args.json:
        _check_json_path(parser, args.json)
    start = time.perf_counter()
    count = sum(1 for _ in iter_specs(args.family)) * len(args.arch)
    results = compile_all(args.arch, args.family, args.jobs)
    for line in summary(results):
        print(line)
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    failures = sum(1 for r in results if r.failure)
    print(f"compiled {count - failures}/{count} kernel configurations for "
          f"{', '.join(f'sm_{arch}' for arch in args.arch)} "
          f"in {time.perf_counter() - start:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
