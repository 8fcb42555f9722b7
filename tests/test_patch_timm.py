"""ManyHeadAttention, the timm ViT patch, leaner() and attention_condition_numbers on real
timm models built without pretrained weights."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import lucidops
from lucidops.nn import ManyHeadAttention
from lucidops.reference import attention as attention_reference
from lucidops.reference import attention_dropout

timm = pytest.importorskip("timm")
from timm.layers.attention import Attention  # noqa: E402

# lucidops' kernel inside the models on every machine (conftest.cpp_attention_default).
pytestmark = pytest.mark.usefixtures("cpp_attention_default")


def tiny_vit(name="vit_tiny_patch16_224", **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, img_size=64, **kwargs).eval()


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_patched_model_matches_original_and_reverts(name):
    model = tiny_vit(name)
    x = torch.randn(2, 3, 64, 64)
    params_before = {n: p for n, p in model.named_parameters()}
    expected = model(x)
    handle = lucidops.patch.timm_vit(model)
    assert len(handle) == len(model.blocks)
    assert all(isinstance(b.attn, ManyHeadAttention) for b in model.blocks)
    assert {n: p for n, p in model.named_parameters()} == params_before  # same objects, same names
    got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # The CPU default in float32 is the cpp kernel at every head dim (timm's tiny models: 64).
    assert lucidops.backends.last_used("attention") == "cpp"

    # Gradients flow to the shared parameters and match the original model's.
    model.zero_grad()
    model(x).sum().backward()
    patched_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    handle.revert()
    assert all(type(b.attn) is Attention for b in model.blocks)
    model.zero_grad()
    torch.testing.assert_close(model(x), expected)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        err = (patched_grads[n] - p.grad).norm() / p.grad.norm().clamp_min(1e-30)
        assert err < 1e-5, (n, err)


def test_patched_eval_model_stays_in_eval_mode_and_revert_follows_the_model_mode():
    """from_timm builds a fresh module (training by default): an eval model with attention
    dropout got dropout after patching. And a revert after model.eval() must put back eval
    modules (the originals were outside the model while it switched)."""
    model = tiny_vit(attn_drop_rate=0.3)  # eval mode
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    handle = lucidops.patch.timm_vit(model)
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    model.train()
    handle.revert()
    assert all(m.training for m in model.modules())
    model.eval()
    handle = lucidops.patch.timm_vit(model)
    model.train()
    model.eval()
    handle.revert()
    assert not any(m.training for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("gated", [False, True])
def test_patch_keeps_the_order_of_parameters_and_state_dict_keys(gated):
    """Optimizer states and DDP buckets index parameters by position: a patched model must list
    them in timm's order (before: a gated attention's gate moved after proj, and an Adam state
    saved patched loaded after revert() with gate and proj moments swapped, silently)."""
    model = tiny_vit(depth=2)
    model.blocks[1].attn = Attention(192, num_heads=3, qkv_bias=True, gated=gated, qk_norm=True,
                                    norm_layer=torch.nn.LayerNorm).eval()
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    with lucidops.patch.timm_vit(model):
        assert isinstance(model.blocks[1].attn, ManyHeadAttention)
        assert [n for n, _ in model.named_parameters()] == names
        assert list(model.state_dict()) == keys


def test_hooks_on_a_swapped_module_keep_firing():
    """Feature-extraction hooks on blocks.i.attn: the swapped-in module shares the original's
    hook tables (they stopped firing), and a hook added while patched stays after revert."""
    model = tiny_vit(depth=1)
    x = torch.randn(1, 3, 64, 64)
    fired = []
    model.blocks[0].attn.register_forward_hook(lambda m, args, out: fired.append("before"))
    handle = lucidops.patch.timm_vit(model)
    late = model.blocks[0].attn.register_forward_hook(lambda m, args, out: fired.append("while"))
    model(x)
    assert fired == ["before", "while"]
    handle.revert()
    model(x)
    assert fired[2:] == ["before", "while"]
    late.remove()  # its handle reaches the original's table too
    model(x)
    assert fired[4:] == ["before"]



def test_a_full_backward_hook_registered_while_patched_fires_after_revert():
    """register_full_backward_hook sets the flag _is_full_backward_hook on the module it is
    called on: the hook table is shared, but the flag stayed on the replacement and PyTorch
    silently skipped the hook on the original after revert."""
    model = tiny_vit(depth=1)
    x = torch.randn(1, 3, 64, 64)
    fired = []
    handle = lucidops.patch.timm_vit(model)
    model.blocks[0].attn.register_full_backward_hook(lambda m, gi, go: fired.append(type(m).__name__))
    model(x).sum().backward()
    assert fired == ["ManyHeadAttention"]
    handle.revert()
    model(x).sum().backward()
    assert fired == ["ManyHeadAttention", "Attention"]


def test_revert_keeps_the_mode_of_submodules_shared_with_the_replacement():
    """Dropouts of the attention (shared with ManyHeadAttention) switched off while patched
    were switched back on by the undo's recursive original.train(...)."""
    model = tiny_vit(depth=1, attn_drop_rate=0.1, proj_drop_rate=0.1).train()
    handle = lucidops.patch.timm_vit(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.eval()
    modes = {n: m.training for n, m in model.named_modules() if n != "blocks.0.attn"}
    handle.revert()
    assert type(model.blocks[0].attn) is Attention and model.blocks[0].attn.training
    assert {n: m.training for n, m in model.named_modules() if n != "blocks.0.attn"} == modes
    assert not model.blocks[0].attn.attn_drop.training and not model.blocks[0].attn.proj_drop.training
    # Switched off before patching: ManyHeadAttention.from_timm's recursive train() turned them on.
    model = tiny_vit(depth=1, attn_drop_rate=0.1, proj_drop_rate=0.1).train()
    model.blocks[0].attn.attn_drop.eval()
    with lucidops.patch.timm_vit(model):
        assert not model.blocks[0].attn.attn_drop.training and model.blocks[0].attn.proj_drop.training
    assert not model.blocks[0].attn.attn_drop.training and model.blocks[0].attn.proj_drop.training


def test_revert_keeps_layers_set_in_place_of_shared_ones_while_patched():
    """ManyHeadAttention shares qkv and proj with the timm Attention it replaces. A layer the
    user set in their place while patched, or peft's LoRA layer wrapping qkv, was dropped by
    the undo (the Attention came back with its old children), its weights with it."""
    model = tiny_vit(depth=1)
    handle = lucidops.patch.timm_vit(model)
    proj = torch.nn.Linear(192, 192)
    model.blocks[0].attn.proj = proj
    handle.revert()
    assert type(model.blocks[0].attn) is Attention and model.blocks[0].attn.proj is proj

    peft = pytest.importorskip("peft")
    model = tiny_vit(depth=1)
    x = torch.randn(2, 3, 64, 64)
    handle = lucidops.patch.timm_vit(model)
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["qkv"], init_lora_weights=False))
    expected = peft_model(x)
    keys = set(peft_model.state_dict())
    assert any("lora_A" in k for k in keys)
    handle.revert()
    assert type(model.blocks[0].attn) is Attention and set(peft_model.state_dict()) == keys
    torch.testing.assert_close(peft_model(x), expected, rtol=1e-4, atol=1e-5)


