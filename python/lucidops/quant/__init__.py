"""Quantized adapters."""

from .adapters import QuantizedAdapter, QuantizedTensor, quantize_adapter

__all__ = ["QuantizedAdapter", "QuantizedTensor", "quantize_adapter"]
