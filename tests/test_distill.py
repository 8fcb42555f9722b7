"""lucidops.train.distill: single process, the three-stage PointNet recipe, and DDP (2 gloo ranks)."""

import math
import os
import signal
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from lucidops.data import SyntheticShapes
from lucidops.models import PointNet
from lucidops.nn import GaussianPointEncoder, GaussianPointNet
from lucidops.train import DistilledPointNet, DistillResult, distill, distill_pointnet, finetune
from lucidops.train import cloud_cubes, sample_cube_points, tnet_point_features

K = 32  # teacher channels kept (PointNet's encoder is 1024 wide; a slice keeps the test small)


def _teacher(seed=0, **kwargs):
    torch.manual_seed(seed)
    return PointNet(10, **kwargs).eval()


def _held_out(n_clouds=4, n_points=256, seed=123):
    g = torch.Generator().manual_seed(seed)
    return sample_cube_points(torch.zeros(n_clouds, 3), torch.ones(n_clouds), n_points, g)


@pytest.mark.parametrize("optimizer", ["natural", "adamw"])
def test_distill_reduces_held_out_error(optimizer):
    teacher = _teacher(feature_transform=False, input_transform=False)
    teacher_fn = lambda x: teacher.point_features(x)[..., :K]  # noqa: E731
    torch.manual_seed(1)
    student = GaussianPointEncoder(16, K, reduce="none")
    held = _held_out()
    with torch.no_grad():
        target = teacher_fn(held)
        before = (student(held) - target).abs().mean().item()
        # The best constant predictor (per-channel median): distillation must beat it clearly too.
        constant = (target - target.flatten(0, 1).median(0).values).abs().mean().item()
    result = distill(teacher_fn, student, None, steps=150, lr=1e-2, batch_size=8, points_per_cloud=128, seed=0,
                     progress=False, optimizer=optimizer)
    with torch.no_grad():
        after = (student(held) - target).abs().mean().item()
    assert isinstance(result, DistillResult) and result.steps == 150 and len(result.losses) == 150
    assert after < 0.2 * before, (before, after)
    assert after < 0.5 * constant, (constant, after)
    assert result.final_loss < 0.2 * result.losses[0]
    assert teacher.training is False


def test_a_half_frozen_gaussian_still_trains_its_other_half():
    """Factors frozen, means trainable: the natural gradient needs both, so the means must go to
    AdamW (before, no optimizer held them and they never moved, with no word said)."""
    teacher = _teacher(feature_transform=False, input_transform=False)
    torch.manual_seed(2)
    student = GaussianPointEncoder(4, 8, reduce="none")
    student.factor.requires_grad_(False)
    means, factor = student.means.detach().clone(), student.factor.detach().clone()
    distill(lambda x: teacher.point_features(x)[..., :8], student, None, steps=3, batch_size=2,
            points_per_cloud=16, progress=False, optimizer="natural")
    assert not torch.equal(student.means, means)
    assert torch.equal(student.factor, factor)


def test_distill_restores_flags_and_reduce():
    teacher = _teacher(feature_transform=False, input_transform=False)
    teacher.train()
    student = GaussianPointEncoder(4, 1024, reduce="max")
    distill(teacher, student, torch.rand(3, 50, 3), steps=2, batch_size=2, points_per_cloud=16, progress=False)
    assert teacher.training is True  # put in eval mode during the run, restored after
    assert student.reduce == "max"


def test_students_far_from_the_clouds_are_warned_about_and_can_start_there():
    """Clouds at +50: an encoder started around the origin has no Gaussian reaching them (its
    gradients vanish; it would learn its bias alone, silently). distill warns; cloud_center
    starts the means in the clouds' cube, and then nothing is said."""
    teacher = _teacher(feature_transform=False, input_transform=False)
    clouds = torch.rand(3, 40, 3) + 50.0
    far = GaussianPointEncoder(4, 8, reduce="none")
    with pytest.warns(RuntimeWarning, match="do not reach the sampled points"):
        distill(lambda x: teacher.point_features(x)[..., :8], far, clouds, steps=1, batch_size=2,
                points_per_cloud=16, progress=False)
    near = GaussianPointEncoder(4, 8, reduce="none", cloud_range=0.5, cloud_center=(50.5, 50.5, 50.5))
    assert ((near.means - 50.5).abs() <= 0.5).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        distill(lambda x: teacher.point_features(x)[..., :8], near, clouds, steps=1, batch_size=2,
                points_per_cloud=16, progress=False)
    with pytest.raises(ValueError, match="cloud_center must be a number or 3 numbers"):
        GaussianPointEncoder(4, 8, cloud_center=(1.0, 2.0))
    with pytest.raises(ValueError, match="cloud_center"):
        GaussianPointEncoder(4, 8, cloud_center=float("nan"))