def test_a_later_patch_inside_the_replacement_is_not_carried_when_reverted_first():
    """Reverted out of order, the attention's undo carried a layer another handle had swapped
    in (still pending) onto the timm Attention; that handle's undo then restored the detached
    replacement, and the layer stayed in the model for good."""
    from lucidops.patch import PatchHandle

    model = tiny_vit(depth=1)
    proj = model.blocks[0].attn.proj
    h1 = lucidops.patch.timm_vit(model)
    h2 = PatchHandle(model)
    h2.swap_child(model, "blocks.0.attn.proj", torch.nn.Linear(192, 192))
    h1.revert()
    h2.revert()
    assert type(model.blocks[0].attn) is Attention and model.blocks[0].attn.proj is proj


def test_heads_the_kernel_cannot_take_are_left_to_timm():
    """Head dim 192 (one head at width 192) is outside 4..128: timm_vit says so, and apply leaves
    those modules to timm's SDPA (sdpa_calls counts them) instead of swapping in a module that fails."""
    model = tiny_vit(num_heads=1)
    x = torch.randn(1, 3, 64, 64)
    expected = model(x)
    with pytest.raises(ValueError, match=r"head dim \[192\], outside lucidops' 4..128"):
        lucidops.patch.timm_vit(model)
    handle = lucidops.patch.apply(model)
    assert all(type(b.attn) is Attention for b in model.blocks)
    with pytest.warns(RuntimeWarning, match="head dim 192"):
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert handle.parts["sdpa_calls"].calls == {"head dim 192 outside 4..128": 12}
    handle.revert()


