"""The extension cache and ahead-of-time builds, without building anything: an unwritable
cache, a prebuilt CUDA module for other GPUs, `lucidops build` with a prebuilt module, and
setup.py's extras and build-time errors.

A read-only folder cannot be made with chmod here (root ignores permissions), so the
failures are simulated: a regular file on the cache path, or torch's builder and the log
write raising the OSError a read-only file system gives.
"""

import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import types
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from child_python import run_ops_collecting_warnings, run_python
from lucidops import _ext, _ext_sources, cli

REPO = Path(__file__).resolve().parents[1]


def _erofs(path):
    return OSError(30, "Read-only file system", str(path))


def _no_builder(*args, **kwargs):
    raise AssertionError("torch's builder must not run")


@pytest.fixture
def fresh_ext(monkeypatch):
    """_ext with its per-process memory emptied, no ahead-of-time module, a compiler assumed."""
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_failed", {})
    monkeypatch.setattr(_ext, "_prebuilt", lambda kind, spec: None)
    monkeypatch.setattr(_ext, "_compiler_problem", lambda kind: None)
    return _ext


def _fake_extension(folder: Path, name: str, source_hash: str) -> Path:
    """A real (tiny) extension module file ``folder/name.so`` with SOURCE_HASH, compiled in a
    fraction of a second, standing in for a cached build."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    include = sysconfig.get_paths()["include"]
    if cc is None or not Path(include, "Python.h").is_file():
        pytest.skip("needs a C compiler and Python's headers")
    src = folder / "fake.c"
    src.write_text(textwrap.dedent(f"""
        #include <Python.h>
        static struct PyModuleDef def = {{PyModuleDef_HEAD_INIT, "{name}", NULL, -1, NULL}};
        PyMODINIT_FUNC PyInit_{name}(void) {{
            PyObject *m = PyModule_Create(&def);
            if (m) PyModule_AddStringConstant(m, "SOURCE_HASH", "{source_hash}");
            return m;
        }}
    """))
    so = folder / f"{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", f"-I{include}", "-o", str(so), str(src)], check=True)
    src.unlink()
    return so


# --- LUCIDOPS_CACHE_DIR ------------------------------------------------------------------

def test_empty_cache_dir_is_the_default_and_tilde_is_expanded(monkeypatch):
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", "")
    assert _ext.cache_dir() == Path.home() / ".cache" / "lucidops"
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", "~/lucidops-cache")
    assert _ext.cache_dir() == Path.home() / "lucidops-cache"


# --- an unwritable cache -----------------------------------------------------------------

def test_cache_folder_that_cannot_be_made_is_unavailable_not_oserror(fresh_ext, monkeypatch, tmp_path):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    monkeypatch.setattr(cpp_extension, "load", _no_builder)
    with pytest.raises(_ext.ExtensionUnavailable, match="not writable") as err:
        _ext.load("cpu")
    assert "LUCIDOPS_CACHE_DIR" in str(err.value)
    with pytest.raises(_ext.ExtensionUnavailable):  # remembered: no second attempt
        _ext.load("cpu")


def test_read_only_cache_without_a_build_is_unavailable_not_oserror(fresh_ext, monkeypatch, tmp_path):
    """Read-only: torch's lock cannot be made, nor the build log written."""
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path))

    def read_only_load(**kwargs):
        raise _erofs(Path(kwargs["build_directory"]) / "lock")

    def read_only_write(self, *args, **kwargs):
        raise _erofs(self)

    monkeypatch.setattr(cpp_extension, "load", read_only_load)
    monkeypatch.setattr(Path, "write_text", read_only_write)
    with pytest.raises(_ext.ExtensionUnavailable, match="not writable.*Read-only file system") as err:
        _ext.build("cpu")
    assert err.value.log_path is None


def test_read_only_cache_with_a_build_imports_it_without_the_builder(fresh_ext, monkeypatch, tmp_path):
    """The module built there is imported from its file; torch's builder, which fails on
    its lock, is not needed, nor a compiler."""
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path))
    name = _ext_sources.spec("cpu").module_name
    folder = tmp_path / name
    folder.mkdir()
    _fake_extension(folder, name, "hfake")
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False)
    monkeypatch.setattr(cpp_extension, "load", _no_builder)
    monkeypatch.setattr(_ext, "_compiler_problem", lambda kind: "no C++ compiler found")
    module = _ext.load("cpu")
    assert module.SOURCE_HASH == "hfake" and Path(module.__file__) == folder / f"{name}.so"


