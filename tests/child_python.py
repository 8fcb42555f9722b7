"""Run a snippet of Python in a fresh interpreter: for tests of import-time and process-wide state
(extension caches, environment variables, aborts) that one pytest process cannot reset."""

import os
import subprocess
import sys
import textwrap
from typing import Mapping, Optional


def run_python(code: str, *, env: Optional[Mapping[str, str]] = None, cwd=None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` (dedented) with ``env`` added to this process's environment; text output."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=dict(os.environ, **(env or {})),
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
