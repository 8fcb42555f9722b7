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


@pytest.mark.parametrize("budget", ["abc", "0", "-5", "inf", "nan"])
def test_bench_refuses_a_bad_time_budget_before_any_benchmark(tmp_path, capsys, monkeypatch, budget):
    """A bad LUCIDOPS_BENCH_BUDGET_S was found by the attention family, after the families
    before it had run (minutes with --full), and "abc" was a traceback that did not name it."""
    monkeypatch.setenv("LUCIDOPS_BENCH_BUDGET_S", budget)
    monkeypatch.setattr(runner, "bench_device", lambda *args, **kwargs: pytest.fail("a benchmark ran"))
    args = runner.argparse.ArgumentParser()
    runner.add_arguments(args)
    assert runner.run(args.parse_args(["--device", "cpu", "--families", "activations", "attention",
                                       "--out", str(tmp_path / "out")])) == 2
    assert capsys.readouterr().err.startswith("error: LUCIDOPS_BENCH_BUDGET_S must be a positive number")
    assert not (tmp_path / "out").exists()


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
    # A cut-short CUDA run has measured both targets, d = 16 and 64, at N = 1024 and 4096 in its
    # first eight cases (causal and not): the first GPU run's budget ended before any d = 64.
    assert order[:8] == [(1024, 16)] * 2 + [(1024, 64)] * 2 + [(4096, 16)] * 2 + [(4096, 64)] * 2
    assert len(order) == len(set(attention._cases("cuda", quick=False)))  # no case twice
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
    g_groups = []
    chunk_kernel = tk.lora_wgrad_chunk_kernel

    class RecordedLaunches:
        def __getitem__(self, grid):
            g_groups.append(grid)
            return chunk_kernel[grid]

    monkeypatch.setattr(tk, "lora_wgrad_chunk_kernel", RecordedLaunches())
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
    assert built == [] and g_groups == [] and tk.FUSED_MAX_ROWS == limit
    with bench_lora._setting("lucidops[triton]"):
        step()
    # forward and dx build Weff's chunks, the backward G's rows (one group): 200 rows > FUSED_MAX_ROWS
    assert len(built) == 2 and len(g_groups) == 1


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


def test_per_sample_bench_reports_a_failing_implementation_and_keeps_the_others(monkeypatch, capsys):
    # its first call (the error check) had no try, and the speed-ups read the baselines' times
    # unconditionally: one failure, or a failing baseline, aborted the whole family
    from lucidops.bench import per_sample

    def failing(*args, **kwargs):
        def impl():
            raise RuntimeError("CUDA error: out of memory")
        return impl

    vmapped = per_sample._vmapped
    calls = iter(range(100))
    monkeypatch.setattr(per_sample, "_vmapped", lambda module, inputs: (
        failing() if next(calls) % 2 else vmapped(module, inputs)))  # every case's pytorch vmap(grad) fails
    rows = per_sample.run("cpu", quick=True)
    assert len({r["case"] for r in rows}) == 3 and len(rows) == 9
    assert not any(r["impl"] == "pytorch vmap(grad)" or "speedup_vs_pytorch_vmap" in r for r in rows)
    assert all(r["speedup_vs_pytorch_loop"] > 0 for r in rows)
    assert "pytorch vmap(grad): failed (RuntimeError: CUDA error: out of memory)" in capsys.readouterr().out


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



def _failing(*args, **kwargs):
    raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")


def _broken_backward(fn):
    """``fn``, except that it raises when its input needs a gradient (a backend without a backward)."""
    def call(x, *args):
        if x.requires_grad:
            raise RuntimeError("no backward (simulated)")
        return fn(x, *args)
    return call


