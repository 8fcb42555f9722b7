"""What each C++/CUDA extension is built from: sources, flags and a content hash.

Pure Python with no torch import at module level, so that setup.py can use it too.
The hash covers every source and header, the flags and the torch version: it is compiled
into the module (``SOURCE_HASH``) so that a stale ahead-of-time build is recognised and
ignored. It leaves out the CUDA architectures, which depend on the machine (a GPU-less
build host targets sm_80/sm_90, a run on an H100 only sm_90): an ahead-of-time build records
its list instead (``ARCHS_FILE``) and is used where it covers the visible GPUs. The lazy
build's cache folder is named by a second hash that includes them. Likewise for the CPU:
``-march=native`` means the build host's instruction sets, so a lazy build's folder is also
named by the host's CPU features (``host_cpu_features``), and an ahead-of-time build records
them (``CPU_FEATURES_FILE``) and is used only on a CPU that has them all.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

KINDS = ("cpu", "cuda")


def csrc_root() -> Path:
    """The folder holding the C++/CUDA sources, installed or in a checkout."""
    here = Path(__file__).resolve().parent
    candidates = [
        here / "csrc",  # a regular install: package data lucidops/csrc
        here.parents[1] / "csrc",  # a checkout: python/lucidops -> ../../csrc
    ]
    try:  # an editable install maps lucidops.csrc wherever the checkout is
        from importlib.util import find_spec

        found = find_spec("lucidops.csrc")
        if found is not None and found.submodule_search_locations:
            candidates += [Path(p) for p in found.submodule_search_locations]
    except (ImportError, ValueError):
        pass
    for root in candidates:
        if (root / "bindings.cpp").is_file():
            return root
    raise FileNotFoundError(f"lucidops C++ sources not found; looked in {[str(c) for c in candidates]}")


def cpu_arch_flags() -> List[str]:
    """-march for the CPU build: native by default (extensions build where they run)."""
    flags = os.environ.get("LUCIDOPS_CPU_ARCH_FLAGS")
    return flags.split() if flags is not None else ["-march=native"]


def visible_capabilities() -> List[str]:
    """Compute capabilities of the GPUs torch sees, e.g. ['9.0']; empty without a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            return [f"{major}.{minor}" for major, minor in sorted(caps)]
    except Exception:  # pragma: no cover - torch without CUDA runtime
        pass
    return []


def cuda_arch_list() -> List[str]:
    """Compute capabilities to build for, e.g. ['8.0', '9.0'].

    TORCH_CUDA_ARCH_LIST wins; else the visible GPUs; else sm_80 and sm_90.
    """
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        archs = [a for a in env.replace(",", ";").replace(" ", ";").split(";") if a]
        bad = [a for a in archs if not _ARCH.fullmatch(a)]
        if bad:  # "sm_90" became nvcc's "compute_sm_90", refused a thousand characters into the build
            raise ValueError(f"TORCH_CUDA_ARCH_LIST: {bad[0]!r} is not a compute capability; write them as "
                             f"'8.0;9.0' (optionally 9.0a or 8.6+PTX), got {env!r}")
        return archs
    return visible_capabilities() or ["8.0", "9.0"]


_ARCH = re.compile(r"\d+\.\d+[af]?(\+PTX)?")


# Written next to an ahead-of-time lucidops._C_cuda by setup.py: its arch list, ';'-separated.
ARCHS_FILE = "_C_cuda_archs.txt"
# Written next to an ahead-of-time lucidops._C_cpu built for the host's CPU (-march=native):
# that CPU's features, space-separated.
CPU_FEATURES_FILE = "_C_cpu_features.txt"


# x86 /proc/cpuinfo flags that name instruction sets a compiler may emit under -march=native.
# The others (hypervisor, tsc_known_freq, microcode-dependent hle/rtm, ...) change with the
# kernel, the hypervisor or a microcode update, not with what the module can run.
_X86_ISA = re.compile(r"(mmx|sse\w*|pni|ssse3|avx\w*|fma4?|f16c|bmi[12]|adx|aes|vaes|pclmulqdq|vpclmulqdq|sha_ni"
                      r"|gfni|popcnt|movbe|abm|lzcnt|cx8|cx16|xsave\w*|rdrand|rdseed|amx\w*|clflushopt|clwb"
                      r"|3dnowprefetch|tbm|xop|lm|serialize|movdiri|movdir64b|waitpkg|wbnoinvd|rdpid)")
# ARM Features entries that are not instruction sets.
_ARM_NOT_ISA = {"evtstrm", "cpuid"}


def host_cpu_features() -> List[str]:
    """The instruction-set features of this machine's CPU, sorted: from /proc/cpuinfo's flags
    (x86, instruction sets only) or Features (ARM) line, on macOS from ``sysctl hw.optional``,
    else the processor's name. A module built with -march=native uses them: one built on an
    AVX-512 machine dies of an illegal instruction on a CPU without."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return sorted({flag for flag in value.split() if _X86_ISA.fullmatch(flag)})
                if key.strip() == "Features":
                    return sorted(set(value.split()) - _ARM_NOT_ISA)
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            listing = subprocess.run(["sysctl", "hw.optional"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            listing = ""
        present = sorted(line.partition(":")[0].strip()[len("hw.optional."):].lower()
                         for line in listing.splitlines() if line.partition(":")[2].strip() == "1")
        if present:
            return present
    return [f"{platform.machine()}:{platform.processor()}"]


def builds_for_host(cflags: List[str]) -> bool:
    """Whether the flags target the build machine's own CPU (-march=native, -mcpu=native, ...)."""
    return any(flag.endswith("=native") for flag in cflags)


