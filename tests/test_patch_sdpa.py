"""lucidops.patch.sdpa_calls: the SDPA calls of attention modules that patch.timm_vit does not
replace (rotary, spatial-reduction, class-attention, windowed ones) answered by lucidops'
op, and every call it cannot answer exactly left to PyTorch, counted and warned about."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lucidops
from lucidops import backends
from lucidops.patch import sdpa_calls, sdpa_modules
from lucidops.reference import attention as attention_reference
from lucidops.reference import attention_dropout

# lucidops' kernel inside the models on every machine (conftest.cpp_attention_default).
pytestmark = pytest.mark.usefixtures("cpp_attention_default")

timm = pytest.importorskip("timm")

# name -> (create_model kwargs, input size, the attention class routed, calls per forward)
MODELS = {
    "eva02_tiny_patch14_224": (dict(img_size=56, depth=2), 56, "EvaAttention", 2),  # rotary, a prefix token
    "vit_small_patch16_rope_224": (dict(img_size=64, depth=2), 64, "AttentionRope", 2),
    "pvt_v2_b0": ({}, 64, "Attention", 8),  # keys spatially reduced: Nk != Nq
    "cait_xxs24_224": (dict(img_size=64, depth=2), 64, "ClassAttn", 2),  # one class-token query
    "davit_tiny": ({}, 64, "WindowAttention", 6),  # windowed attention, no position bias
}


def build(name):
    kwargs, size, _, _ = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    return model, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def forward_backward(model, x):
    x = x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def _error(got, truth, floor):
    """Relative error, relative to at least ``floor`` (a gradient that is zero in exact
    arithmetic, such as a key bias under softmax, holds only rounding noise)."""
    return ((got.double() - truth).norm() / max(truth.norm().item(), floor)).item()


def _one_ulp_apart(x, count):
    """x and count copies of it with every element moved by about one float32 rounding."""
    return [x] + [x * (1 + 2e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i)))
                  for i in range(count)]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_routed_models_match_the_original(name, monkeypatch):
    model, x = build(name)
    # Each input, its unpatched model's float64 result and the original's float32 one. Several
    # inputs one rounding apart: EVA-02's input gradient at init carries 0.2%-0.4% float32
    # error of its own, and where in that range a float32 run lands depends on every rounding
    # (timm's own SDPA: 0.0018 to 0.0036 over eight such inputs; lucidops' cpp kernel
    # 0.0018 to 0.0039), so one input compares luck, not accuracy.
    inputs = _one_ulp_apart(x, 3)
    model64 = copy.deepcopy(model).double()
    truths = [forward_backward(model64, xi.double()) for xi in inputs]
    theirs = [forward_backward(model, xi) for xi in inputs]
    _, _, cls, per_forward = MODELS[name]
    assert {type(m).__name__ for _, m in sdpa_modules(model)} == {cls}
    handle = sdpa_calls(model)
    assert sdpa_modules(model) == []  # what a second sdpa_calls would patch: nothing
    monkeypatch.setattr(backends, "_last_used", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every call is routed: no warning
        ours = [forward_backward(model, xi) for xi in inputs]
    assert handle.calls == {"lucidops": per_forward * len(inputs)}
    assert backends._last_used["attention"] == "cpp" and backends._last_used["attention_backward"] == "cpp"
    # Against float64, the routed model is as accurate as the original in float32: its largest
    # error over the inputs at most twice the original's largest.
    assert all(o[2].keys() == t[2].keys() == e[2].keys() for o, t, e in zip(ours, theirs, truths))
    parts = [("output", lambda r: r[0]), ("input grad", lambda r: r[1])]
    parts += [(key, lambda r, key=key: r[2][key]) for key in truths[0][2]]
    floor = 1e-6 * max(part(truth).norm().item() for truth in truths for _, part in parts)
    for what, part in parts:
        worst_ours = max(_error(part(o), part(e), floor) for o, e in zip(ours, truths))
        worst_theirs = max(_error(part(t), part(e), floor) for t, e in zip(theirs, truths))
        assert worst_ours <= 2 * worst_theirs + 1e-5, what
    handle.revert()
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), theirs[0][0])


def test_modules_that_do_not_take_their_sdpa_path_are_not_patched():
    """timm's Swin runs with fused_attn off by default: its forward names SDPA but never calls
    it, so patching it would add the mode's cost and report a route that never runs."""
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=56, depths=(1, 1),
                             num_heads=(3, 6), embed_dim=48).eval()
    attention = [m for m in swin.modules() if type(m).__name__ == "WindowAttention"]
    assert attention and all(m.fused_attn is False for m in attention)
    assert sdpa_modules(swin) == []
    attention[0].fused_attn = True
    assert [m for _, m in sdpa_modules(swin)] == [attention[0]]


