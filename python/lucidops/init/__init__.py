"""Initialisations from the same research line (skipless, impulse)."""

from .impulse import impulse_, kernel_offsets
from .skipless import skipless_

__all__ = ["skipless_", "impulse_", "kernel_offsets"]
