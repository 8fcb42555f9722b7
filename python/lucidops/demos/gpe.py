"""``lucidops demo gpe``: the 3D Gaussian point encoder's Table 1 (arXiv:2511.04797), reproduced small.

Steps (methods.md section 1):

1. data: ``SyntheticShapes`` train and test splits (deterministic by ``--seed``; the test
   split uses its own seed, so the two never share a cloud), or ModelNet40 with ``--data``;
2. train ``PointNet`` (the teacher, with input and feature T-Nets) and ``PointNet`` without
   the feature transform, with AdamW and a cosine schedule;
3. distil a Gaussian PointNet from the PointNet without feature transform (a per-point
   student cannot know the feature transform a feature T-Net computes from the whole
   cloud) with :func:`lucidops.train.distill_pointnet`: Gaussian T-Net, then the main
   encoder on T-Net-transformed points, uniform random points in the clouds' bounding
   cubes, L1 loss; then fine-tune it end to end on the
   training split (:func:`lucidops.train.finetune`, the Gaussian encoders' rates times
   ``--encoder-lr-scale``: 0.1 by default; the paper's 1/100 learnt less in this short run;
   a cosine schedule by default, as the PointNets get: constant rates ended ~5 points lower);
4. measure four rows: test accuracy (each row evaluated, the culled row too), parameters,
   FLOPs (torch's FlopCounterMode, 2 per multiply-add, and fvcore, 1 per multiply-add),
   CPU latency and the activation memory a forward saves for backward
   (:func:`lucidops.profile.report`), for one cloud of ``--profile-points`` points.

The rows: PointNet; PointNet without feature transform; the Gaussian PointNet run densely
in eager PyTorch, (N, G) and (N, K) materialised as the authors' code does
(:func:`eager_dense`); the same model on the default
fused backend (``cpp`` on the CPU) with box culling at ``--cull-threshold`` on its encoders.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from .. import _optional
from ._png import png_path_problem, save_png

DESCRIPTION = "3D Gaussian point encoders: train PointNet, distil a Gaussian PointNet, print/plot the paper's Table 1"

# Default settings (chosen to finish in under 10 minutes on 2 CPU cores) and --quick's.
DEFAULTS: Dict[str, Any] = dict(
    classes=10, points=64, train_size=1000, test_size=2000, steps=400, batch_size=32, lr=2e-3,
    gaussians=32, tnet_steps=1000, distill_steps=2500, distill_batch=16, distill_points=128, distill_lr=3e-3,
    finetune_steps=1500, finetune_lr=1e-3, encoder_lr_scale=0.1, finetune_schedule="cosine", cull_threshold=0.1,
    profile_points=1024, repeat=10,
)
QUICK: Dict[str, Any] = dict(
    classes=4, points=48, train_size=40, test_size=24, steps=3, batch_size=6, gaussians=8, tnet_steps=3,
    distill_steps=3, distill_batch=4, distill_points=32, finetune_steps=3, profile_points=96, repeat=2,
)

ROW_NAMES = ("PointNet", "PointNet, no feature transform", "Gaussian encoder, dense (eager PyTorch)",
             "Gaussian encoder, fused + culled")


class DemoError(ValueError):
    """A bad demo argument (printed as ``error: ...``, exit status 2)."""


@dataclass
class Row:
    """One line of the table: what was measured for one model."""

    name: str
    accuracy: float          # test accuracy, percent
    params: int
    flops: int               # torch FlopCounterMode, 2 per multiply-add, forward
    fvcore_flops: Optional[int]  # fvcore, 1 per multiply-add, forward (None when it cannot trace)
    latency_ms: float        # median CPU forward latency for one cloud
    saved_bytes: int         # activation bytes one forward saves for backward
    backend: str             # which lucidops backend ran the Gaussian op ("-" for PointNet)


@dataclass
class DemoResult:
    """Everything :func:`run_demo` produced (the models and test data too, for checking)."""

    rows: List[Row]
    gap: float               # PointNet accuracy minus the fused+culled Gaussian model's, points
    dense_gap: float         # PointNet accuracy minus the dense Gaussian model's, points
    png: Optional[str]
    seconds: float
    stage_seconds: Dict[str, float]
    dataset: str
    models: Dict[str, Any] = field(default_factory=dict)
    test: Tuple[Any, Any] = (None, None)
    cull_threshold: float = 0.1
    cpu_seconds: float = 0.0  # CPU time of this process (all its threads)
    stage_cpu_seconds: Dict[str, float] = field(default_factory=dict)
    distilled_accuracy: float = math.nan  # the Gaussian model's accuracy before fine-tuning


# ---------------------------------------------------------------- arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    d = DEFAULTS
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the models and training (default 0)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="a ModelNet40 folder in PointNet's ply_hdf5_2048 layout (default: SyntheticShapes)")
    parser.add_argument("--classes", type=int, default=None,
                        help=f"SyntheticShapes classes, at most 12 (default {d['classes']})")
    parser.add_argument("--points", type=int, default=None,
                        help=f"points per cloud for training and testing (default {d['points']})")
    parser.add_argument("--train-size", type=int, default=None,
                        help=f"SyntheticShapes training clouds (default {d['train_size']})")
    parser.add_argument("--test-size", type=int, default=None,
                        help=f"SyntheticShapes test clouds (default {d['test_size']})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps of each PointNet (default {d['steps']})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"clouds per training step (default {d['batch_size']})")
    parser.add_argument("--lr", type=float, default=None, help=f"PointNet learning rate (default {d['lr']:g})")
    parser.add_argument("--gaussians", type=int, default=None, help=f"Gaussians per encoder (default {d['gaussians']})")
    parser.add_argument("--tnet-steps", type=int, default=None,
                        help=f"distillation steps of the Gaussian T-Net (default {d['tnet_steps']})")
    parser.add_argument("--distill-steps", type=int, default=None,
                        help=f"distillation steps of the main encoder (default {d['distill_steps']})")
    parser.add_argument("--distill-batch", type=int, default=None,
                        help=f"clouds per distillation step (default {d['distill_batch']})")
    parser.add_argument("--distill-points", type=int, default=None,
                        help=f"uniform points per cloud and distillation step (default {d['distill_points']})")
    parser.add_argument("--distill-lr", type=float, default=None,
                        help=f"distillation AdamW learning rate (default {d['distill_lr']:g})")
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help=f"end-to-end fine-tuning steps of the Gaussian model (default {d['finetune_steps']})")
    parser.add_argument("--finetune-lr", type=float, default=None,
                        help=f"fine-tuning learning rate (default {d['finetune_lr']:g})")
    parser.add_argument("--encoder-lr-scale", type=float, default=None,
                        help=f"fine-tuning rate factor of the Gaussian encoders (default {d['encoder_lr_scale']:g}; "
                             "the paper uses 0.01)")
    parser.add_argument("--finetune-schedule", choices=("cosine", "constant"), default=None,
                        help=f"fine-tuning learning-rate schedule (default {d['finetune_schedule']})")
    parser.add_argument("--cull-threshold", type=float, default=None,
                        help=f"culling threshold t of the fused row (default {d['cull_threshold']:g})")
    parser.add_argument("--profile-points", type=int, default=None,
                        help=f"points of the cloud the latency/FLOPs/memory are measured on (default {d['profile_points']})")
    parser.add_argument("--repeat", type=int, default=None, help=f"timed runs per latency (default {d['repeat']})")
    parser.add_argument("--quick", action="store_true",
                        help="tiny settings for a smoke test (seconds, not minutes): few training steps, small "
                             "models, few points per cloud; with --data the ModelNet40 splits are used whole (every "
                             "cloud, cut to --points), with the same tiny settings")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="folder for the PNG, made if missing (default: the current folder)")
    parser.add_argument("--png", default=None, metavar="PATH",
                        help="the PNG's path, instead of --out (default: OUT/gpe_table.png)")
    parser.add_argument("--no-png", action="store_true", help="do not write the PNG (not with --out or --png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Defaults, then --quick's, then explicit options; validated (DemoError names the flag)."""
    cfg = dict(DEFAULTS)
    if getattr(args, "quick", False):
        cfg.update(QUICK)
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = value
    ints = ("classes", "points", "train_size", "test_size", "steps", "batch_size", "gaussians", "tnet_steps",
            "distill_steps", "distill_batch", "distill_points", "finetune_steps", "profile_points", "repeat")
    for key in ints:
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DemoError(f"--{key.replace('_', '-')} must be an int >= 1, got {v!r}")
    if cfg["batch_size"] < 2:  # said now: PointNet's first training step failed with a traceback
        raise DemoError(f"--batch-size must be at least 2 (PointNet's BatchNorm layers need 2 clouds per batch), "
                        f"got {cfg['batch_size']}")
    for key in ("lr", "distill_lr", "finetune_lr", "encoder_lr_scale", "cull_threshold"):
        v = cfg[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise DemoError(f"--{key.replace('_', '-')} must be a finite number > 0, got {v!r}")
    from ..data import SHAPES

    # --classes, --train-size and --test-size size the SyntheticShapes splits: ModelNet40 has its
    # own classes and splits, and a run that ignored them showed a table of something else.
    synthetic_only = [f"--{key.replace('_', '-')}" for key in ("classes", "train_size", "test_size")
                      if getattr(args, key, None) is not None]
    if args.data is not None and synthetic_only:
        raise DemoError(f"{', '.join(synthetic_only)} apply to the synthetic data, not --data (ModelNet40 "
                        "has its own classes and splits)")
    if args.data is None and cfg["classes"] > len(SHAPES):
        raise DemoError(f"--classes must be at most {len(SHAPES)} (the SyntheticShapes shapes), got {cfg['classes']}")
    if args.data is None and cfg["classes"] > cfg["train_size"]:
        raise DemoError(f"--train-size ({cfg['train_size']}) must be at least --classes ({cfg['classes']})")
    seed = getattr(args, "seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DemoError(f"--seed must be an int >= 0, got {seed!r}")
    cfg["seed"] = seed
    cfg["data"] = args.data
    cfg["progress"] = not getattr(args, "no_progress", False)
    png, out = getattr(args, "png", None), getattr(args, "out", None)
    # Contradictory PNG options were resolved silently (--no-png won over --png, --png over --out).
    if getattr(args, "no_png", False) and (png is not None or out is not None):
        raise DemoError(f"--no-png and {'--png' if png is not None else '--out'} contradict each other: give one")
    if png is not None and out is not None:
        raise DemoError("--png and --out both name where the PNG goes: give one")
    for flag, path in (("--png", png), ("--out", out)):
        if path is not None and not str(path).strip():  # "" wrote ./gpe_table.png
            raise DemoError(f"{flag} must name a path, got an empty string")
    if getattr(args, "no_png", False):
        cfg["png"] = None
    else:
        cfg["png"] = png if png is not None else os.path.join(out if out is not None else ".", "gpe_table.png")
        problem = png_path_problem(cfg["png"])  # said now, not after minutes of training
        if problem:
            raise DemoError(f"--{'png' if png else 'out'}: {problem}")
        no_plotting = _optional.missing("matplotlib", "the PNG (default on; --no-png skips it)")
        if no_plotting:
            raise DemoError(no_plotting)
    if args.data is not None:
        no_h5py = _optional.missing("h5py", "--data (ModelNet40's HDF5 files)")
        if no_h5py:
            raise DemoError(no_h5py)
    return cfg


# ---------------------------------------------------------------- data


def _stack(dataset, desc: str, progress: bool):
    """A dataset of (points (N, 3), label) -> (points (M, N, 3) float32, labels (M,) int64)."""
    import torch
    from tqdm.auto import tqdm

    pts, labels = [], []
    for i in tqdm(range(len(dataset)), desc=desc, disable=not progress, dynamic_ncols=True, leave=False):
        p, y = dataset[i]
        pts.append(p)
        labels.append(int(y))
    return torch.stack(pts).float(), torch.tensor(labels, dtype=torch.int64)


def load_data(cfg: Dict[str, Any]):
    """-> (train points, train labels, test points, test labels, number of classes, dataset description)."""
    from ..data import ModelNet40, SyntheticShapes

    train: Union[ModelNet40, SyntheticShapes]
    test: Union[ModelNet40, SyntheticShapes]
    progress = cfg["progress"]
    if cfg["data"] is not None:
        root = cfg["data"]
        if not os.path.isdir(root):
            raise DemoError(f"--data: {root!r} is not a folder (expected a ModelNet40 ply_hdf5_2048 folder)")
        try:
            train = ModelNet40(root, "train", num_points=cfg["points"])
            test = ModelNet40(root, "test", num_points=cfg["points"])
        except (FileNotFoundError, ValueError) as err:
            raise DemoError(f"--data: {err}") from err
        if len(train) == 0 or len(test) == 0:
            raise DemoError(f"--data: {root!r} has an empty train or test split")
        xtr, ytr = _stack(train, "loading ModelNet40 train", progress)
        xte, yte = _stack(test, "loading ModelNet40 test", progress)
        return xtr, ytr, xte, yte, train.num_classes, f"ModelNet40 ({root}: {len(train)} train, {len(test)} test)"
    seed, k = cfg["seed"], cfg["classes"]
    # Separate seeds for the two splits: the same (seed, index) would give the same cloud.
    train = SyntheticShapes(cfg["train_size"], num_points=cfg["points"], num_classes=k, seed=2 * seed)
    test = SyntheticShapes(cfg["test_size"], num_points=cfg["points"], num_classes=k, seed=2 * seed + 1)
    xtr, ytr = _stack(train, "generating train clouds", progress)
    xte, yte = _stack(test, "generating test clouds", progress)
    return xtr, ytr, xte, yte, k, f"SyntheticShapes ({k} classes, {len(train)} train, {len(test)} test)"


# ---------------------------------------------------------------- training and evaluation


def train_pointnet(model, points, labels, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool,
                   desc: str = "train PointNet") -> List[float]:
    """Train ``model`` (a PointNet) in place: AdamW, cosine schedule, cross-entropy plus the
    feature-transform regulariser (weight 0.001, as the paper). Returns the step losses."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.02)
    losses: List[float] = []
    was_training = model.training
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, points.shape[0], (batch_size,), generator=gen)
        logits, _, trans_feat = model(_augment(points[idx], gen), return_transforms=True)
        loss = F.cross_entropy(logits, labels[idx]) + 0.001 * model.regularization_loss(trans_feat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(ce=f"{losses[-1]:.3f}")
    bar.close()
    model.train(was_training)
    return losses


def _augment(points, gen):
    """PointNet's training augmentation: random anisotropic scale in [0.8, 1.25] and jitter."""
    import torch

    scale = 0.8 + 0.45 * torch.rand(points.shape[0], 1, 3, generator=gen)
    noise = (0.01 * torch.randn(points.shape, generator=gen)).clamp(-0.05, 0.05)
    return points * scale + noise


class _Augmented:
    """A dataset view of (points, labels) tensors; each access draws a fresh augmentation
    from a generator seeded once, so a run is deterministic given its access order."""

    def __init__(self, points, labels, seed: int):
        import torch

        self.points, self.labels = points, labels
        self.gen = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.points.shape[0])

    def __getitem__(self, i: int):
        return _augment(self.points[i:i + 1], self.gen)[0], self.labels[i]


def evaluate(model, points, labels, batch_size: int = 64) -> float:
    """Test accuracy of ``model`` (points (B, N, 3) -> logits) in percent, in eval mode
    (its train/eval flag is restored), under whatever backend and culling are set."""
    import torch

    if points.shape[0] != labels.shape[0] or points.shape[0] == 0:
        raise ValueError(f"points ({points.shape[0]}) and labels ({labels.shape[0]}) must be non-empty and match")
    was_training = model.training
    model.eval()
    correct = 0
    try:
        with torch.no_grad():
            for i in range(0, points.shape[0], batch_size):
                pred = model(points[i:i + batch_size]).argmax(dim=1)
                correct += int((pred == labels[i:i + batch_size]).sum())
    finally:
        model.train(was_training)
    return 100.0 * correct / points.shape[0]


@contextlib.contextmanager
def eager_dense(model):
    """Run every Gaussian encoder of ``model`` the way the authors' code does: phi (N, G) and
    the mixed features (N, K) materialised by plain PyTorch ops under autograd, then the max
    (no custom op, no culling). The function is the fused op's; the memory and time are not."""
    from ..nn.gaussian_mixture import GaussianPointEncoder
    from ..reference.gaussian_mixture import gaussian_phi

    def dense_forward(enc):
        def forward(points):
            mixed = enc.mixer(gaussian_phi(points, enc.means, enc.precisions()).to(points.dtype))
            return mixed if enc.reduce == "none" else mixed.amax(dim=-2)
        return forward

    encoders = [m for m in model.modules() if isinstance(m, GaussianPointEncoder)]
    for enc in encoders:
        enc.forward = dense_forward(enc)  # an instance attribute shadows the class's forward
    try:
        yield model
    finally:
        for enc in encoders:
            del enc.forward


def _profile_row(name: str, model, accuracy: float, cloud, repeat: int, backend: str) -> Row:
    from .. import profile

    rep = profile.report(model, cloud, repeat=repeat, warmup=min(2, repeat), depth=0, name=name)
    return Row(name=name, accuracy=accuracy, params=rep.params, flops=rep.flops, fvcore_flops=rep.fvcore_flops,
               latency_ms=rep.latency_s * 1e3, saved_bytes=rep.peak_memory_bytes or 0, backend=backend)


# ---------------------------------------------------------------- the demo


def run_demo(cfg: Dict[str, Any]) -> DemoResult:
    """Run the whole demo with validated settings (see :func:`_settings`); print nothing but bars."""
    import torch

    from .. import backends, profile, train
    from ..models import PointNet
    from ..nn import GaussianPointNet

    start, cpu_start = time.perf_counter(), time.process_time()
    stages: Dict[str, float] = {}
    cpu: Dict[str, float] = {}
    cpu_mark = [cpu_start]

    def lap(name: str, t0: float) -> float:
        now, now_cpu = time.perf_counter(), time.process_time()
        stages[name] = now - t0
        cpu[name] = now_cpu - cpu_mark[0]
        cpu_mark[0] = now_cpu
        return now

    t = time.perf_counter()
    xtr, ytr, xte, yte, num_classes, dataset = load_data(cfg)
    t = lap("data", t)
    seed, progress = cfg["seed"], cfg["progress"]
    common = dict(steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"], progress=progress)

    torch.manual_seed(seed)
    pointnet = PointNet(num_classes, feature_transform=True)
    train_pointnet(pointnet, xtr, ytr, seed=seed + 1, desc="train PointNet", **common)
    pointnet.eval()
    t = lap("train PointNet", t)
    torch.manual_seed(seed + 100)
    vanilla = PointNet(num_classes, feature_transform=False)
    train_pointnet(vanilla, xtr, ytr, seed=seed + 2, desc="train PointNet (no feature transform)", **common)
    vanilla.eval()
    t = lap("train PointNet, no feature transform", t)

    torch.manual_seed(seed + 200)
    # The teacher is the PointNet without feature transform: a per-point student cannot know the
    # 64x64 feature transform a feature T-Net computes from the whole cloud (the input T-Net is
    # kept: the Gaussian T-Net distilled from it supplies that transform).
    distilled = train.distill_pointnet(
        vanilla, xtr, num_gaussians=cfg["gaussians"], steps=cfg["distill_steps"], tnet_steps=cfg["tnet_steps"],
        batch_size=cfg["distill_batch"], points_per_cloud=cfg["distill_points"], lr=cfg["distill_lr"],
        seed=seed + 3, progress=progress)
    t = lap("distil", t)
    gmodel = GaussianPointNet.from_distilled(distilled)
    acc_distilled = evaluate(gmodel, xte, yte)
    train.finetune(gmodel, _Augmented(xtr, ytr, seed + 4), steps=cfg["finetune_steps"], lr=cfg["finetune_lr"],
                   encoder_lr_scale=cfg["encoder_lr_scale"], schedule=cfg["finetune_schedule"],
                   batch_size=cfg["batch_size"], points_per_cloud=xtr.shape[1], seed=seed + 5, progress=progress)
    gmodel.eval()
    t = lap("fine-tune", t)

    culled = copy.deepcopy(gmodel)
    culled.set_cull_threshold(cfg["cull_threshold"])
    acc = {"pointnet": evaluate(pointnet, xte, yte), "vanilla": evaluate(vanilla, xte, yte)}
    with eager_dense(gmodel):
        acc["dense"] = evaluate(gmodel, xte, yte)
    acc["culled"] = evaluate(culled, xte, yte)  # measured with culling on, on the default backend
    fused_backend = backends.last_used("gaussian_mixture") or "?"
    t = lap("evaluate", t)

    # The profiled cloud: a test cloud resampled (with replacement) to --profile-points points.
    pick = torch.randint(0, xte.shape[1], (cfg["profile_points"],), generator=torch.Generator().manual_seed(seed))
    cloud = xte[0][pick].unsqueeze(0)
    rows = [
        _profile_row(ROW_NAMES[0], pointnet, acc["pointnet"], cloud, cfg["repeat"], "-"),
        _profile_row(ROW_NAMES[1], vanilla, acc["vanilla"], cloud, cfg["repeat"], "-"),
    ]
    with eager_dense(gmodel):
        dense = _profile_row(ROW_NAMES[2], gmodel, acc["dense"], cloud, cfg["repeat"], "eager")
    # FLOPs of the same function counted as the fused rows are (the op's formula): torch's
    # counter skips the dense run's elementwise phi (23 FLOPs per point-Gaussian pair), which
    # made the dense encoder look cheaper than the fused one.
    same_function = profile.report(gmodel, cloud, repeat=1, warmup=0, depth=0)
    dense.flops, dense.fvcore_flops = same_function.flops, same_function.fvcore_flops
    rows.append(dense)
    rows.append(_profile_row(ROW_NAMES[3] + f" (t={cfg['cull_threshold']:g})", culled, acc["culled"], cloud,
                             cfg["repeat"], fused_backend))
    lap("profile", t)

    result = DemoResult(rows=rows, gap=acc["pointnet"] - acc["culled"], dense_gap=acc["pointnet"] - acc["dense"],
                        png=None, seconds=0.0, stage_seconds=stages, dataset=dataset,
                        models={"pointnet": pointnet, "vanilla": vanilla, "gaussian": gmodel, "culled": culled},
                        test=(xte, yte), cull_threshold=cfg["cull_threshold"],
                        distilled_accuracy=acc_distilled, stage_cpu_seconds=cpu)
    if cfg["png"]:
        result.png = plot(result, cfg["png"])
    result.seconds = time.perf_counter() - start
    result.cpu_seconds = time.process_time() - cpu_start
    return result


def _fmt_count(n: Optional[float], unit: str = "") -> str:
    if n is None:
        return "n/a"
    for suffix, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3f}{suffix}{unit}"
    return f"{n:g}{unit}"


HEADER = ("model", "test acc %", "params", "FLOPs (torch, 2/MAC)", "FLOPs (fvcore, 1/MAC)", "CPU latency ms",
          "saved-for-backward MiB", "backend")


def table_rows(result: DemoResult) -> List[Tuple[str, ...]]:
    """The table's cells as strings, in :data:`HEADER` order."""
    return [(r.name, f"{r.accuracy:.2f}", f"{r.params / 1e6:.3f}M", _fmt_count(r.flops), _fmt_count(r.fvcore_flops),
             f"{r.latency_ms:.3f}", f"{r.saved_bytes / 2 ** 20:.3f}", r.backend) for r in result.rows]


def format_table(result: DemoResult, cfg: Optional[Dict[str, Any]] = None) -> str:
    """The printed report: the table, the accuracy gap and what each column means."""
    cells = [HEADER] + table_rows(result)
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    line = lambda c: "  ".join(s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in enumerate(zip(c, widths)))  # noqa: E731
    out = [f"lucidops demo gpe: {result.dataset}", line(HEADER), "  ".join("-" * w for w in widths)]
    out += [line(c) for c in cells[1:]]
    pts = cfg["profile_points"] if cfg else "?"
    out += [
        "",
        f"accuracy gap, PointNet - Gaussian (fused + culled): {result.gap:+.2f} points "
        f"(dense Gaussian: {result.dense_gap:+.2f})",
        f"FLOPs, latency and memory: forward of one cloud of {pts} points on the CPU (latency: median); "
        "FLOPs of the dense and culled rows are the fused op's count of the dense work (torch's counter "
        "skips the dense run's elementwise phi; culling skips work, the formula does not);",
        "memory: bytes of the activations a forward saves for backward (lucidops.profile.report on the CPU), "
        "not a peak allocation.",
    ]
    return "\n".join(out)


def plot(result: DemoResult, path: str) -> str:
    """Bar charts of accuracy, FLOPs, latency and memory, and the table, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = ["PointNet", "PointNet\nno FT", "Gaussian\ndense", "Gaussian\nfused+culled"]
    colors = ["#4c72b0", "#8172b2", "#dd8452", "#55a868"]
    fvcore = [r.fvcore_flops if r.fvcore_flops is not None else 0 for r in result.rows]
    panels = [("test accuracy (%)", [r.accuracy for r in result.rows]),
              ("MFLOPs (fvcore, 1/MAC)", [f / 1e6 for f in fvcore]),
              ("CPU latency (ms)", [r.latency_ms for r in result.rows]),
              ("saved for backward (MiB)", [r.saved_bytes / 2 ** 20 for r in result.rows])]
    fig = plt.figure(figsize=(15, 7.5))
    grid = fig.add_gridspec(2, 4, height_ratios=[3, 1.4])
    for i, (title, values) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        bars = ax.bar(range(4), values, color=colors)
        ax.set_xticks(range(4))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_title(title, fontsize=10)
        for b, v in zip(bars, values):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=8)
        if i == 0:
            lo = min(values)
            ax.set_ylim(max(0.0, lo - 10), 100)
    ax = fig.add_subplot(grid[1, :])
    ax.axis("off")
    tab = ax.table(cellText=[list(r) for r in table_rows(result)], colLabels=list(HEADER), loc="center",
                   colWidths=[0.23] + [0.11] * (len(HEADER) - 1))
    tab.auto_set_font_size(False)
    tab.set_fontsize(8)
    tab.scale(1, 1.3)
    fig.suptitle(f"lucidops demo gpe: {result.dataset}; accuracy gap PointNet - Gaussian (culled) "
                 f"{result.gap:+.2f} points", fontsize=11)
    fig.tight_layout()
    return save_png(fig, path)


def run(args: argparse.Namespace) -> int:
    """``lucidops demo gpe``: exit status 0, or 2 with ``error: ...`` on bad arguments."""
    import torch

    try:
        cfg = _settings(args)
        # The PNG is drawn below, after the table is printed: a save that fails (the path is
        # checked up front, but a disk can fill up) then loses no result.
        result = run_demo(dict(cfg, png=None))
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(result, cfg))
    stages = ", ".join(f"{k} {v:.0f}s (CPU {result.stage_cpu_seconds.get(k, 0):.0f}s)"
                       for k, v in result.stage_seconds.items())
    print(f"Gaussian accuracy after distillation alone (before fine-tuning): {result.distilled_accuracy:.2f}%")
    print(f"wall-clock {result.seconds:.1f} s ({stages}); CPU time {result.cpu_seconds:.1f} s "
          f"on {torch.get_num_threads()} threads", flush=True)
    if cfg["png"]:
        try:
            result.png = plot(result, cfg["png"])
        except OSError as err:
            print(f"error: could not write the PNG {cfg['png']!r}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {result.png}")
    return 0


__all__ = ["DESCRIPTION", "add_arguments", "run", "run_demo", "evaluate", "train_pointnet", "load_data", "plot",
           "format_table", "DemoResult", "Row", "DemoError", "DEFAULTS", "QUICK"]