def test_calls_lucidops_cannot_answer_stay_pytorch_counted_and_warned():
    torch.manual_seed(0)
    model = timm.create_model("vit_relpos_small_patch16_224", pretrained=False, img_size=64, depth=2).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    handle = sdpa_calls(model)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        got = model(x)
        model(x)
    assert torch.equal(got, want)  # PyTorch's own SDPA ran: bit for bit
    reason = "attn_mask is not boolean (an additive mask, e.g. a position bias)"
    assert [str(w.message) for w in caught] == [  # once for the handle, though four calls
        f"lucidops.patch.sdpa_calls: SDPA calls left to PyTorch (first in 'blocks.0.attn'): {reason}; "
        "the sdpa_calls handle's .calls counts them (handle.parts['sdpa_calls'] of patch.apply's)"]
    assert handle.calls == {reason: 4} and set(handle.calls_by_module) == {"blocks.0.attn", "blocks.1.attn"}
    # under torch.compile too (where nothing is warned: Dynamo cannot trace a warning)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), want)
    assert handle.calls == {reason: 6}


class CallsSDPA(nn.Module):
    """Calls SDPA the way the test asks, on fixed q, k, v."""

    def __init__(self, **how):
        super().__init__()
        self.how = how

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.how)


def _qkv(*shape, nk=None, generator_seed=2):
    g = torch.Generator().manual_seed(generator_seed)
    kv_shape = (*shape[:-2], shape[-2] if nk is None else nk, shape[-1])
    return torch.randn(*shape, generator=g), torch.randn(*kv_shape, generator=g), torch.randn(*kv_shape, generator=g)


def _unpatched_and_routed(how, q, k, v):
    """(SDPA's output, the output once sdpa_calls routed the call to lucidops), of the same shape."""
    module = CallsSDPA(**how)
    want = module(q, k, v)
    handle = sdpa_calls(module)
    got = module(q, k, v)
    assert handle.calls == {"lucidops": 1}
    assert got.shape == want.shape
    return want, got


ZERO_SIZE_CALLS = {  # q shape, Nk, SDPA keywords
    "3d-no-queries": ((3, 0, 8), 5, {}), "3d-no-keys": ((3, 5, 8), 0, {}), "5d-no-queries": ((1, 2, 3, 0, 8), 4, {}),
    "4d-no-keys-masked": ((2, 3, 4, 8), 0, dict(attn_mask=torch.ones(2, 1, 1, 0, dtype=torch.bool))),
    "4d-no-batch": ((0, 3, 4, 8), 4, {}),
}


@pytest.mark.parametrize("case", ZERO_SIZE_CALLS)
def test_zero_size_calls_are_routed_and_answer_as_sdpa(case):
    """No queries or no keys: the folding of leading dims used reshape(-1, ...), which cannot
    infer -1 next to a zero size, and a routed 3-D or 5-D call raised where SDPA answers."""
    shape, nk, how = ZERO_SIZE_CALLS[case]
    want, got = _unpatched_and_routed(how, *_qkv(*shape, nk=nk))
    torch.testing.assert_close(got, torch.zeros_like(want), rtol=0, atol=0)  # nothing to attend: zeros