def test_build_in_the_cache_is_usable_without_a_compiler(fresh_ext, monkeypatch, tmp_path):
    """Automatic selection asks status() before anything loads: it said "no C++ compiler
    found" and passed over a build sitting in the cache, which load() imports without one
    (from a writable cache too, not only a read-only one)."""
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_ext, "_compiler_problem", lambda kind: "no C++ compiler found")
    monkeypatch.setattr(_ext, "_prebuilt", lambda kind, spec: None)
    assert _ext.status("cpu") == "no C++ compiler found"
    _ext._failed.pop("cpu", None)  # remembered per process: the build below is a new process's
    name = _ext_sources.spec("cpu").module_name
    folder = tmp_path / name
    folder.mkdir()
    _fake_extension(folder, name, "hfake3")
    assert _ext.status("cpu") is None
    monkeypatch.setattr(cpp_extension, "load", _no_builder)
    assert _ext.load("cpu").SOURCE_HASH == "hfake3"


def test_lock_that_cannot_be_written_falls_back_to_importing_the_build(fresh_ext, monkeypatch, tmp_path):
    """Where the folder looks writable but torch's builder still fails to write (a read-only
    bind mount os.access misjudges), the module built there is imported from its file: the
    builder is never reached for a whole module."""
    name, folder, built = _cached_fake_module(monkeypatch, tmp_path, "hfake2")
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: (_ for _ in ()).throw(_erofs(folder / "lock")))
    assert _ext.build("cpu").SOURCE_HASH == "hfake2"


def test_op_with_an_unwritable_cache_warns_once_and_runs_the_next_backend(tmp_path):
    (tmp_path / "afile").write_text("")
    setup = """
        _ext._prebuilt = lambda kind, spec: None     # only the cache counts here
        _ext._compiler_problem = lambda kind: None   # get as far as the cache folder
    """
    proc, warned = run_ops_collecting_warnings({"LUCIDOPS_CACHE_DIR": str(tmp_path / "afile" / "cache")}, setup)
    assert proc.returncode == 0, proc.stderr
    assert "USED" in proc.stdout and "USED cpp" not in proc.stdout, proc.stdout
    assert len(warned) == 1 and "not writable" in warned[0] and "LUCIDOPS_CACHE_DIR" in warned[0], warned


def test_build_command_with_an_unwritable_cache_reports_it(fresh_ext, monkeypatch, tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    monkeypatch.setattr(cpp_extension, "load", _no_builder)
    assert cli.main(["build", "cpu"]) == 1
    captured = capsys.readouterr()
    err = captured.err  # on stderr with "error: ", as every other command's failures
    assert err.startswith("error: cpu: ") and "not writable" in err and not captured.out, err


def test_a_cached_build_is_imported_without_the_builder(fresh_ext, monkeypatch, tmp_path):
    """With a compiler present the builder ran on every first call, and its ninja check
    rebuilt the whole extension (a silent minute) whenever another ninja ran than last time:
    pip's in an activated venv, the system's otherwise. The folder's name hashes what the
    build depends on, so a module there is the build."""
    name, folder, built = _cached_fake_module(monkeypatch, tmp_path, "hfake4")
    monkeypatch.setattr(cpp_extension, "load", _no_builder)
    assert _ext.build("cpu").SOURCE_HASH == "hfake4"


def test_a_cached_module_that_does_not_import_is_rebuilt(fresh_ext, monkeypatch, tmp_path, capsys):
    # A link cut short (a killed build) leaves a truncated module file: the builder relinks it.
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path))
    name = _ext_sources.spec("cpu").module_name
    folder = tmp_path / name
    folder.mkdir()
    (folder / f"{name}.so").write_bytes(b"\x7fELF truncated")
    rebuilt = types.ModuleType(name)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: rebuilt)
    assert _ext.build("cpu") is rebuilt
    assert "rebuilding the cpu extension" in capsys.readouterr().err