def test_patch_refuses_a_model_without_vit_attention():
    with pytest.raises(ValueError, match="no timm ViT Attention"):
        lucidops.patch.timm_vit(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    model = tiny_vit(depth=1)
    with lucidops.patch.timm_vit(model), pytest.raises(ValueError, match="already lucidops' ManyHeadAttention"):
        lucidops.patch.timm_vit(model)


@pytest.mark.parametrize("num_heads", [12, 3])  # head dims 4 and 16
def test_state_dict_loads_and_outputs_match_timm_attention(num_heads):
    torch.manual_seed(1)
    kwargs = dict(qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm)
    theirs = Attention(48, num_heads=num_heads, **kwargs).eval()
    ours = ManyHeadAttention(48, num_heads=num_heads, **kwargs).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 9, 48, requires_grad=True)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x, is_causal=True), theirs(x, is_causal=True), rtol=1e-5, atol=1e-6)
    mask = torch.rand(2, 9) > 0.4
    mask[:, 0] = True
    torch.testing.assert_close(ours(x, attn_mask=mask), theirs(x, attn_mask=mask[:, None, None, :]),
                               rtol=1e-5, atol=1e-6)
    # Any other mask runs PyTorch's SDPA as timm's module does (it raised before: NaFlexViT's
    # padded batches pass additive (B, 1, N, N) masks), with a warning; a (N, N) query-by-key
    # mask with B == N has B * N elements and must not be misread as key padding.
    square = torch.ones(9, 9, dtype=torch.bool).tril()
    additive = torch.randn(2, 1, 9, 9)
    per_query = torch.rand(2, 1, 9, 9) > 0.3
    per_query[..., 0] = True
    for inputs, other in ((x, torch.zeros(9, 9)), (x, additive), (x, per_query), (torch.randn(9, 9, 48), square)):
        with pytest.warns(RuntimeWarning, match="is not a bool key padding mask"):
            got = ours(inputs, attn_mask=other)
        torch.testing.assert_close(got, theirs(inputs, attn_mask=other), rtol=1e-5, atol=1e-6)


