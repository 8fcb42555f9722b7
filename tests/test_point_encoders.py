"""lucidops.patch.point_encoders: PointNet and Point-MAE-style encoders swapped for distilled
Gaussian encoders, and reverted bit for bit."""

import copy

import pytest
import torch
from torch import nn

from lucidops.models import PointNet
from lucidops.nn import GaussianPointEncoder
from lucidops.patch.handle import PatchHandle
from lucidops.patch.point_encoders import point_encoders, point_mae_point_features
from lucidops.train import DistilledPointNet

FAST = dict(steps=150, lr=1e-2, batch_size=8, points_per_cloud=128)


class PointMAEEncoder(nn.Module):
    """Point-MAE's mini-PointNet patch encoder: neighbourhoods (B, G, n, 3) -> tokens (B, G, C)."""

    def __init__(self, encoder_channel: int):
        super().__init__()
        self.encoder_channel = encoder_channel
        self.first_conv = nn.Sequential(nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True),
                                        nn.Conv1d(128, 256, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(512, 512, 1), nn.BatchNorm1d(512), nn.ReLU(inplace=True),
                                         nn.Conv1d(512, encoder_channel, 1))

    def forward(self, point_groups):
        bs, g, n, _ = point_groups.shape
        x = point_groups.reshape(bs * g, n, 3)
        feature = self.first_conv(x.transpose(2, 1))
        feature_global = torch.max(feature, dim=2, keepdim=True)[0]
        feature = torch.cat([feature_global.expand(-1, -1, n), feature], dim=1)
        feature = self.second_conv(feature)
        feature_global = torch.max(feature, dim=2, keepdim=False)[0]
        return feature_global.reshape(bs, g, self.encoder_channel)


class Mamba3DLike(nn.Module):
    def __init__(self, channels=64, classes=5):
        super().__init__()
        self.encoder = PointMAEEncoder(channels)
        self.head = nn.Linear(channels, classes)

    def forward(self, groups):
        return self.head(self.encoder(groups).amax(dim=1))


class WithBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = PointNet(6, feature_transform=False)
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, points):
        return self.scale * self.backbone(points)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _clouds(m=16, n=128, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(m, n, 3, generator=g) * 2 - 1) * scale


def test_pointnet_root_swapped_and_reverted():
    torch.manual_seed(0)
    model = PointNet(6, feature_transform=True, input_transform=True).eval()
    x = _clouds(4, 200, seed=1)
    with torch.no_grad():
        orig_logits, orig_feat = model(x), model.global_feature(x)
    modules_before = dict(model.named_modules())
    handle = point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=60))
    assert isinstance(handle, PatchHandle) and len(handle) >= 1 and handle.paths[0] == ""
    assert isinstance(model.gaussian_encoder, GaussianPointEncoder)
    assert model.gaussian_encoder.reduce == "max" and model.gaussian_encoder.out_channels == 1024
    with torch.no_grad():
        logits, feat = model(x), model.global_feature(x)
        # The same model with an undistilled Gaussian encoder: what distillation must beat.
        torch.manual_seed(5)
        fresh = DistilledPointNet(GaussianPointEncoder(32, 1024), model.head, model.input_tnet).eval()
        fresh_logits, fresh_feat = fresh(x), fresh.global_feature(x)
    assert logits.shape == (4, 6) and feat.shape == (4, 1024)
    # Measured (60 steps): 0.21 vs 2.4 (features), 0.10 vs 0.60 (logits).
    assert _rel(feat, orig_feat) < 0.25 * _rel(fresh_feat, orig_feat), (_rel(feat, orig_feat), _rel(fresh_feat, orig_feat))
    assert _rel(logits, orig_logits) < 0.25 * _rel(fresh_logits, orig_logits)
    assert "|" in str(handle)
    with pytest.raises(RuntimeError, match="already patched"):  # it distilled a student from the student
        point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=1))

    handle.revert()
    assert "gaussian_encoder" not in model._modules and "forward" not in model.__dict__
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(model.get_submodule(k) is v for k, v in modules_before.items())
    with torch.no_grad():
        assert torch.equal(model(x), orig_logits) and torch.equal(model.global_feature(x), orig_feat)


