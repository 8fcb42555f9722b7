"""lucidops.nn.GaussianTNet / GaussianPointNet and ``lucidops demo gpe`` (quick settings)."""

import math
import re

import numpy as np
import pytest
import torch
from torch import nn

from lucidops import cli
from lucidops.demos import gpe
from lucidops.models import TNet
from lucidops.nn import GaussianPointEncoder, GaussianPointNet, GaussianTNet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _points(b=3, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, 3, generator=g) * 2 - 1


# ---------------------------------------------------------------- the modules


def test_default_sizes_match_the_paper_layout():
    torch.manual_seed(0)
    model = GaussianPointNet()
    g, k = 32, 1024

    def lin(i, o):
        return i * o + o

    encoder = g * 3 + g * 6 + lin(g, k)  # means, packed factors, mixer
    head = lin(k, 512) + 2 * 512 + lin(512, 256) + 2 * 256 + lin(256, 40)
    tnet = encoder + lin(k, 512) + 2 * 512 + lin(512, 256) + 2 * 256 + lin(256, 9)
    assert sum(p.numel() for p in model.parameters()) == encoder + head + tnet
    assert model.num_classes == 40 and isinstance(model.input_tnet, GaussianTNet)
    assert model.encoder.num_gaussians == 32 and model.encoder.out_channels == 1024
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 1.39) < 0.02  # the paper's 1.39M
    assert GaussianPointNet(input_transform=False).input_tnet is None


@pytest.mark.parametrize("input_transform", [True, False])
def test_shapes_and_gradients(input_transform):
    torch.manual_seed(1)
    model = GaussianPointNet(num_classes=5, num_gaussians=6, out_channels=24, input_transform=input_transform,
                             tnet_gaussians=4)
    if input_transform:
        # The T-Net's output layer starts at zero (identity transform), which blocks every gradient
        # above it; perturb it so each parameter must receive a non-zero gradient.
        with torch.no_grad():
            model.input_tnet.out.weight.normal_(0, 0.1)
    model.train()
    pts = _points(4, 33).requires_grad_()
    logits = model(pts)
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    weights = torch.randn(4, 5, generator=torch.Generator().manual_seed(2))
    (logits * weights).sum().backward()
    assert pts.grad is not None and torch.isfinite(pts.grad).all() and pts.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    model.eval()
    with torch.no_grad():
        assert model.global_feature(pts).shape == (4, 24)
        feats = model.point_features(pts)
        assert feats.shape == (4, 33, 24) and model.encoder.reduce == "max"
        # The global feature is the max of the per-point features.
        torch.testing.assert_close(feats.amax(1), model.global_feature(pts))


def test_gaussian_tnet_starts_at_identity_and_batches():
    torch.manual_seed(0)
    tnet = GaussianTNet(3, num_gaussians=5, out_channels=16, hidden=(8, 4)).eval()
    pts = _points(2, 17)
    with torch.no_grad():
        t = tnet(pts)
    assert t.shape == (2, 3, 3)
    torch.testing.assert_close(t, torch.eye(3).expand(2, 3, 3))
    with torch.no_grad():
        tnet.out.bias.normal_()
        tnet.out.weight.normal_()
        t_all = tnet(pts)
        t_one = tnet(pts[1:])
    assert not torch.allclose(t_all, torch.eye(3).expand(2, 3, 3))
    torch.testing.assert_close(t_all[1:], t_one)
    assert GaussianTNet(k=4, num_gaussians=2, out_channels=8).eval()(pts).shape == (2, 4, 4)


def test_state_dict_round_trip():
    torch.manual_seed(3)
    a = GaussianPointNet(num_classes=4, num_gaussians=5, out_channels=12).eval()
    torch.manual_seed(4)
    b = GaussianPointNet(num_classes=4, num_gaussians=5, out_channels=12).eval()
    pts = _points(2, 21)
    with torch.no_grad():
        assert not torch.allclose(a.encoder.means, b.encoder.means)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(b(pts), a(pts), rtol=0, atol=0)
    keys = set(a.state_dict())
    assert {"encoder.means", "encoder.factor", "input_tnet.encoder.means", "head.7.weight"} <= keys


