"""Run a snippet of Python in a fresh interpreter: for tests of import-time and process-wide state
(extension caches, environment variables, aborts) that one pytest process cannot reset."""

import os
import subprocess
import sys
import textwrap
from typing import List, Mapping, Optional, Tuple


def run_python(code: str, *, env: Optional[Mapping[str, str]] = None, cwd=None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` (dedented) with ``env`` added to this process's environment; text output."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, **(env or {})),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)


# Runs two ops in automatic mode and prints the backend sinc used and every warning raised.
_OPS_PROBE = """
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lucidops.ops.sinc(torch.randn(4))
    lucidops.ops.gaussian(torch.randn(4))
print("USED", lucidops.backends.last_used("sinc"))
for w in caught:
    print("WARNED", w.message)
"""


def run_ops_collecting_warnings(env: Mapping[str, str], setup: str = "",
                                timeout: float = 300) -> Tuple[subprocess.CompletedProcess, List[str]]:
    """Two ops in a fresh interpreter (after ``setup``, e.g. patching ``_ext``): the process
    (its stdout has ``USED <backend>``) and the ``WARNED <message>`` lines."""
    code = "import warnings, torch, lucidops\nfrom lucidops import _ext\n" + textwrap.dedent(setup) + _OPS_PROBE
    proc = run_python(code, env=env, timeout=timeout)
    return proc, [line for line in proc.stdout.splitlines() if line.startswith("WARNED")]
