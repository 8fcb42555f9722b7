"""Where a demo's PNG goes: checked before minutes of training, written as PNG whatever its name.

A demo that finds out only when saving that its path is a folder, in a read-only place or
named ``.txt`` (matplotlib picks the format from the suffix) loses the run it just did.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional


def png_path_problem(path: str) -> Optional[str]:
    """Why no PNG can be written at ``path``, or None. Creates nothing: folders that do not
    exist yet are made when the PNG is saved (so a refused run leaves no empty folder)."""
    if os.path.isdir(path):
        return f"must be a file path, got the folder {path!r}"
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing!r} is not a folder"
    try:  # os.access says yes to root even on read-only mounts and /proc: try a real file
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        return f"cannot write in {existing!r} ({err.strerror})"
    return None


def save_png(fig: Any, path: str) -> str:
    """Save matplotlib figure ``fig`` at exactly ``path`` as PNG (making its folder), close it,
    and return ``path``. The format is given, so matplotlib neither appends ``.png`` to a name
    without a suffix nor fails on another suffix."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)
    return path