def test_from_modules_from_distilled_and_old_names():
    import lucidops.train
    from lucidops.train import DistilledPointNet

    torch.manual_seed(5)
    enc = GaussianPointEncoder(4, 16)
    head = nn.Sequential(nn.Linear(16, 3))
    tnet = GaussianTNet(3, 3, 16)
    model = DistilledPointNet(enc, head, tnet).eval()  # the old positional constructor
    assert isinstance(model, GaussianPointNet) and model.num_classes == 3
    assert lucidops.train.GaussianTNet is GaussianTNet and lucidops.train.GaussianPointNet is GaussianPointNet
    import lucidops.models

    assert lucidops.models.GaussianPointNet is GaussianPointNet
    shared = GaussianPointNet.from_distilled(model)
    copied = GaussianPointNet.from_distilled(model, copy_modules=True)
    assert type(shared) is GaussianPointNet and shared.encoder is enc and shared.input_tnet is tnet
    assert copied.encoder is not enc and not shared.training
    pts = _points(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(shared(pts), model(pts), rtol=0, atol=0)
        torch.testing.assert_close(copied(pts), model(pts), rtol=0, atol=0)
    # A result-like object with a .model attribute works too.
    assert GaussianPointNet.from_distilled(type("R", (), {"model": model})()).head is head
    # PointNet's own T-Net as the input T-Net: points @ tnet(points^T).
    pn_tnet = TNet(3).eval()
    with torch.no_grad():
        pn_tnet.out.bias.normal_()
        m2 = GaussianPointNet.from_modules(enc, head, pn_tnet).eval()
        torch.testing.assert_close(m2.transform_points(pts), pts @ pn_tnet(pts.transpose(1, 2)))
    # The profile CLI's model name resolves to this class.
    made, kind, _ = cli._make_model("gaussian_pointnet", None)
    assert isinstance(made, GaussianPointNet) and kind == "points"


def test_set_cull_threshold():
    torch.manual_seed(6)
    model = GaussianPointNet(num_classes=3, num_gaussians=4, out_channels=8).eval()
    model.set_cull_threshold(0.1, tnet=False)
    assert model.encoder.cull_threshold == 0.1 and model.input_tnet.encoder.cull_threshold is None
    model.set_cull_threshold(0.2)
    assert [e.cull_threshold for e in model.gaussian_encoders()] == [0.2, 0.2]
    with torch.no_grad():
        assert torch.isfinite(model(_points(2, 30))).all()
    model.set_cull_threshold(None)
    assert all(e.cull_threshold is None for e in model.gaussian_encoders())
    with pytest.raises(ValueError, match="cull_threshold"):
        model.set_cull_threshold(-1.0)


def test_validation_errors_name_the_argument():
    for kwargs, exc, name in [
        (dict(num_classes=0), ValueError, "num_classes"),
        (dict(num_gaussians="8"), TypeError, "num_gaussians must be an int, got str"),
        (dict(out_channels=-3), ValueError, "out_channels"),
        (dict(input_transform="yes"), TypeError, "input_transform"),
        (dict(tnet_gaussians=0), ValueError, "tnet_gaussians"),
        (dict(cloud_range=float("nan")), ValueError, "cloud_range"),
        (dict(dropout=1.0), ValueError, "dropout"),
    ]:
        with pytest.raises(exc, match=name):
            GaussianPointNet(**kwargs)
    for kwargs, name in [(dict(k=0), "k"), (dict(num_gaussians=0), "num_gaussians"),
                         (dict(hidden=()), "hidden"), (dict(hidden=(4, 0)), r"hidden\[1\]")]:
        with pytest.raises(ValueError, match=name):
            GaussianTNet(**kwargs)
    model = GaussianPointNet(num_classes=3, num_gaussians=2, out_channels=8).eval()
    with pytest.raises(ValueError, match="points"):
        model(torch.rand(2, 5, 2))
    with pytest.raises(ValueError, match="points"):
        model(torch.rand(2, 0, 3))
    with pytest.raises(TypeError, match="points"):
        model(torch.ones(2, 5, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="points"):
        model([[0.0, 0.0, 0.0]])
    enc = GaussianPointEncoder(2, 8)
    with pytest.raises(TypeError, match="encoder"):
        GaussianPointNet.from_modules(nn.Linear(3, 8), nn.Linear(8, 2))
    with pytest.raises(TypeError, match="head"):
        GaussianPointNet.from_modules(enc, "head")
    with pytest.raises(TypeError, match="input_tnet"):
        GaussianPointNet.from_modules(enc, nn.Linear(8, 2), nn.Linear(3, 9))
    with pytest.raises(ValueError, match="input_tnet"):
        GaussianPointNet.from_modules(enc, nn.Linear(8, 2), GaussianTNet(k=4, num_gaussians=2, out_channels=8))
    with pytest.raises(ValueError, match="out"):
        GaussianTNet.from_modules(enc, nn.ModuleList(), nn.Linear(8, 4), k=3)
    with pytest.raises(TypeError, match="tnet"):
        GaussianTNet.from_tnet(nn.Linear(3, 3), enc)
    with pytest.raises(TypeError, match="result"):
        GaussianPointNet.from_distilled(42)


# ---------------------------------------------------------------- the demo


def test_evaluate_counts_correct_predictions():
    class FirstCoords(nn.Module):  # logits = the first point's (x, y)
        def forward(self, points):
            return points[:, 0, :2]

    pts = torch.zeros(5, 2, 3)
    pts[:, 0, 0] = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])
    pts[:, 0, 1] = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]) * 2 - 0.5
    labels = torch.tensor([0, 1, 1, 1, 0])  # predictions 0, 1, 0, 1, 0: 4 of 5 right
    model = FirstCoords().train()
    assert gpe.evaluate(model, pts, labels, batch_size=2) == pytest.approx(80.0)
    assert model.training  # flag restored
    with pytest.raises(ValueError, match="labels"):
        gpe.evaluate(model, pts, labels[:3])