def _cached_fake_module(monkeypatch, tmp_path: Path, source_hash: str):
    """A cache in ``tmp_path`` holding a (tiny, real) build of the cpu extension: (module name,
    its folder, the module file)."""
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path))
    name = _ext_sources.spec("cpu").module_name
    folder = tmp_path / name
    folder.mkdir()
    return name, folder, _fake_extension(folder, name, source_hash)


def _cut_short(path: Path) -> bytes:
    """Cut ``path`` to half its length, as a link killed or still running leaves it; returns
    the whole file. dlopen maps such a file past its end and kills the process (SIGBUS)."""
    whole = path.read_bytes()
    path.write_bytes(whole[: len(whole) // 2])
    assert not _ext.whole_shared_object(path) and whole[:4] == b"\x7fELF"
    return whole


def test_a_cached_module_cut_short_is_relinked_not_imported(fresh_ext, monkeypatch, tmp_path, capsys):
    name, folder, built = _cached_fake_module(monkeypatch, tmp_path, "hfake5")
    _cut_short(built)
    monkeypatch.setattr(_ext, "_import_built", lambda *args: pytest.fail("imported a module cut short"))
    seen = []
    rebuilt = types.ModuleType(name)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.append(built.exists()) or rebuilt)
    assert _ext.build("cpu") is rebuilt
    assert seen == [False]  # removed first: ninja could keep a cut file newer than its inputs
    assert "cut short" in capsys.readouterr().err


def test_a_cached_module_cut_short_in_a_read_only_cache_is_refused(fresh_ext, monkeypatch, tmp_path):
    name, folder, built = _cached_fake_module(monkeypatch, tmp_path, "hfake6")
    _cut_short(built)
    monkeypatch.setattr(_ext, "_compiler_problem", lambda kind: "no C++ compiler found")
    with pytest.raises(_ext.ExtensionUnavailable, match="cut short"):
        _ext.build("cpu")


def test_a_waiter_finding_the_cut_module_removed_goes_to_the_builder(fresh_ext, monkeypatch, tmp_path):
    """Several processes waiting on the lock over a cut module: the first removed it and the
    others, finding it gone, raised FileNotFoundError from the op call."""
    import contextlib

    name, folder, built = _cached_fake_module(monkeypatch, tmp_path, "hfake8")
    _cut_short(built)

    @contextlib.contextmanager
    def another_waiter_went_first(folder):
        built.unlink()
        yield

    monkeypatch.setattr(_ext, "_build_lock", another_waiter_went_first)
    rebuilt = types.ModuleType(name)
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: rebuilt)
    assert _ext.build("cpu") is rebuilt


def test_a_lock_file_that_cannot_be_opened_reads_the_module_unlocked(fresh_ext, monkeypatch, tmp_path):
    """A shared cache whose lock file another user owns: taking the lock raised PermissionError
    from every op call, where the whole module there had been imported."""
    import filelock

    name, folder, built = _cached_fake_module(monkeypatch, tmp_path, "hfake9")

    def not_yours(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(folder / "lock"))

    monkeypatch.setattr(filelock.FileLock, "acquire", not_yours)
    monkeypatch.setattr(cpp_extension, "load", _no_builder)
    assert _ext.build("cpu").SOURCE_HASH == "hfake9"


def test_a_module_being_linked_is_imported_once_the_build_lock_is_free(fresh_ext, monkeypatch, tmp_path):
    """A process arriving while another linked the module imported the half-written file
    and died of SIGBUS: the cached module is read under the builder's own lock."""
    name, folder, built = _cached_fake_module(monkeypatch, tmp_path, "hfake7")
    whole = _cut_short(built)
    (tmp_path / "whole.so").write_bytes(whole)
    linker = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import shutil, sys, time
        from filelock import FileLock
        with FileLock({str(folder / "lock")!r}):
            print("locked", flush=True)
            time.sleep(1.5)
            shutil.copyfile({str(tmp_path / "whole.so")!r}, {str(built)!r})
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert linker.stdout.readline().strip() == "locked"
        monkeypatch.setattr(cpp_extension, "load", _no_builder)
        assert _ext.build("cpu").SOURCE_HASH == "hfake7"
    finally:
        linker.wait(timeout=60)


