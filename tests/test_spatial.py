"""Frozen random depthwise mixing: FrozenRandomDepthwise and patch.freeze_spatial_mixing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lucidops.nn import FrozenRandomDepthwise
from lucidops.nn.spatial import random_depthwise_weight
from lucidops.patch import freeze_spatial_mixing, spatial_mixers, unfreeze_spatial_mixing


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("kernel_size,padding,stride", [(3, "same", 1), ((5, 3), "same", 1), (3, 1, 2), (4, 0, 1)])
def test_frozen_depthwise_matches_float64_conv(kernel_size, padding, stride):
    layer = FrozenRandomDepthwise(6, kernel_size, padding=padding, stride=stride, generator=gen())
    x = torch.randn(2, 6, 9, 11)
    ref = F.conv2d(x.double(), layer.weight.double(), None, stride, padding, 1, 6)
    out = layer(x)
    assert out.shape == ref.shape
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-6
    # Unbatched input and a strided view work too.
    torch.testing.assert_close(layer(x[0]), out[0])
    xt = x.transpose(-1, -2)
    torch.testing.assert_close(layer(xt), layer(xt.contiguous()))


def test_frozen_depthwise_gets_no_gradient_and_stays_bit_identical():
    torch.manual_seed(0)
    model = nn.Sequential(FrozenRandomDepthwise(4, 3, bias=True, generator=gen()), nn.Conv2d(4, 4, 1))
    before = model[0].weight.detach().clone()
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 4 * 9 + 4
    model.requires_grad_(True)  # even re-enabled, the forward detaches the filters
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert torch.equal(model[0].weight, before)
    assert x.grad is not None and x.grad.abs().sum() > 0  # gradient still flows through it


def test_inits():
    k = (5, 5)
    default = random_depthwise_weight(64, k, "default", generator=gen(1))
    assert default.shape == (64, 1, 5, 5) and default.abs().max() <= 1 / 5
    assert abs(default.std().item() - (1 / 5) / 3 ** 0.5) < 0.01
    impulse = random_depthwise_weight(64, k, "impulse", generator=gen(1))
    assert torch.equal(impulse.flatten(1).sum(1), torch.ones(64))
    assert torch.equal((impulse.flatten(1) != 0).sum(1), torch.ones(64, dtype=torch.long))
    assert len(set(impulse.flatten(1).argmax(1).tolist())) > 5  # random taps, not all the same
    smoothed = random_depthwise_weight(64, k, "smoothed", generator=gen(1))
    torch.testing.assert_close(smoothed.flatten(1).norm(dim=1), default.flatten(1).norm(dim=1))

    def roughness(w):  # mean squared difference of neighbouring taps, relative to the energy
        return ((w.diff(dim=-1) ** 2).sum() + (w.diff(dim=-2) ** 2).sum()) / (w ** 2).sum()
    assert roughness(smoothed) < 0.5 * roughness(default)
    assert torch.equal(random_depthwise_weight(8, k, "default", generator=gen(3)),
                       random_depthwise_weight(8, k, "default", generator=gen(3)))
    layer = FrozenRandomDepthwise(8, 5, init="smoothed", smoothing_sigma=0.5, generator=gen(2))
    assert "smoothed" in repr(layer)


@pytest.mark.parametrize("sigma", [1e-200, 1e300])
def test_smoothing_sigma_extremes_stay_finite(sigma):
    """A tiny sigma is the centre tap alone (the default filter, renormalised), a huge one flat
    taps; before, 2 sigma^2 underflowed to 0 (NaN filters) or overflowed Python's float."""
    weight = random_depthwise_weight(4, (3, 3), "smoothed", smoothing_sigma=sigma, generator=gen(4))
    default = random_depthwise_weight(4, (3, 3), "default", generator=gen(4))
    assert torch.isfinite(weight).all()
    torch.testing.assert_close(weight.flatten(1).norm(dim=1), default.flatten(1).norm(dim=1))
    if sigma < 1:
        torch.testing.assert_close(weight, default)


