"""The package type-checks clean under mypy (it ships py.typed, so users' checkers read our
annotations): any new error, or a `# type: ignore` that no longer ignores anything, fails."""

from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy is in the [dev] extra")

REPO = Path(__file__).resolve().parents[1]


def installed_layout(root: Path) -> None:
    """``root/lucidops`` as setup.py installs it: python/lucidops with the top-level
    triton_kernels/ and bench/ inside (linked, not copied, so that errors name real lines)."""
    package = root / "lucidops"
    package.mkdir(parents=True)
    for entry in (REPO / "python" / "lucidops").iterdir():
        if not entry.name.startswith("."):
            (package / entry.name).symlink_to(entry)
    for name in ("triton_kernels", "bench"):
        (package / name).symlink_to(REPO / name)


def test_package_type_checks_clean(tmp_path, monkeypatch):
    installed_layout(tmp_path / "tree")
    monkeypatch.chdir(tmp_path / "tree")  # where `-p lucidops` finds the laid-out package
    stdout, stderr, status = mypy_api.run([
        "--config-file", str(REPO / "tests" / "mypy.ini"),
        "--cache-dir", str(tmp_path / "mypy-cache"),  # cold: a stale shared cache cannot hide errors
        "--no-error-summary",
        "-p", "lucidops",
    ])
    assert status == 0, f"mypy exited {status}:\n{stdout}{stderr}"
    assert "error" not in stdout
