"""The lazy extension builder: CUDA build for sm_80/sm_90, cache, errors, concurrent builds."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from child_python import run_ops_collecting_warnings, run_python
from lucidops import _ext, _ext_sources

pytestmark = pytest.mark.slow


def test_cuda_extension_builds_and_links_for_sm80_and_sm90():
    # The cache's build (`lucidops build cuda` on a machine without a GPU): built here or by
    # test_gaussian_mixture_cuda.py, whichever runs first, instead of a minute's build each.
    module = _ext.build("cuda", arch_list=["8.0", "9.0"])
    spec = _ext_sources.spec("cuda", arch_list=["8.0", "9.0"])
    assert module.DEVICE == "cuda"
    assert module.SOURCE_HASH == "h" + spec.source_hash
    assert hasattr(module, "activation_forward") and hasattr(module, "activation_backward")
    for name in ("gaussian_mixture_forward", "gaussian_mixture_backward_max", "gaussian_phi", "gaussian_phi_backward"):
        assert hasattr(module, name), name
    blob = Path(module.__file__).read_bytes()
    # The fat binary names each architecture it carries code for.
    assert b"sm_80" in blob and b"sm_90" in blob
    assert b"sm_75" not in blob


def _run(code, env_extra, timeout=600):
    return run_python(code, env=env_extra, timeout=timeout)


LOAD_CPU = """
    import torch
    from lucidops import _ext
    m = _ext.load("cpu")
    x = torch.linspace(-3, 3, 101)
    y = m.activation_forward(x, torch.tensor(1.0), 0)
    assert torch.allclose(y, torch.sinc(x / torch.pi), atol=1e-6)
    print("LOADED", m.__name__)
"""


@pytest.fixture(scope="module")
def portable_cpu_build(tmp_path_factory) -> dict:
    """The environment of an AVX2-only (-march=x86-64-v3) build of the CPU extension in a cache
    of its own. Two tests share the build: the concurrent-build test makes it from an empty cache
    and the AVX2 Gaussian forward test runs it. A build takes about a minute of both cores, and CI
    paid for one each."""
    return {"LUCIDOPS_CPU_ARCH_FLAGS": "-march=x86-64-v3",
            "LUCIDOPS_CACHE_DIR": str(tmp_path_factory.mktemp("portable-cpu-build"))}


def test_two_processes_building_at_once_both_succeed(portable_cpu_build, tmp_path):
    env = dict(portable_cpu_build)
    cache = Path(env["LUCIDOPS_CACHE_DIR"])
    if any(cache.iterdir()):  # the shared build exists already (tests run out of file order): start empty
        cache = tmp_path
        env["LUCIDOPS_CACHE_DIR"] = str(cache)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(LOAD_CPU)], env=dict(os.environ, **env),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "LOADED" in out
    # One cached build, reused by a third process without rebuilding.
    assert len(list(cache.glob("lucidops_cpu_*"))) == 1
    third = _run(LOAD_CPU, env)
    assert third.returncode == 0 and "building" not in third.stderr


def test_missing_compiler_is_a_clear_error(tmp_path):
    proc = _run(
        """
        from lucidops import _ext
        try:
            _ext.load("cpu")
        except _ext.ExtensionUnavailable as err:
            print("ERR", err)
        """,
        {"CXX": "/nonexistent/c++", "LUCIDOPS_CACHE_DIR": str(tmp_path)},
    )
    assert "ERR" in proc.stdout and "no C++ compiler found" in proc.stdout, proc.stdout + proc.stderr


def test_missing_compiler_in_automatic_mode_warns_once_and_runs_the_next_backend(tmp_path):
    """Not silently: the next backend can be tens of times slower (reference vs cpp)."""
    proc, warned = run_ops_collecting_warnings({"CXX": "/nonexistent/c++", "LUCIDOPS_CACHE_DIR": str(tmp_path)},
                                               timeout=600)
    assert "USED reference" in proc.stdout, proc.stdout + proc.stderr
    assert len(warned) == 1 and "no C++ compiler found" in warned[0] and "lucidops info" in warned[0], warned


def test_ninja_from_pip_is_found_without_an_activated_venv(tmp_path):
    """A venv's python run without activation (cron, an IDE, a Jupyter kernel) has the pip
    ninja package but not its bin folder on PATH: the build still finds it. PATH here is a
    copy (links) of the compiler's folder without any ninja."""
    pytest.importorskip("ninja")
    compiler_dir = Path(shutil.which("c++")).parent
    tools = tmp_path / "bin"
    tools.mkdir()
    for entry in compiler_dir.iterdir():
        if entry.name != "ninja":
            (tools / entry.name).symlink_to(entry)
    proc = _run(
        """
        import shutil, torch, lucidops
        print("ON PATH BEFORE", shutil.which("ninja"))
        lucidops.ops.sinc(torch.randn(4))
        print("USED", lucidops.backends.last_used("sinc"))
        """,
        {"PATH": str(tools)},
    )
    assert "ON PATH BEFORE None" in proc.stdout, proc.stdout + proc.stderr
    assert "USED cpp" in proc.stdout, proc.stdout + proc.stderr