def test_status_reports_a_cache_no_build_can_write_into(fresh_ext, monkeypatch, tmp_path, capsys):
    """`lucidops info` said "cpp available" over a cache folder that could not be written and
    held no build, while the op's own warning (pointing at info) said the opposite."""
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path / "afile" / "cache"))
    monkeypatch.setattr(cpp_extension, "load", _no_builder)
    assert "not writable" in _ext.status("cpu")
    monkeypatch.setattr(_ext, "_failed", {})
    assert cli.main(["info"]) == 0
    assert "cpp       unavailable: cache folder" in capsys.readouterr().out
    monkeypatch.setattr(_ext, "_failed", {})
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path / "not yet made" / "cache"))
    assert _ext.status("cpu") is None  # buildable: a build makes the folders
    assert not (tmp_path / "not yet made").exists()  # and asking made nothing


@pytest.mark.parametrize("value, disabled", [("1", True), ("true", True), (" Yes ", True), ("on", True),
                                             ("0", False), ("", False), ("false", False), ("off", False)])
def test_disable_ext_reads_the_usual_spellings(fresh_ext, monkeypatch, value, disabled):
    # "true" was read as "keep them", so the build it was set to avoid ran.
    monkeypatch.setenv("LUCIDOPS_DISABLE_EXT", value)
    assert (_ext.status("cpu") == "disabled by LUCIDOPS_DISABLE_EXT") is disabled


def test_disable_ext_refuses_other_values_by_name(fresh_ext, monkeypatch, capsys):
    monkeypatch.setenv("LUCIDOPS_DISABLE_EXT", "maybe")
    with pytest.raises(ValueError, match="LUCIDOPS_DISABLE_EXT.*'maybe'"):
        _ext.status("cpu")
    assert cli.main(["info"]) == 2
    assert capsys.readouterr().err.startswith("error: LUCIDOPS_DISABLE_EXT must be")


def test_a_failed_build_is_reported_by_its_error_line_not_a_command_line():
    """nvcc's failures say "nvcc fatal   : ...", not "error:": the reason was the first line of
    ninja's output, a thousand characters of nvcc command line."""
    nvcc = ["[1/3] /usr/local/cuda/bin/nvcc -MD -MF a.o.d -gencode=arch=compute_90,code=sm_90 -c a.cu -o a.o",
            "FAILED: a.o", "/usr/local/cuda/bin/nvcc -MD -MF a.o.d -c a.cu -o a.o",
            "nvcc fatal   : Unsupported gpu architecture 'compute_sm_90'"]
    assert _ext.first_error_line(nvcc) == "nvcc fatal   : Unsupported gpu architecture 'compute_sm_90'"
    gcc = ["[1/2] c++ -c x.cpp", "FAILED: x.o", "c++ -c x.cpp", "x.cpp:3:1: error: expected ';'"]
    assert _ext.first_error_line(gcc) == "x.cpp:3:1: error: expected ';'"
    assert _ext.first_error_line(["  something else went wrong  ", "more"]) == "something else went wrong"


@pytest.mark.parametrize("value", ["sm_90", "90", "8.0;compute_90", "Hopper"])
def test_cuda_arch_list_refuses_what_nvcc_would_by_name(monkeypatch, capsys, value):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        _ext_sources.cuda_arch_list()
    monkeypatch.setattr(cpp_extension, "load", _no_builder)
    assert cli.main(["build", "cuda"]) == 1
    assert capsys.readouterr().err.startswith("error: cuda: TORCH_CUDA_ARCH_LIST")