def _major_minor(arch: str) -> str:
    """'8.6+PTX' -> '8.6', '9.0a' -> '9.0', '90' -> '9.0'."""
    base = arch.strip().replace("+PTX", "").rstrip("abf")
    return base if "." in base else f"{base[:-1]}.{base[-1:]}"


def archs_cover(built: List[str], needed: List[str]) -> bool:
    """Whether a build for the ``built`` arch list runs natively on every ``needed`` capability.

    Deliberately simple: a capability is covered only by machine code for the same
    major.minor. PTX that the driver could JIT for a newer GPU does not count (a slow first
    launch), nor does sm_80 code that an sm_86 could run; such GPUs get a lazy build instead.
    """
    have = {_major_minor(a) for a in built}
    return bool(needed) and all(_major_minor(c) in have for c in needed)


def gencode_flags(arch_list: List[str]) -> List[str]:
    flags = []
    for arch in arch_list:
        base = arch.replace("+PTX", "")
        num = base.replace(".", "")
        # Hopper's arch-specific features need the 'a' suffix; plain sm_90 is fine here.
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if arch.endswith("+PTX"):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def use_real_cuda_home(cpp_extension) -> None:
    """Point torch.utils.cpp_extension at the toolkit behind a wrapped or linked nvcc.

    torch guesses CUDA_HOME as nvcc's grandparent, which for a wrapper script in
    /usr/local/bin is /usr/local: no CUDA headers there.
    """
    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []
    candidates += [Path("/usr/local/cuda")] + sorted(Path("/usr/local").glob("cuda-*"), reverse=True)
    for real in candidates:
        if (real / "include" / "cuda_runtime_api.h").is_file() and (real / "bin" / "nvcc").is_file():
            cpp_extension.CUDA_HOME = str(real)
            os.environ.setdefault("CUDA_HOME", str(real))
            return


@dataclass
class ExtensionSpec:
    kind: str
    sources: List[str]
    cflags: List[str]
    ldflags: List[str]
    cuda_cflags: List[str] = field(default_factory=list)
    include_dirs: List[str] = field(default_factory=list)
    # Compiled into the module as SOURCE_HASH; without the CUDA architectures.
    source_hash: str = ""
    # CUDA compute capabilities the build targets (empty for the CPU extension).
    archs: List[str] = field(default_factory=list)
    # The CPU features a -march=native CPU build needs (empty for portable flags and for CUDA).
    cpu_features: List[str] = field(default_factory=list)
    # source_hash plus the architectures, the sources' folder and the Python ABI: names the
    # lazy build's cache folder.
    build_hash: str = ""

    @property
    def module_name(self) -> str:
        return f"lucidops_{self.kind}_{(self.build_hash or self.source_hash)[:12]}"


def _hash(paths: List[Path], extra: List[str]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for item in extra:
        h.update(item.encode())
    return h.hexdigest()


def spec(kind: str, root: Optional[str] = None, arch_list: Optional[List[str]] = None) -> ExtensionSpec:
    """The build spec of extension ``kind`` ('cpu' or 'cuda')."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    base = Path(root) if root is not None else csrc_root()
    headers = sorted(base.glob("*.h")) + sorted(base.glob(f"{kind}/*.h"))
    if kind == "cpu":
        sources = [base / "bindings.cpp"] + sorted(base.glob("cpu/*.cpp"))
        # -fno-trapping-math: without AVX-512's masked operations, GCC will not if-convert a
        # float comparison it thinks might trap, so the branch-free clamps of vec_math::exp
        # kept every exp loop scalar on AVX2 (attention at B8 H24 N197 d8: 24.1 -> 10.5 ms). Values
        # are unchanged: only floating-point exception flags, which nothing reads, may differ.
        cflags = ["-O3", "-fopenmp", "-fno-trapping-math"] + cpu_arch_flags()  # torch picks the C++ standard
        ldflags = ["-fopenmp"]
        cuda_cflags: List[str] = []
        archs: List[str] = []
    else:
        sources = [base / "bindings.cpp"] + sorted(base.glob("cuda/*.cu"))
        cflags = ["-O3", "-DLUCIDOPS_WITH_CUDA"]
        ldflags = []
        cuda_cflags = ["-O3", "-lineinfo"]
        archs = list(arch_list or cuda_arch_list())
    try:
        import torch

        torch_version: str = torch.__version__
    except ImportError:  # setup.py without torch never builds, so this is only for hashing
        torch_version = "unknown"
    digest = _hash(sources + headers, [kind, torch_version] + cflags + ldflags + cuda_cflags)
    arch_flags = gencode_flags(archs)
    # The cache folder is also one per Python ABI and per sources' location. Two checkouts or
    # venvs with the same sources shared one folder, but torch's ninja file names the sources'
    # paths and Python's headers: each use from the other rebuilt it (a minute, at every
    # alternation), and another Python version would load a module built for the first.
    where = [str(base.resolve()), sysconfig.get_config_var("EXT_SUFFIX") or sys.version]
    # And per CPU for a -march=native build: a cache shared by machines (an NFS home) served an
    # AVX-512 build to a CPU without AVX-512.
    cpu_features = host_cpu_features() if kind == "cpu" and builds_for_host(cflags) else []
    build_digest = hashlib.sha256(" ".join([digest] + arch_flags + where + cpu_features).encode()).hexdigest()
    # An identifier, not a string literal: quotes do not survive ninja's shell.
    define = f"-DLUCIDOPS_SOURCE_HASH=h{digest}"
    return ExtensionSpec(
        kind=kind,
        sources=[str(s) for s in sources],
        cflags=cflags + [define],
        ldflags=ldflags,
        cuda_cflags=cuda_cflags + arch_flags + ([define] if kind == "cuda" else []),
        include_dirs=[str(base)],
        source_hash=digest,
        archs=archs,
        cpu_features=cpu_features,
        build_hash=build_digest,
    )
