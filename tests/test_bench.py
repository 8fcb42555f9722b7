"""`lucidops bench` runs end to end and writes its JSON, Markdown and PNG results."""

import json
import os
import subprocess
import sys

import pytest

from lucidops.bench import plots, runner


def test_short_bench_writes_results(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "LUCIDOPS_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "lucidops.cli", "bench", "--families", "activations", "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (result,) = tmp_path.glob("*-short.json")
    data = json.loads(result.read_text())
    assert data["machine"]["device"] == "cpu" and data["machine"]["torch"] and data["full"] is False
    impls = {(r["case"].split()[0], r["mode"], r["impl"]) for r in data["results"]}
    for kind in ("sinc", "gaussian"):
        for mode in ("forward", "forward+backward"):
            assert (kind, mode, "eager") in impls
            assert (kind, mode, "lucidops[reference]") in impls
    for row in data["results"]:
        assert row["ms"] > 0 and row["speedup_vs_eager"] > 0
    assert result.with_suffix(".md").read_text().count("| activations |") == len(data["results"])
    (png,) = tmp_path.glob("*-short-activations.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bench cpu" in proc.stderr  # the progress bar


def test_bench_refuses_a_gpu_it_does_not_have(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = runner.argparse.ArgumentParser()
    runner.add_arguments(args)
    assert runner.run(args.parse_args(["--device", "cuda", "--out", str(tmp_path)])) == 2
    assert "no GPU" in capsys.readouterr().err


def test_plot_has_one_panel_per_baseline(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(family="f", case="c", mode="forward", impl="eager", ms=2.0, speedup_vs_eager=1.0),
            dict(family="f", case="c", mode="forward", impl="lucidops[cpp]", ms=1.0, speedup_vs_eager=2.0,
                 speedup_vs_reference=4.0)]
    assert plots.speedup_keys(rows) == ["speedup_vs_eager", "speedup_vs_reference"]
    (path,) = plots.write_family_plots(rows, "test machine", tmp_path, "slug")
    assert path.name == "slug-f.png" and path.read_bytes()[:4] == b"\x89PNG"
    # A family without ratios gets no chart.
    assert plots.write_family_plots([dict(family="g", case="c", mode="m", impl="i", ms=1.0)], "m", tmp_path, "s") == []


def test_markdown_reports_memory_and_its_ratio():
    row = dict(family="f", case="c", mode="forward+backward", impl="lucidops[cpp]", ms=1.0, speedup_vs_eager=2.0,
               saved_bytes=3 * 2**20, saved_vs_eager=0.25, peak_MB_above_inputs=5.0, peak_vs_pointnet=0.5)
    line = runner.to_markdown({"name": "m"}, [row]).splitlines()[-1]
    assert "2.00x vs eager" in line
    assert "saved 3 MiB" in line and "0.25x eager's saved bytes" in line
    assert "peak +5 MiB" in line and "0.5x pointnet's peak" in line


def test_gaussian_bench_compares_whole_pointnet():
    from lucidops.bench import gaussian_mixture

    rows = [r for r in gaussian_mixture.run("cpu", quick=True) if r["mode"] == "forward"]
    impls = {r["impl"] for r in rows}
    assert gaussian_mixture.POINTNET in impls
    assert any(i.startswith("GaussianPointNet, whole model (lucidops[") for i in impls)
    first_case = rows[0]["case"]
    for row in rows:
        if row["case"] == first_case:  # the case with the baselines: every forward row has the ratio
            assert row["speedup_vs_pointnet"] > 0
            op_row = "whole model" not in row["impl"]
            assert ("rel_err_vs_fp64" in row) == op_row  # logits have no fp64 mixture to compare with
            if op_row and "cull" not in row["impl"]:
                assert row["rel_err_vs_fp64"] < 1e-4
    # Every culled row has its ratio to the same backend unculled (was cpp's only: a GPU run's
    # triton and cuda rows had none).
    for row in rows:
        if row["impl"].startswith("lucidops[") and " cull t=" in row["impl"]:
            assert row["speedup_vs_unculled"] > 0, row["impl"]


def test_attention_bench_stops_at_its_time_budget(monkeypatch, capsys):
    """A short GPU session sets LUCIDOPS_BENCH_BUDGET_S: no case starts after it (the first
    always runs), the skipped ones are counted, and a bad value is refused by name."""
    from lucidops.bench import attention

    monkeypatch.setenv("LUCIDOPS_BENCH_BUDGET_S", "1e-9")
    rows = attention.run("cpu", quick=True)
    assert len({r["case"] for r in rows}) == 1
    assert "1 of 2 cases not measured" in capsys.readouterr().out
    order = [case[2:4] for case in attention._cases("cuda", quick=False)]
    # A cut-short CUDA run has the targets' cases first: d = 16 and 64 at N = 1024 and 4096
    # (N = 4096 came after every N = 1024 case before).
    assert list(dict.fromkeys(order))[:4] == [(1024, 16), (4096, 16), (1024, 64), (4096, 64)]
    monkeypatch.setenv("LUCIDOPS_BENCH_BUDGET_S", "0")
    with pytest.raises(ValueError, match="LUCIDOPS_BENCH_BUDGET_S"):
        attention.run("cpu", quick=True)


def test_lora_bench_can_force_the_tile_fused_kernels(monkeypatch):
    # bench/lora.py's "lucidops[triton, fused tiles]" runs forward and backward inside
    # _setting(FUSED_TILES): no chunk of Weff or G may be formed there, and the limit comes back.
    import lucidops
    import torch
    from lucidops.bench import lora as bench_lora
    from lucidops.triton_kernels import lora as tk

    if not lucidops.backends.triton_interpreting() and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    built = []
    plan = tk.materialize_chunk_columns
    monkeypatch.setattr(tk, "materialize_chunk_columns", lambda *args, **kw: built.append(args) or plan(*args, **kw))
    x = torch.randn(200, 24, device=device, requires_grad=True)
    w = torch.randn(20, 24, device=device)
    a = torch.randn(4, 24, device=device, requires_grad=True)
    b = torch.randn(20, 4, device=device, requires_grad=True)

    def step():
        with lucidops.use_backend("triton"):
            lucidops.ops.sine_lora_linear(x, w, a, b, omega=2.0, scale=0.5).sum().backward()

    limit = tk.FUSED_MAX_ROWS
    with bench_lora._setting(bench_lora.FUSED_TILES):
        step()
    assert built == [] and tk.FUSED_MAX_ROWS == limit
    with bench_lora._setting("lucidops[triton]"):
        step()
    assert len(built) == 3  # forward, dx and G, 200 rows > FUSED_MAX_ROWS


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # SDPA's CPU kernel has no vmap rule
def test_per_sample_bench_times_the_same_gradients():
    """bench/per_sample.py: each case times the four implementations, and lucidops' per-sample
    gradients (vmap and loop) equal the plain-PyTorch module's in float64."""
    from lucidops.bench import per_sample

    rows = per_sample.run("cpu", quick=True)
    cases = {r["case"] for r in rows}
    assert len(cases) == 3 and len(rows) == 12
    for row in rows:
        assert row["ms"] > 0 and row["speedup_vs_pytorch_loop"] > 0
        if row["impl"].startswith("lucidops"):
            assert row["rel_err_vs_fp64"] < 1e-5, row


def test_per_sample_bench_runs_without_timm(monkeypatch, capsys):
    """timm is not a lucidops dependency: without it `lucidops bench` still runs, minus the
    attention case, and says so."""
    import sys

    from lucidops.bench import per_sample

    for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    rows = per_sample.run("cpu", quick=True)
    assert len({r["case"] for r in rows}) == 2 and not any(r["case"].startswith("attention") for r in rows)
    assert "needs timm" in capsys.readouterr().out


def test_attention_bench_dropout_rows(monkeypatch):
    """A dropout case times lucidops' fused dropout against SDPA's dropout_p and against the
    same kernel without dropout (its cost), and leaves out aten, which cannot run it."""
    import torch

    from lucidops.bench import attention

    monkeypatch.setattr(attention, "_cases", lambda device, quick: iter([(1, 2, 16, 8, False, torch.float32, 0.1)]))
    monkeypatch.setattr(attention, "measure_interleaved_ms", lambda steps, device: {name: 1.0 for name in steps})
    rows = attention.run("cpu", quick=True)
    impls = {r["impl"] for r in rows}
    assert {"lucidops[cpp]", "lucidops[cpp], no dropout", "sdpa"} <= impls and "lucidops[aten]" not in impls
    assert all(r["case"].endswith("dropout 0.1") for r in rows)