def test_cuda_arch_list_takes_torchs_spellings(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0 8.6+PTX;9.0a,10.0f")
    assert _ext_sources.cuda_arch_list() == ["8.0", "8.6+PTX", "9.0a", "10.0f"]


# --- ahead-of-time modules ---------------------------------------------------------------

def _install_prebuilt(monkeypatch, tmp_path, kind, source_hash, archs=None):
    """A stand-in for an installed lucidops._C_<kind> (with setup.py's arch list file)."""
    mod = types.ModuleType(f"lucidops._C_{kind}")
    mod.SOURCE_HASH = "h" + source_hash
    mod.__file__ = str(tmp_path / f"_C_{kind}.so")
    if archs is not None:
        (tmp_path / _ext_sources.ARCHS_FILE).write_text(";".join(archs) + "\n")
    monkeypatch.setitem(sys.modules, f"lucidops._C_{kind}", mod)
    return mod


def test_a_build_leaves_the_process_streams_alone(fresh_ext, monkeypatch, tmp_path):
    """The build swapped sys.stdout/sys.stderr (process-wide) for its minute: other threads'
    output went into the build log, and a caller's redirect overlapping it could leave
    sys.stdout a StringIO for good."""
    monkeypatch.setenv("LUCIDOPS_CACHE_DIR", str(tmp_path))
    streams = (sys.stdout, sys.stderr)
    seen = []

    def fake_load(**kwargs):
        seen.append((sys.stdout, sys.stderr))
        return types.ModuleType(kwargs["name"])

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    _ext.load("cpu")
    assert seen == [streams]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_during_a_build_does_not_inherit_the_held_lock():
    """A fork while another thread built copied the held _lock with no owner: the child's first
    op (a DataLoader worker's) waited forever."""
    with _ext._lock:  # as a building thread holds it
        pid = os.fork()
        if pid == 0:  # the child: its lock must be free
            os._exit(0 if _ext._lock.acquire(timeout=5) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_source_hash_leaves_the_cuda_archs_out_and_the_cache_name_keeps_them():
    host = _ext_sources.spec("cuda", arch_list=["8.0", "9.0"])
    h100 = _ext_sources.spec("cuda", arch_list=["9.0"])
    assert host.source_hash == h100.source_hash
    assert host.module_name != h100.module_name  # a lazy build per arch list
    assert "-gencode=arch=compute_90,code=sm_90" in h100.cuda_cflags
    assert not any("compute_80" in f for f in h100.cuda_cflags)


def test_cache_folder_is_per_sources_location_and_python_abi(tmp_path, monkeypatch):
    """Two checkouts (or venvs) with the same sources shared one cache folder, and torch's ninja
    file names the sources' paths: each alternation rebuilt it (a minute); a second Python
    version would load a module built for the first."""
    import shutil
    import sysconfig

    here = _ext_sources.spec("cpu")
    copy = tmp_path / "csrc"
    shutil.copytree(_ext_sources.csrc_root(), copy)
    there = _ext_sources.spec("cpu", root=str(copy))
    assert there.source_hash == here.source_hash  # an ahead-of-time build still matches
    assert there.module_name != here.module_name
    assert _ext_sources.spec("cpu").module_name == here.module_name  # and stays put between calls
    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var",
                        lambda key: ".cpython-399-x86_64-linux-gnu.so" if key == "EXT_SUFFIX" else real(key))
    other_python = _ext_sources.spec("cpu")
    assert other_python.source_hash == here.source_hash and other_python.module_name != here.module_name


def test_native_cpu_builds_are_per_cpu_and_portable_ones_are_not(monkeypatch):
    """-march=native builds for the build machine's instruction sets: a cache shared by machines
    (an NFS home) served an AVX-512 build to a CPU without AVX-512 (an illegal instruction)."""
    monkeypatch.delenv("LUCIDOPS_CPU_ARCH_FLAGS", raising=False)
    monkeypatch.setattr(_ext_sources, "host_cpu_features", lambda: ["avx2", "avx512f", "fma"])
    big = _ext_sources.spec("cpu")
    monkeypatch.setattr(_ext_sources, "host_cpu_features", lambda: ["avx2", "fma"])
    small = _ext_sources.spec("cpu")
    assert big.cpu_features == ["avx2", "avx512f", "fma"] and small.cpu_features == ["avx2", "fma"]
    assert big.source_hash == small.source_hash and big.module_name != small.module_name
    monkeypatch.setenv("LUCIDOPS_CPU_ARCH_FLAGS", "-march=x86-64-v3")  # portable: one build for all
    portable = _ext_sources.spec("cpu")
    monkeypatch.setattr(_ext_sources, "host_cpu_features", lambda: ["avx2", "avx512f", "fma"])
    assert portable.cpu_features == [] and _ext_sources.spec("cpu").module_name == portable.module_name


def test_host_cpu_features_are_read_and_only_instruction_sets():
    """The whole flags line also held hypervisor, tsc_known_freq or microcode-dependent hle/rtm:
    a prebuilt module was refused on the same CPU on bare metal or after a microcode update."""
    features = _ext_sources.host_cpu_features()
    assert features and features == sorted(set(features))
    if Path("/proc/cpuinfo").is_file() and sysconfig.get_platform().endswith("x86_64"):
        assert "sse2" in features  # every x86-64 CPU has it
        assert not {"hypervisor", "tsc_known_freq", "constant_tsc", "hle", "rtm", "fpu"} & set(features)


def _no_builder_unavailable(kind, **kwargs):
    raise _ext.ExtensionUnavailable(kind, "no C++ compiler found")


def test_ahead_of_time_native_cpu_module_is_skipped_on_a_cpu_without_its_features(monkeypatch, tmp_path, capsys):
    """setup.py records the build host's CPU features next to a -march=native _C_cpu; the loader
    checks them before importing it (its code may already use the missing instructions)."""
    namespace, _ = _run_setup(monkeypatch)

    class FakeBuildExt:
        def build_extension(self, ext):
            Path(self.get_ext_fullpath(ext.name)).write_text("")

        def get_ext_fullpath(self, name):
            return str(tmp_path / (name.rsplit(".", 1)[1] + ".so"))

    cmd = namespace["_recording_archs"](FakeBuildExt, [], _ext_sources.ARCHS_FILE, ["avx2", "avx512f"],
                                        _ext_sources.CPU_FEATURES_FILE)()
    cmd.build_extension(types.SimpleNamespace(name="lucidops._C_cpu"))
    assert (tmp_path / _ext_sources.CPU_FEATURES_FILE).read_text().split() == ["avx2", "avx512f"]
    mod = _install_prebuilt(monkeypatch, tmp_path, "cpu", _ext_sources.spec("cpu").source_hash)
    monkeypatch.setattr(_ext.importlib.util, "find_spec",
                        lambda name: types.SimpleNamespace(origin=mod.__file__) if name == "lucidops._C_cpu" else None)
    monkeypatch.setattr(_ext_sources, "host_cpu_features", lambda: ["avx", "avx2", "avx512f", "fma"])
    assert _ext._prebuilt("cpu", _ext_sources.spec("cpu")) is mod
    monkeypatch.setattr(_ext_sources, "host_cpu_features", lambda: ["avx", "avx2", "fma"])
    imported, real_import = [], _ext.importlib.import_module
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: imported.append(name))
    monkeypatch.setattr(_ext, "_skipped_prebuilt", {})
    assert _ext._prebuilt("cpu", _ext_sources.spec("cpu")) is None and imported == []
    monkeypatch.setattr(_ext.importlib, "import_module", real_import)
    # Then unavailable for want of a compiler: the reason says an installed build was passed over.
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_failed", {})
    monkeypatch.setattr(_ext, "_compiler_problem", lambda kind: "no C++ compiler found")
    monkeypatch.setattr(_ext, "cache_dir", lambda: tmp_path / "empty-cache")
    with pytest.raises(_ext.ExtensionUnavailable, match=r"no C\+\+ compiler found; the installed lucidops._C_cpu "
                                                         r"was built for CPU features this CPU lacks \(avx512f\)"):
        _ext.load("cpu")
    # lucidops build names it too.
    monkeypatch.setattr(_ext, "build", _no_builder_unavailable)
    assert cli.main(["build", "cpu"]) == 1
    assert "the installed lucidops._C_cpu was built for CPU features this CPU lacks (avx512f)" in capsys.readouterr().err
    # A portable rebuild in the same folder removes the record a native build left.
    portable = namespace["_recording_archs"](FakeBuildExt, [], _ext_sources.ARCHS_FILE, [],
                                             _ext_sources.CPU_FEATURES_FILE)()
    portable.build_extension(types.SimpleNamespace(name="lucidops._C_cpu"))
    assert not (tmp_path / _ext_sources.CPU_FEATURES_FILE).exists()