def _expected_with_dropout(module, x, p, seed, mask=None, causal=False):
    """timm's Attention computed by hand, its attention from lucidops' reference dropping by ``seed``."""
    b, n, _ = x.shape
    q, k, v = module.qkv(x).reshape(b, n, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    out = attention_reference.attention(q, k, v, causal=causal, key_padding_mask=mask, scale=module.scale,
                                        dropout_p=p, seed=seed)
    return module.proj(out.transpose(1, 2).reshape(b, n, -1))


def test_attention_dropout_in_training_is_fused(monkeypatch):
    """Training with attn_drop > 0 runs lucidops' kernel with fused dropout (no warning): the
    reference's mask for the seed drawn from the same random state; another draw gives another
    output, and eval mode has no dropout (timm's output)."""
    torch.manual_seed(3)
    theirs = Attention(32, num_heads=8, attn_drop=0.25).train()
    ours = ManyHeadAttention(32, num_heads=8, attn_drop=0.25).train()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 6, 32, requires_grad=True)
    for kwargs in ({}, {"is_causal": True}):
        monkeypatch.setattr(lucidops.backends, "_last_used", {})
        torch.manual_seed(4)
        seed = attention_dropout.draw_seed(x.device)
        torch.manual_seed(4)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = ours(x, **kwargs)
            got.sum().backward()
        assert lucidops.backends.last_used("attention") == "cpp"
        assert lucidops.backends.last_used("attention_backward") == "cpp"
        expected = _expected_with_dropout(theirs, x, 0.25, seed, causal=kwargs.get("is_causal", False))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.manual_seed(5)
        assert not torch.equal(ours(x, **kwargs), got)  # dropout is on: another draw, another output
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_attention_dropout_keeps_lucidops_rule_for_queries_without_keys():
    """A batch element whose keys are all padded gets zeros and zero gradient in training with
    dropout (SDPA would give NaN); the other matches the reference under the same seed."""
    torch.manual_seed(6)
    ours = ManyHeadAttention(16, num_heads=4, attn_drop=0.5).train()
    ours.proj.bias.data.zero_()
    x = torch.randn(2, 5, 16, requires_grad=True)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    torch.manual_seed(7)
    seed = attention_dropout.draw_seed(x.device)
    torch.manual_seed(7)
    got = ours(x, attn_mask=mask)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(got[1], torch.zeros_like(got[1]))
    torch.testing.assert_close(got[0], _expected_with_dropout(ours, x, 0.5, seed, mask)[0])


def test_attn_drop_of_one_runs_sdpa_and_says_so():
    ours = ManyHeadAttention(16, num_heads=4, attn_drop=1.0).train()
    x = torch.randn(2, 5, 16)
    with pytest.warns(RuntimeWarning, match="attn_drop = 1"):
        got = ours(x)
    torch.testing.assert_close(got, ours.proj.bias.expand_as(got))  # every probability dropped


@pytest.mark.skipif(not lucidops.backends.triton_interpreting(), reason="needs the Triton interpreter")
def test_patched_model_on_the_triton_backend():
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2,
                              num_heads=12).eval()  # head dim 16, 5 tokens
    x = torch.randn(1, 3, 32, 32)
    expected = model(x)
    with lucidops.patch.timm_vit(model), lucidops.use_backend("triton"):
        got = model(x)
        assert lucidops.backends.last_used("attention") == "triton"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_leaner_configuration_and_costs():
    report = lucidops.patch.leaner("vit_tiny_patch16_224", heads_factor=2, depth_divisor=2, img_size=64)
    assert report.original == {"embed_dim": 192, "depth": 12, "num_heads": 3, "head_dim": 64, "mlp_ratio": 4.0}
    assert report.leaner == {"embed_dim": 192, "depth": 6, "num_heads": 6, "head_dim": 32, "mlp_ratio": 4.0}
    model = report.build()
    assert len(model.blocks) == 6 and model.blocks[0].attn.num_heads == 6
    assert report.params[1] == sum(p.numel() for p in model.parameters())
    assert report.params[1] < 0.6 * report.params[0] and report.flops[1] < 0.6 * report.flops[0]
    with torch.no_grad():
        flops = lucidops.profile.count_flops(model.eval(), torch.randn(1, 3, 64, 64))["total"]
    assert report.flops[1] == flops
    assert "| params (M) |" in report.table()

    wide = lucidops.patch.leaner("vit_tiny_patch16_224", heads_factor=2, depth_divisor=3, mlp_ratio=2.0,
                                 keep="head_dim", img_size=64)
    assert wide.leaner == {"embed_dim": 384, "depth": 4, "num_heads": 6, "head_dim": 64, "mlp_ratio": 2.0}
    for kwargs, message in ((dict(heads_factor=0), "heads_factor"), (dict(keep="depth"), "keep"),
                            (dict(heads_factor=5), "not divisible"), (dict(heads_factor=32), "head_dim 2 is outside")):
        with pytest.raises(ValueError, match=message):
            lucidops.patch.leaner("vit_tiny_patch16_224", img_size=32, **kwargs)
    # Named, instead of an AttributeError from inside or a comparison error (or a bool taken as 1).
    for kwargs, error, message in ((dict(depth_divisor="2"), TypeError, "depth_divisor must be a real number"),
                                   (dict(heads_factor=True), TypeError, "heads_factor must be an int"),
                                   (dict(mlp_ratio=float("nan")), ValueError, "mlp_ratio must be finite"),
                                   (dict(img_size=0), ValueError, "img_size must be an int >= 1")):
        with pytest.raises(error, match=message):
            lucidops.patch.leaner("vit_tiny_patch16_224", **kwargs)
    with pytest.raises(ValueError, match="model_name 'resnet18' is not a timm vision transformer"):
        lucidops.patch.leaner("resnet18")


