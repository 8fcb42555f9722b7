"""FLOP and memory profiling of models that use lucidops ops.

- :func:`count_flops`: torch's ``FlopCounterMode`` with lucidops' registered formulas.
- :func:`fvcore_flops`: fvcore's ``FlopCountAnalysis`` with lucidops' op handles.
"""

from .flops import count_flops, fvcore_flops, fvcore_handles

__all__ = ["count_flops", "fvcore_flops", "fvcore_handles"]
