"""Triton kernels of lucidops, installed as ``lucidops.triton_kernels``.

Each module holds one op family's kernels, their launchers and ``aot_specs()``: every
(kernel, signature, constexprs, options) combination its launchers can pick, which
tests/test_triton_aot.py compiles for sm_80 and sm_90 without a GPU.

``INTERPRETED`` records whether the kernels were defined under TRITON_INTERPRET=1
(Triton decides that when a kernel is decorated, i.e. at import). Interpreted, the IEEE
float dots are made to sum in k order as on a GPU (interpreter_dot.py).
"""

try:
    from triton import knobs as _knobs

    INTERPRETED: bool = bool(_knobs.runtime.interpret)
except (ImportError, AttributeError):  # older triton: the env var is the switch
    import os as _os

    INTERPRETED = _os.environ.get("TRITON_INTERPRET", "0") == "1"

if INTERPRETED:
    from .interpreter_dot import patch_interpreter_ieee_dot

    patch_interpreter_ieee_dot()
