"""Patched models copy and save whole: ``copy.deepcopy`` (timm's EMA model, checkpoint
averaging) and ``torch.save(model)`` / ``torch.load`` of every patch that swaps a module's
forward in place. A copy must run the patched function on its own weights, not the original's."""

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import lucidops
from lucidops.models import PointNet
from lucidops.patch.instance_method import InstanceMethod


class PointMAEEncoder(nn.Module):
    """Point-MAE's mini-PointNet patch encoder, as small as the patch accepts."""

    def __init__(self, channels: int = 16):
        super().__init__()
        self.encoder_channel = channels
        self.first_conv = nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 16, 1))
        self.second_conv = nn.Sequential(nn.Conv1d(32, 16, 1), nn.BatchNorm1d(16), nn.ReLU(),
                                         nn.Conv1d(16, channels, 1))

    def forward(self, groups):
        bs, g, n, _ = groups.shape
        feature = self.first_conv(groups.reshape(bs * g, n, 3).transpose(2, 1))
        feature = torch.cat([feature.amax(dim=2, keepdim=True).expand(-1, -1, n), feature], dim=1)
        return self.second_conv(feature).amax(dim=2).reshape(bs, g, self.encoder_channel)


def _clouds(m, n, seed):
    return torch.rand(m, n, 3, generator=torch.Generator().manual_seed(seed)) * 2 - 1


_DISTILL = dict(num_gaussians=4, distill_kwargs=dict(steps=3, batch_size=2, points_per_cloud=16))


def pointnet_root():
    torch.manual_seed(0)
    model = PointNet(4, feature_transform=False).eval()
    lucidops.patch.point_encoders(model, clouds=_clouds(4, 32, 1), **_DISTILL)
    return model, lambda m: m(_clouds(2, 32, 2))


def pointnet_root_features():
    model, _ = pointnet_root()
    return model, lambda m: torch.cat([m.global_feature(_clouds(2, 32, 2)), m.point_features(_clouds(1, 8, 3))[0]])


def point_mae_root():
    torch.manual_seed(0)
    model = PointMAEEncoder().eval()
    lucidops.patch.point_encoders(model, clouds=_clouds(4, 16, 1), **_DISTILL)
    return model, lambda m: m(_clouds(6, 16, 2).reshape(2, 3, 16, 3))


def _patched_timm(name, size, patch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=size, depth=2).eval()
    patch(model)
    return model, lambda m: m(torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2)))


def sdpa_calls_eva():
    return _patched_timm("eva02_tiny_patch14_224", 28, lucidops.patch.sdpa_calls)


def skipless_vit():
    return _patched_timm("vit_tiny_patch16_224", 32, lucidops.patch.skipless)


def peft_gpt2():
    model, run = _peft_gpt2_unpatched()
    lucidops.patch.peft_lora(model, **_PEFT_PATCH)
    return model, run


_PEFT_PATCH = dict(variant="bounded", fn="tanh", omega=2.0)


def _peft_gpt2_unpatched():
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=8, bos_token_id=0, eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"],
                                                                fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    model.eval()
    return model, lambda m: m(input_ids=torch.arange(6)[None] % 32).logits


CASES = {"point_encoders PointNet root": pointnet_root,
         "point_encoders PointNet root features": pointnet_root_features,
         "point_encoders Point-MAE root": point_mae_root,
         "sdpa_calls EVA-02": sdpa_calls_eva, "skipless ViT": skipless_vit, "peft_lora GPT-2": peft_gpt2}


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))


@pytest.mark.parametrize("case", list(CASES))
def test_copies_run_the_patch_on_their_own_weights(case):
    model, run = CASES[case]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sdpa_calls' notes about calls it leaves to PyTorch
        with torch.no_grad():
            expected = run(model)
            for copied in (copy.deepcopy(model), _saved_and_loaded(model)):
                patched = [m for m in copied.modules() if isinstance(m.__dict__.get("forward"), InstanceMethod)]
                assert patched, "the copy lost the patch"
                assert all(m.forward.__self__ is m for m in patched)  # bound to the copy's modules
                torch.testing.assert_close(run(copied), expected, rtol=0, atol=0)
                _perturb(copied)
                assert not torch.allclose(run(copied), expected)  # the copy's own weights
                torch.testing.assert_close(run(model), expected, rtol=0, atol=0)  # the original's untouched


def test_instance_method_reports_the_function_signature_without_self():
    import inspect

    def forward(module, x, scale=1.0):
        return x

    bound = InstanceMethod(forward, nn.Identity())
    assert list(inspect.signature(bound).parameters) == ["x", "scale"]
    assert bound(3) == 3


def test_undo_peft_lora_restores_a_copy_that_has_no_handle():
    """A deepcopy or a reloaded whole-model checkpoint of a patched peft model runs the patch
    but has no handle: peft's merge_and_unload and a second patch refused it, naming a handle
    it never had. undo_peft_lora puts peft's own forward back on it."""
    model, run = _peft_gpt2_unpatched()
    with torch.no_grad():
        plain = run(model)
        handle = lucidops.patch.peft_lora(model, **_PEFT_PATCH)
        patched = run(model)
        assert not torch.allclose(patched, plain)
        for copied in (copy.deepcopy(model), _saved_and_loaded(model)):
            with pytest.raises(RuntimeError, match="undo_peft_lora"):
                copied.merge_and_unload()
            with pytest.raises(RuntimeError, match="undo_peft_lora"):
                lucidops.patch.peft_lora(copied, **_PEFT_PATCH)
            assert lucidops.patch.undo_peft_lora(copied) is copied
            assert not [m for m in copied.modules() if {"_lucidops_lora", "forward", "merge"} & set(m.__dict__)]
            torch.testing.assert_close(run(copied), plain, rtol=0, atol=0)
            again = lucidops.patch.peft_lora(copied, **_PEFT_PATCH)  # patchable again
            torch.testing.assert_close(run(copied), patched, rtol=0, atol=0)
            again.revert()
            merged = copied.merge_and_unload()  # peft's plain merge, allowed again
            torch.testing.assert_close(run(merged), plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(run(model), patched, rtol=0, atol=0)  # the original stays patched
        lucidops.patch.undo_peft_lora(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            handle.revert()  # nothing left to do, and nothing to warn about
        torch.testing.assert_close(run(model), plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no LoRA layer patched"):
        lucidops.patch.undo_peft_lora(model)
    # A model patched before merge_before was recorded (a checkpoint saved by an earlier
    # version) is restored too: the missing key stopped the undo halfway, for good.
    lucidops.patch.peft_lora(model, **_PEFT_PATCH)
    for layer in model.modules():
        layer.__dict__.get("_lucidops_lora", {}).pop("merge_before", None)
    lucidops.patch.undo_peft_lora(model)
    assert not [m for m in model.modules() if {"_lucidops_lora", "forward", "merge"} & set(m.__dict__)]
    with torch.no_grad():
        torch.testing.assert_close(run(model), plain, rtol=0, atol=0)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        lucidops.patch.undo_peft_lora("model")


def test_patching_a_copy_of_a_patched_point_model_says_it_has_no_handle():
    model, _ = pointnet_root()
    with pytest.raises(RuntimeError, match="a copy of a patched model has no handle"):
        lucidops.patch.point_encoders(copy.deepcopy(model), clouds=_clouds(4, 32, 1), **_DISTILL)
