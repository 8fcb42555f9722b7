"""The package type-checks clean under mypy (it ships py.typed, so users' checkers read our
annotations): any new error, or a `# type: ignore` that no longer ignores anything, fails."""

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is in the [dev] extra")

REPO = Path(__file__).resolve().parents[1]


def test_package_type_checks_clean(tmp_path):
    stdout, stderr, status = mypy_api.run([
        "--config-file", str(REPO / "tests" / "mypy.ini"),
        "--cache-dir", str(tmp_path / "mypy-cache"),  # cold: a stale shared cache cannot hide errors
        "--no-error-summary",
        str(REPO / "python" / "lucidops"),
    ])
    assert status == 0, f"mypy exited {status}:\n{stdout}{stderr}"
