"""Optional dependencies: say what to install before a long run needs one, not after it."""

from __future__ import annotations

import importlib.util
from typing import Optional

# The pip extra that installs each optional package (setup.py's extras_require).
EXTRA_OF = {"matplotlib": "plot", "peft": "peft", "h5py": "data"}


def missing(package: str, purpose: str) -> Optional[str]:
    """None when ``package`` can be imported, else a one-line message: what ``purpose`` needs
    and the pip command that installs it."""
    if importlib.util.find_spec(package) is not None:
        return None
    extra = EXTRA_OF.get(package)
    how = f"pip install 'lucidops[{extra}]'" if extra else f"pip install {package}"
    return f"{purpose} needs {package}: {how}"