def test_revert_after_moving_the_model_puts_back_modules_that_moved_with_it():
    """The original convs are detached while patched, so a later ``model.double()`` (or
    ``.to(device)``) missed them: revert must move them the way the model went."""
    model = resnet_style()
    handle = freeze_spatial_mixing(model)
    model.double()
    handle.revert()
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.randn(1, 3, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_frozen_depthwise_rejects_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        FrozenRandomDepthwise(0, 3)
    with pytest.raises(TypeError, match="kernel_size"):
        FrozenRandomDepthwise(4, "3")
    with pytest.raises(ValueError, match="init must be one of"):
        FrozenRandomDepthwise(4, 3, init="gaussian")
    with pytest.raises(ValueError, match="smoothing_sigma"):
        FrozenRandomDepthwise(4, 3, init="smoothed", smoothing_sigma=0)
    with pytest.raises(ValueError, match="padding"):
        FrozenRandomDepthwise(4, 3, stride=2)
    with pytest.raises(ValueError, match="weight must have shape"):
        FrozenRandomDepthwise(4, 3, weight=torch.randn(4, 1, 5, 5))
    with pytest.raises(TypeError, match="weight must be a floating-point tensor, got torch.int64"):
        FrozenRandomDepthwise(4, 3, weight=torch.ones(4, 1, 3, 3, dtype=torch.long))  # failed in forward
    with pytest.raises(ValueError, match="x must be"):
        FrozenRandomDepthwise(4, 3)(torch.randn(2, 5, 8, 8))
    # Refused when built, naming the argument (they failed in forward, as conv2d's own error).
    for kwargs, message in ((dict(stride=0, padding=1), "stride must be >= 1"),
                            (dict(stride=(1, -2), padding=0), "stride must be >= 1"),
                            (dict(dilation=0), "dilation must be >= 1"),
                            (dict(padding=-1), "padding must be >= 0"),
                            (dict(kernel_size=(3, 0)), "kernel_size must be >= 1")):
        kwargs.setdefault("kernel_size", 3)
        with pytest.raises(ValueError, match=message):
            FrozenRandomDepthwise(4, **kwargs)
    # The frozen bias lives with the weight it is given.
    assert FrozenRandomDepthwise(4, 3, bias=True, weight=torch.randn(4, 1, 3, 3, device="meta")).bias.is_meta


def convmixer():
    pytest.importorskip("timm")
    from timm.models.convmixer import ConvMixer
    torch.manual_seed(0)
    return ConvMixer(dim=16, depth=2, kernel_size=5, patch_size=4, num_classes=3)


class DepthwiseResBlock(nn.Module):
    """ResNet-style block whose spatial mixer is depthwise (MobileNet/ConvNeXt style)."""

    def __init__(self, c):
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.pw(torch.relu(self.bn(self.dw(x))))


def resnet_style():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DepthwiseResBlock(8), DepthwiseResBlock(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


@pytest.mark.parametrize("build", [convmixer, resnet_style], ids=["timm-convmixer", "resnet-style"])
def test_freeze_spatial_mixing_trains_only_channel_mixers(build):
    model = build()
    names = spatial_mixers(model)
    assert len(names) == 2
    spatial_numel = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    x = torch.randn(4, 3, 16, 16)
    model.eval()
    ref = model(x)
    freeze_spatial_mixing(model)  # init=None keeps the filters: same function
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    assert all(isinstance(model.get_submodule(n), FrozenRandomDepthwise) for n in names)
    assert sum(p.numel() for p in model.parameters() if not p.requires_grad) == spatial_numel
    frozen = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    y = torch.randint(0, 3, (4,))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for n in names:
        assert model.get_submodule(n).weight.grad is None
        assert torch.equal(model.get_submodule(n).weight, frozen[n])
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable[n])]
    assert len(changed) == len(trainable)
    unfreeze_spatial_mixing(model)
    assert all(type(model.get_submodule(n)) is nn.Conv2d for n in names)
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model.get_submodule(names[0]).weight, frozen[names[0]])


def test_freeze_spatial_mixing_with_new_init():
    model = resnet_style()
    old = model[1].dw.weight.detach().clone()
    freeze_spatial_mixing(model, init="impulse", generator=gen())
    w = model[1].dw.weight
    assert not torch.equal(w, old)
    assert torch.equal((w.flatten(1) != 0).sum(1), torch.ones(8, dtype=torch.long))


