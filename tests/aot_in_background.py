"""The ahead-of-time compile of every Triton configuration, started as soon as pytest has
collected the test that checks it (test_triton_aot.py).

That compile is 1402 Triton compilations, 564 s of both cores on a 2-core machine
(bench/results/triton-aot-resources.log). So conftest starts it at the lowest CPU priority
right after collection: it runs on the cycles the other tests leave idle, and the test,
reached near the end, waits for the rest (10.6 minutes on the AVX2 EPYC of 2026-12-07, whose
other tests kept both cores busy). It is the same command on the same
sources, compiled from an empty Triton cache; the test asserts on its output and report.
When conftest started none (pytest without this conftest), the test starts it itself.

The compile runs in a process group of its own, so that stopping it stops its worker
processes too; it also dies with the process that started it (a SIGTERM or SIGKILL to pytest,
which skips pytest's own clean-up), and its folder lies in pytest's temporary folders, which
pytest prunes.
"""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from lucidops.triton_kernels.aot import exit_with_parent

# The test that waits for the compile, as its node id ends.
COMPILE_TEST = "test_triton_aot.py::test_all_kernel_configurations_compile_for_sm80_and_sm90"


def compile_env(folder: Path) -> dict:
    """The environment of a real compile: no interpreter (the test session interprets), and an
    empty Triton cache of its own, so that each configuration is really compiled. No line
    tables: they change no instruction, register or byte of shared memory, and leaving them out
    took 6%-10% off the compile time (16 configurations, twice each, same resources)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(folder / "triton-cache")
    env["TRITON_DISABLE_LINE_INFO"] = "1"
    return env


class AotRun:
    """`python -m lucidops.triton_kernels.aot --arch 80 90 --json <report>` running in
    ``folder``; its stdout and stderr go to a log file there (a pipe nobody reads would fill)."""

    def __init__(self, folder: Path, *, background: bool):
        self.folder = folder
        self.report = folder / "aot.json"
        self.log = folder / "aot.log"
        command = [sys.executable, "-m", "lucidops.triton_kernels.aot", "--arch", "80", "90",
                   "--json", str(self.report)]
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                command, env=compile_env(folder), stdout=log, stderr=subprocess.STDOUT, text=True,
                preexec_fn=_in_background if background else _own_process_group)

    def wait(self, timeout: float) -> Tuple[int, str]:
        """(exit status, everything it printed); stops it and raises TimeoutError past ``timeout``."""
        try:
            returncode = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"the ahead-of-time compile ran past {timeout:.0f}s:\n{self.output()[-3000:]}")
        return returncode, self.output()

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait()


def _own_process_group() -> None:
    # So that stop() ends the workers too. Not a session of its own (start_new_session): with
    # the kernel's autogroups a new session is scheduled as a peer of the tests' whatever its
    # nice value, and took half the CPU from them.
    os.setpgid(0, 0)
    # Out of the terminal's and `timeout`'s process group, it would outlive a pytest killed by
    # a signal: it dies with its parent, as its workers die with it.
    exit_with_parent()


def _in_background() -> None:
    _own_process_group()
    os.nice(19)


_early: Optional[AotRun] = None  # started by conftest, not yet taken by the test
_started_early: List[AotRun] = []  # every run conftest started, for stop_all


def start_early(item_ids, collect_only: bool, folder_factory) -> None:
    """conftest, after collection: start the compile in the background when its test will run.
    ``folder_factory(name)`` makes a fresh folder (pytest's tmp_path_factory.mktemp)."""
    global _early
    if collect_only or _early is not None or not any(i.endswith(COMPILE_TEST) for i in item_ids):
        return
    _early = AotRun(Path(folder_factory("aot-in-background")), background=True)
    _started_early.append(_early)


def take() -> Optional[AotRun]:
    """The compile conftest started, once (None when it started none)."""
    global _early
    run, _early = _early, None
    return run


def stop_all() -> None:
    """conftest, at the end of the session: stop a compile still running (the session was
    stopped early, -x) and remove the folders of those conftest started (a second session in
    the same process, pytest.main twice, starts afresh)."""
    global _early
    for run in _started_early:
        run.stop()
        shutil.rmtree(run.folder, ignore_errors=True)
    _started_early.clear()
    _early = None
