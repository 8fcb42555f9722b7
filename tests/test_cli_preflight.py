"""Commands say what they need (an optional package, a writable output folder) before any long run:
`lucidops demo gpe` used to train for minutes and then crash plotting without matplotlib."""

import importlib.util
import os

import pytest

from lucidops import _optional, cli


@pytest.fixture
def without(monkeypatch):
    """Make the named packages look uninstalled to lucidops._optional."""
    def hide(*packages):
        real = importlib.util.find_spec
        monkeypatch.setattr(_optional.importlib.util, "find_spec",
                            lambda name, *a: None if name in packages else real(name, *a))
    return hide


def test_missing_names_the_purpose_and_the_extra(without):
    assert _optional.missing("torch", "anything") is None
    without("matplotlib")
    assert _optional.missing("matplotlib", "the PNG") == "the PNG needs matplotlib: pip install 'lucidops[plot]'"


def test_demo_gpe_without_matplotlib_stops_before_training(without, capsys, monkeypatch):
    from lucidops.demos import gpe

    monkeypatch.setattr(gpe, "run_demo", lambda cfg: pytest.fail("trained before saying matplotlib is missing"))
    without("matplotlib")
    assert cli.main(["demo", "gpe", "--quick", "--no-progress"]) == 2
    assert "matplotlib: pip install 'lucidops[plot]'" in capsys.readouterr().err
    monkeypatch.setattr(gpe, "run_demo", lambda cfg: (_ for _ in ()).throw(RuntimeError("ran")))
    with pytest.raises(RuntimeError, match="ran"):  # --no-png needs no matplotlib
        cli.main(["demo", "gpe", "--quick", "--no-progress", "--no-png"])


@pytest.mark.parametrize("package,extra", [("peft", "peft"), ("matplotlib", "plot")])
def test_demo_unlearn_without_its_packages_stops_before_pretraining(package, extra, without, capsys, monkeypatch,
                                                                     tmp_path):
    from lucidops.demos import unlearn

    monkeypatch.setattr(unlearn, "run_experiment", lambda *a, **k: pytest.fail("ran before saying what is missing"))
    without(package)
    assert cli.main(["demo", "unlearn", "--quick", "--out", str(tmp_path)]) == 2
    assert f"needs {package}: pip install 'lucidops[{extra}]'" in capsys.readouterr().err


def test_profile_png_without_matplotlib_is_a_one_line_error(without, capsys, tmp_path):
    without("matplotlib")
    rc = cli.main(["profile", "--model", "pointnet", "--patch", "--png", str(tmp_path / "c.png")])
    assert rc == 2 and "--png needs matplotlib: pip install 'lucidops[plot]'" in capsys.readouterr().err


# ---------------------------------------------------------------- output paths, said up front

def test_bench_out_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, capsys):
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    assert cli.main(["bench", "--families", "activations", "--no-plots", "--device", "cpu", "--out", str(a_file)]) == 2
    assert "--out: cannot use" in capsys.readouterr().err