def test_a_teacher_in_another_dtype_reads_points_in_its_own():
    """A float32 PointNet teacher and a float64 student (it failed inside Conv1d)."""
    teacher = _teacher(feature_transform=False, input_transform=False)
    student = GaussianPointEncoder(4, 1024, reduce="none").double()
    result = distill(teacher, student, torch.rand(3, 50, 3), steps=2, batch_size=2, points_per_cloud=16,
                     progress=False)
    assert result.steps == 2 and student.means.dtype == torch.float64 and teacher.conv1[0].weight.dtype == torch.float32

    class TransformingTeacher(torch.nn.Module):  # per-cloud rows (transforms) reach it in its dtype too
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)

        def forward(self, x, transform):
            return self.lin(x @ transform)

    transforms = torch.eye(3).expand(3, 3, 3).contiguous()
    result = distill(TransformingTeacher(), torch.nn.Linear(3, 4).double(), torch.rand(3, 50, 3), steps=2,
                     batch_size=2, points_per_cloud=16, optimizer="adamw", per_cloud=[transforms],
                     input_transform=lambda x, t: x, progress=False)
    assert result.steps == 2


def test_cloud_cubes_and_sampling():
    clouds = [torch.tensor([[0.0, 0.0, 0.0], [2.0, 1.0, 0.5]]), torch.tensor([[-1.0, -3.0, 1.0], [1.0, 1.0, 1.0]])]
    centres, half = cloud_cubes(clouds)
    torch.testing.assert_close(centres, torch.tensor([[1.0, 0.5, 0.25], [0.0, -1.0, 1.0]], dtype=torch.float64))
    torch.testing.assert_close(half, torch.tensor([1.0, 2.0], dtype=torch.float64))
    pts = sample_cube_points(centres, half, 4000, torch.Generator().manual_seed(0))
    lo, hi = pts.amin(1), pts.amax(1)
    assert (lo >= centres - half[:, None]).all() and (hi <= centres + half[:, None]).all()
    # Uniform: the samples fill the cube (spread close to the full side).
    assert ((hi - lo) > 1.9 * half[:, None]).all()
    c2, h2 = cloud_cubes(SyntheticShapes(3, num_points=64, seed=0))
    assert c2.shape == (3, 3) and h2.shape == (3,) and (h2 > 0).all()


def test_bad_arguments():
    teacher = _teacher(feature_transform=False, input_transform=False)
    student = GaussianPointEncoder(4, 1024, reduce="none")
    ok = dict(steps=1, batch_size=2, points_per_cloud=8, progress=False)
    with pytest.raises(ValueError, match="steps"):
        distill(teacher, student, None, **{**ok, "steps": 0})
    with pytest.raises(ValueError, match="lr"):
        distill(teacher, student, None, lr=-1.0, **ok)
    with pytest.raises(ValueError, match="optimizer"):
        distill(teacher, student, None, optimizer="sgd", **ok)
    with pytest.raises(ValueError, match="natural_gradient"):
        distill(teacher, student, None, natural_gradient="newton", **ok)
    with pytest.raises(TypeError, match="teacher"):
        distill(42, student, None, **ok)
    with pytest.raises(TypeError, match="student"):
        distill(teacher, lambda x: x, None, **ok)
    with pytest.raises(ValueError, match="clouds"):
        distill(teacher, student, torch.rand(2, 5, 2), **ok)
    with pytest.raises(ValueError, match="clouds is empty"):
        distill(teacher, student, [], **ok)
    with pytest.raises(ValueError, match="does not match"):
        distill(teacher, GaussianPointEncoder(4, 16, reduce="none"), None, **ok)
    with pytest.raises(ValueError, match="per-point"):
        distill(lambda x: x.sum(1), student, None, **ok)
    with pytest.raises(TypeError, match="PointNet"):
        distill_pointnet(student)
    with pytest.raises(ValueError, match="finetune_data"):
        distill_pointnet(teacher, finetune_steps=3)
    with pytest.raises(ValueError, match="finetune_schedule"):
        distill_pointnet(teacher, finetune_steps=3, finetune_data=[], finetune_schedule="linear")