def _run_cli(argv, capsys):
    """Run ``lucidops demo gpe`` through the CLI, returning (rc, stdout, stderr, DemoResult or None)."""
    captured = {}
    real = gpe.run_demo

    def spy(cfg):
        captured["cfg"] = cfg
        captured["result"] = real(cfg)
        return captured["result"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gpe, "run_demo", spy)
        rc = cli.main(["demo", "gpe", "--no-progress", *argv])
    out, err = capsys.readouterr()
    return rc, out, err, captured.get("result"), captured.get("cfg")


def _check_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    import matplotlib.image

    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _table_lines(out):
    return {name: line for line in out.splitlines() for name in gpe.ROW_NAMES if line.startswith(name)}


def test_demo_quick_end_to_end(tmp_path, capsys):
    rc, out, err, result, cfg = _run_cli(["--quick", "--out", str(tmp_path)], capsys)
    assert rc == 0, err
    # Four rows, in order, with finite numbers (also in the printed table).
    assert [r.name.split(" (t=")[0] for r in result.rows] == list(gpe.ROW_NAMES)
    lines = _table_lines(out)
    assert set(lines) == set(gpe.ROW_NAMES)
    for r in result.rows:
        for v in (r.accuracy, r.params, r.flops, r.fvcore_flops, r.latency_ms, r.saved_bytes):
            assert v is not None and math.isfinite(v) and v >= 0, r
        assert 0 <= r.accuracy <= 100 and r.params > 0 and r.flops > 0 and r.latency_ms > 0
        numbers = re.findall(r"\d+\.\d+", lines[r.name.split(" (t=")[0]])
        assert f"{r.accuracy:.2f}" in numbers
    pn, vanilla, dense, fused = result.rows
    assert pn.params > vanilla.params > dense.params == fused.params
    # FLOPs: the Gaussian encoder is far cheaper than PointNet's MLP (both counters).
    assert dense.flops < 0.5 * vanilla.flops and dense.fvcore_flops < 0.5 * vanilla.fvcore_flops
    # The dense and fused rows compute one function: the same count (torch's counter skipped the
    # dense run's elementwise phi, so the dense row showed 5.8M against the fused 6.2M).
    assert (dense.flops, dense.fvcore_flops) == (fused.flops, fused.fvcore_flops)
    assert dense.backend == "eager" and fused.backend in ("cpp", "reference")
    # The eager dense encoder keeps (N, G) and (N, K) for backward; the fused op keeps neither.
    assert dense.saved_bytes > 10 * fused.saved_bytes
    # The culled row's accuracy comes from evaluating the culled model on the test split.
    xte, yte = result.test
    culled, dense_model = result.models["culled"], result.models["gaussian"]
    assert [e.cull_threshold for e in culled.gaussian_encoders()] == [cfg["cull_threshold"]] * 2
    assert all(e.cull_threshold is None for e in dense_model.gaussian_encoders())
    assert gpe.evaluate(culled, xte, yte) == fused.accuracy
    with gpe.eager_dense(dense_model):
        assert gpe.evaluate(dense_model, xte, yte) == dense.accuracy
    assert gpe.evaluate(result.models["pointnet"], xte, yte) == pn.accuracy
    assert result.gap == pytest.approx(pn.accuracy - fused.accuracy)
    assert f"{result.gap:+.2f} points" in out
    # Deterministic splits: the same seed gives the same clouds; the splits differ.
    xtr2, ytr2, xte2, yte2, k, _ = gpe.load_data(dict(cfg, progress=False))
    assert torch.equal(xte2, xte) and torch.equal(yte2, yte) and k == cfg["classes"]
    assert not torch.equal(xtr2[: len(xte)], xte)
    png = tmp_path / "gpe_table.png"
    assert result.png == str(png) and f"wrote {png}" in out
    _check_png(png)


