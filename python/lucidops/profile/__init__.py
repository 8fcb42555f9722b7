"""FLOP and memory profiling of models that use lucidops ops.

- :func:`count_flops`: torch's ``FlopCounterMode`` with lucidops' registered formulas.
- :func:`fvcore_flops`: fvcore's ``FlopCountAnalysis`` with lucidops' op handles.
- :func:`report`: params, FLOPs (both counters), memory, latency and a per-module
  breakdown of one model, as a :class:`ProfileReport`.
- :func:`compare`: two reports side by side with ratios (and a PNG bar chart).
- :func:`eager`: the eager original of a ``torch.compile``'d model, which the counters use;
  :func:`eager_calls`: the same for a module compiled in place (``module.compile()``).
"""

from .flops import count_flops, eager, eager_calls, fvcore_flops, fvcore_handles
from .report import ModuleStats, ProfileReport, report
from .compare import ProfileComparison, compare, png_path_problem

__all__ = ["count_flops", "eager", "eager_calls", "fvcore_flops", "fvcore_handles", "report", "compare",
           "ProfileReport", "ProfileComparison", "ModuleStats", "png_path_problem"]