def test_distill_pointnet_passes_the_finetune_schedule(monkeypatch):
    from lucidops.train import pointnet_recipe

    seen = {}
    real = pointnet_recipe.finetune

    def spy(model, data, **kwargs):
        seen.update(kwargs)
        return real(model, data, **kwargs)

    monkeypatch.setattr(pointnet_recipe, "finetune", spy)
    data = SyntheticShapes(4, num_points=32, num_classes=10, seed=0)
    res = distill_pointnet(_teacher(), data, num_gaussians=4, steps=2, finetune_data=data, finetune_steps=2,
                           finetune_schedule="cosine", batch_size=2, points_per_cloud=16, seed=0, progress=False)
    assert seen["schedule"] == "cosine" and res.finetune.steps == 2


def test_a_float16_student_is_refused_by_name():
    """AdamW's float16 steps overflowed the student to inf; the next forward then named the
    mixer's weight, an argument the caller never passed."""
    student = GaussianPointEncoder(4, 8, reduce="none").half()
    partly = GaussianPointEncoder(4, 8, reduce="none")
    partly.mixer.half()  # its first parameter (the means) float32, its mixer float16
    for model in (student, partly):
        with pytest.raises(TypeError, match="student has float16 parameters: .*distil a float32 student"):
            distill(lambda x: x.repeat(1, 1, 3)[..., :8], model, None, steps=1, batch_size=2, points_per_cloud=8,
                    progress=False)


