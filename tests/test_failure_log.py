"""LUCIDOPS_FAILURE_LOG (tests/failure_log.py): each failure is appended to the file as it happens,
so a run that bench/gpu_check.sh's time limit kills before pytest's summary keeps the details."""

import os
import subprocess
import sys
from pathlib import Path

import failure_log

CHILD_TESTS = '''
import pytest

def test_passes():
    pass

def test_fails():
    assert 1 == 2, "the failing test's own message"

@pytest.fixture
def broken():
    raise RuntimeError("the fixture broke")

def test_setup_errors(broken):
    pass

def test_fails_at_length():
    assert False, "\\n".join(f"line {i}" for i in range(1000))
'''


def _run_child(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """pytest in a fresh process on CHILD_TESTS with the hooks loaded by ``-p failure_log``."""
    (tmp_path / "test_child.py").write_text(CHILD_TESTS)
    child_env = {k: v for k, v in os.environ.items()
                 if k not in ("LUCIDOPS_FAILURE_LOG", "PYTEST_XDIST_WORKER", "PYTEST_ADDOPTS")}
    child_env.update(env, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
                     PYTHONPATH=os.pathsep.join([str(Path(failure_log.__file__).parent)]
                                                + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "failure_log", "-p", "no:cacheprovider",
                           "test_child.py"], cwd=tmp_path, env=child_env, capture_output=True, text=True,
                          timeout=120)


def test_failures_are_logged_as_they_happen(tmp_path):
    log = tmp_path / "failures.txt"
    proc = _run_child(tmp_path, LUCIDOPS_FAILURE_LOG=str(log))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    text = log.read_text()
    headers = [line for line in text.splitlines() if line.startswith(failure_log.HEADER)]
    assert headers == [f"{failure_log.HEADER} test_child.py::test_fails (call)",
                       f"{failure_log.HEADER} test_child.py::test_setup_errors (setup)",
                       f"{failure_log.HEADER} test_child.py::test_fails_at_length (call)"]
    assert "the failing test's own message" in text and "RuntimeError: the fixture broke" in text
    assert "test_passes" not in text
    # A long failure keeps its end, trimmed.
    long_entry = text.split(headers[-1])[1]
    assert "line 999" in long_entry and "line 0" not in long_entry and "earlier characters left out" in long_entry
    assert len(long_entry.splitlines()) <= failure_log.MAX_LINES + 3


def test_no_log_without_the_variable_nor_from_an_xdist_worker(tmp_path):
    assert _run_child(tmp_path).returncode == 1
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("test_child.py", "__pycache__")] == []
    # In an xdist worker (the controller writes each failure once).
    log = tmp_path / "failures.txt"
    assert _run_child(tmp_path, LUCIDOPS_FAILURE_LOG=str(log), PYTEST_XDIST_WORKER="gw0").returncode == 1
    assert not log.exists()


def test_conftest_loads_the_hooks(request):
    hooks = request.config.pluginmanager.hook
    assert failure_log.pytest_runtest_logreport in [h.function for h in hooks.pytest_runtest_logreport.get_hookimpls()]
    assert failure_log.pytest_collectreport in [h.function for h in hooks.pytest_collectreport.get_hookimpls()]
