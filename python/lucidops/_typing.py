"""Type aliases shared by lucidops' public signatures."""

from __future__ import annotations

from typing import Union

import torch

#: What a ``device`` argument accepts: a ``torch.device`` or its name ("cpu", "cuda:1").
DeviceLike = Union[str, torch.device]