def test_patched_root_pointnet_holds_only_what_it_runs():
    """A patched root PointNet kept conv1..conv3 and the feature T-Net registered (unused), so
    its parameters, state dict and `lucidops profile` count grew (1.010x) where the same swap
    one level down gives 0.43x. They leave while patched; revert() brings them back with what
    the model did meanwhile (dtype, requires_grad, mode)."""
    torch.manual_seed(0)
    model = PointNet(6, feature_transform=True, input_transform=True).train()
    modules_before = dict(model.named_modules())
    nested = nn.Sequential(copy.deepcopy(model))

    def count(m):
        return sum(p.numel() for p in m.parameters())

    count_before = count(model)
    handle = point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=2))
    point_encoders(nested, clouds=_clouds(), distill_kwargs=dict(FAST, steps=2))
    # The same function as the swap one level down, and the same parameters.
    assert count(model) == count(nested) < 0.5 * count_before
    assert not any(k.startswith(("conv1.", "conv2.", "conv3.", "feature_tnet.")) for k in model.state_dict())
    x = _clouds(3, 50, seed=4)
    model.eval()
    with torch.no_grad():
        trans_in, trans_feat = model.transforms(x)
        assert trans_feat is None and torch.equal(trans_in, model.input_tnet(x.transpose(1, 2)))
        features = model.encoder_features(model.transform_points(x))
        assert torch.equal(features, model.point_features(x)) and features.shape == (3, 50, 1024)
        with pytest.raises(ValueError, match="feature_transform must be None"):
            model.encoder_features(x, torch.eye(64).expand(3, 64, 64))
    model.double()
    model.requires_grad_(False)
    handle.revert()  # patched in train mode, reverted in eval mode
    assert dict(model.named_modules()).keys() == modules_before.keys()
    assert all(model.get_submodule(k) is v for k, v in modules_before.items())
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("kind", ["pointnet", "point_mae"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_half_precision_model_gets_a_student_trained_in_float32(dtype, kind, monkeypatch):
    """Distilled in the model's float16, AdamW's steps overflowed the student to inf and the
    patch failed ("weight must be finite"); it trains in float32 and takes the model's dtype,
    the Point-MAE encoder's teacher reading the points in the model's dtype."""
    import importlib

    module = importlib.import_module("lucidops.patch.point_encoders")  # the package's name is the function

    trained_in = []
    original = module.distill
    monkeypatch.setattr(module, "distill", lambda teacher, student, *args, **kwargs: (
        trained_in.append(next(student.parameters()).dtype), original(teacher, student, *args, **kwargs))[1])
    torch.manual_seed(0)
    if kind == "pointnet":
        model = PointNet(5, feature_transform=False).eval().to(dtype)
        x = _clouds(2, 64, seed=4).to(dtype)
    else:
        model = Mamba3DLike(channels=16).eval().to(dtype)
        x = _clouds(2 * 4, 32, scale=0.2, seed=4).reshape(2, 4, 32, 3).to(dtype)
    with torch.no_grad():
        before = model(x)
    with point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=20), num_gaussians=4):
        students = [m for m in model.modules() if isinstance(m, GaussianPointEncoder)]
        assert trained_in == [torch.float32]
        assert len(students) == 1 and {p.dtype for p in students[0].parameters()} == {dtype}
        assert all(torch.isfinite(p).all() for p in students[0].parameters())
        with torch.no_grad():
            out = model(x)
        assert out.dtype == dtype and torch.isfinite(out).all()
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_revert_puts_a_root_pointnet_s_layers_back_in_their_order():
    """The hidden layers came back registered last: parameters() and state_dict() changed
    order, and an optimizer's state (matched by position) landed on the wrong parameters."""
    torch.manual_seed(0)
    model = PointNet(5)
    optimizer = torch.optim.Adam(model.parameters())
    model(_clouds(4, 32)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    handle = point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=2), num_gaussians=4)
    handle.revert()
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    reloaded = torch.optim.Adam(model.parameters())
    reloaded.load_state_dict(saved)
    assert all(reloaded.state[p]["exp_avg"].shape == p.shape for p in model.parameters())


def test_a_model_holding_a_patched_root_pointnet_is_refused():
    """Wrapping a patched root PointNet and patching the wrapper was an AttributeError on the
    hidden conv3 (and before that distilled a second student from the first)."""
    torch.manual_seed(0)
    net = PointNet(5, feature_transform=False).eval()
    handle = point_encoders(net, clouds=_clouds(), distill_kwargs=dict(FAST, steps=2), num_gaussians=4)
    with pytest.raises(RuntimeError, match="'0' is already patched by lucidops.patch.point_encoders"):
        point_encoders(nn.Sequential(net), clouds=_clouds(), distill_kwargs=dict(FAST, steps=2))
    handle.revert()


