"""`lucidops bench` runs end to end and writes its JSON and Markdown results."""

import json
import os
import subprocess
import sys


def test_quick_bench_writes_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LUCIDOPS_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "lucidops.cli", "bench", "--quick", "--families", "activations",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (result,) = tmp_path.glob("*-quick.json")
    data = json.loads(result.read_text())
    assert data["machine"]["device"] in ("cpu", "cuda") and data["machine"]["torch"]
    impls = {(r["case"].split()[0], r["mode"], r["impl"]) for r in data["results"]}
    for kind in ("sinc", "gaussian"):
        for mode in ("forward", "forward+backward"):
            assert (kind, mode, "eager") in impls
            assert (kind, mode, "lucidops[reference]") in impls
    for row in data["results"]:
        assert row["ms"] > 0 and row["speedup_vs_eager"] > 0
    assert result.with_suffix(".md").read_text().count("| activations |") == len(data["results"])