def test_a_failing_implementation_is_reported_and_the_others_still_run(monkeypatch, capsys):
    """A candidate raising in its first call (or in a lazy torch.compile there), or only in
    training (in saved_bytes), is reported and left out; before, it aborted the whole family
    and nothing of it was written."""
    from lucidops.bench import activations, gaussian_mixture

    candidates = gaussian_mixture._candidates
    monkeypatch.setattr(gaussian_mixture, "_candidates", lambda device, with_baselines: {
        **candidates(device, with_baselines), "lucidops[cuda]": _failing,
        "broken backward": _broken_backward(gaussian_mixture._eager_dense)})
    monkeypatch.setattr(gaussian_mixture, "_trained_params", lambda K, device: [])
    monkeypatch.setattr(activations, "_candidates", lambda kind, device: {
        "eager": activations.EAGER[kind], "lucidops[cuda]": _failing,
        "broken backward": _broken_backward(activations.EAGER[kind])})
    for family, baseline in ((gaussian_mixture, "eager dense"), (activations, "eager")):
        rows = family.run("cpu", quick=True)
        measured = {(r["impl"], r["mode"]) for r in rows}
        assert {(baseline, "forward"), (baseline, "forward+backward"), ("broken backward", "forward")} <= measured
        assert not any(impl == "lucidops[cuda]" or (impl, mode) == ("broken backward", "forward+backward")
                       for impl, mode in measured), family.__name__
    out = capsys.readouterr().out
    assert "forward lucidops[cuda]: failed (RuntimeError: CUDA error" in out
    assert "forward+backward broken backward: failed (RuntimeError: no backward" in out


def test_activations_gaussian_and_conditioning_time_their_implementations_interleaved(monkeypatch):
    """Every implementation of a case and mode is timed in one measure_interleaved_ms call, so
    a slow spell of a busy host falls on all of them alike (they were timed one after another),
    and the rows keep their format."""
    import torch

    from lucidops.bench import activations, conditioning, gaussian_mixture

    calls = []

    def interleaved(steps, device, **kwargs):
        calls.append(list(steps))
        return {name: float(i + 1) for i, name in enumerate(steps)}

    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)  # the compile is not what is tested
    monkeypatch.setattr(gaussian_mixture, "_trained_params", lambda K, device: [])
    common = {"family", "case", "mode", "impl", "ms", "rel_err_vs_fp64"}
    for family, n_calls, speedup in ((activations, 8, "speedup_vs_eager"), (conditioning, 1, "speedup_vs_svd"),
                                     (gaussian_mixture, 4, "speedup_vs_eager")):
        monkeypatch.setattr(family, "measure_interleaved_ms", interleaved)
        calls.clear()
        rows = family.run("cpu", quick=True)
        assert len(calls) == n_calls and all(len(names) >= 2 for names in calls), family.__name__
        assert len(rows) == sum(len(names) for names in calls)
        for row in rows:
            if family is not gaussian_mixture:
                assert set(row) == common | {speedup}, row
            if row["case"] == rows[0]["case"]:  # the Gaussian case with the baselines
                assert row[speedup] > 0, row


@pytest.mark.parametrize("family", ["attention", "gaussian_mixture", "lora"])
def test_rows_are_on_disk_before_a_long_family_ends(family, tmp_path, monkeypatch):
    """The families gpu_check.sh runs under a time limit hand the runner their rows after every
    case, and it writes them at once: a run stopped in the middle of a family (here at its second
    timing) keeps the cases it measured. Before, rows were written only when a family returned."""
    import importlib

    module = importlib.import_module(f"lucidops.bench.{family}")
    calls = []

    def interleaved(steps, device, **kwargs):
        calls.append(list(steps))
        if len(calls) == 2:
            raise KeyboardInterrupt  # stands in for the time limit's SIGTERM
        return {name: 1.0 for name in steps}

    monkeypatch.setattr(module, "measure_interleaved_ms", interleaved)
    if family == "gaussian_mixture":
        monkeypatch.setattr(module, "_trained_params", lambda K, device: [])
    with pytest.raises(KeyboardInterrupt):
        runner.bench_device("cpu", [family], full=False, out=tmp_path, plots=False)
    (result,) = tmp_path.glob("*-short.json")
    rows = json.loads(result.read_text())["results"]
    assert rows and {r["family"] for r in rows} == {family}
    assert {r["impl"] for r in rows} == set(calls[0])
    assert result.with_suffix(".md").read_text().count(f"| {family} |") == len(rows)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _fake_family(monkeypatch, name, ms):
    """A family module ``lucidops.bench.<name>`` whose run returns one row timed ``ms``."""
    import types

    module = types.ModuleType(f"lucidops.bench.{name}")
    module.run = lambda device, quick: [dict(family=name, case="c", mode="forward", impl="lucidops[cpp]", ms=ms,
                                             speedup_vs_eager=2.0)]
    monkeypatch.setitem(sys.modules, module.__name__, module)


