"""Benchmarks, installed as ``lucidops.bench``: one module per op family and a runner.

    lucidops bench                      # every family, short sizes, every device here
    lucidops bench --full               # the sizes the README reports
    python -m lucidops.bench.runner --families activations --device cpu

Each family module's ``run(device, quick)`` gets ``quick=True`` in the default short run
(the small sizes its docstring names) and ``quick=False`` with ``--full``. A family whose
``run`` also takes ``on_rows`` calls it with its rows so far after each case, and the runner
writes them at once, so that a time limit stopping a long family loses one case, not all.
"""