def test_nested_pointnet_swapped_for_wrapper_and_reverted():
    torch.manual_seed(1)
    model = WithBackbone().eval()
    backbone, head, tnet = model.backbone, model.backbone.head, model.backbone.input_tnet
    x = _clouds(3, 100, seed=2)
    with torch.no_grad():
        orig = model(x)
    with point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=20)) as handle:
        assert isinstance(model.backbone, DistilledPointNet)
        # What is replaced: conv1..conv3 (+ max); the input T-Net and the head are the original modules.
        assert model.backbone.head is head and model.backbone.input_tnet is tnet
        assert handle.paths == ["backbone"]
        with torch.no_grad():
            assert model(x).shape == (3, 6)
            # PointNet's training call keeps working inside a model, as at the root (before: a TypeError)
            logits, trans_in, trans_feat = model.backbone(x, return_transforms=True)
            assert torch.equal(logits, model.backbone(x)) and trans_feat is None
            assert torch.equal(trans_in, tnet(x.transpose(1, 2)))
            # ... and so do PointNet's other methods, as on a patched root (before: AttributeError)
            assert model.backbone.regularization_loss(trans_feat).item() == 0.0
            transforms = model.backbone.transforms(x)
            assert torch.equal(transforms[0], trans_in) and transforms[1] is None
            per_point = model.backbone.encoder_features(model.backbone.transform_points(x))
            assert per_point.shape == (3, 100, 1024)
            assert torch.equal(per_point.amax(dim=1), model.backbone.global_feature(x))
            with pytest.raises(ValueError, match="feature_transform must be None"):
                model.backbone.encoder_features(x, torch.eye(64).expand(3, 64, 64))
    assert model.backbone is backbone
    with torch.no_grad():
        assert torch.equal(model(x), orig)



def test_nested_pointnet_revert_follows_moves_and_freezing_of_the_model():
    """The replacement shares the input T-Net with the PointNet: the old undo compared only
    that (already moved) tensor, so after model.double() while patched conv1..conv3 came back
    float32 into a float64 model, and requires_grad_(False) did not reach them."""
    torch.manual_seed(1)
    model = WithBackbone().eval()
    backbone = model.backbone
    handle = point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=2))
    model.double()
    model.requires_grad_(False)
    handle.revert()
    assert model.backbone is backbone
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert {b.dtype for b in model.buffers() if b.is_floating_point()} == {torch.float64}
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(_clouds(2, 64, seed=3).double()).dtype == torch.float64


def test_revert_reads_the_model_s_changes_off_the_replacement_s_own_tensors():
    """Read over every tensor of the replacement, the head and T-Net it shares with the PointNet
    decided: "freeze the backbone, train the head" read as mixed (nothing carried, conv1..conv3
    came back trainable), and .double() on the shared T-Net alone turned conv1..conv3 float64."""
    torch.manual_seed(1)
    model = WithBackbone().eval()
    handle = point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=2))
    model.requires_grad_(False)
    model.backbone.head.requires_grad_(True)
    model.backbone.input_tnet.double()
    handle.revert()
    assert not model.backbone.conv1[0].weight.requires_grad and next(model.backbone.head.parameters()).requires_grad
    assert model.backbone.conv1[0].weight.dtype == torch.float32


