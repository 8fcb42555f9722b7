"""Reversible monkeypatching of existing models (timm, peft, point encoders).

Heavy libraries (timm, peft, transformers) are imported inside the functions, never at
module level, so that ``import lucidops`` stays fast.
"""

from .peft_lora import DEFAULT_MLP_PATTERNS, PeftLoRAHandle, is_mlp_name, peft_lora
from .skipless import skipless, undo_skipless
from .spatial import freeze_spatial_mixing, spatial_mixers, unfreeze_spatial_mixing
from .timm_vit import LeanerReport, PatchHandle, leaner, timm_vit

__all__ = [
    "timm_vit", "leaner", "LeanerReport", "PatchHandle",
    "peft_lora", "PeftLoRAHandle", "is_mlp_name", "DEFAULT_MLP_PATTERNS",
    "skipless", "undo_skipless", "freeze_spatial_mixing", "unfreeze_spatial_mixing", "spatial_mixers",
]