def test_attention_condition_numbers_match_an_independent_computation():
    model = tiny_vit(depth=2)
    x = torch.randn(2, 3, 64, 64)
    result = lucidops.conditioning.attention_condition_numbers(model, x)
    assert [r.name for r in result] == ["blocks.0.attn", "blocks.1.attn"]

    # Independent: the input of block 1's attention is norm1(output of block 0); per-head
    # outputs from torch's SDPA in float64, kappa from the full SVD.
    inputs = {}
    model.blocks[1].norm1.register_forward_hook(lambda m, a, out: inputs.setdefault("x", out))
    model(x)
    attn = model.blocks[1].attn
    b, n, c = inputs["x"].shape
    qkv = F.linear(inputs["x"].double(), attn.qkv.weight.double(), attn.qkv.bias.double())
    q, k, v = qkv.reshape(b, n, 3, 3, 64).permute(2, 0, 3, 1, 4).unbind(0)
    heads = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, d)
    for i in range(b):
        s = torch.linalg.svd(heads[i].transpose(0, 1).reshape(n, c))[1]
        torch.testing.assert_close(result[1].block[i], s[0] / s[-1], rtol=1e-9, atol=0)
        for h in range(3):
            s = torch.linalg.svd(heads[i, h])[1]
            torch.testing.assert_close(result[1].heads[i, h], s[0] / s[-1], rtol=1e-9, atol=0)
    assert result[0].heads.shape == (2, 3) and (result[0].block >= 1).all()
    # The model is left as it was: same outputs, no hooks, eval/train mode restored.
    # A model in train mode with a frozen part in eval keeps each module's own mode.
    model.train()
    model.blocks[0].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    lucidops.conditioning.attention_condition_numbers(model, x)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training and not model.blocks[0].training and not model.blocks[0].attn._forward_pre_hooks


def test_attention_condition_numbers_refuse_attention_they_cannot_model():
    """EVA-02's EvaAttention has qkv, num_heads and head_dim like timm's Attention, but rotary
    embeddings the diagnostic does not apply: it must say so, not return another model's kappa."""
    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1).eval()
    with pytest.raises(ValueError, match="EvaAttention"):
        lucidops.conditioning.attention_condition_numbers(eva, torch.randn(1, 3, 28, 28))


def test_attention_condition_numbers_refuse_masked_attention():
    """A block called with an attention mask (padded tokens) was modelled unmasked, silently."""
    torch.manual_seed(0)
    vit = tiny_vit(depth=1)

    class Padded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vit = vit

        def forward(self, x):
            tokens = self.vit.patch_embed(x)
            mask = torch.ones(x.shape[0], 1, 1, tokens.shape[1], dtype=torch.bool)
            mask[..., -3:] = False
            return self.vit.blocks[0].attn(tokens, attn_mask=mask)

    with pytest.raises(ValueError, match="'vit.blocks.0.attn' was called with an attention mask"):
        lucidops.conditioning.attention_condition_numbers(Padded(), torch.randn(1, 3, 64, 64))
    assert len(lucidops.conditioning.attention_condition_numbers(vit, torch.randn(1, 3, 64, 64))) == 1


