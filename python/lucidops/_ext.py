"""Lazy loader for the C++ (CPU) and CUDA extensions.

First use builds the extension with ninja through ``torch.utils.cpp_extension.load``
into ``$LUCIDOPS_CACHE_DIR`` (default ``~/.cache/lucidops``), in a folder named by the
hash of sources, flags and torch version, so an edited source gets a fresh build and an
unchanged one is reused. torch's build lock (a file baton in that folder) makes two
processes building at once safe: one builds, the other waits and loads.

An ahead-of-time build (``LUCIDOPS_BUILD_EXT=1 pip install --no-build-isolation .``)
installs ``lucidops._C_cpu`` / ``lucidops._C_cuda``; they are used when their
``SOURCE_HASH`` matches the sources (and, for CUDA, their recorded arch list covers the
visible GPUs), else ignored.

A cache folder that cannot be written (a read-only file system, a shared install) still
serves a module already built there, imported directly from its file, since torch's
builder needs to write its lock; with nothing built, the extension is unavailable with
a reason that says so, and ops run on the next backend.

Failures are remembered per process: ``ExtensionUnavailable`` carries the reason and,
for a failed build, the path of the log.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import shutil
import struct
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional

from . import _ext_sources


class ExtensionUnavailable(RuntimeError):
    """The extension cannot be used here; ``str(err)`` says why."""

    def __init__(self, kind: str, reason: str, log_path: Optional[str] = None):
        self.kind = kind
        self.reason = reason
        self.log_path = log_path
        msg = f"lucidops {kind} extension unavailable: {reason}"
        if log_path:
            msg += f" (build log: {log_path})"
        super().__init__(msg)


_lock = threading.Lock()


def _fresh_lock_in_child() -> None:
    # A fork while another thread builds copies _lock held, with no owner to release it: the
    # child's first op waited forever. The child's own build still waits on torch's file lock.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=_fresh_lock_in_child)

_loaded: Dict[str, ModuleType] = {}
_failed: Dict[str, ExtensionUnavailable] = {}


def cache_dir() -> Path:
    """``$LUCIDOPS_CACHE_DIR`` (``~`` expanded), or ``~/.cache/lucidops`` when unset or empty.

    Empty counts as unset: ``Path("")`` would be the current folder, scattering build
    folders wherever the program happens to run.
    """
    env = os.environ.get("LUCIDOPS_CACHE_DIR", "")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lucidops"


def _ninja_on_path() -> bool:
    """Whether torch's builder will find ``ninja``. The pip package's binary sits in its own
    bin folder, which is on PATH only in an activated venv (not when the venv's python runs
    from cron, an IDE or a Jupyter kernel): that folder is then appended to PATH."""
    if shutil.which("ninja") is not None:
        return True
    try:
        import ninja
    except ImportError:
        return False
    bin_dir = str(getattr(ninja, "BIN_DIR", ""))
    if bin_dir and shutil.which("ninja", path=bin_dir) is not None:
        os.environ["PATH"] = os.pathsep.join(filter(None, [os.environ.get("PATH", ""), bin_dir]))
        return True
    return False


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


def disabled_by_env() -> bool:
    """``LUCIDOPS_DISABLE_EXT``: 1/true/yes/on disables the C++/CUDA extensions, 0/false/no/off
    or unset leaves them on; anything else is a ValueError naming it (``true`` was read as
    "on" before, so the build it was set to avoid ran)."""
    value = os.environ.get("LUCIDOPS_DISABLE_EXT", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"LUCIDOPS_DISABLE_EXT must be 1 (or true/yes/on) to disable the extensions, or 0 (or "
                     f"false/no/off), got {os.environ['LUCIDOPS_DISABLE_EXT']!r}")


def _cache_writable() -> bool:
    """Whether a build could write into the cache folder: the folder, or the nearest folder
    above it that exists (which a build would create it in), is a writable directory."""
    path = cache_dir()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path.is_dir() and os.access(path, os.W_OK | os.X_OK)


def _compiler_problem(kind: str) -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found (looked for {cxx!r}; set CXX)"
    if not _ninja_on_path():
        return "ninja not found on PATH (pip install ninja, or put its bin folder on PATH)"
    if kind == "cuda":
        import torch

        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is a CPU-only build"
        from torch.utils.cpp_extension import CUDA_HOME

        if CUDA_HOME is None:
            return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    return None


def prebuilt_archs(mod: ModuleType) -> List[str]:
    """The arch list an ahead-of-time ``lucidops._C_cuda`` was built for, from the file
    setup.py writes next to it; empty when there is none (then it is not used)."""
    try:
        text = (Path(mod.__file__ or "").parent / _ext_sources.ARCHS_FILE).read_text()
    except (OSError, TypeError):
        return []
    return [a.strip() for a in text.replace(",", ";").split(";") if a.strip()]


def _prebuilt_cpu_lacks() -> List[str]:
    """The CPU features an ahead-of-time ``lucidops._C_cpu`` was built for that this CPU lacks,
    from the file setup.py writes next to a -march=native build (none: portable flags). Read
    before the module is imported, whose code may already use those instructions."""
    origin = getattr(sys.modules.get("lucidops._C_cpu"), "__file__", None)  # already imported
    if origin is None:
        try:
            found = importlib.util.find_spec("lucidops._C_cpu")
        except (ImportError, ValueError):
            found = None
        origin = found.origin if found is not None else None
    if not origin:
        return []
    try:
        text = (Path(origin).parent / _ext_sources.CPU_FEATURES_FILE).read_text()
    except OSError:
        return []
    return sorted(set(text.split()) - set(_ext_sources.host_cpu_features()))


# Why an installed ahead-of-time module was passed over, per kind: added to the reason when
# the extension then turns out unavailable (otherwise "no compiler" hid an installed build).
_skipped_prebuilt: Dict[str, str] = {}


def _prebuilt(kind: str, spec: _ext_sources.ExtensionSpec) -> Optional[ModuleType]:
    """The ahead-of-time module for ``kind`` when it was built from these sources (and for this
    CPU's features, or for CUDA every visible GPU's capability), else None."""
    lacks = _prebuilt_cpu_lacks() if kind == "cpu" else []
    if lacks:
        _skipped_prebuilt[kind] = (f"the installed lucidops._C_cpu was built for CPU features this CPU lacks "
                                   f"({', '.join(lacks[:6])}{' ...' if len(lacks) > 6 else ''}): rebuild it here")
        return None
    try:
        mod = importlib.import_module(f"lucidops._C_{kind}")
    except ImportError:
        return None
    if getattr(mod, "SOURCE_HASH", None) != "h" + spec.source_hash:
        return None
    if kind == "cuda":
        # The GPUs present decide; without one (`lucidops build` on a build host), the
        # archs a lazy build would target.
        needed = _ext_sources.visible_capabilities() or spec.archs
        if not _ext_sources.archs_cover(prebuilt_archs(mod), needed):
            return None
    return mod


def _unwritable(kind: str, folder: Path, exc: OSError) -> ExtensionUnavailable:
    return ExtensionUnavailable(
        kind,
        f"cache folder {folder} is not writable ({exc}); "
        "set LUCIDOPS_CACHE_DIR to a writable folder",
    )


def _import_built(kind: str, folder: Path, name: str) -> ModuleType:
    """Import the module file a previous build left in ``folder``, bypassing torch's builder
    (which wants to write its lock and build.ninja even when nothing needs building)."""
    path = folder / f"{name}.so"
    import torch  # noqa: F401  (the module links against libtorch, which must be loaded first)

    try:
        loader = importlib.util.spec_from_file_location(name, path)
        if loader is None or loader.loader is None:
            raise ImportError(f"not an importable module file: {path}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    except ImportError as exc:
        raise ExtensionUnavailable(kind, f"cannot import the cached build {path}: {exc}; "
                                         "delete that folder (or set LUCIDOPS_CACHE_DIR) to rebuild") from exc
    return module


def _write_log(path: Path, text: str) -> Optional[str]:
    """Write the build log; its path, or None where the folder is not writable."""
    try:
        path.write_text(text)
    except OSError:
        return None
    return str(path)


def build(
    kind: str,
    *,
    build_dir: Optional[Path] = None,
    arch_list: Optional[List[str]] = None,
    verbose: bool = False,
) -> ModuleType:
    """Build (or reuse a cached build of) extension ``kind`` and import it.

    Raises ExtensionUnavailable with the reason and the build log's path on failure.
    """
    spec = _ext_sources.spec(kind, arch_list=arch_list)
    folder = Path(build_dir) if build_dir is not None else cache_dir() / spec.module_name
    built = folder / f"{spec.module_name}.so"
    # A module already built here is imported without torch's builder: the folder's name
    # hashes everything the build depends on (sources, flags, torch, Python, CPU), and the
    # builder's ninja check rebuilt it all whenever another ninja ran (pip's in an activated
    # venv, the system's from cron or an IDE: each rejects the other's log), silently, for a
    # minute. One that does not import (a link cut short) goes to the builder, which
    # serialises concurrent builds, where it can write.
    problem = _compiler_problem(kind)
    unimportable = False
    if built.is_file():
        if problem or not os.access(folder, os.W_OK):  # nothing can rebuild it: take it as it is
            if not whole_shared_object(built):
                raise ExtensionUnavailable(kind, f"the cached build {built} is cut short (a build killed while "
                                                 "linking?); delete that folder (or set LUCIDOPS_CACHE_DIR) to rebuild")
            return _import_built(kind, folder, spec.module_name)
        with _build_lock(folder):  # a build in progress is finished first: its module half-linked killed us
            if whole_shared_object(built):
                module = None
                try:
                    module = _import_built(kind, folder, spec.module_name)
                except ExtensionUnavailable:
                    pass
                if module is not None:
                    return module
            # Cut short (a killed link) or not importable: removed, so the builder links it again
            # (ninja could find a cut file newer than its inputs and keep it). Another process
            # waiting on the lock may have removed it already: then its build is under way.
            unimportable = built.exists()
            built.unlink(missing_ok=True)
    if problem:
        raise ExtensionUnavailable(kind, problem)
    from torch.utils import cpp_extension

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only file system, a regular file on the path, no permission
        raise _unwritable(kind, folder, exc) from exc
    log_path = folder / "build.log"
    if not verbose and unimportable:
        print(f"lucidops: rebuilding the {kind} extension in {folder} (the module there was cut short or did not "
              "import)", file=sys.stderr)
    elif not verbose and not built.exists():
        print(f"lucidops: building the {kind} extension (first use; about a minute) in {folder}", file=sys.stderr)
    if kind == "cuda":
        _ext_sources.use_real_cuda_home(cpp_extension)
    # sys.stdout and sys.stderr are left alone: swapping them (redirect_stdout) is process-wide,
    # so another thread's output went into the log for the minute of a build, and a caller's
    # own redirect that overlapped it could leave sys.stdout a StringIO for good. Nothing is
    # lost: not verbose, torch captures ninja's output into the exception, and it reports
    # through logging.
    try:
        module = cpp_extension.load(
            name=spec.module_name,
            sources=spec.sources,
            extra_cflags=spec.cflags,
            extra_cuda_cflags=spec.cuda_cflags,
            extra_ldflags=spec.ldflags,
            extra_include_paths=spec.include_dirs,
            build_directory=str(folder),
            with_cuda=(kind == "cuda"),
            verbose=verbose,
        )
    except OSError as exc:  # torch's lock or build.ninja could not be written; not a compile error
        if built.is_file():
            return _import_built(kind, folder, spec.module_name)
        raise _unwritable(kind, folder, exc) from exc
    except Exception as exc:  # compiler errors arrive as RuntimeError with ninja's output
        lines = str(exc).splitlines() or [repr(exc)]
        logged = _write_log(log_path, str(exc))
        first_error = first_error_line(lines)
        raise ExtensionUnavailable(kind, f"build failed: {first_error.strip()}", logged) from exc
    try:  # a failed build's log is stale now
        log_path.unlink(missing_ok=True)
    except OSError:
        pass
    return module


@contextlib.contextmanager
def _build_lock(folder: Path):
    """torch's builder's own lock on ``folder`` (an OS advisory lock through ``filelock``, which
    torch depends on), so that a module another process is still linking is never imported.
    Released before the builder runs: it takes the lock itself. Where the lock file cannot be
    opened (another user's, in a shared cache) nothing is locked, as before the lock was taken."""
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - torch requires filelock
        yield
        return
    lock = FileLock(str(folder / "lock"))
    try:
        lock.acquire()
    except OSError:  # a shared cache whose lock file another user owns: read it as before, unlocked
        yield
        return
    try:
        yield
    finally:
        lock.release()


def whole_shared_object(path: Path) -> bool:
    """Whether an ELF file holds all it says it does: its section header table, which linkers
    write last, ends within the file. A module cut short (a link killed or still running) is
    mapped by dlopen past its end, which kills the process (SIGBUS) instead of raising. Files
    that are not ELF (macOS) pass: dlopen judges them."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
        size = path.stat().st_size
    except OSError:
        return False
    if header[:4] != b"\x7fELF" or len(header) < 52:
        return header[:4] != b"\x7fELF"
    order = "<" if header[5] == 1 else ">"
    if header[4] == 2:  # 64-bit
        if len(header) < 64:
            return False
        (shoff,) = struct.unpack_from(order + "Q", header, 0x28)
        entsize, count = struct.unpack_from(order + "HH", header, 0x3A)
    else:
        (shoff,) = struct.unpack_from(order + "I", header, 0x20)
        entsize, count = struct.unpack_from(order + "HH", header, 0x2E)
    return 0 < shoff and shoff + entsize * count <= size


_ERROR_LINE = re.compile(r"error:|fatal\s*:|fatal error", re.IGNORECASE)


def first_error_line(lines: List[str]) -> str:
    """The line of a failed build's output that says what went wrong: the compiler's first
    error, or nvcc's "nvcc fatal : ...", not a command line ninja echoes (which may be a
    thousand characters of flags); the first line where there is none."""
    for line in lines:
        stripped = line.strip()
        if _ERROR_LINE.search(stripped) and not stripped.startswith("["):
            return stripped
    return lines[0].strip()


def load(kind: str) -> ModuleType:
    """The extension module for ``kind``, building it on first use (cached per process)."""
    with _lock:
        if kind in _loaded:
            return _loaded[kind]
        if kind in _failed:
            raise _failed[kind]
        try:
            if kind == "cuda":
                import torch

                if not torch.cuda.is_available():
                    raise ExtensionUnavailable(kind, "no CUDA GPU visible to torch")
            if disabled_by_env():
                raise ExtensionUnavailable(kind, "disabled by LUCIDOPS_DISABLE_EXT")
            spec = _ext_sources.spec(kind)
            module = _prebuilt(kind, spec) or build(kind)
        except ExtensionUnavailable as err:
            if kind not in _skipped_prebuilt:
                _failed[kind] = err
                raise
            failure = ExtensionUnavailable(kind, f"{err.reason}; {_skipped_prebuilt[kind]}", err.log_path)
            _failed[kind] = failure
            raise failure from err
        _loaded[kind] = module
        return module


def is_loaded(kind: str) -> bool:
    """Whether extension ``kind`` is imported in this process (no build, no import)."""
    return kind in _loaded


def status(kind: str, *, build_if_needed: bool = False) -> Optional[str]:
    """None when extension ``kind`` is usable, else the reason it is not.

    Without ``build_if_needed`` a not-yet-built extension is reported as buildable
    (None) when a compiler is present, without spending a minute building it.
    """
    if kind in _loaded:
        return None
    if kind in _failed:
        return _failed[kind].reason + (f" (build log: {_failed[kind].log_path})" if _failed[kind].log_path else "")
    if build_if_needed:
        try:
            load(kind)
            return None
        except ExtensionUnavailable as err:
            return str(err)
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
    if disabled_by_env():
        return "disabled by LUCIDOPS_DISABLE_EXT"
    problem = _compiler_problem(kind)
    if problem is None and _cache_writable():
        return None
    # Without a compiler, or with a cache folder no build can write into, load() builds
    # nothing: it takes the ahead-of-time module or the build in the cache, or records why
    # not, so that selection asks (and hashes the sources) once rather than on every op call.
    try:
        load(kind)
    except ExtensionUnavailable as err:
        return err.reason
    return None