@pytest.mark.parametrize("case", ["padding_mask", "causal_scale", "three_d", "five_d", "mask_broadcast_batch"])
def test_exact_calls_are_routed(case):
    q, k, v = _qkv(3, 4, 7, 8, nk=9)
    how = {}
    if case == "padding_mask":
        keep = torch.rand(3, 9, generator=torch.Generator().manual_seed(3)) > 0.3
        keep[:, 0] = True
        how = dict(attn_mask=keep[:, None, None, :])
    elif case == "mask_broadcast_batch":
        how = dict(attn_mask=torch.tensor([True] * 6 + [False] * 3)[None, None, None, :])
    elif case == "causal_scale":
        q, k, v = _qkv(2, 3, 9, 16)
        how = dict(is_causal=True, scale=0.3)
    elif case == "three_d":
        q, k, v = _qkv(5, 6, 8, nk=4)
    else:
        q, k, v = _qkv(2, 3, 2, 6, 8)
    want, got = _unpatched_and_routed(how, q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dropout_calls_run_lucidops_fused_dropout():
    """An SDPA call with dropout_p in (0, 1) is routed: lucidops' fused dropout, whose mask for the
    seed drawn from the same random state is the reference's; its expectation is SDPA's output."""
    q, k, v = _qkv(2, 4, 5, 8)
    module = CallsSDPA(dropout_p=0.3)
    handle = sdpa_calls(module)
    torch.manual_seed(9)
    seed = attention_dropout.draw_seed(q.device)
    torch.manual_seed(9)
    got = module(q, k, v)
    assert handle.calls == {"lucidops": 1}
    expected = attention_reference.attention(q.double(), k.double(), v.double(), dropout_p=0.3, seed=seed)
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how,shapes,reason", [
    (dict(dropout_p=1.0), None, "dropout_p 1.0 is not a number in"),
    (dict(enable_gqa=True), ((2, 4, 5, 8), (2, 2, 5, 8)), "grouped-query"),
    (dict(), ((2, 4, 5, 256), (2, 4, 5, 256)), "head dim 256 outside 4..128"),
    (dict(), ((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 16)), "head dims"),  # SDPA allows v's own head dim
    (dict(attn_mask=torch.ones(5, 5, dtype=torch.bool)), None, "not a key-padding mask"),
    (dict(scale=float("inf")), None, "scale inf is not a finite number"),  # SDPA runs it; the op refuses it
    (dict(scale=True), None, "scale True is not a finite number"),
])
def test_inexact_calls_are_left_to_pytorch(how, shapes, reason):
    if shapes is None:
        q, k, v = _qkv(2, 4, 5, 8)
    else:
        g = torch.Generator().manual_seed(4)
        q, k = torch.randn(*shapes[0], generator=g), torch.randn(*shapes[1], generator=g)
        v = torch.randn(*shapes[-1], generator=g)
    module = CallsSDPA(**how)
    handle = sdpa_calls(module)
    with pytest.warns(RuntimeWarning, match=reason):
        module(q, k, v)
    assert sum(handle.calls.values()) == 1 and "lucidops" not in handle.calls
    assert reason in next(iter(handle.calls))