@pytest.mark.parametrize("built, needed, covered", [
    (["8.0", "9.0"], ["9.0"], True),
    (["8.0", "9.0"], ["8.0", "9.0"], True),
    (["8.0", "9.0+PTX"], ["9.0"], True),
    (["9.0a"], ["9.0"], True),
    (["8.0"], ["8.6"], False),  # same major, other minor: a lazy build for the real GPU
    (["9.0"], ["8.0", "9.0"], False),  # every GPU must be covered
    ([], ["9.0"], False),  # no recorded list: not trusted
])
def test_archs_cover(built, needed, covered):
    assert _ext_sources.archs_cover(built, needed) is covered


def test_cuda_module_built_on_a_gpu_less_host_is_used_on_a_gpu_it_covers(monkeypatch, tmp_path):
    """Built for the default sm_80/sm_90 without a GPU, run on an H100 (9.0) or an A10 (8.6)."""
    host = _ext_sources.spec("cuda", arch_list=["8.0", "9.0"])
    mod = _install_prebuilt(monkeypatch, tmp_path, "cuda", host.source_hash, archs=["8.0", "9.0"])
    monkeypatch.setattr(_ext_sources, "visible_capabilities", lambda: ["9.0"])
    assert _ext._prebuilt("cuda", _ext_sources.spec("cuda", arch_list=["9.0"])) is mod
    monkeypatch.setattr(_ext_sources, "visible_capabilities", lambda: ["8.6"])
    assert _ext._prebuilt("cuda", _ext_sources.spec("cuda", arch_list=["8.6"])) is None


