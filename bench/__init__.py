"""Benchmarks, installed as ``lucidops.bench``: one module per op family and a runner.

    lucidops bench                      # every family, short sizes, every device here
    lucidops bench --full               # the sizes the README reports
    python -m lucidops.bench.runner --families activations --device cpu

Each family module's ``run(device, quick)`` gets ``quick=True`` in the default short run
(the small sizes its docstring names) and ``quick=False`` with ``--full``.
"""
