"""End-to-end demos behind ``lucidops demo <name>``.

Each demo is a module here with ``DESCRIPTION`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit status). They train small models on data generated here (nothing
is downloaded), print a table and write a PNG; their defaults finish in minutes on 2 CPU cores.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict

# demo name -> module under lucidops.demos
DEMOS = {"gpe": "gpe", "unlearn": "unlearn"}


def load(name: str) -> ModuleType:
    """The module of demo ``name`` (ValueError naming the known demos otherwise)."""
    if name not in DEMOS:
        raise ValueError(f"unknown demo {name!r}; choose one of: {', '.join(sorted(DEMOS))}")
    return importlib.import_module(f"{__name__}.{DEMOS[name]}")


def available() -> Dict[str, ModuleType]:
    """Every demo whose module imports here, by name."""
    found = {}
    for name in DEMOS:
        try:
            found[name] = load(name)
        except ImportError:
            continue
    return found