def test_compiled_model_routes_and_counts():
    model, x = build("eva02_tiny_patch14_224")
    with torch.no_grad():
        want = model(x)
    handle = sdpa_calls(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x)
        compiled(x)
    assert handle.calls == {"lucidops": 4}  # two forwards of two blocks: counted at run time too
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_choosing_modules_and_bad_input():
    model, _ = build("pvt_v2_b0")
    every = [name for name, _ in sdpa_modules(model)]
    assert len(every) == 8
    assert [n for n, _ in sdpa_modules(model, every[:2])] == every[:2]
    assert [n for n, _ in sdpa_modules(model, lambda name, m: name.startswith("stages.0.") and name.endswith(".attn"))] == every[:2]
    assert len(sdpa_modules(model, type(dict(model.named_modules())[every[0]]))) == 8
    assert sdpa_modules(model, lambda name, m: name == "") == [("", model)]  # the root covers the rest
    with pytest.raises(TypeError, match="single string"):
        sdpa_modules(model, every[0])
    with pytest.raises(ValueError, match="not submodules"):
        sdpa_modules(model, ["stages.9.attn"])
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        sdpa_calls("model")
    with pytest.raises(ValueError, match="no module to patch"):
        sdpa_calls(nn.Sequential(nn.Linear(3, 3)))
    handle = sdpa_calls(model)
    assert len(handle) == 8 and "SDPA calls -> lucidops attention" in str(handle)
    with pytest.raises(ValueError, match="routed already"):
        sdpa_calls(model)
    with pytest.raises(RuntimeError, match="already patched"):
        sdpa_calls(model, every[:1])  # chosen explicitly
    handle.revert()
    sdpa_calls(model).revert()  # patchable again after revert


def test_patch_apply_routes_the_attention_modules_timm_vit_leaves():
    eva, x = build("eva02_tiny_patch14_224")
    with lucidops.patch.apply(eva) as handle:
        assert set(handle.parts) == {"sdpa_calls"} and len(handle) == 2
        with torch.no_grad():
            eva(x)
        assert handle.parts["sdpa_calls"].calls == {"lucidops": 2}
        assert lucidops.patch.apply(eva).nothing_patched  # defaults never complain (it raised), as for a ViT
    torch.manual_seed(0)
    siglip = timm.create_model("vit_base_patch16_siglip_224", pretrained=False, img_size=32, depth=1)
    handle = lucidops.patch.apply(siglip)  # its blocks' Attention swapped, its attention-pool head routed
    assert handle.parts["attention"].paths == ["blocks.0.attn"]
    assert handle.parts["sdpa_calls"].paths == ["attn_pool"]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_routed_eva_on_cuda_runs_triton(dtype, monkeypatch):
    model, x = build("eva02_tiny_patch14_224")
    model, x = model.to("cuda"), x.to("cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        want = model(x).float()
        handle = sdpa_calls(model)
        monkeypatch.setattr(backends, "_last_used", {})
        got = model(x).float()
    assert handle.calls == {"lucidops": 2} and backends._last_used["attention"] == "triton"
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    assert ((got - want).norm() / want.norm()).item() < tolerance


def test_transformers_attention_chosen_by_class():
    """transformers' attention classes call SDPA through a helper: chosen with modules=, and
    GPT-2's causal calls are routed."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=8, vocab_size=100, n_positions=32, bos_token_id=0,
                                     eos_token_id=0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
    assert sdpa_modules(model) == []  # the helper's call is not in the class's own forward
    handle = sdpa_calls(model, modules=GPT2Attention)
    with torch.no_grad():
        got = model(ids).logits
    assert handle.calls == {"lucidops": 2}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_deepcopy_of_a_patched_model_runs_its_own_weights():
    """timm's ModelEma deep-copies the model it averages: the copy's patched forwards must be the
    copy's, routed, with its own parameters."""
    model, x = build("eva02_tiny_patch14_224")
    handle = sdpa_calls(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
        got = twin(x)
        handle.revert()
        assert torch.equal(model(x), model(x))  # the original is unpatched now
        want = copy.deepcopy(twin)
        for m in want.modules():
            m.__dict__.pop("forward", None)  # the copy's weights, timm's own forwards
        torch.testing.assert_close(got, want(x), rtol=1e-4, atol=1e-5)
    assert twin.blocks[0].attn._lucidops_sdpa[0].counts == {"lucidops": 1}
    assert handle.calls == {}  # the copy's calls are its own