@pytest.mark.parametrize("init", ["default", "smoothed"])
def test_freeze_spatial_mixing_draws_from_the_generator_it_is_given(init):
    def frozen(seed):
        torch.manual_seed(1000 + seed)  # a draw from the global generator would differ by seed
        model = resnet_style()
        freeze_spatial_mixing(model, init=init, generator=gen(7))
        return [m.weight.detach().clone() for m in model.modules() if isinstance(m, FrozenRandomDepthwise)]

    first, again = frozen(0), frozen(1)
    assert len(first) > 0
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    model = resnet_style()
    freeze_spatial_mixing(model, init=init, generator=gen(8))
    other = [m.weight for m in model.modules() if isinstance(m, FrozenRandomDepthwise)]
    assert not torch.equal(other[0], first[0])


def test_freeze_spatial_mixing_rejects_models_without_spatial_mixers():
    with pytest.raises(ValueError, match="no depthwise"):
        freeze_spatial_mixing(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1, groups=8)))
    with pytest.raises(TypeError, match="model"):
        freeze_spatial_mixing("convmixer")
    with pytest.raises(ValueError, match="init"):
        freeze_spatial_mixing(resnet_style(), init="zeros")
    with pytest.raises(ValueError, match="itself"):
        freeze_spatial_mixing(nn.Conv2d(4, 4, 3, groups=4))
    with pytest.raises(ValueError, match="no FrozenRandomDepthwise"):
        unfreeze_spatial_mixing(resnet_style())


def test_depthwise_convs_left_trainable_are_named():
    """timm's Conv2dSame (a Conv2d subclass with its own padding), reflect padding and channel
    multipliers are not replaced (FrozenRandomDepthwise would change their function); they
    kept training with nothing said (tf_efficientnet_b0: 4 of 16)."""

    class SamePadded(nn.Conv2d):
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), SamePadded(4, 4, 3, groups=4),
                          nn.Conv2d(4, 4, 3, padding=1, groups=4, padding_mode="reflect"),
                          nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1, groups=4))
    with pytest.warns(RuntimeWarning, match=r"3 depthwise-like conv\(s\) left trainable .*: 1, 2, 3") as caught:
        handle = freeze_spatial_mixing(model)
    assert caught[0].filename == __file__  # attributed to the caller, not to lucidops
    assert handle.paths == ["0"] and "left trainable" in handle.notes[0]
    assert model[1].weight.requires_grad and model[2].weight.requires_grad
    handle.revert()
    for conv in model[1:4]:
        conv.requires_grad_(False)  # frozen by the user already: nothing to say
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not freeze_spatial_mixing(model).notes


def test_options_that_would_draw_nothing_are_refused():
    """init=None keeps the convs' own filters: a generator or smoothing_sigma given with it was
    ignored silently (the caller believed the filters reproducible or smoothed), as was a
    generator beside a given weight."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, groups=4), nn.Conv2d(4, 4, 1))
    before = model[0]
    for kwargs, named in ((dict(generator=gen()), "generator"), (dict(smoothing_sigma=0.5), "smoothing_sigma")):
        with pytest.raises(ValueError, match=f"{named}: used to draw new filters, but init=None"):
            freeze_spatial_mixing(model, **kwargs)
        assert model[0] is before  # nothing swapped
    handle = freeze_spatial_mixing(model, init="smoothed", generator=gen(), smoothing_sigma=0.5)
    assert isinstance(model[0], FrozenRandomDepthwise)
    handle.revert()
    with pytest.raises(ValueError, match="pass generator=None with a given weight"):
        FrozenRandomDepthwise(4, 3, weight=torch.randn(4, 1, 3, 3), generator=gen())
    # smoothing_sigma shapes only a drawn "smoothed" bank.
    for kwargs in (dict(init="impulse"), dict(init="default"), dict(init="smoothed", weight=torch.randn(4, 1, 3, 3))):
        with pytest.raises(ValueError, match="smoothing_sigma shapes the random filters of init='smoothed'"):
            FrozenRandomDepthwise(4, 3, smoothing_sigma=5.0, **kwargs)
    with pytest.raises(ValueError, match="smoothing_sigma shapes"):
        freeze_spatial_mixing(model, init="impulse", smoothing_sigma=5.0)
    assert model[0] is before
    with pytest.raises(ValueError, match="pass init='smoothed' to draw"):
        freeze_spatial_mixing(model, smoothing_sigma=5.0)
    assert torch.equal(FrozenRandomDepthwise(4, 3, init="smoothed", generator=gen()).weight,
                       FrozenRandomDepthwise(4, 3, init="smoothed", smoothing_sigma=1.0, generator=gen()).weight)
