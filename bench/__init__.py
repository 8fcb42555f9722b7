"""Benchmarks, installed as ``lucidops.bench``: one module per op family and a runner.

    lucidops bench                      # every family, this machine's defaults
    python -m lucidops.bench.runner --families activations --quick
"""
