"""Gaussian point encoder mixture: the fused kernels against dense PyTorch.

B = 16 clouds, N = 2048 points, G = 32 Gaussians, K = 1024 channels, float32 (B = 2,
N = 256, K = 128 in the short run). Three parameter sets:

- "synthetic std 0.5" (with all baselines): ``GaussianPointEncoder`` means, L = 2 x its
  near-identity init (Gaussian std ~0.5), mixer weights N(0, 1); points uniform in [-1, 1]^3.
- "synthetic std 0.2": the same with L = 5 x init.
- "distilled": the Gaussians of each ``bench/gaussian_trained*.pt``, a ``GaussianPointEncoder``
  briefly distilled from a briefly trained PointNet by ``bench/make_gaussian_trained.py``
  (step counts, final L1 and any spread penalty in the row label), on ``SyntheticShapes``
  clouds (shape surfaces, as at inference) rather than uniform points. Skipped when no file
  is there.

Baselines: ``eager dense`` is the paper's formulation (phi (B, N, G) materialised, a
Linear to (B, N, K), then max); ``lucidops[reference]`` is the op's reference backend.
Beside the op, the first case times two whole classifiers (eval mode, 40 classes, random
weights: the cost does not depend on training) on the same points: ``lucidops.models.PointNet``
without feature transform (the issue's baseline, cuDNN convolutions on a GPU, run with TF32
off so that it computes in float32 like the kernels; on CUDA a second row has PyTorch's default,
TF32 convolutions) and
``lucidops.nn.GaussianPointNet`` (Gaussian T-Net, encoder and head, on the default backend);
every forward row of that case gets its speed-up against PointNet, and on CUDA the peak
allocation of one forward above its inputs and its ratio to PointNet's.
Rows report time, the speedup against eager dense, the relative error against a float64
evaluation, the culled kernel's speedup against the same kernel unculled, and for
forward+backward the bytes autograd saves for the backward beyond the inputs
(:func:`lucidops.profile.report.saved_bytes`) and their ratio to eager dense's (the
reference backend runs inside the same custom op, so it too saves only the arg-max).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

import lucidops
from lucidops import backends
from lucidops.nn.gaussian_mixture import GaussianPointEncoder
from lucidops.profile.report import saved_bytes
from lucidops.reference import gaussian_mixture as ref

from .timing import measure_interleaved_ms, peak_mb_above, report_failure

CULL_THRESHOLD = 0.1
POINTNET = "PointNet (no feature transform), whole model"
POINTNET_TF32 = f"{POINTNET}, cuDNN TF32"
TRAINED = Path(__file__).with_name("gaussian_trained.pt")


def _eager_dense(points, means, precisions, weight, bias):
    phi = ref.gaussian_phi(points, means, precisions)
    return torch.nn.functional.linear(phi, weight, bias).amax(dim=-2)


def _params(G: int, K: int, factor_scale: float, device: str):
    torch.manual_seed(0)
    enc = GaussianPointEncoder(G, K).to(device)
    with torch.no_grad():  # stand-in for a trained encoder: narrower Gaussians, O(1) mixer weights
        enc.factor.mul_(factor_scale)
        enc.mixer.weight.normal_(0.0, 1.0)
    return enc.means.detach(), enc.precisions().detach(), enc.mixer.weight.detach(), enc.mixer.bias.detach()


def _trained_params(K: int, device: str) -> List[Tuple[Tuple[torch.Tensor, ...], str]]:
    """Each ``gaussian_trained*.pt``'s distilled parameters (first K channels) and a label."""
    found = []
    for path in sorted(TRAINED.parent.glob(TRAINED.stem + "*.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        p, meta = saved["params"], saved["meta"]
        params = (p["means"], p["precisions"], p["weight"][:K].contiguous(), p["bias"][:K].contiguous())
        penalty = meta.get("spread_penalty", 0.0)
        label = (f"distilled Gaussians (PointNet teacher {meta['teacher_steps']} steps, distilled "
                 f"{meta['distill_steps']} steps, L1 {meta['distill_l1_final']:.3f}"
                 + (f", spread penalty {penalty:g}" if penalty else "") + "), SyntheticShapes clouds")
        found.append((tuple(t.to(device) for t in params), label))
    return found


def _shape_clouds(B: int, N: int, device: str) -> torch.Tensor:
    from lucidops.data import SyntheticShapes

    data = SyntheticShapes(B, num_points=N, seed=1)
    return torch.stack([data[i][0] for i in range(B)]).float().to(device)


def _whole_models(device: str) -> Dict[str, Callable]:
    """The classifiers compared with the op (forward only, eval mode), keyed by row name."""
    from lucidops.models import PointNet
    from lucidops.nn import GaussianPointNet

    torch.manual_seed(0)
    pointnet = PointNet(40, feature_transform=False).to(device).eval()
    gaussian = GaussianPointNet(40).to(device).eval()
    backend = backends.select("gaussian_mixture", device)
    models = {POINTNET: lambda p, *_: _without_tf32(pointnet, p),
              f"GaussianPointNet, whole model (lucidops[{backend}])": lambda p, *_: gaussian(p)}
    if device == "cuda":  # PyTorch's default: cuDNN convolutions in TF32 (10-bit mantissas)
        models[POINTNET_TF32] = lambda p, *_: pointnet(p)
    return models


def _without_tf32(model, points):
    """model(points) with cuDNN's TF32 convolutions off: float32 like the mixture kernels
    (IEEE dots) and the eager baseline (cuBLAS keeps TF32 off by default)."""
    flags = torch.backends.cudnn
    before = flags.allow_tf32
    flags.allow_tf32 = False
    try:
        return model(points)
    finally:
        flags.allow_tf32 = before


def _candidates(device: str, with_baselines: bool) -> Dict[str, Callable]:
    impls: Dict[str, Callable] = {}
    if with_baselines:
        impls["eager dense"] = _eager_dense
    for backend in backends.BACKENDS:
        if backend not in backends.registered_ops()["gaussian_mixture"].impls:
            continue
        if backend == "triton" and device == "cpu":
            continue  # the interpreter is a correctness tool
        if backend == "reference" and not with_baselines:
            continue
        if backends.backend_problem(backend, device) is not None:
            continue
        for cull in (None, CULL_THRESHOLD):
            if cull is not None and backend == "reference":
                continue  # the dense reference only masks: culling saves it nothing

            def fn(p, m, pr, w, b, _backend=backend, _cull=cull):
                with lucidops.use_backend(_backend):
                    return lucidops.ops.gaussian_mixture(p, m, pr, w, b, cull_threshold=_cull)

            impls[f"lucidops[{backend}]" + (f" cull t={cull}" if cull is not None else "")] = fn
    return impls


def run(device: str, quick: bool = False, on_rows: Optional[Callable[[List[Dict]], None]] = None) -> List[Dict]:
    """The rows of every case and mode; ``on_rows`` gets the rows so far after each of them."""
    B, N, G, K = (2, 256, 32, 128) if quick else (16, 2048, 32, 1024)
    uniform = torch.rand(B, N, 3, generator=torch.Generator().manual_seed(1)).to(device) * 2 - 1
    # (label, params, points, with baselines); std ~ 1 / factor_scale: the narrower, the more
    # whole tiles culling skips.
    cases = []
    for factor_scale, with_baselines in ((2.0, True), (5.0, False)):
        cases.append((f"synthetic Gaussian std {1 / factor_scale:.1f}, uniform points",
                      _params(G, K, factor_scale, device), uniform, with_baselines))
    trained = _trained_params(K, device)
    for params, label in trained:
        cases.append((label, params, _shape_clouds(B, N, device), False))
    if not trained:
        print(f"  gaussian: {TRAINED.name} missing (python -m lucidops.bench.make_gaussian_trained): no distilled rows")
    rows: List[Dict] = []
    for label, (means, prec, weight, bias), points, with_baselines in cases:
        expected = _eager_dense(points.double(), means.double(), prec.double(), weight.double(), bias.double())
        impls = _candidates(device, with_baselines)
        case = f"B={B} N={N} G={G} K={K} fp32, {label}"
        for mode in ("forward", "forward+backward"):
            saved: Dict[str, int] = {}
            first = len(rows)
            peak: Dict[str, float] = {}
            whole = _whole_models(device) if with_baselines and mode == "forward" else {}
            mode_impls = {**impls, **whole}
            steps: Dict[str, Callable[[], object]] = {}
            extras: Dict[str, Dict[str, object]] = {}
            for name, fn in mode_impls.items():
                # The first call and the memory probes inside the try: a failing candidate is
                # reported and left out, the others still run.
                try:
                    extra: Dict[str, object] = {}
                    if mode == "forward":
                        def forward_step(fn=fn):
                            with torch.no_grad():
                                return fn(points, means, prec, weight, bias)

                        out = forward_step()
                        if name not in whole:  # the whole models return logits, not the mixture
                            extra["rel_err_vs_fp64"] = ((out.double() - expected).norm() / expected.norm()).item()
                        mb = peak_mb_above(forward_step, device)
                        if mb is not None:
                            extra["peak_MB_above_inputs"] = peak[name] = mb
                        steps[name] = forward_step
                    else:
                        args = [t.clone().requires_grad_(True) for t in (points, means, prec, weight, bias)]
                        grad = torch.randn(B, K, device=device)

                        def train_step(fn=fn, args=args, grad=grad):
                            for a in args:
                                a.grad = None
                            fn(*args).backward(grad)

                        # Beyond the inputs, which the caller holds anyway.
                        saved[name] = saved_bytes(functools.partial(fn, *args), exclude=args)
                        extra["saved_bytes"] = saved[name]
                        steps[name] = train_step
                    extras[name] = extra
                except Exception as exc:
                    report_failure(f"gaussian {mode} {name}", exc)
            # Interleaved, so that the ratios hold on a busy host; 5 rounds, not 10: the dense
            # baselines' steps take up to seconds at the full size.
            times = measure_interleaved_ms(steps, device, warmup=1, rounds=3 if quick else 5,
                                           label=f"gaussian {mode} ")
            for name, ms in times.items():
                rows.append(dict(family="gaussian_mixture", case=case, mode=mode, impl=name, ms=ms, **extras[name]))
            cull_suffix = f" cull t={CULL_THRESHOLD}"
            for row in rows[first:]:
                for base, key in (("eager dense", "speedup_vs_eager"), ("lucidops[reference]", "speedup_vs_reference")):
                    if base in times:
                        row[key] = times[base] / row["ms"]
                if mode == "forward" and POINTNET in times:
                    row["speedup_vs_pointnet"] = times[POINTNET] / row["ms"]
                    if row["impl"] in peak and peak.get(POINTNET):
                        row["peak_vs_pointnet"] = peak[row["impl"]] / peak[POINTNET]
                # Every backend's culled row against the same backend unculled (cpp on the CPU,
                # triton and cuda on a GPU).
                unculled = row["impl"][:-len(cull_suffix)] if row["impl"].endswith(cull_suffix) else None
                if unculled in times:
                    row["speedup_vs_unculled"] = times[unculled] / row["ms"]
                # The reference backend runs inside the same custom op (it too keeps only the
                # arg-max), so the dense PyTorch encoder is the baseline for saved bytes.
                if row["impl"] in saved and saved.get("eager dense"):
                    row["saved_vs_eager"] = saved[row["impl"]] / saved["eager dense"]
            if on_rows is not None:
                on_rows(rows)
    return rows


if __name__ == "__main__":  # python -m bench.gaussian_mixture [--quick]
    import sys

    for r in run("cpu", quick="--quick" in sys.argv):
        print(r)
