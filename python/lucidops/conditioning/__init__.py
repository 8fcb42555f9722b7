"""Conditioning of token matrices and attention blocks, and diagnostics."""

from .attention import LayerConditioning, attention_condition_numbers
from .graying import dct_basis, token_gray
from .spectral import gd_shrinkage_mask
from .tokens import condition_number, condition_tokens

__all__ = [
    "condition_number", "condition_tokens", "token_gray", "dct_basis", "gd_shrinkage_mask",
    "attention_condition_numbers", "LayerConditioning",
]
