"""A plain (non-editable) install ships the Triton kernels, the benchmarks and the C++/CUDA
sources, and finds those sources from where it is installed."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_plain_install_ships_everything(tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--target", str(target), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    pkg = target / "lucidops"
    for rel in ("py.typed", "triton_kernels/activations.py", "bench/runner.py", "bench/gpu_check.sh",
                "bench/gaussian_trained.pt", "bench/gaussian_trained_compact.pt", "csrc/bindings.cpp",
                "csrc/cpu/activations.cpp", "csrc/cuda/activations.cu", "csrc/cuda/launch.h"):
        assert (pkg / rel).is_file(), rel
    env = dict(os.environ, PYTHONPATH=str(target))
    check = subprocess.run(
        [sys.executable, "-c",
         "import lucidops, lucidops.triton_kernels; from lucidops import _ext_sources as s; "
         "print(lucidops.__file__); print(s.csrc_root()); print(s.spec('cpu').source_hash)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stderr
    file_line, root_line, digest = check.stdout.split()[-3:]
    assert file_line.startswith(str(target)) and root_line == str(pkg / "csrc")
    from lucidops import _ext_sources

    assert digest == _ext_sources.spec("cpu").source_hash  # same sources, same cached build


def test_sdist_carries_the_test_helpers(tmp_path):
    """The sdist shipped tests/test_*.py without what they import (conftest.py, comparisons.py,
    the CUDA emulation), so its tests could not run."""
    import tarfile

    # A fresh egg-info folder: sdist also adds whatever an existing SOURCES.txt lists.
    egg_base = tmp_path / "egg"
    egg_base.mkdir()
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(egg_base), "sdist", "-d",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (archive,) = tmp_path.glob("lucidops-*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for helper in ("tests/conftest.py", "tests/comparisons.py", "tests/small_modules.py", "tests/cuda_emulator.py",
                   "tests/pytest.ini", "tests/cuda_emulation/runtime.cpp", "tests/test_packaging.py"):
        assert helper in names, helper
    assert not any("__pycache__" in name or name.endswith(".so") for name in names)
