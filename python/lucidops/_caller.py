"""Which frame a lucidops warning names: the first one outside lucidops and torch.

A fixed ``stacklevel`` counts frames, and the depth between a user's call and the code that
warns differs by path: through ``torch.library``'s custom-op and autograd machinery, or
through ``lucidops.patch.apply`` calling a patch function. (Python 3.12's
``warnings.warn(skip_file_prefixes=...)`` does this; 3.9 to 3.11 lack it.)
"""

from __future__ import annotations

import os
import sys

import torch

_INTERNAL_FOLDERS = tuple(os.path.dirname(os.path.abspath(str(path))) + os.sep
                          for path in (torch.__file__, __file__))


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warning raised by the function that calls this,
    of the first frame outside lucidops and torch: the user's line."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL_FOLDERS):
        frame = frame.f_back
        level += 1
    return level