def test_a_run_of_some_families_keeps_the_others_rows(tmp_path, monkeypatch):
    """`lucidops bench --families X` replaces X's rows in the results file of the same machine
    and size and keeps the other families' (it overwrote the file with X's rows alone), and
    removes X's chart, which no longer matches its rows."""
    _fake_family(monkeypatch, "fake_a", 1.0)
    _fake_family(monkeypatch, "fake_b", 2.0)
    runner.bench_device("cpu", ["fake_a", "fake_b"], full=False, out=tmp_path, plots=False)
    (result,) = tmp_path.glob("*-short.json")
    slug = result.stem
    for family in ("fake_a", "fake_b"):
        (tmp_path / f"{slug}-{family}.png").write_bytes(b"stale")
    _fake_family(monkeypatch, "fake_b", 3.0)
    runner.bench_device("cpu", ["fake_b"], full=False, out=tmp_path, plots=False)
    data = json.loads(result.read_text())
    assert [(r["family"], r["ms"]) for r in data["results"]] == [("fake_a", 1.0), ("fake_b", 3.0)]
    assert set(data["measured"]) == {"fake_a", "fake_b"}
    assert result.with_suffix(".md").read_text().count("| fake_") == 2
    assert (tmp_path / f"{slug}-fake_a.png").exists() and not (tmp_path / f"{slug}-fake_b.png").exists()
    # Another machine's rows under the same name are not mixed in.
    data["machine"]["name"] = "another CPU"
    result.write_text(json.dumps(data))
    runner.bench_device("cpu", ["fake_b"], full=False, out=tmp_path, plots=False)
    assert [r["family"] for r in json.loads(result.read_text())["results"]] == ["fake_b"]
    # ... nor rows measured under another torch, relabelled with this one's version.
    runner.bench_device("cpu", ["fake_a"], full=False, out=tmp_path, plots=False)
    data = json.loads(result.read_text())
    data["machine"]["torch"] = "2.0.0"
    result.write_text(json.dumps(data))
    runner.bench_device("cpu", ["fake_a"], full=False, out=tmp_path, plots=False)
    assert [r["family"] for r in json.loads(result.read_text())["results"]] == ["fake_a"]


def test_a_stopped_run_keeps_the_earlier_rows_of_the_families_it_never_reached(tmp_path, monkeypatch):
    """`--families a b` stopped inside a: b never ran, so its earlier rows stay (they were
    dropped up front, before a had measured anything)."""
    _fake_family(monkeypatch, "fake_a", 1.0)
    _fake_family(monkeypatch, "fake_b", 2.0)
    runner.bench_device("cpu", ["fake_a", "fake_b"], full=False, out=tmp_path, plots=False)
    import types

    stopping = types.ModuleType("lucidops.bench.fake_a")

    def run(device, quick, on_rows):
        on_rows([dict(family="fake_a", case="c", mode="forward", impl="lucidops[cpp]", ms=10.0)])
        raise KeyboardInterrupt  # the time limit, inside the first family

    stopping.run = run
    monkeypatch.setitem(sys.modules, stopping.__name__, stopping)
    with pytest.raises(KeyboardInterrupt):
        runner.bench_device("cpu", ["fake_a", "fake_b"], full=False, out=tmp_path, plots=False)
    (result,) = tmp_path.glob("*-short.json")
    assert sorted((r["family"], r["ms"]) for r in json.loads(result.read_text())["results"]) == [("fake_a", 10.0),
                                                                                                 ("fake_b", 2.0)]


