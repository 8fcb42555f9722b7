"""Where a PNG goes: checked before minutes of training or profiling, written as PNG whatever its name.

A command that finds out only when saving that its path is a folder, in a read-only place or
named ``.txt`` (matplotlib picks the format from the suffix) loses the run it just did. The
demos and ``lucidops profile`` / :func:`lucidops.profile.compare` share these two functions, so
they accept and refuse the same paths: a folder that does not exist yet is made when saving.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional, Union

PathLike = Union[str, os.PathLike]


def _names_a_folder(path: str) -> bool:
    """Whether ``path`` can only be a folder: one that exists, or a name ending in a separator,
    "." or ".." (``abspath`` strips those, so the parent check below would pass; savefig then
    fails with IsADirectoryError after the whole run)."""
    return os.path.isdir(path) or os.path.basename(path) in ("", ".", "..")


def png_path_error(path: PathLike) -> Optional[OSError]:
    """The error saving a PNG at ``path`` would meet, as an exception to raise or print, or None:
    IsADirectoryError (a folder, or a name ending in a separator), NotADirectoryError (a file
    where a folder must be), PermissionError (a folder nothing can be written in). Creates
    nothing: folders that do not exist yet are made when the PNG is saved (so a refused run
    leaves no empty folder)."""
    path = os.fspath(path)
    if _names_a_folder(path):
        return IsADirectoryError(f"must be a file path, got the folder {path!r}")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(existing):  # lexists: a dangling link stops here, it is no folder
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return NotADirectoryError(f"{existing!r} is not a folder")
    try:  # os.access says yes to root even on read-only mounts and /proc: try a real file
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return PermissionError(f"cannot write in {existing!r} ({err.strerror})")
    return None


def png_path_problem(path: PathLike) -> Optional[str]:
    """Why no PNG can be written at ``path`` (see :func:`png_path_error`), or None."""
    error = png_path_error(path)
    return None if error is None else str(error)


def make_folder(path: PathLike) -> None:
    """Make the folder the file ``path`` goes into, if it does not exist yet."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)


def save_png(fig: Any, path: str) -> str:
    """Save matplotlib figure ``fig`` at exactly ``path`` as PNG (making its folder), close it,
    and return ``path``. The format is given, so matplotlib neither appends ``.png`` to a name
    without a suffix nor fails on another suffix."""
    import matplotlib.pyplot as plt

    make_folder(path)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path