def _write_modelnet(root, classes=("airplane", "chair", "lamp"), points=48, seed=0):
    import h5py

    rng = np.random.default_rng(seed)

    def write(name, m):
        labels = np.arange(m) % len(classes)
        data = rng.uniform(-1, 1, (m, points, 3)) * (1 + labels[:, None, None])  # classes differ in extent
        with h5py.File(root / name, "w") as f:
            f.create_dataset("data", data=data.astype(np.float32))
            f.create_dataset("label", data=labels.astype(np.uint8).reshape(-1, 1))

    write("ply_data_train0.h5", 12)
    write("ply_data_train1.h5", 9)
    write("ply_data_test0.h5", 9)
    (root / "shape_names.txt").write_text("\n".join(classes) + "\n")
    (root / "train_files.txt").write_text("data/modelnet40_ply_hdf5_2048/ply_data_train0.h5\n"
                                          "data/modelnet40_ply_hdf5_2048/ply_data_train1.h5\n")
    (root / "test_files.txt").write_text("data/modelnet40_ply_hdf5_2048/ply_data_test0.h5\n")


def test_demo_with_modelnet_folder(tmp_path, capsys):
    pytest.importorskip("h5py")
    data = tmp_path / "modelnet"
    data.mkdir()
    _write_modelnet(data)
    png = tmp_path / "sub" / "table.png"
    rc, out, err, result, cfg = _run_cli(["--quick", "--data", str(data), "--points", "32", "--png", str(png),
                                          "--profile-points", "64"], capsys)
    assert rc == 0, err
    assert result.dataset.startswith("ModelNet40") and "21 train, 9 test" in result.dataset
    xte, yte = result.test
    assert xte.shape == (9, 32, 3) and sorted(set(yte.tolist())) == [0, 1, 2]
    assert result.models["pointnet"].num_classes == 3 and result.models["gaussian"].num_classes == 3
    assert len(_table_lines(out)) == 4 and "ModelNet40" in out
    _check_png(png)