def test_distillation_keeps_each_submodule_s_mode():
    """The teacher runs in eval mode; afterwards module.train(was_training) used to flatten
    every submodule's mode (frozen BatchNorms of a training model came back training)."""
    torch.manual_seed(1)
    model = WithBackbone().train()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    handle = point_encoders(model, clouds=_clouds(), distill_kwargs=dict(FAST, steps=2))
    # The wrapper trains like the PointNet it replaces; the T-Net and head it shares keep their BNs frozen.
    assert model.backbone.training and model.backbone.encoder.training
    assert not any(m.training for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    handle.revert()
    assert {n: m.training for n, m in model.named_modules()} == modes

def test_point_mae_encoder_swapped_and_reverted():
    torch.manual_seed(2)
    model = Mamba3DLike(channels=64).eval()
    original = model.encoder
    # Neighbourhoods as Point-MAE sees them: points centred on their group centre, small extent.
    groups = _clouds(2 * 8, 32, scale=0.2, seed=3).reshape(2, 8, 32, 3)
    with torch.no_grad():
        orig_tokens, orig_out = model.encoder(groups), model(groups)
    handle = point_encoders(model, clouds=_clouds(64, 32, scale=0.2, seed=4), num_gaussians=16,
                            distill_kwargs=dict(FAST, points_per_cloud=64))
    assert isinstance(model.encoder, GaussianPointEncoder) and model.encoder.reduce == "max"
    assert handle.paths == ["encoder"]
    with torch.no_grad():
        tokens, out = model.encoder(groups), model(groups)
        torch.manual_seed(7)
        fresh = GaussianPointEncoder(16, 64, cloud_range=0.2)
        fresh_tokens = fresh(groups)
    assert tokens.shape == (2, 8, 64) and out.shape == (2, 5)
    # Measured: 0.37 vs 12.5.
    assert _rel(tokens, orig_tokens) < 0.1 * _rel(fresh_tokens, orig_tokens), (
        _rel(tokens, orig_tokens), _rel(fresh_tokens, orig_tokens))
    handle.revert()
    assert model.encoder is original
    with torch.no_grad():
        assert torch.equal(model(groups), orig_out)
    handle.revert()  # a second revert does nothing
    assert model.encoder is original


def test_point_mae_encoder_at_root():
    torch.manual_seed(3)
    enc = PointMAEEncoder(32).eval()
    groups = _clouds(4, 16, scale=0.2, seed=5).reshape(1, 4, 16, 3)
    with torch.no_grad():
        orig = enc(groups)
    handle = point_encoders(enc, clouds=_clouds(8, 16, scale=0.2), num_gaussians=8,
                            distill_kwargs=dict(FAST, steps=10))
    assert isinstance(enc.gaussian_encoder, GaussianPointEncoder)
    # Its convolutions leave while patched (only the student's parameters count)...
    assert set(enc._modules) == {"gaussian_encoder"}
    with torch.no_grad():
        assert enc(groups).shape == (1, 4, 32)
    # ...and without them it still reads as patched, not as a model without an encoder.
    with pytest.raises(RuntimeError, match="already patched"):
        point_encoders(enc, clouds=_clouds(8, 16, scale=0.2), distill_kwargs=dict(FAST, steps=1))
    handle.revert()
    assert "gaussian_encoder" not in enc._modules and "forward" not in enc.__dict__
    assert set(enc._modules) == {"first_conv", "second_conv"}
    with torch.no_grad():
        assert torch.equal(enc(groups), orig)


def test_point_mae_point_features_max_is_the_encoder():
    torch.manual_seed(4)
    enc = PointMAEEncoder(16).eval()
    groups = _clouds(3, 20, seed=6)
    with torch.no_grad():
        per_point = point_mae_point_features(enc, groups)
        assert per_point.shape == (3, 20, 16)
        torch.testing.assert_close(per_point.amax(1), enc(groups[None])[0])


def test_no_encoder_raises():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    with pytest.raises(ValueError, match="no point encoder"):
        point_encoders(model)
    handle = point_encoders(model, allow_none=True)
    assert handle.nothing_patched and "no PointNet" in str(handle)


def test_bad_arguments_leave_model_unchanged():
    torch.manual_seed(5)
    model = Mamba3DLike(channels=16).eval()
    original = model.encoder
    small = dict(distill_kwargs=dict(FAST, steps=2), clouds=_clouds(4, 16))
    with pytest.raises(TypeError, match="model"):
        point_encoders("pointnet")
    with pytest.raises(TypeError, match="student_factory"):
        point_encoders(model, student_factory=3, **small)
    with pytest.raises(TypeError, match="distill_kwargs"):
        point_encoders(model, distill_kwargs=[("steps", 3)])
    with pytest.raises(TypeError, match="distill_kwargs"):
        point_encoders(model, distill_kwargs={"seed": 1})
    with pytest.raises(ValueError, match="num_gaussians"):
        point_encoders(model, num_gaussians=0, **small)
    with pytest.raises(ValueError, match="steps"):
        point_encoders(model, distill_kwargs={"steps": -1}, clouds=_clouds(4, 16))
    with pytest.raises(ValueError, match="clouds"):
        point_encoders(model, distill_kwargs=dict(FAST, steps=2), clouds=torch.rand(4, 16, 2))
    with pytest.raises(TypeError, match="GaussianPointEncoder"):
        point_encoders(model, student_factory=lambda p, m, k: nn.Linear(3, k), **small)
    with pytest.raises(ValueError, match="output channels"):
        point_encoders(model, student_factory=lambda p, m, k: GaussianPointEncoder(4, k + 1), **small)
    assert model.encoder is original


def test_student_factory_used():
    torch.manual_seed(6)
    model = Mamba3DLike(channels=16).eval()
    calls = []

    def factory(path, module, k):
        calls.append((path, type(module).__name__, k))
        return GaussianPointEncoder(5, k, cloud_range=0.5, reduce="none")

    handle = point_encoders(model, student_factory=factory, clouds=_clouds(4, 16, scale=0.5),
                            distill_kwargs=dict(FAST, steps=3))
    assert calls == [("encoder", "PointMAEEncoder", 16)]
    assert model.encoder.num_gaussians == 5 and model.encoder.reduce == "max"
    handle.revert()


def test_students_are_seeded_without_reseeding_the_gpus(monkeypatch):
    """The students' initialisation ran under torch.manual_seed, which also reseeds every GPU's
    generator (outside the CPU-only fork): a patch changed the model's CUDA random stream."""
    torch.manual_seed(6)
    model = Mamba3DLike(channels=16).eval()
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    before = torch.random.get_rng_state()
    handle = point_encoders(model, clouds=_clouds(4, 16, scale=0.5), seed=3, distill_kwargs=dict(FAST, steps=2))
    assert reseeded == []
    assert torch.equal(torch.random.get_rng_state(), before)  # the CPU stream is left as it was
    handle.revert()