def test_cuda_module_without_its_arch_list_is_not_used(monkeypatch, tmp_path):
    host = _ext_sources.spec("cuda", arch_list=["8.0", "9.0"])
    _install_prebuilt(monkeypatch, tmp_path, "cuda", host.source_hash, archs=None)
    monkeypatch.setattr(_ext_sources, "visible_capabilities", lambda: ["9.0"])
    assert _ext._prebuilt("cuda", _ext_sources.spec("cuda", arch_list=["9.0"])) is None


def test_build_command_reports_a_prebuilt_module_without_building(monkeypatch, tmp_path, capsys):
    mod = _install_prebuilt(monkeypatch, tmp_path, "cpu", _ext_sources.spec("cpu").source_hash)
    monkeypatch.setattr(_ext, "build", _no_builder)
    assert cli.main(["build", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == f"cpu: ok (prebuilt: {mod.__file__})"


# --- setup.py ----------------------------------------------------------------------------

def _run_setup(monkeypatch):
    """setup.py's globals and the keyword arguments it passes to setup(), without building."""
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("LUCIDOPS_BUILD_EXT", raising=False)
    namespace = runpy.run_path(str(REPO / "setup.py"), run_name="setup")
    return namespace, captured


def test_peft_extra_brings_matplotlib_for_the_unlearn_demo(monkeypatch):
    _, kwargs = _run_setup(monkeypatch)
    assert any(req.startswith("matplotlib") for req in kwargs["extras_require"]["peft"])


def test_ahead_of_time_build_without_torch_says_to_disable_build_isolation():
    """pip's default build isolation: torch not importable by setup.py."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; "
            "runpy.run_path('setup.py', run_name='__main__')")
    proc = run_python(code, cwd=REPO, env={"LUCIDOPS_BUILD_EXT": "1"}, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "pip install --no-build-isolation" in proc.stderr, proc.stderr


def test_ahead_of_time_cuda_build_records_its_arch_list(monkeypatch, tmp_path):
    namespace, _ = _run_setup(monkeypatch)

    class FakeBuildExt:  # what BuildExtension's build_extension leaves: the module file
        def build_extension(self, ext):
            Path(self.get_ext_fullpath(ext.name)).write_text("")

        def get_ext_fullpath(self, name):
            return str(tmp_path / (name.rsplit(".", 1)[1] + ".so"))

    cmd = namespace["_recording_archs"](FakeBuildExt, ["8.0", "9.0"], _ext_sources.ARCHS_FILE)()
    cmd.build_extension(types.SimpleNamespace(name="lucidops._C_cpu"))
    assert not (tmp_path / _ext_sources.ARCHS_FILE).exists()
    cmd.build_extension(types.SimpleNamespace(name="lucidops._C_cuda"))
    mod = types.SimpleNamespace(__file__=str(tmp_path / "_C_cuda.so"))
    assert _ext.prebuilt_archs(mod) == ["8.0", "9.0"]
