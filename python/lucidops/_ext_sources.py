"""What each C++/CUDA extension is built from: sources, flags and a content hash.

Pure Python with no torch import at module level, so that setup.py can use it too.
The hash covers every source and header, the flags and the torch version: it names the
lazy build's cache folder and is compiled into the module (``SOURCE_HASH``) so that a
stale ahead-of-time build is recognised and ignored.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


def cuda_arch_list() -> List[str]:
    """Compute capabilities to build for, e.g. ['8.0', '9.0'].

    TORCH_CUDA_ARCH_LIST wins; else the visible GPUs; else sm_80 and sm_90.
    """
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return [a for a in env.replace(",", ";").replace(" ", ";").split(";") if a]
    try:
        import torch

        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            return [f"{major}.{minor}" for major, minor in sorted(caps)]
    except Exception:  # pragma: no cover - torch without CUDA runtime
        pass
    return ["8.0", "9.0"]


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
    source_hash: str = ""

    @property
    def module_name(self) -> str:
        return f"lucidops_{self.kind}_{self.source_hash[:12]}"


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
        cflags = ["-O3", "-fopenmp"] + cpu_arch_flags()  # torch picks the C++ standard
        ldflags = ["-fopenmp"]
        cuda_cflags: List[str] = []
    else:
        sources = [base / "bindings.cpp"] + sorted(base.glob("cuda/*.cu"))
        cflags = ["-O3", "-DLUCIDOPS_WITH_CUDA"]
        ldflags = []
        cuda_cflags = ["-O3", "-lineinfo"] + gencode_flags(arch_list or cuda_arch_list())
    try:
        import torch

        torch_version: str = torch.__version__
    except ImportError:  # setup.py without torch never builds, so this is only for hashing
        torch_version = "unknown"
    digest = _hash(sources + headers, [kind, torch_version] + cflags + ldflags + cuda_cflags)
    # An identifier, not a string literal: quotes do not survive ninja's shell.
    define = f"-DLUCIDOPS_SOURCE_HASH=h{digest}"
    return ExtensionSpec(
        kind=kind,
        sources=[str(s) for s in sources],
        cflags=cflags + [define],
        ldflags=ldflags,
        cuda_cflags=cuda_cflags + ([define] if kind == "cuda" else []),
        include_dirs=[str(base)],
        source_hash=digest,
    )