def test_failed_build_names_its_log(tmp_path):
    proc = _run(
        """
        from lucidops import _ext
        try:
            _ext.load("cpu")
        except _ext.ExtensionUnavailable as err:
            print("ERR", err.reason)
            print("LOG", err.log_path)
        """,
        {"LUCIDOPS_CPU_ARCH_FLAGS": "-mno-such-flag-xyz", "LUCIDOPS_CACHE_DIR": str(tmp_path)},
    )
    assert "ERR build failed" in proc.stdout, proc.stdout + proc.stderr
    log = Path(proc.stdout.split("LOG ", 1)[1].strip())
    assert log.is_file() and "no-such-flag-xyz" in log.read_text()


def test_forced_cpp_backend_with_broken_build_raises_not_falls_back(tmp_path):
    proc = _run(
        """
        import torch, lucidops
        try:
            with lucidops.use_backend("cpp"):
                lucidops.ops.sinc(torch.randn(4))
        except lucidops.BackendUnavailable as err:
            print("RAISED", err)
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = lucidops.ops.sinc(torch.randn(4))   # automatic: warns once, uses reference
        print("AUTO", lucidops.backends.last_used("sinc"), len(caught))
        """,
        {"LUCIDOPS_CPU_ARCH_FLAGS": "-mno-such-flag-xyz", "LUCIDOPS_CACHE_DIR": str(tmp_path)},
    )
    assert "RAISED" in proc.stdout and "build log" in proc.stdout, proc.stdout + proc.stderr
    assert "AUTO reference" in proc.stdout


def test_cpu_build_without_avx512_runs_the_avx2_gaussian_forward(portable_cpu_build):
    """float32 gaussian_mixture runs forward_item_f32, whose register tile is 8 points x 32
    channels with AVX-512 and 6 x 16 without. A build for AVX2 only (-march=x86-64-v3) runs the
    second on any machine, so an AVX-512 CI machine checks it too: against the float64
    reference, dense and culled, both reductions, with a channel where every point ties."""
    proc = _run(
        """
        import torch, lucidops
        from lucidops.reference import gaussian_mixture as ref
        gen = torch.Generator().manual_seed(3)
        G, K = 24, 45
        means = torch.rand(G, 3, generator=gen) * 2 - 1
        prec = torch.tensor([12.0, 1.0, 0.5, 10.0, -1.0, 14.0]).expand(G, 6).contiguous()
        weight = torch.randn(K, G, generator=gen)
        bias = torch.randn(K, generator=gen)
        weight[3] = 0.0  # a constant channel: every point ties, point 0 wins
        points = torch.rand(3, 700, 3, generator=gen) * 2.4 - 1.2
        worst = 0.0
        for cull in (None, 0.1):
            for reduce_max in (True, False):
                with lucidops.use_backend("cpp"):
                    out, arg = torch.ops.lucidops.gaussian_mixture(points, means, prec, weight, bias, reduce_max, cull)
                assert lucidops.backends.last_used("gaussian_mixture") == "cpp"
                expected, _ = ref.forward(points.double(), means.double(), prec.double(), weight.double(),
                                          bias.double(), reduce_max, cull)
                worst = max(worst, ((out.double() - expected).norm() / expected.norm()).item())
                if reduce_max:
                    assert (arg[:, 3] == 0).all()
        print("WORST", worst)
        """,
        portable_cpu_build,  # usually built by test_two_processes_building_at_once_both_succeed
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert float(proc.stdout.split("WORST", 1)[1]) < 1e-5