def test_plots_from_a_results_file(tmp_path):
    """`python -m lucidops.bench.plots <json>` makes the charts of a run made with --no-plots
    (gpu_check.sh's), beside the JSON or in --out."""
    pytest.importorskip("matplotlib")
    results = tmp_path / "gpu.json"
    rows = [dict(family="f", case="c", mode="forward", impl="lucidops[triton]", ms=1.0, speedup_vs_eager=2.0)]
    results.write_text(json.dumps({"machine": {"name": "a GPU"}, "full": True, "results": rows}))
    assert plots.main([str(results)]) == 0
    assert (tmp_path / "gpu-f.png").read_bytes()[:4] == b"\x89PNG"
    assert plots.main([str(results), "--out", str(tmp_path / "charts")]) == 0
    assert (tmp_path / "charts" / "gpu-f.png").exists()


def test_plots_refuse_a_file_that_is_not_a_results_file(tmp_path, capsys):
    # the results folder also holds triton-aot-resources.json: a KeyError traceback
    pytest.importorskip("matplotlib")
    for name, text in (("aot.json", json.dumps({"configurations": []})), ("bad.json", "{"),
                       ("list.json", "[]")):
        (tmp_path / name).write_text(text)
        assert plots.main([str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.startswith("error: ")
    assert plots.main([str(tmp_path / "missing.json")]) == 2


def test_gpu_check_fits_the_device_call():
    """bench/gpu_check.sh: every command that can hang runs under a time limit, the limits add up
    to the sum its header states, inside a 590 s call, and only the bench JSON and Markdown go
    into the results folder (no PNGs: the device tool brings back 8 files at most)."""
    import re
    from pathlib import Path

    script = (Path(runner.__file__).parent / "gpu_check.sh").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    limits = [int(n) for n in re.findall(r"\btimeout (\d+)", code)]
    limits += [int(n) for n in re.findall(r"^\s*(?:\w+=\S+ )*bench \w+ (\d+)$", code, re.M)]
    limits.append(int(re.search(r"^\s*test_limit=(\d+)", code, re.M).group(1)))
    stated = re.search(r"^# [\d +]+ = (\d+) s", script, re.M)
    assert stated and sum(limits) == int(stated.group(1)) <= 570
    for line in code.splitlines():
        if re.search(r"\b(python3|nvidia-smi|pip)\b", line) and "import xdist" not in line and "pytest_timeout" not in line:
            assert re.search(r"\btimeout ", line), line
    assert "--no-plots" in code


def test_flex_attention_baseline_stays_compiled_over_the_whole_grid(monkeypatch):
    """One compiled flex_attention served every case: past Dynamo's recompile limit (8
    variants) it ran eager, materialising every score, under its own label. Run here with
    Dynamo's eager backend (the limit, not inductor, is what is checked), forward only."""
    import functools
    import warnings

    import torch

    from lucidops.bench import attention

    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    flex = attention._flex()
    monkeypatch.undo()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "flex_attention called without torch.compile()" fails the test
            grid = [case for case in attention._cases("cuda", quick=False) if not case[-1]]
            for b, h, n, d, causal, _, _ in grid[:12]:  # the GPU grid's first 12 cases, scaled down
                n //= 16
                q = torch.randn(max(1, 2**14 // (h * n)), h, n, d)
                assert flex(q, q, q, causal, 0.0).shape == q.shape
    finally:
        torch._dynamo.reset()


def test_bench_refuses_an_out_folder_it_cannot_write_before_running(capsys, monkeypatch):
    # mkdir(exist_ok=True) passed an existing read-only folder: a traceback after the benchmarks
    import os

    if not os.path.isdir("/proc"):
        pytest.skip("needs /proc (a folder nothing can be written in, even as root)")
    monkeypatch.setattr(runner, "bench_device", lambda *a, **k: pytest.fail("benchmarked before refusing --out"))
    args = runner.argparse.ArgumentParser()
    runner.add_arguments(args)
    assert runner.run(args.parse_args(["--device", "cpu", "--families", "conditioning", "--out", "/proc"])) == 2
    assert "error: --out: cannot use '/proc' as the results folder" in capsys.readouterr().err
    # Without --out the default folder is named as such: "--out" blamed a flag never given.
    from pathlib import Path

    monkeypatch.setattr(runner, "default_out", lambda: Path("/proc/lucidops-bench-results"))  # a wheel's, in /proc
    assert runner.run(args.parse_args(["--device", "cpu", "--families", "conditioning"])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the default results folder (pass --out DIR for another): cannot use '/proc/"), err


def test_lora_bench_times_float32_adapters_over_a_half_x(monkeypatch):
    """bench/lora.py's peft-default case (float32 adapters, bf16 x): every implementation is
    timed on the same function, lucidops with the float32 factors as they are (not rounded to
    x's dtype first), and the forward's error against float64 is that of one bf16 rounding."""
    import lucidops
    import torch
    from lucidops.bench import lora as bench_lora

    factor_dtypes = set()
    op = lucidops.ops.sine_lora_linear

    def recorded(x, weight, lora_a, lora_b, *args, **kwargs):
        factor_dtypes.add((lora_a.dtype, lora_b.dtype))
        return op(x, weight, lora_a, lora_b, *args, **kwargs)

    monkeypatch.setattr(lucidops.ops, "sine_lora_linear", recorded)
    g = torch.Generator().manual_seed(0)
    m, k, n, r = 24, 48, 40, 4
    x = torch.randn(m, k, generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    a, b = torch.randn(r, k, generator=g) / k ** 0.5, torch.randn(n, r, generator=g) * 0.05
    grad = torch.randn(m, n, generator=g).bfloat16()
    rows = bench_lora.with_float32_adapters("cpu", 0.5, "case", x, w, a, b, bias, grad)
    by_impl = {row["impl"]: row for row in rows}
    assert {"naive", "plain LoRA", "lucidops[reference]"} <= set(by_impl)
    assert factor_dtypes == {(torch.float32, torch.float32)}
    assert all(row["mode"] == "forward+backward, float32 adapters" and row["ms"] > 0 for row in rows)
    for name, row in by_impl.items():
        if name != "plain LoRA":
            assert row["rel_err_vs_fp64"] < 1e-2, row
            assert row["speedup_vs_naive"] > 0


def test_cuda_timing_interleaves_flushes_and_isolates_failures(monkeypatch, capsys):
    """bench/timing.py's CUDA loop, with torch.cuda stood in for (no GPU here): every round
    times each function once, in turn, each call after an L2 flush and a drained GPU; a
    function whose call raises (at once or at the sync after it, as an asynchronous CUDA
    error does) is reported under its own name and left out; short calls get more rounds.
    The events read a fake clock that only the calls advance, so the round count is exact
    (a real sleep overshoots on a loaded machine: 4 ms sleeps gave 40 rounds instead of 60
    while the suite's background compile ran)."""
    import torch

    from lucidops.bench import timing

    log = []
    clock = [0.0]  # ms

    class Event:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock[0]

        def synchronize(self):
            log.append("sync")

        def elapsed_time(self, other):
            return other.t - self.t

    class Flush:
        def zero_(self):
            log.append("flush")
            clock[0] += 100.0  # not timed: outside the events

    pending_error = []

    def synchronize():
        log.append("sync")
        if pending_error:
            raise RuntimeError(pending_error.pop())

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    monkeypatch.setattr(timing, "_l2_flush_buffer", Flush)

    def named(name, ms=0.0):
        def fn():
            log.append(name)
            clock[0] += ms
        return fn

    def fails_later():
        log.append("late")
        pending_error.append("an illegal memory access")  # surfaces at the next synchronize

    fns = {"slow": named("slow", 4.0), "fast": named("fast", 0.5), "late": fails_later,
           "raises": lambda: 1 / 0}
    times = timing.measure_interleaved_ms(fns, "cuda", warmup=1, rounds=3, label="case ")
    out = capsys.readouterr().out
    assert times == {"slow": 4.0, "fast": 0.5}
    assert "case late: failed (RuntimeError: an illegal memory access)" in out
    assert "case raises: failed (ZeroDivisionError" in out
    timed = [entry for entry in log[log.index("late") + 1:] if entry in ("slow", "fast", "flush")]
    assert timed[:4] == ["flush", "slow", "flush", "fast"]  # interleaved, each after a flush
    rounds = timed.count("slow")
    assert timed.count("fast") == rounds and timed.count("flush") == 2 * rounds
    # 4.5 ms of timed work a round: as many rounds as fill the target, not the 3 asked for.
    assert rounds == int(timing.CUDA_ROUNDS_TARGET_MS / 4.5) > 3


def test_attention_bench_small_head_candidate_computes_the_same_and_restores_the_configs():
    """bench/attention.py times a candidate tiling for d <= 32 on a GPU: under the interpreter
    it gives the shipped kernels' output and gradients, and the shipped configs come back."""
    import torch

    import lucidops
    from lucidops.bench import attention as bench_attention
    from lucidops.triton_kernels import attention as tk

    if not lucidops.backends.triton_interpreting():
        pytest.skip("needs the Triton interpreter")
    shipped = dict(tk.FORWARD_CONFIGS), dict(tk.BACKWARD_CONFIGS)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 3, 70, 16, generator=g, requires_grad=True) for _ in range(3))

    def run():
        for t in (q, k, v):
            t.grad = None
        with lucidops.use_backend("triton"):
            out = lucidops.ops.attention(q, k, v, causal=True)
        out.backward(torch.ones_like(out))
        return [out.detach()] + [t.grad.clone() for t in (q, k, v)]

    expected = run()
    with bench_attention.small_head_candidate():
        assert tk.FORWARD_CONFIGS[16] == bench_attention.CANDIDATE_CONFIGS["forward"]
        got = run()
    assert (dict(tk.FORWARD_CONFIGS), dict(tk.BACKWARD_CONFIGS)) == shipped
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_result_files_name_the_vector_instruction_set(monkeypatch):
    """Two "AMD EPYC" machines, one with AVX-512 and one without, write different files: the
    C++ kernels' speed differs several times between them."""
    from lucidops.bench import timing
    from lucidops import _ext_sources

    desc = {"device": "cpu", "name": "AMD EPYC", "threads": 2}
    for flags, isa in ((["avx", "avx2", "avx512f", "fma"], "avx512"), (["avx", "avx2", "fma"], "avx2"),
                       (["sse2"], "sse"), (["asimd", "fp"], "neon"), (["x86_64:"], None)):
        monkeypatch.setattr(_ext_sources, "host_cpu_features", lambda flags=flags: flags)
        assert timing.vector_isa() == isa
        expected = f"cpu-amd-epyc-{isa}-2threads" if isa else "cpu-amd-epyc-2threads"
        assert timing.device_slug({**desc, "vector_isa": timing.vector_isa()}) == expected
    assert timing.device_slug({"device": "cuda", "name": "NVIDIA H100 80GB HBM3", "threads": 2,
                               "vector_isa": None}) == "nvidia-h100-80gb-hbm3"
