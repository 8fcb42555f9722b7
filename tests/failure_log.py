"""Opt-in pytest hooks: every failure written to the file LUCIDOPS_FAILURE_LOG names as it happens.

bench/gpu_check.sh runs the GPU tests under a time limit, and a kill before pytest's summary left
no failure details at all (-q prints only F, --junitxml is written at the end). Appended and
flushed at once, each failure survives a kill. Under pytest-xdist the hooks run in the workers
and again in the controller: only the controller writes, so each failure is written once.
Without the variable nothing changes. conftest.py imports the hooks; ``-p failure_log`` also works.
"""

import os
import sys

MAX_LINES = 60
MAX_CHARS = 6000
HEADER = "##### FAILED"  # bench/gpu_check.sh counts the lines that start with it


def _trimmed(text: str) -> str:
    """The end of ``text`` (where the error is): its last MAX_LINES lines, MAX_CHARS characters."""
    kept = "\n".join(text.splitlines()[-MAX_LINES:])[-MAX_CHARS:]
    dropped = len(text.rstrip("\n")) - len(kept)
    return (f"[... {dropped} earlier characters left out]\n" if dropped > 0 else "") + kept


def _log(report, phase: str) -> None:
    path = os.environ.get("LUCIDOPS_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    entry = f"{HEADER} {report.nodeid} ({phase})\n{_trimmed(report.longreprtext)}\n\n"
    try:
        with open(path, "a") as log:  # closed, hence flushed, after every failure
            log.write(entry)
    except OSError as error:  # a bad path must not stop the test run
        print(f"failure_log: cannot write {path}: {error}", file=sys.stderr)


def pytest_runtest_logreport(report):
    _log(report, report.when)


def pytest_collectreport(report):
    _log(report, "collect")