def test_leaner_reads_the_hidden_width_of_gated_mlps():
    """EVA-02's SwiGLU fc1 holds gate and value (2x the hidden width): the ratio is fc2's."""
    report = lucidops.patch.leaner("eva02_tiny_patch14_224", heads_factor=2, depth_divisor=2, img_size=28)
    assert report.original["mlp_ratio"] == pytest.approx(512 / 192)
    model = report.build()
    assert model.blocks[0].mlp.fc2.in_features == 512
    assert report.params[1] == sum(p.numel() for p in model.parameters())
    assert report.params[1] < 0.7 * report.params[0]  # half the blocks, same widths


def _register_tiny_swiglu_packed_vit() -> str:
    """A tiny ViT with vit_giant_patch14_dinov2's MLP recipe (SwiGLUPacked from dim * 5.33)."""
    import timm
    from timm.layers import SwiGLUPacked
    from timm.models import register_model
    from timm.models.vision_transformer import _create_vision_transformer

    name = "lucidops_test_vit_tiny_swiglu_packed"
    if name not in timm.list_models(name):
        def build(pretrained=False, **kwargs):
            args = dict(patch_size=16, embed_dim=192, depth=2, num_heads=3, mlp_ratio=2.66667 * 2,
                        mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU)
            return _create_vision_transformer(name, pretrained=pretrained, **dict(args, **kwargs))

        build.__name__ = name
        register_model(build)
    return name


def test_leaner_reads_the_hidden_width_of_a_packed_swiglu_vit():
    """VisionTransformer builds SwiGLUPacked from dim * mlp_ratio, so its fc2 is half that:
    reading fc2 halved the MLP of vit_giant_patch14_dinov2 (758M params rebuilt for 1136M)."""
    name = _register_tiny_swiglu_packed_vit()
    report = lucidops.patch.leaner(name, heads_factor=2, depth_divisor=1, img_size=32)
    base = timm.create_model(name, pretrained=False, img_size=32)
    model = report.build()
    assert model.blocks[0].mlp.fc1.out_features == base.blocks[0].mlp.fc1.out_features == 1024
    assert report.params[1] == report.params[0] == sum(p.numel() for p in base.parameters())  # width and depth kept


def test_leaner_refuses_a_model_that_is_not_a_vit_naming_it():
    # timm's own TypeError about img_size named no lucidops rule
    with pytest.raises(ValueError, match="'convnext_atto' is not a timm vision transformer"):
        lucidops.patch.leaner("convnext_atto", img_size=64)


def test_many_head_vit_runs_the_cpp_kernel_and_matches():
    """24 heads of dim 8 at width 192: the small-head case the CPU default sends to cpp."""
    model = tiny_vit("vit_tiny_patch16_224", num_heads=24)
    x = torch.randn(2, 3, 64, 64)
    expected = model(x)
    handle = lucidops.patch.timm_vit(model)
    assert model.blocks[0].attn.head_dim == 8
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert lucidops.backends.last_used("attention") == "cpp"
    handle.revert()


def test_from_timm_refuses_other_attention_modules():
    """Any module with num_heads and head_dim was wrapped: EVA's attention lost its q and v
    biases (outputs 5.9 off, silently). Exactly timm's ViT Attention, or a ManyHeadAttention."""
    import timm.models.eva as eva

    other = eva.EvaAttention(32, num_heads=4, qkv_bias=True, qkv_fused=True, norm_layer=torch.nn.LayerNorm)
    with pytest.raises(TypeError, match="module must be timm's ViT Attention .* got timm.models.eva.EvaAttention"):
        ManyHeadAttention.from_timm(other)
    vit_attention = tiny_vit().blocks[0].attn
    x = torch.randn(2, 5, vit_attention.qkv.in_features)
    once = ManyHeadAttention.from_timm(vit_attention)
    torch.testing.assert_close(ManyHeadAttention.from_timm(once)(x), vit_attention(x))


