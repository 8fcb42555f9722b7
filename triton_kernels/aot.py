"""Compile every Triton kernel configuration ahead of time for NVIDIA GPUs, no GPU needed.

    python -m lucidops.triton_kernels.aot [--arch 80 90]

The interpreter (TRITON_INTERPRET=1) checks what kernels compute on the CPU but accepts
code a GPU compiler rejects (a 16x8 tl.dot, say); compiling to cubin for sm_80 and
sm_90 catches that. Must run without TRITON_INTERPRET: interpreted kernels have no
compiler front end.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import Dict, Iterable, List, Sequence, Tuple



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


def _compile_job(job: Tuple[str, int, int]) -> str:
    """Worker: compile spec number ``index`` of ``family`` for ``arch``; '' or the failure."""
    family, index, arch = job
    module = importlib.import_module(f"lucidops.triton_kernels.{family}")
    spec = list(module.aot_specs())[index]
    try:
        kernel = compile_spec(spec, arch)
        if not kernel.asm.get("cubin"):
            raise RuntimeError("no cubin produced")
        return ""
    except Exception as exc:  # report every failing configuration, not just the first
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        return (f"{family}.{spec['fn'].__name__} sm_{arch} {spec.get('constexprs')} {spec['signature']}: "
                f"{type(exc).__name__}: {last}")


def compile_all(archs: Sequence[int] = (80, 90), families: Iterable[str] = FAMILIES, jobs: int = 0) -> List[str]:
    """Compile everything (in ``jobs`` processes, default one per core); return one line
    per failure, empty when all compiled."""
    from . import INTERPRETED

    if INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled ahead of time")
    work = []
    for family in families:
        module = importlib.import_module(f"lucidops.triton_kernels.{family}")
        work += [(family, i, arch) for i in range(len(list(module.aot_specs()))) for arch in archs]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        results = [_compile_job(job) for job in work]
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_job, work, chunksize=1))
    return [r for r in results if r]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--family", nargs="+", default=list(FAMILIES))
    parser.add_argument("--jobs", type=int, default=0, help="processes (default: one per core)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    count = sum(1 for _ in iter_specs(args.family)) * len(args.arch)
    failures = compile_all(args.arch, args.family, args.jobs)
    for line in failures:
        print("FAILED", line)
    print(f"compiled {count - len(failures)}/{count} kernel configurations for sm_{args.arch} "
          f"in {time.perf_counter() - start:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
