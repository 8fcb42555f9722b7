"""Commands say what they need (an optional package, a writable output folder) before any long run:
`lucidops demo gpe` used to train for minutes and then crash plotting without matplotlib."""

import importlib.util

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
    assert f"needs {package}: pip install 'lucidops[{extra}]'" in capsys.readouterr().out


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
    assert "--out/--png" in capsys.readouterr().err


def test_aot_arch_takes_every_usual_spelling():
    import argparse

    from lucidops.triton_kernels.aot import compute_capability

    assert [compute_capability(a) for a in ("80", "8.0", "sm_90", "9.0", "SM_86")] == [80, 80, 90, 90, 86]
    with pytest.raises(argparse.ArgumentTypeError, match="8.x"):
        compute_capability("8.x")