def test_demo_gpe_out_that_cannot_be_made_stops_before_training(tmp_path, capsys, monkeypatch):
    from lucidops.demos import gpe

    monkeypatch.setattr(gpe, "run_demo", lambda cfg: pytest.fail("trained before checking --out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main(["demo", "gpe", "--quick", "--no-progress", "--out", str(blocker / "sub")]) == 2
    assert f"--out: {str(blocker)!r} is not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("demo", ["gpe", "unlearn"])
@pytest.mark.parametrize("where", ["file as folder", "folder as png", "unwritable folder"])
def test_demo_png_paths_are_checked_before_any_work(demo, where, tmp_path, capsys, monkeypatch):
    """`demo unlearn` checked none of these and crashed after its training (FileExistsError,
    FileNotFoundError), or wrote beside a folder named as the PNG and said it wrote the folder."""
    from lucidops.demos import gpe, unlearn

    monkeypatch.setattr(gpe, "run_demo", lambda cfg: pytest.fail("trained before checking the PNG path"))
    monkeypatch.setattr(unlearn, "run_experiment", lambda *a, **k: pytest.fail("ran before checking the PNG path"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    if where == "file as folder":
        option, path, message = "--out", str(blocker), "is not a folder"
    elif where == "folder as png":
        option, path, message = "--png", str(tmp_path), "must be a file path, got the folder"
    else:
        option, path, message = "--png", "/proc/lucidops-test/u.png", "cannot write in '/proc'"
    argv = ["demo", demo, "--quick", option, path] + (["--no-progress"] if demo == "gpe" else [])
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and option in captured.err and not captured.out


@pytest.mark.parametrize("command", ["gpe", "unlearn", "profile"])
@pytest.mark.parametrize("where", ["trailing separator", "dot", "file as folder", "unwritable folder"])
def test_every_png_option_is_checked_before_any_work(command, where, tmp_path, capsys, monkeypatch):
    """A --png ending in a separator passed the check (abspath strips it) and every command
    crashed with IsADirectoryError after its whole run; `profile --png /proc/x.png` was not
    checked for writability at all. One check (demos._png) now serves all three commands."""
    from lucidops.demos import gpe, unlearn

    monkeypatch.setattr(gpe, "run_demo", lambda cfg: pytest.fail("trained before checking the PNG path"))
    monkeypatch.setattr(unlearn, "run_experiment", lambda *a, **k: pytest.fail("ran before checking the PNG path"))
    monkeypatch.setattr(cli, "_make_model", lambda *a, **k: pytest.fail("profiled before checking the PNG path"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    path, message = {
        "trailing separator": (str(tmp_path / "newdir") + os.sep, "must be a file path, got the folder"),
        "dot": (os.path.join(str(tmp_path / "newdir"), "."), "must be a file path, got the folder"),
        "file as folder": (str(blocker / "x.png"), "is not a folder"),
        "unwritable folder": ("/proc/lucidops-test/x.png", "cannot write in '/proc'"),
    }[where]
    argv = (["profile", "--model", "pointnet", "--patch", "--quiet"] if command == "profile" else
            ["demo", command, "--quick"] + (["--no-progress"] if command == "gpe" else []))
    assert cli.main(argv + ["--png", path]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "--png: " in captured.err and message in captured.err, captured.err
    assert not captured.out and not (tmp_path / "newdir").exists()  # nothing run, no folder made


def _unpatched(monkeypatch):
    """`--patch` distils Gaussian encoders for a minute: compare the model with a plain copy."""
    monkeypatch.setattr(cli, "_patch", lambda model, kind: model)
    return ["profile", "--model", "pointnet_vanilla", "--patch", "--points", "16", "--repeat", "1", "--warmup", "0",
            "--depth", "0", "--quiet"]


def test_profile_makes_a_missing_png_folder_as_the_demos_do(tmp_path, capsys, monkeypatch):
    """profile refused a folder that did not exist yet while the demos made it: both make it."""
    from lucidops import profile
    from lucidops.demos import _png

    assert profile.png_path_problem is _png.png_path_problem  # one implementation
    png = tmp_path / "new" / "sub" / "c.png"
    assert profile.png_path_problem(png) is None
    assert cli.main(_unpatched(monkeypatch) + ["--png", str(png)]) == 0, capsys.readouterr().err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in capsys.readouterr().out


def test_profile_prints_its_table_even_when_the_png_cannot_be_saved(tmp_path, capsys, monkeypatch):
    """The chart was saved inside compare(), before the table was printed: a failed save lost it."""
    from lucidops import profile

    def disk_full(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(profile.ProfileComparison, "plot", disk_full)
    assert cli.main(_unpatched(monkeypatch) + ["--png", str(tmp_path / "c.png")]) == 1
    captured = capsys.readouterr()
    assert "patched/original" in captured.out and "No space left on device" in captured.err


def test_a_refused_gpe_run_leaves_no_folder_behind(tmp_path, capsys):
    """The PNG's folder was made while checking the arguments: a run refused for --data left an
    empty --out folder. It is made only when the PNG is written now."""
    out = tmp_path / "new_out"
    assert cli.main(["demo", "gpe", "--quick", "--no-progress", "--out", str(out), "--data", str(tmp_path / "no")]) == 2
    assert "--data" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("name", ["chart", "chart.txt", "sub/chart.png"])
def test_demo_pngs_are_written_as_png_at_exactly_the_path_given(name, tmp_path):
    """matplotlib picks the format from the suffix: "chart" became chart.png while the demos
    said they wrote "chart", and "chart.txt" failed after the whole run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lucidops.demos._png import save_png

    path = str(tmp_path / name)
    fig = plt.figure(figsize=(2, 2))
    assert save_png(fig, path) == path
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / name).parent.iterdir()) == [os.path.basename(name)]
    assert not plt.fignum_exists(fig.number)  # closed: a long session does not pile up figures


def test_aot_arch_takes_every_usual_spelling():
    import argparse

    from lucidops.triton_kernels.aot import compute_capability

    assert [compute_capability(a) for a in ("80", "8.0", "sm_90", "9.0", "SM_86")] == [80, 80, 90, 90, 86]
    with pytest.raises(argparse.ArgumentTypeError, match="8.x"):
        compute_capability("8.x")


# ---------------------------------------------------------------- environment, interrupts, repeats

@pytest.mark.parametrize("variable,value", [("LUCIDOPS_DISABLE_EXT", "maybe"), ("LUCIDOPS_BACKEND", "foo")])
@pytest.mark.parametrize("command", [["bench", "--families", "activations", "--device", "cpu"],
                                     ["demo", "gpe", "--quick"], ["demo", "unlearn", "--quick"]])
def test_a_bad_environment_setting_stops_a_command_before_any_work(command, variable, value, tmp_path, capsys,
                                                                   monkeypatch):
    """bench and the demos met a bad LUCIDOPS_DISABLE_EXT or LUCIDOPS_BACKEND minutes in (demo
    gpe after training both PointNets) and stopped with a traceback."""
    from lucidops.bench import runner
    from lucidops.demos import gpe, unlearn

    monkeypatch.setenv(variable, value)
    for module in (runner, gpe, unlearn):
        monkeypatch.setattr(module, "run", lambda *a, **k: pytest.fail("the command started its work"))
    monkeypatch.chdir(tmp_path)
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and variable in err and "Traceback" not in err, err


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    from lucidops.bench import runner

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert cli.main(["bench", "--families", "activations", "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip() == "lucidops bench: interrupted"


def test_bench_runs_a_family_or_device_named_twice_once(tmp_path, monkeypatch):
    from lucidops.bench import runner

    calls = []
    monkeypatch.setattr(runner, "bench_device", lambda device, families, *a, **k: calls.append((device, families)))
    args = ["bench", "--families", "activations", "conditioning", "activations", "--device", "cpu", "cpu",
            "--no-plots", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    assert calls == [("cpu", ["activations", "conditioning"])]


def test_a_bench_run_stopped_before_a_family_s_first_rows_keeps_its_chart(tmp_path, monkeypatch):
    """The family's PNG was deleted when it started, while its earlier rows stayed in the JSON."""
    from lucidops.bench import activations, runner

    def first_run(device, quick, **kwargs):
        return [{"family": "activations", "case": "c", "mode": "forward", "impl": "i", "ms": 1.0}]

    monkeypatch.setattr(activations, "run", first_run)
    monkeypatch.setattr(runner, "write_family_plots", lambda rows, name, out, slug: [], raising=False)
    runner.bench_device("cpu", ["activations"], False, tmp_path, plots=False)
    (json_path,) = tmp_path.glob("*.json")
    chart = tmp_path / f"{json_path.stem}-activations.png"
    chart.write_bytes(b"earlier chart")
    before = json_path.read_text()

    def stopped(device, quick, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(activations, "run", stopped)
    with pytest.raises(KeyboardInterrupt):
        runner.bench_device("cpu", ["activations"], False, tmp_path, plots=False)
    assert json_path.read_text() == before and chart.read_bytes() == b"earlier chart"
    monkeypatch.setattr(activations, "run", first_run)
    runner.bench_device("cpu", ["activations"], False, tmp_path, plots=False)
    assert not chart.exists()  # its rows were replaced: the chart of the earlier ones goes


def test_bench_replaces_a_results_file_of_another_shape(tmp_path, capsys):
    from lucidops.bench import runner

    path = tmp_path / "results.json"
    for text in ("[]", '{"results": 3}', '{"results": [1]}'):
        path.write_text(text)
        assert runner._earlier_rows(path, {}, False) == ([], {})
        assert "not a lucidops results file" in capsys.readouterr().out


def test_plots_out_that_cannot_be_a_folder_is_a_one_line_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from lucidops.bench import plots

    results = tmp_path / "r.json"
    results.write_text('{"machine": {"name": "m"}, "results": []}')
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert plots.main([str(results), "--out", str(a_file)]) == 2
    err = capsys.readouterr().err
    assert "--out: cannot use" in err and "Traceback" not in err


@pytest.mark.parametrize("argv,message", [(["--png", ""], "--png: an empty path"),
                                          (["--out", " "], "--out: an empty path"),
                                          (["--png", "a.png", "--out", "d"], "--png and --out both")])
def test_demo_unlearn_png_options_are_refused_as_gpe_refuses_them(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "unlearn", "--quick", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
