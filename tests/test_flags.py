"""Every public on/off flag is a bool: a string such as "False" (truthy) or a 0/1 is a TypeError
naming the flag, before any work, instead of being read by its truthiness."""

import pytest
import torch
from torch import nn

import lucidops
from lucidops.patch.peft_lora import lora_layers
from lucidops.train.unlearning import mlp_lora_parameters


def _vit_like():
    """The smallest model skipless_ accepts: one attention with fused qkv and proj."""
    return lucidops.nn.ManyHeadAttention(16, 4)


def _lora():
    return lucidops.nn.SineLoRALinear(nn.Linear(8, 4), rank=2, omega=1.0, alpha=2.0)


def _pointnet():
    return lucidops.nn.GaussianPointNet(num_classes=3, num_gaussians=4, out_channels=8, input_transform=False)


def _clouds():
    return torch.rand(2, 16, 3) * 2 - 1


CALLS = {
    "normalize": lambda bad: lucidops.data.SyntheticShapes(4, normalize=bad),
    "orthogonal_mlp": lambda bad: lucidops.init.skipless_(_vit_like(), orthogonal_mlp=bad),
    "strict": lambda bad: lucidops.patch.apply(nn.Linear(2, 2), strict=bad),
    "keep_original": lambda bad: _lora().merge(keep_original=bad),
    "copy_modules": lambda bad: lucidops.nn.GaussianPointNet.from_distilled(_pointnet(), copy_modules=bad),
    "tnet": lambda bad: _pointnet().set_cull_threshold(0.1, tnet=bad),
    "bias": lambda bad: lucidops.nn.FrozenRandomDepthwise(4, 3, bias=bad),
    "backward": lambda bad: lucidops.profile.count_flops(nn.Linear(2, 2), torch.randn(1, 2), backward=bad),
    "fvcore": lambda bad: lucidops.profile.report(nn.Linear(2, 2), torch.randn(1, 2), fvcore=bad, repeat=1),
    "trainable_only": lambda bad: mlp_lora_parameters(nn.Linear(2, 2), trainable_only=bad),
    "progress": lambda bad: lucidops.train.distill(lambda p: p.sum(-1, keepdim=True),
                                                   lucidops.nn.GaussianPointEncoder(4, 1), _clouds(), steps=1,
                                                   progress=bad),
    "progress (finetune)": lambda bad: lucidops.train.finetune(_pointnet(), [(_clouds()[0], 0)], steps=1,
                                                              progress=bad),
    "progress (distill_pointnet)": lambda bad: lucidops.train.distill_pointnet(
        lucidops.models.PointNet(num_classes=3, feature_transform=False), _clouds(), steps=1, progress=bad),
    "progress (gradient_difference)": lambda bad: lucidops.train.gradient_difference(
        nn.Linear(2, 2), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), steps=1, lr=0.1,
        progress=bad),
    "augment": lambda bad: lucidops.data.ModelNet40("/nonexistent", augment=bad),
    "only_mlp": lambda bad: lora_layers(nn.Linear(2, 2), only_mlp=bad),
}


@pytest.mark.parametrize("flag", sorted(CALLS))
@pytest.mark.parametrize("bad", ["False", 0])
def test_flag_that_is_not_a_bool_is_refused(flag, bad):
    name = flag.split()[0]
    with pytest.raises(TypeError, match=f"{name} must be a bool, got {type(bad).__name__}"):
        CALLS[flag](bad)


def test_report_refuses_a_string_backward():
    # report and compare share one check; "False" profiled a training step
    with pytest.raises(TypeError, match="backward must be a bool"):
        lucidops.profile.report(nn.Linear(2, 2), torch.randn(1, 2), backward="False", repeat=1)
