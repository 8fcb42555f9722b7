"""Reversible monkeypatching of existing models (timm, peft, point encoders).

``apply(model, ...)`` is the one entry point; the family functions below are what it
calls. Every patch function returns a :class:`PatchHandle` (``revert()``, context manager,
``str(handle)`` table of what was replaced).

Heavy libraries (timm, peft, transformers) are imported inside the functions, never at
module level, so that ``import lucidops`` stays fast.
"""

from .handle import PatchHandle, Replacement
from .peft_lora import DEFAULT_MLP_PATTERNS, PeftLoRAHandle, is_mlp_name, peft_lora, undo_peft_lora
from .skipless import skipless, undo_skipless
from .spatial import freeze_spatial_mixing, spatial_mixers, unfreeze_spatial_mixing
from .timm_vit import LeanerReport, leaner, timm_vit
from .point_encoders import point_encoders
from .sdpa_calls import SDPACallsHandle, sdpa_calls, sdpa_modules
from .apply import apply  # the function shadows the submodule name, as for timm_vit and peft_lora

__all__ = [
    "apply", "PatchHandle", "Replacement", "point_encoders", "sdpa_calls", "sdpa_modules", "SDPACallsHandle",
    "timm_vit", "leaner", "LeanerReport",
    "peft_lora", "undo_peft_lora", "PeftLoRAHandle", "is_mlp_name", "DEFAULT_MLP_PATTERNS",
    "skipless", "undo_skipless", "freeze_spatial_mixing", "unfreeze_spatial_mixing", "spatial_mixers",
]