@pytest.mark.parametrize("argv, message", [
    (["--points", "0"], "--points"),
    (["--classes", "13"], "--classes"),
    (["--lr", "-1"], "--lr"),
    (["--cull-threshold", "0"], "--cull-threshold"),
    (["--encoder-lr-scale", "0"], "--encoder-lr-scale"),
    (["--finetune-steps", "0"], "--finetune-steps"),
    (["--seed", "-2"], "--seed"),
    (["--train-size", "3", "--classes", "4"], "--train-size"),
    (["--data", "/nonexistent/modelnet40"], "--data"),
    (["--batch-size", "1"], "--batch-size must be at least 2"),  # a traceback at PointNet's first step
])
def test_demo_bad_arguments(argv, message, capsys):
    rc = cli.main(["demo", "gpe", "--quick", "--no-progress", "--no-png", *argv])
    _, err = capsys.readouterr()
    assert rc == 2 and err.startswith("error: ") and message in err


def test_demo_bad_data_and_png_paths(tmp_path, capsys):
    data = tmp_path / "modelnet"
    data.mkdir()
    _write_modelnet(data, points=16)
    rc = cli.main(["demo", "gpe", "--quick", "--no-progress", "--no-png", "--data", str(data), "--points", "64"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--data" in err and "num_points" in err
    rc = cli.main(["demo", "gpe", "--quick", "--no-progress", "--data", str(tmp_path), "--no-png"])
    _, err = capsys.readouterr()
    assert rc == 2 and "--data" in err and "shape_names.txt" in err
    rc = cli.main(["demo", "gpe", "--quick", "--no-progress", "--png", str(tmp_path)])
    _, err = capsys.readouterr()
    assert rc == 2 and "--png" in err
    with pytest.raises(SystemExit):
        cli.main(["demo", "gpe", "--steps", "many"])


def _parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    gpe.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("flags", [["--classes", "12"], ["--train-size", "3"], ["--test-size", "1"],
                                   ["--classes", "12", "--train-size", "3", "--test-size", "1"]])
def test_synthetic_sizes_with_data_are_refused(flags, tmp_path, capsys, monkeypatch):
    """They size SyntheticShapes only: with --data they were ignored without a word."""
    monkeypatch.setattr(gpe, "run_demo", lambda cfg: pytest.fail("ran with options it ignores"))
    rc = cli.main(["demo", "gpe", "--quick", "--no-progress", "--no-png", "--data", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "apply to the synthetic data, not --data" in err
    assert all(flag in err for flag in flags if flag.startswith("--"))


def test_quick_with_data_shortens_training_and_keeps_the_splits(tmp_path):
    """--quick stays allowed with --data: it shortens training; its data sizes apply to
    SyntheticShapes only (ModelNet40's splits are used whole)."""
    pytest.importorskip("h5py")
    cfg = gpe._settings(_parse(["--quick", "--no-png", "--data", str(tmp_path)]))
    assert cfg["data"] == str(tmp_path)
    assert all(cfg[k] == gpe.QUICK[k] for k in ("steps", "distill_steps", "finetune_steps", "points"))
    import argparse

    parser = argparse.ArgumentParser()
    gpe.add_arguments(parser)
    assert "with --data" in " ".join(parser.format_help().split())  # and the help says so


@pytest.mark.parametrize("argv, message", [
    (["--no-png", "--png", "x.png"], "--no-png and --png contradict"),
    (["--no-png", "--out", "somewhere"], "--no-png and --out contradict"),
    (["--png", "x.png", "--out", "somewhere"], "--png and --out both name where the PNG goes"),
    (["--png", ""], "--png must name a path"),  # "" wrote ./gpe_table.png
    (["--out", ""], "--out must name a path"),
])
def test_contradictory_png_options_are_refused(argv, message, tmp_path, capsys, monkeypatch):
    """--no-png silently won over --png (and --png over --out): the PNG asked for never came."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpe, "run_demo", lambda cfg: pytest.fail("ran with options it ignores"))
    rc = cli.main(["demo", "gpe", "--quick", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert not list(tmp_path.iterdir())


def test_table_is_printed_before_the_png_is_saved(tmp_path, capsys, monkeypatch):
    """run_demo drew the PNG before run() printed the table: a save that failed at the end
    (a full disk) lost the whole run's results. Now the table comes first and the exit is 1."""
    rows = [gpe.Row(name, 50.0, 1000, 2000, 1000, 1.0, 1024, "-") for name in gpe.ROW_NAMES]

    def fake_run_demo(cfg):  # run_demo's contract: it plots when cfg["png"] is set
        result = gpe.DemoResult(rows=rows, gap=0.0, dense_gap=0.0, png=None, seconds=1.0, stage_seconds={},
                                dataset="fake")
        if cfg["png"]:
            result.png = gpe.plot(result, cfg["png"])
        return result

    def disk_full(result, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gpe, "run_demo", fake_run_demo)
    monkeypatch.setattr(gpe, "plot", disk_full)
    rc = cli.main(["demo", "gpe", "--quick", "--no-progress", "--png", str(tmp_path / "t.png")])
    captured = capsys.readouterr()
    assert rc == 1 and set(_table_lines(captured.out)) == set(gpe.ROW_NAMES)
    assert "No space left on device" in captured.err and "wrote" not in captured.out


def test_eager_dense_computes_the_fused_function_and_restores_the_model():
    torch.manual_seed(0)
    model = GaussianPointNet(num_classes=4, num_gaussians=5, out_channels=16).eval()
    x = torch.rand(3, 40, 3) * 2 - 1
    with torch.no_grad():
        fused = model(x)
        with gpe.eager_dense(model) as same:
            assert same is model
            assert all("forward" in vars(e) for e in model.gaussian_encoders())
            dense = model(x)
        assert all("forward" not in vars(e) for e in model.gaussian_encoders())
    torch.testing.assert_close(dense, fused, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- fine-tuning helpers (lucidops.train.finetune)


def test_finetune_picks_distinct_points_and_cosine_rates():
    from lucidops.train import finetuning
    gen = torch.Generator().manual_seed(0)
    for n, count in [(64, 64), (64, 17), (1, 1)]:
        idx = finetuning._pick_points(n, count, gen)
        assert idx.shape == (count,) and len(set(idx.tolist())) == count and 0 <= idx.min() and idx.max() < n
    idx = finetuning._pick_points(5, 12, gen)  # fewer points than asked: with replacement
    assert idx.shape == (12,) and set(idx.tolist()) <= set(range(5))

    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [w], "lr": 0.5}, {"params": [nn.Parameter(torch.zeros(1))], "lr": 0.1}])
    base = [[0.5, 0.1]]
    rates = []
    for step in range(5):
        finetuning._set_cosine_rates([opt], base, step, 5)
        rates.append([g["lr"] for g in opt.param_groups])
    assert rates[0] == pytest.approx([0.5, 0.1]) and rates[-1] == pytest.approx([0.01, 0.002])
    assert rates[2] == pytest.approx([0.5 * 0.51, 0.1 * 0.51])  # the half-way point: (1 + 0.02) / 2
    assert all(a[0] > b[0] for a, b in zip(rates, rates[1:]))  # strictly decreasing


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_finetune_schedules_train(schedule):
    from lucidops.train import finetune

    torch.manual_seed(0)
    model = GaussianPointNet(num_classes=2, num_gaussians=4, out_channels=16, tnet_gaussians=3)
    g = torch.Generator().manual_seed(1)
    # Two classes that differ in extent: a learnable task, so the loss must fall.
    data = [((torch.rand(24, 3, generator=g) * 2 - 1) * (0.3 + 0.7 * (i % 2)), i % 2) for i in range(16)]
    res = finetune(model, data, steps=40, lr=5e-3, batch_size=8, points_per_cloud=24, encoder_lr_scale=0.1,
                   schedule=schedule, seed=0, progress=False)
    assert res.steps == 40 and all(math.isfinite(v) for v in res.losses)
    assert np.mean(res.losses[-10:]) < np.mean(res.losses[:10])
    with pytest.raises(ValueError, match="schedule"):
        finetune(model, data, steps=1, schedule="linear", progress=False)