def test_many_head_attention_is_causal_must_be_a_bool():
    # bool(is_causal): the string "False" ran causal attention (timm's module raises)
    module = ManyHeadAttention(32, num_heads=4).eval()
    x = torch.randn(1, 5, 32)
    for bad in ("False", 1, None):
        with pytest.raises(TypeError, match="is_causal must be a bool"):
            module(x, is_causal=bad)
    assert not torch.equal(module(x, is_causal=True), module(x))


def test_many_head_attention_names_a_wrong_input_width():
    """timm's module fails inside the qkv matmul ("mat1 and mat2 shapes cannot be multiplied");
    the error here names the input and the width it needs."""
    module = ManyHeadAttention(48, num_heads=6)
    with pytest.raises(ValueError, match=r"x must be \(B, N, dim=48\), got shape \(2, 10, 32\)"):
        module(torch.randn(2, 10, 32))
    with pytest.raises(ValueError, match=r"x must be \(B, N, dim=48\)"):
        module(torch.randn(10, 48))


def test_many_head_attention_checks_its_sizes_when_built():
    """dim or attn_head_dim 0 was a ZeroDivisionError, a float a torch.empty TypeError."""
    for kwargs, error, message in ((dict(dim=0), ValueError, "dim must be an int >= 1"),
                                   (dict(dim=48.0), TypeError, "dim must be an int"),
                                   (dict(num_heads=True), TypeError, "num_heads must be an int"),
                                   (dict(attn_head_dim=0), ValueError, "attn_head_dim must be an int >= 1")):
        kwargs = {"dim": 48, "num_heads": 6, **kwargs}
        with pytest.raises(error, match=message):
            ManyHeadAttention(**kwargs)
    assert ManyHeadAttention(48, num_heads=2, attn_head_dim=4).attn_dim == 8
    # A head dim beyond the kernel's still runs where forward hands the call to SDPA.
    wide = ManyHeadAttention(512, num_heads=2)
    with pytest.warns(RuntimeWarning, match="runs PyTorch"):  # the additive mask goes to SDPA
        assert wide(torch.randn(2, 7, 512), attn_mask=torch.zeros(7, 7)).shape == (2, 7, 512)
    # A plain call too (it was the kernel's error about q, an argument the caller never saw),
    # with timm's result for the same weights.
    for module in (wide, ManyHeadAttention(6, num_heads=3)):
        x = torch.randn(2, 5, module.attn_dim)
        with pytest.warns(RuntimeWarning, match=rf"head_dim = {module.head_dim} is outside the kernel's 4..128"):
            out = module(x)
        timm_attention = Attention(module.attn_dim, num_heads=module.num_heads)
        timm_attention.load_state_dict(module.state_dict())
        torch.testing.assert_close(out, timm_attention(x))


def test_a_patched_vit_traces_with_torch_fx_and_timm_feature_extraction():
    """The checks and branches of ManyHeadAttention.forward read values, so torch.fx tracing
    (timm's create_feature_extractor) of a patched ViT failed ('is_causal must be a bool, got
    Proxy'). The attention runs as one leaf of the graph, the lucidops kernel inside it."""
    from timm.models import create_feature_extractor

    model = tiny_vit(depth=2)
    x = torch.randn(2, 3, 64, 64)
    handle = lucidops.patch.timm_vit(model)
    expected = model(x)
    traced = torch.fx.symbolic_trace(model)
    leaves = [node for node in traced.graph.nodes if node.op == "call_function" and node.target.__name__ == "_attend"]
    assert len(leaves) == 2
    with lucidops.use_backend("cpp"):
        assert torch.equal(traced(x), expected)
    assert lucidops.backends.last_used("attention") == "cpp"
    features = create_feature_extractor(model, return_nodes=["blocks.1"])(x)["blocks.1"]
    assert torch.equal(model.head(model.fc_norm(model.norm(features)[:, 0])), expected)
    with pytest.raises(TypeError, match="is_causal must be a bool"):  # the leaf still checks at run time
        torch.fx.symbolic_trace(model.blocks[0].attn)(torch.randn(1, 5, 192), None, "False")
    handle.revert()