def test_finetune_refuses_a_float16_model_before_touching_it():
    """It trained in float16 in place: AdamW overflowed 22 parameters to inf and the model was lost."""
    model = GaussianPointNet(num_classes=3, num_gaussians=4, out_channels=16, tnet_gaussians=3).half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = SyntheticShapes(4, num_points=32, num_classes=3, seed=0)
    with pytest.raises(TypeError, match=r"model has float16 parameters: .*fine-tune it in float32 \(model.float\(\)\)"):
        finetune(model, data, steps=2, batch_size=2, points_per_cloud=16, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_distill_pointnet_of_a_half_teacher_trains_in_float32_and_returns_its_dtype(dtype, monkeypatch):
    import lucidops.train.pointnet_recipe as recipe

    trained_in = []  # the dtypes of what each stage trains
    distill_, finetune_ = recipe.distill, recipe.finetune

    def recording_distill(teacher, student, *args, **kwargs):
        trained_in.append({p.dtype for p in student.parameters()})
        return distill_(teacher, student, *args, **kwargs)

    def recording_finetune(model, *args, **kwargs):
        trained_in.append({p.dtype for p in model.parameters()})
        return finetune_(model, *args, **kwargs)

    monkeypatch.setattr(recipe, "distill", recording_distill)
    monkeypatch.setattr(recipe, "finetune", recording_finetune)
    teacher = _teacher(input_transform=True, feature_transform=True).to(dtype)
    data = SyntheticShapes(8, num_points=64, num_classes=10, seed=0)
    res = distill_pointnet(teacher, data, num_gaussians=4, steps=20, tnet_steps=10, finetune_data=data,
                           finetune_steps=2, batch_size=4, points_per_cloud=32, lr=1e-2, seed=0, progress=False)
    assert trained_in == [{torch.float32}] * 3  # the T-Net's and the encoder's students, then fine-tuning
    assert {p.dtype for p in res.model.parameters()} == {dtype}
    assert all(math.isfinite(loss) for r in (res.tnet, res.encoder, res.finetune) for loss in r.losses)
    assert res.encoder.final_loss < res.encoder.losses[0]
    with torch.no_grad():
        logits = res.model(_held_out(2, 64).to(dtype))
    assert logits.dtype == dtype and torch.isfinite(logits).all()


def test_distill_pointnet_three_stages():
    teacher = _teacher(input_transform=True, feature_transform=True)
    data = SyntheticShapes(16, num_points=64, num_classes=10, seed=0)
    held = _held_out(2, 128)
    res = distill_pointnet(teacher, data, num_gaussians=8, steps=40, tnet_steps=30, finetune_data=data,
                           finetune_steps=3, batch_size=4, points_per_cloud=64, lr=1e-2, seed=0, progress=False)
    model = res.model
    assert isinstance(model, DistilledPointNet) and model.input_tnet is not None
    assert res.tnet.steps == 30 and res.encoder.steps == 40 and res.finetune.steps == 3
    assert res.tnet.final_loss < res.tnet.losses[0] and res.encoder.final_loss < res.encoder.losses[0]
    # The head is a copy, not the teacher's module.
    assert model.head is not teacher.head
    with torch.no_grad():
        # Stage 1: the Gaussian T-Net's encoder matches the T-Net's pre-ReLU features better than at init.
        fresh = GaussianPointEncoder(8, 1024, reduce="none")
        target = tnet_point_features(teacher.input_tnet, held)
        enc = model.input_tnet.encoder
        enc.reduce = "none"
        err = (enc(held) - target).abs().mean()
        enc.reduce = "max"
        assert err < 0.5 * (fresh(held) - target).abs().mean()
        logits = model(held)
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()
    assert teacher.training is False


def test_distill_pointnet_without_fine_tuning_keeps_the_teachers_head_as_it_is():
    teacher = _teacher(input_transform=True, feature_transform=False)
    data = SyntheticShapes(8, num_points=32, num_classes=10, seed=1)
    res = distill_pointnet(teacher, data, num_gaussians=4, steps=2, tnet_steps=2, batch_size=4,
                           points_per_cloud=32, seed=0, progress=False)
    head, taught = res.model.head.state_dict(), teacher.head.state_dict()
    assert res.model.head is not teacher.head and head.keys() == taught.keys() and len(head) > 0
    for name, value in taught.items():  # a copy, weights and BatchNorm statistics alike
        assert torch.equal(head[name], value), name
        assert head[name].data_ptr() != value.data_ptr(), name


_DDP_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
from lucidops.models import PointNet
from lucidops.nn import GaussianPointEncoder
from lucidops.train import distill, distill_pointnet

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
# Different initialisations per rank: distill must broadcast the teacher and DDP the student.
torch.manual_seed(100 + rank)
teacher = PointNet(10, feature_transform=False, input_transform=False).eval()
student = GaussianPointEncoder(8, 1024, reduce="none")
clouds = torch.rand(6, 32, 3) * 2 - 1
res = distill(teacher, student, clouds, steps=30, lr=1e-2, batch_size=4, points_per_cloud=64, seed=0,
              progress=(rank == 0))
# The three-stage recipe (T-Net teacher, fine-tuning included) under DDP too.
teacher2 = PointNet(4, feature_transform=False).eval()
data = [(torch.rand(40, 3) * 2 - 1, i % 4) for i in range(6)]
res2 = distill_pointnet(teacher2, data, num_gaussians=4, steps=4, tnet_steps=3, finetune_data=data,
                        finetune_steps=2, batch_size=2, points_per_cloud=32, seed=0, progress=False)
torch.save({"state": student.state_dict(), "losses": res.losses, "teacher": teacher.state_dict(),
            "model": res2.model.state_dict(), "ft_losses": res2.finetune.losses},
           os.path.join(sys.argv[1], f"rank{rank}.pt"))
dist.destroy_process_group()
"""


def _run_two_ranks(script, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", "1"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    # Own session, so that a hang can be ended together with the worker processes torchrun started.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail("2-rank distillation timed out:\n" + out[-3000:] + err[-3000:])
    return proc.returncode, out, err


# Seen once in about 100 runs (CI, 2026-12-06): a rank aborted in torch's C++ with this message
# after its training loop had finished, before the next; 80 reruns under the same load passed.
# That abort, and only it, gets one more run: a failure of lucidops' own fails both.
_TORCH_ABORT = "terminate called without an active exception"


def test_distill_ddp_two_gloo_ranks(tmp_path):
    script = tmp_path / "ddp_distill.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    returncode, out, err = _run_two_ranks(script, tmp_path)
    if returncode != 0 and _TORCH_ABORT in err:
        warnings.warn(f"a rank aborted in torch ({_TORCH_ABORT!r}); ran the two ranks once more")
        returncode, out, err = _run_two_ranks(script, tmp_path)
    assert returncode == 0, out[-3000:] + err[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    for name, value in r0["teacher"].items():
        assert torch.equal(value, r1["teacher"][name]), name
    assert set(r0["state"]) == {"means", "factor", "mixer.weight", "mixer.bias"}
    for name, value in r0["state"].items():
        assert torch.equal(value, r1["state"][name]), name
    for name, value in r0["model"].items():
        assert torch.equal(value, r1["model"][name]), name
    assert r0["ft_losses"] == r1["ft_losses"] and len(r0["ft_losses"]) == 2
    # The logged loss is the all-reduced mean: identical on both ranks, and it went down.
    assert r0["losses"] == r1["losses"] and len(r0["losses"]) == 30
    assert sum(r0["losses"][-5:]) / 5 < 0.5 * r0["losses"][0]


def test_per_cloud_rows_follow_the_sampled_clouds():
    # Three far-apart clouds; the teacher gets each batch cloud's row (its index) and checks
    # that the points it is given lie in that cloud's cube.
    torch.manual_seed(0)
    clouds = torch.stack([torch.rand(20, 3) * 0.5 + off for off in (-4.0, 0.0, 4.0)])
    centres, half = cloud_cubes(clouds)
    index = torch.arange(3, dtype=torch.float32)[:, None]
    seen = []

    def teacher(x, row):
        i = row[:, 0].round().long()
        inside = ((x - centres[i].float()[:, None, :]).abs() <= half[i].float()[:, None, None] + 1e-5).all()
        seen.append((bool(inside), set(i.tolist())))
        return x.repeat(1, 1, 2)[..., :4]

    student = torch.nn.Linear(3, 4)
    distill(teacher, student, clouds, steps=6, batch_size=4, points_per_cloud=8, optimizer="adamw",
            per_cloud=[index], input_transform=lambda x, row: x, seed=0, progress=False)
    assert len(seen) == 6 and all(ok for ok, _ in seen)
    assert set().union(*(ids for _, ids in seen)) == {0, 1, 2}


def test_per_cloud_bad_arguments():
    clouds = torch.rand(5, 10, 3)
    student = GaussianPointEncoder(2, 4, reduce="none")
    teacher = lambda x, r: x.new_zeros(x.shape[0], x.shape[1], 4)  # noqa: E731
    with pytest.raises(ValueError, match="per_cloud\\[0\\].*one row per cloud"):
        distill(teacher, student, clouds, steps=1, per_cloud=[torch.zeros(4, 3)], progress=False)
    with pytest.raises(TypeError, match="per_cloud must be a list"):
        distill(teacher, student, clouds, steps=1, per_cloud=torch.zeros(5, 3), progress=False)
    with pytest.raises(ValueError, match="per_cloud needs clouds"):
        distill(teacher, student, None, steps=1, per_cloud=[torch.zeros(5, 3)], progress=False)


@pytest.mark.parametrize("feature_transform", [False, True])
def test_pointnet_encoder_features_given_transforms(feature_transform):
    torch.manual_seed(0)
    net = PointNet(5, feature_transform=feature_transform).eval()
    x = torch.randn(3, 50, 3)
    trans_in, trans_feat = net.transforms(x)
    assert (trans_feat is None) != feature_transform
    with torch.no_grad():
        direct = net.point_features(x)
        given = net.encoder_features(net.transform_points(x), trans_feat)
    torch.testing.assert_close(given, direct, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="feature_transform"):
        net.encoder_features(x, None if feature_transform else torch.eye(64).expand(3, 64, 64))


def test_spread_is_the_mean_axis_variance():
    enc = GaussianPointEncoder(3, 4, cloud_range=2.0)
    with torch.no_grad():
        enc.factor.zero_()
        enc.factor[:, [0, 3, 5]] = torch.tensor([[1.0, 2.0, 4.0], [1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    # Sigma = diag(1 / l^2): traces / 3 = (1 + 1/4 + 1/16) / 3, 1, 1/4; over cloud_range^2 = 4.
    expected = ((1 + 0.25 + 0.0625) / 3 + 1.0 + 0.25) / 3 / 4.0
    assert enc.spread().item() == pytest.approx(expected, rel=1e-6)
    enc.spread().backward()
    assert enc.factor.grad is not None and torch.isfinite(enc.factor.grad).all()


def test_spread_penalty_narrows_the_gaussians():
    teacher = _teacher(feature_transform=False, input_transform=False)
    teacher_fn = lambda x: teacher.point_features(x)[..., :K]  # noqa: E731
    runs = {}
    for penalty in (0.0, 1.0):
        torch.manual_seed(1)
        student = GaussianPointEncoder(8, K, reduce="none")
        result = distill(teacher_fn, student, None, steps=60, lr=1e-2, batch_size=4, points_per_cloud=64, seed=0,
                         progress=False, spread_penalty=penalty)
        runs[penalty] = (student.spread().item(), result.losses)
    assert runs[1.0][0] < 0.8 * runs[0.0][0], runs
    # The logged loss is the L1 alone: the first step (same init, same points) logs the same value.
    assert runs[1.0][1][0] == pytest.approx(runs[0.0][1][0], rel=1e-6)


@pytest.mark.parametrize("penalty,error", [(-0.1, ValueError), (float("nan"), ValueError), (True, TypeError),
                                           ("1", TypeError)])
def test_spread_penalty_bad_values(penalty, error):
    with pytest.raises(error, match="spread_penalty"):
        distill(lambda x: x, GaussianPointEncoder(2, 3, reduce="none"), None, steps=1, progress=False,
                spread_penalty=penalty)


def test_spread_penalty_needs_a_gaussian_encoder():
    with pytest.raises(ValueError, match="spread_penalty"):
        distill(lambda x: x, torch.nn.Linear(3, 3), None, steps=1, progress=False, spread_penalty=0.5)


def test_distill_pointnet_takes_one_cloud_as_distill_does():
    """One (N, 3) cloud is a valid ``clouds`` for distill (its cube); the recipe's per-cloud
    T-Net transforms refused it."""
    cloud = SyntheticShapes(1, num_points=32, num_classes=10, seed=1)[0][0]
    assert cloud.shape == (32, 3)
    res = distill_pointnet(_teacher(), cloud, num_gaussians=4, steps=2, batch_size=1, points_per_cloud=16, seed=0,
                           progress=False)
    assert res.model(cloud[None]).shape[0] == 1


def test_a_failed_setup_leaves_the_students_reduce_as_it_was():
    """The switch to reduce="none" came before the optimizers were built: a frozen student (no
    trainable parameter) raised there and stayed in "none", returning per-point features."""
    student = GaussianPointEncoder(4, 1024, reduce="max").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        distill(_teacher(feature_transform=False, input_transform=False), student, None, steps=1, batch_size=2,
                points_per_cloud=8, progress=False)
    assert student.reduce == "max" and student(torch.rand(2, 10, 3)).shape == (2, 1024)


def test_numpy_hyperparameters_are_numbers():
    """A numpy float momentum was refused with "momentum must be in [0, 1), got 0.9"; a string
    is a TypeError, not a range error."""
    import numpy as np

    teacher = lambda x: x.new_zeros(*x.shape[:2], 8)  # noqa: E731
    for kwargs in (dict(momentum=np.float32(0.9)), dict(weight_decay=np.float64(0.01)), dict(lr=np.float32(0.01))):
        res = distill(teacher, GaussianPointEncoder(4, 8, reduce="none"), None, steps=1, batch_size=2,
                      points_per_cloud=8, progress=False, **kwargs)
        assert res.steps == 1
    for name, bad, error in (("momentum", "0.9", TypeError), ("weight_decay", "0", TypeError),
                             ("momentum", 1.0, ValueError), ("weight_decay", -1.0, ValueError),
                             ("momentum", float("nan"), ValueError)):
        with pytest.raises(error, match=name):
            distill(teacher, GaussianPointEncoder(4, 8, reduce="none"), None, steps=1, progress=False, **{name: bad})


def _labelled_clouds(n=6, offset=0.0):
    g = torch.Generator().manual_seed(5)
    return [(torch.rand(40, 3, generator=g) * 2 - 1 + offset, i % 4) for i in range(n)]


def test_distill_pointnet_checks_every_argument_before_training(monkeypatch):
    """finetune's own checks ran after both distillation stages (minutes, on real sizes), and
    named finetune_lr "lr"; steps=0 with tnet_steps given ran stage 1 first."""
    from lucidops.train import pointnet_recipe

    def no_stage(*args, **kwargs):
        raise AssertionError("a stage ran before the arguments were checked")

    monkeypatch.setattr(pointnet_recipe, "distill", no_stage)
    monkeypatch.setattr(pointnet_recipe, "finetune", no_stage)
    teacher = PointNet(4, feature_transform=False, input_transform=True).eval()
    data = _labelled_clouds()
    ok = dict(num_gaussians=4, steps=2, tnet_steps=2, finetune_data=data, finetune_steps=2, batch_size=2,
              points_per_cloud=16, seed=0, progress=False)
    for bad, error, match in ((dict(finetune_lr=-1.0), ValueError, "finetune_lr"),
                              (dict(finetune_lr="1e-3"), TypeError, "finetune_lr"),
                              (dict(encoder_lr_scale=0.0), ValueError, "encoder_lr_scale"),
                              (dict(finetune_data=42), TypeError, "finetune_data"),
                              (dict(finetune_data=[]), ValueError, "finetune_data is empty"),
                              (dict(steps=0), ValueError, "steps"),
                              (dict(seed=1.5), TypeError, "seed"),
                              (dict(cloud_center="middle"), ValueError, "cloud_center"),
                              (dict(cloud_center=(1.0, 2.0)), ValueError, "cloud_center"),
                              (dict(cloud_range=0.0), ValueError, "cloud_range"),
                              # These two failed inside finetune, after both distillation stages:
                              (dict(batch_size=1), ValueError, "batch_size=1: fine-tuning .* BatchNorm"),
                              (dict(finetune_data=[(p, torch.eye(4)[int(y)]) for p, y in data]), ValueError,
                               r"finetune_data\[0\]: label must be one class index")):
        with pytest.raises(error, match=match):
            distill_pointnet(teacher, data, **{**ok, **bad})


def test_distill_pointnet_seed_makes_the_run_reproducible():
    """The encoders were initialised from torch's global RNG: the same seed gave other means
    and losses after any other use of the global RNG. Seeded, the run leaves that RNG alone."""
    teacher = PointNet(4, feature_transform=False, input_transform=True).eval()
    data = _labelled_clouds()
    runs = []
    for draws in (1, 2):
        torch.rand(draws)  # any other use of the global RNG before the call
        state = torch.get_rng_state()
        res = distill_pointnet(teacher, data, num_gaussians=4, steps=3, tnet_steps=3, finetune_data=data,
                               finetune_steps=2, batch_size=2, points_per_cloud=16, seed=0, progress=False)
        assert torch.equal(torch.get_rng_state(), state)
        runs.append(res)
    a, b = runs
    assert a.tnet.losses == b.tnet.losses and a.encoder.losses == b.encoder.losses
    assert a.finetune.losses == b.finetune.losses  # the head's dropout is seeded too
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name


def test_distill_pointnet_starts_the_encoders_in_the_clouds():
    """The encoders always started around the origin: clouds in [9, 11]^3 were out of reach of
    every Gaussian, which never learned. "auto" (the default) centres stage 1 on the clouds'
    cubes and stage 2 on those cubes through each cloud's input transform."""
    from lucidops.train import pointnet_recipe

    torch.manual_seed(0)
    teacher = PointNet(4, feature_transform=False, input_transform=True).eval()
    data = _labelled_clouds(offset=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # distill warns when no Gaussian reaches the points
        res = distill_pointnet(teacher, data, num_gaussians=8, steps=2, tnet_steps=2, batch_size=4,
                               points_per_cloud=32, seed=0, progress=False)
    centres, half = cloud_cubes(data)
    low, high = (centres - half[:, None]).amin(0), (centres + half[:, None]).amax(0)
    assert res.model.input_tnet.encoder.cloud_center == pytest.approx(((low + high) / 2).tolist())
    # Stage 2: the box around every cube's points through its own cloud's input transform.
    with torch.no_grad():
        trans = torch.cat([teacher.transforms(p[None])[0] for p, _ in data]).double()
    corners = torch.tensor([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=torch.float64)
    seen = ((centres[:, None, :] + half[:, None, None] * corners) @ trans).reshape(-1, 3)
    expected = ((seen.amin(0) + seen.amax(0)) / 2).tolist()
    assert res.model.encoder.cloud_center == pytest.approx(expected, abs=1e-4)
    low2, high2 = pointnet_recipe._transformed_box(centres, half, trans)
    assert ((low2 + high2) / 2).tolist() == pytest.approx(expected)
    for enc in (res.model.input_tnet.encoder, res.model.encoder):
        assert enc.cloud_range == 1.0  # the default range
    # cloud_range="auto": half the longest side of each stage's box.
    res = distill_pointnet(teacher, data, num_gaussians=4, steps=1, tnet_steps=1, batch_size=2, points_per_cloud=8,
                           cloud_range="auto", seed=0, progress=False)
    assert res.model.input_tnet.encoder.cloud_range == pytest.approx(float((high - low).max() / 2))
    assert res.model.encoder.cloud_range == pytest.approx(float((seen.amax(0) - seen.amin(0)).max() / 2), rel=1e-4)
    assert res.model.encoder.cloud_center == pytest.approx(expected, abs=1e-4)
    # With a given centre, "auto" sizes the cube around that centre to hold the clouds' box: half
    # the box's side about its own centre left clouds in [109, 111]^3 outside a cube around 100.
    res = distill_pointnet(teacher, data, num_gaussians=4, steps=1, tnet_steps=1, batch_size=2, points_per_cloud=8,
                           cloud_center=(8.5, 9.0, 9.5), cloud_range="auto", seed=0, progress=False)
    reach = torch.maximum(torch.tensor([8.5, 9.0, 9.5], dtype=torch.float64) - low, high - torch.tensor([8.5, 9.0, 9.5]))
    assert res.model.input_tnet.encoder.cloud_range == pytest.approx(float(reach.max()))
    assert res.model.input_tnet.encoder.cloud_range > float((high - low).max() / 2)
    for bad, error in (("big", ValueError), (0.0, ValueError), (None, TypeError)):
        with pytest.raises(error, match="cloud_range"):
            distill_pointnet(teacher, data, steps=1, cloud_range=bad, progress=False)
    # Given: used as is for both encoders.
    res = distill_pointnet(teacher, data, num_gaussians=4, steps=1, tnet_steps=1, batch_size=2, points_per_cloud=8,
                           cloud_center=(9.0, 10.0, 11.0), cloud_range=2.0, seed=0, progress=False)
    for enc in (res.model.input_tnet.encoder, res.model.encoder):
        assert enc.cloud_center == (9.0, 10.0, 11.0) and enc.cloud_range == 2.0


def test_distill_pointnet_learns_off_centre_clouds():
    torch.manual_seed(0)
    teacher = PointNet(4, feature_transform=False, input_transform=False).eval()
    data = [(torch.rand(40, 3) * 2 + 9.0, i % 4) for i in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = distill_pointnet(teacher, data, num_gaussians=8, steps=30, batch_size=4, points_per_cloud=32, seed=0,
                               progress=False, lr=1e-2)
    assert res.encoder.final_loss < 0.5 * res.encoder.losses[0]
    means = res.model.encoder.means.detach()
    assert 8.0 < float(means.min()) and float(means.max()) < 12.0


def test_finetune_checks_seed_and_data():
    """seed=1.5 reached manual_seed (a bare RuntimeError), "7" failed at seed + rank; an empty
    dataset said "cannot be sharded over 1 ranks"; a one-hot label failed in reshape; the
    messages named "finetune_data" where the argument is ``data``."""
    from lucidops.nn import GaussianPointNet
    from lucidops.train import finetune

    torch.manual_seed(0)
    model = GaussianPointNet(4, num_gaussians=4, out_channels=16, input_transform=False)
    data = _labelled_clouds(4)
    ok = dict(steps=1, batch_size=2, points_per_cloud=16, progress=False)
    for seed in (1.5, "7", True):
        with pytest.raises(TypeError, match="seed must be an int"):
            finetune(model, data, seed=seed, **ok)
    with pytest.raises(ValueError, match="^data is empty"):
        finetune(model, [], **ok)
    with pytest.raises(TypeError, match="^data must be a dataset"):
        finetune(model, 42, **ok)
    with pytest.raises(ValueError, match=r"data\[\d\]: label must be one class index.*\(4,\)"):
        finetune(model, [(p, torch.tensor([0.0, 1.0, 0.0, 0.0])) for p, _ in data], **ok)
    with pytest.raises(ValueError, match=r"data\[\d\]: label must be a class index, got 1.5"):
        finetune(model, [(p, 1.5) for p, _ in data], **ok)
    with pytest.raises(TypeError, match=r"data\[\d\] must be a \(points, label\) pair"):
        finetune(model, [p for p, _ in data], **ok)
    with pytest.raises(TypeError, match=r"data\[\d\]: points must be a tensor"):
        finetune(model, [(p.tolist(), y) for p, y in data], **ok)
    res = finetune(model, [(p, torch.tensor([y])) for p, y in data], seed=3, **ok)  # a one-element label is fine
    assert res.steps == 1
    # The head's BatchNorm sees one value per channel: torch's message did not say which argument.
    with pytest.raises(ValueError, match=r"^batch_size=1: a BatchNorm layer of model needs at least 2 clouds"):
        finetune(model, data, **{**ok, "batch_size": 1})
