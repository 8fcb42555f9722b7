"""lucidops.patch.peft_lora and lucidops.train.gradient_difference on a real peft model over
a tiny GPT-2 built from a config (no weights downloaded)."""

import math
import warnings

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from lucidops.patch import apply as apply_patches  # noqa: E402
from lucidops.patch.peft_lora import is_mlp_name, peft_lora  # noqa: E402
from lucidops.train.unlearning import gradient_difference  # noqa: E402

VOCAB = 64


def make_model(seed=0, targets=("c_attn", "c_proj", "c_fc"), n_layer=2, dropout=0.0, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16, bos_token_id=0,
                     eos_token_id=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), fan_in_fan_out=True, lora_dropout=dropout)
        # peft keeps the adapters float32 over a half base (autocast_adapter_dtype)
        model = get_peft_model(GPT2LMHeadModel(cfg).to(dtype), config)
    # B starts at zero in peft: randomise it so the adapters change the output.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)
    return model.eval()


def ids(n=4, t=8, seed=1):
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def lora_linears(model):
    from peft.tuners.lora import Linear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]


def by_hand(layer, x, fn, omega, scale, placement, factors=None):
    """The definition in float64 from W0 (Conv1D stores W0^T), A, B (or ``factors``, (A, B))."""
    base = layer.get_base_layer()
    w0 = base.weight.double().t()
    a, b = factors or (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    a, b = a.double(), b.double()
    f = torch.sin if fn == "sin" else torch.tanh
    x = x.double()
    if placement == "weight":
        return x @ (w0 + scale * f(omega * b @ a)).T + base.bias.double()
    return x @ w0.T + scale * f(omega * (x @ a.T) @ b.T) + base.bias.double()


@pytest.mark.parametrize("variant,fn,placement", [("sine", "sin", "weight"), ("bounded", "tanh", "weight"),
                                                  ("bounded", "sin", "output")])
def test_patched_layer_matches_definition(variant, fn, placement):
    model = make_model()
    omega = 2.5
    handle = peft_lora(model, variant, omega=omega, fn=fn, placement=placement)
    layers = lora_linears(model)
    assert len(handle) == len(layers) == 8
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
    for name, layer in layers:
        if name.endswith("c_proj") and "mlp" in name:
            xin = torch.randn(3, 5, 128, generator=torch.Generator().manual_seed(3))
        else:
            xin = x
        gain = math.sqrt(xin.shape[-1]) if variant == "sine" else 1.0
        want = by_hand(layer, xin, fn, omega, layer.scaling["default"] / gain, placement)
        got = layer(xin)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        # and it is not peft's plain LoRA output
        assert (got - layer._lucidops_lora["original"](xin)).abs().max() > 1e-3


@pytest.mark.parametrize("placement", ["weight", "output"])
@pytest.mark.parametrize("adapter_dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                            (torch.float32, torch.bfloat16)], ids=str)
def test_adapters_over_a_bfloat16_base_form_the_phase_unrounded(placement, adapter_dtypes):
    """peft keeps adapters in float32 over a half base (autocast_adapter_dtype). The patched
    layer cast them to the base's bfloat16 before the op: at omega 300 its output erred by
    tens of percent; now the op takes them as they are, and their gradients stay float32.
    Adapters of other dtypes go to the op in float32 (float16 over bfloat16 lost 12% when
    cast down)."""
    model = make_model(n_layer=1, targets=("c_fc",), dtype=torch.bfloat16)
    layer = lora_linears(model)[0][1]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    assert layer.get_base_layer().weight.dtype == torch.bfloat16 and a.dtype == b.dtype == torch.float32
    with torch.no_grad():
        a.normal_(0.0, 0.3)
        a.data, b.data = a.data.to(adapter_dtypes[0]), b.data.to(adapter_dtypes[1])
    omega = 300.0
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with peft_lora(model, "bounded", fn="sin", omega=omega, placement=placement):
        got = layer(x)
        got.float().sum().backward()
    assert got.dtype == torch.bfloat16 and (a.grad.dtype, b.grad.dtype) == adapter_dtypes
    assert torch.isfinite(a.grad).all() and b.grad.abs().sum() > 0
    scale = layer.scaling["default"]
    with torch.no_grad():
        want = by_hand(layer, x, "sin", omega, scale, placement)
        rounded = by_hand(layer, x, "sin", omega, scale, placement, (a.to(torch.bfloat16), b.to(torch.bfloat16)))

    def rel(t):
        return float((t.detach().double() - want).norm() / want.norm())

    assert rel(got) < 5e-3  # about one bfloat16 rounding of the output
    assert rel(rounded) > 0.05  # what the old cast cost: the test tells the two apart


def by_hand_with_dropout(layer, x, u, fn, omega, scale, placement):
    """by_hand with the adapter reading u = lora_dropout(x) and the base reading x, as peft does."""
    base = layer.get_base_layer()
    w0, bias = base.weight.double().t(), base.bias.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    f = torch.sin if fn == "sin" else torch.tanh
    x, u = x.double(), u.double()
    if placement == "weight":
        return x @ w0.T + u @ (scale * f(omega * b @ a)).T + bias
    return x @ w0.T + scale * f(omega * (u @ a.T) @ b.T) + bias


@pytest.mark.parametrize("fn,placement", [("sin", "weight"), ("tanh", "output")])
def test_lora_dropout_drops_the_adapter_input_in_training(fn, placement):
    model = make_model(dropout=0.2)
    peft_lora(model, "bounded", omega=2.0, fn=fn, placement=placement, only_mlp=True)
    layer = dict(lora_linears(model))["base_model.model.transformer.h.0.mlp.c_fc"]
    x = torch.randn(3, 5, 32)
    scale = layer.scaling["default"]
    model.train()
    torch.manual_seed(11)
    got = layer(x)
    torch.manual_seed(11)  # peft's nn.Dropout draws the same mask again
    u = torch.nn.functional.dropout(x, 0.2, training=True)
    torch.testing.assert_close(got.double(), by_hand_with_dropout(layer, x, u, fn, 2.0, scale, placement),
                               rtol=1e-5, atol=1e-5)
    got.square().sum().backward()
    assert layer.lora_A["default"].weight.grad.abs().sum() > 0 and layer.lora_B["default"].weight.grad.abs().sum() > 0
    model.eval()  # no dropout: the layer's definition on x
    torch.testing.assert_close(layer(x).double(), by_hand(layer, x, fn, 2.0, scale, placement), rtol=1e-5, atol=1e-5)


def test_gradients_reach_the_same_peft_parameters():
    model = make_model()
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict().keys())
    with peft_lora(model, "bounded", omega=1.5, only_mlp=True):
        assert list(model.state_dict().keys()) == keys
        assert all(params[n] is p for n, p in model.named_parameters())
        layer = dict(lora_linears(model))["base_model.model.transformer.h.0.mlp.c_fc"]
        x = torch.randn(4, 32, dtype=torch.float64)
        a = layer.lora_A["default"].weight
        b = layer.lora_B["default"].weight
        layer(x.float()).pow(2).sum().backward()
        ga, gb = a.grad.clone(), b.grad.clone()
        a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
        w0 = layer.get_base_layer().weight.double().t()
        y = x @ (w0 + layer.scaling["default"] * torch.sin(1.5 * b64 @ a64)).T + layer.get_base_layer().bias.double()
        y.pow(2).sum().backward()
        torch.testing.assert_close(ga.double(), a64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(gb.double(), b64.grad, rtol=1e-4, atol=1e-5)
        assert layer.get_base_layer().weight.grad is None


def test_revert_is_bit_exact_and_context_manager():
    model = make_model()
    x = ids()
    with torch.no_grad():
        before = model(x).logits.clone()
        handle = peft_lora(model, "sine", omega=3.0)
        patched = model(x).logits.clone()
        handle.revert()
        after = model(x).logits
        assert not torch.equal(before, patched)
        assert torch.equal(before, after)
        assert all("forward" not in m.__dict__ for _, m in lora_linears(model))
        with peft_lora(model, "bounded", omega=3.0, fn="tanh"):
            assert not torch.equal(model(x).logits, before)
        assert torch.equal(model(x).logits, before)


def test_an_adapter_on_some_layers_patches_those():
    """The active adapter sits on the MLP's c_fc only, another on c_attn: peft runs the plain base
    where the active adapter is absent, and the patch takes the layers that hold it (before, it
    refused the model)."""
    from peft import LoraConfig

    model = make_model(targets=("c_attn",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("mlp_only", LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True))
    model.set_adapter("mlp_only")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.mlp_only" in name:
                p.normal_(0.0, 0.3)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
        handle = peft_lora(model, "bounded", omega=2.0, fn="tanh")
        assert handle.names and all(name.endswith("mlp.c_fc") for name in handle.names)
        assert not torch.equal(model(x).logits, before)
        handle.revert()
        assert torch.equal(model(x).logits, before)
    with pytest.raises(ValueError, match="no LoRA layer has adapter 'absent'"):
        peft_lora(model, "bounded", omega=2.0, adapter_name="absent")


def test_only_mlp_leaves_attention_plain():
    model = make_model()
    handle = peft_lora(model, "bounded", omega=2.0, only_mlp=True)
    patched = set(handle.names)
    assert patched == {f"base_model.model.transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")}
    for name, layer in lora_linears(model):
        assert ("_lucidops_lora" in layer.__dict__) == (name in patched)
    attn = dict(lora_linears(model))["base_model.model.transformer.h.0.attn.c_attn"]
    x = torch.randn(2, 32)
    with torch.no_grad():
        w0 = attn.get_base_layer().weight.t()
        a, b = attn.lora_A["default"].weight, attn.lora_B["default"].weight
        plain = x @ w0.T + attn.get_base_layer().bias + attn.scaling["default"] * (x @ a.T) @ b.T
        torch.testing.assert_close(attn(x), plain, rtol=1e-5, atol=1e-5)
    # default patterns: GPT-2, LLaMA, BERT names
    assert is_mlp_name("model.layers.3.mlp.down_proj") and not is_mlp_name("model.layers.3.self_attn.o_proj")
    assert is_mlp_name("encoder.layer.0.output.dense") and not is_mlp_name("encoder.layer.0.attention.output.dense")
    handle.revert()
    custom = peft_lora(model, "bounded", omega=2.0, only_mlp=True, mlp_patterns=[r"h\.1\.mlp\.c_fc$"])
    assert custom.names == ["base_model.model.transformer.h.1.mlp.c_fc"]


def test_save_load_round_trip(tmp_path):
    from peft import PeftModel
    from transformers import GPT2Config, GPT2LMHeadModel

    model = make_model(seed=0)
    handle = peft_lora(model, "bounded", omega=2.0, fn="sin", only_mlp=True)
    x = ids()
    with torch.no_grad():
        want = model(x).logits
    model.save_pretrained(tmp_path)
    # a fresh base with the same (seeded) weights, adapters from disk, patch re-applied
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=16,
                                      bos_token_id=0, eos_token_id=0))
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert set(loaded.state_dict()) == set(model.state_dict())
    peft_lora(loaded, **{k: v for k, v in handle.settings.items()})
    with torch.no_grad():
        got = loaded(x).logits
    assert torch.equal(got, want)


def test_bad_input_raises():
    model = make_model()
    with pytest.raises(ValueError, match="variant"):
        peft_lora(model, "cosine", omega=1.0)
    with pytest.raises(ValueError, match="omega"):
        peft_lora(model, "bounded", omega=float("nan"))
    with pytest.raises(ValueError, match="omega"):
        peft_lora(model, "sine", omega=float("inf"))
    with pytest.raises(ValueError, match="fn"):
        peft_lora(model, "bounded", omega=1.0, fn="relu")
    with pytest.raises(ValueError, match="placement"):
        peft_lora(model, "bounded", omega=1.0, placement="input")
    with pytest.raises(ValueError, match="variant 'sine'"):
        peft_lora(model, "sine", omega=1.0, fn="tanh")
    with pytest.raises(ValueError, match="no peft LoRA"):
        peft_lora(torch.nn.Sequential(torch.nn.Linear(4, 4)), "sine", omega=1.0)
    with pytest.raises(ValueError, match="only_mlp"):
        peft_lora(make_model(targets=("c_attn",)), "bounded", omega=1.0, only_mlp=True)
    with pytest.raises(TypeError, match="only_mlp must be a bool"):  # "no" was taken as True
        peft_lora(model, "bounded", omega=1.0, only_mlp="no")
    with pytest.raises(ValueError, match="omega must be finite and != 0"):
        peft_lora(model, "sine", omega=0.0)
    odd = make_model()
    lora_linears(odd)[0][1].lora_dropout["default"] = torch.nn.ReLU()
    with pytest.raises(TypeError, match="lora_dropout"):
        peft_lora(odd, "bounded", omega=1.0)
    handle = peft_lora(model, "bounded", omega=1.0)
    with pytest.raises(RuntimeError, match="already patched"):
        peft_lora(model, "bounded", omega=1.0)
    with pytest.raises(RuntimeError, match="revert"):
        model.merge_adapter()
    handle.revert()
    with pytest.raises(ValueError, match="steps"):
        gradient_difference(model, ids(), ids(), steps=0, lr=0.1)
    with pytest.raises(ValueError, match="forget"):
        gradient_difference(model, torch.randn(2, 3), ids(), steps=1, lr=0.1)


@pytest.mark.parametrize("merge", ["merge_and_unload", "merge_adapter"])
def test_a_refused_model_merge_merges_nothing(merge):
    """peft merges layer by layer: with only the MLP patched, the attention adapters were
    folded in and removed before a patched layer refused, leaving the model half merged (its
    disable_adapter() no longer the base, a later save without those adapters)."""
    model = make_model()
    with torch.no_grad(), model.disable_adapter():
        base = model(ids()).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handle = peft_lora(model, "sine", omega=2.0, only_mlp=True)
    patched = model(ids()).logits
    with pytest.raises(RuntimeError, match="nothing was merged"):
        getattr(model, merge)()
    assert len(lora_linears(model)) == 8 and not any(layer.merged for _, layer in lora_linears(model))
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad(), model.disable_adapter():
        torch.testing.assert_close(model(ids()).logits, base, rtol=0, atol=0)
    torch.testing.assert_close(model(ids()).logits, patched, rtol=0, atol=0)
    handle.revert()
    model.merge_adapter()  # peft's own merge again once reverted
    assert all(layer.merged for _, layer in lora_linears(model))


def test_the_merge_refusal_follows_the_patched_layers():
    """Two handles reverted out of order left the refusal in place for good; a patch applied
    to a submodule, or a revert that left a layer patched, let peft merge the layers before."""
    model = make_model()
    first = peft_lora(model, "bounded", omega=1.0, only_mlp=True)
    second = peft_lora(model, "bounded", omega=2.0, only_mlp=True, mlp_patterns=[r"c_attn$"])
    first.revert()
    with pytest.raises(RuntimeError, match="nothing was merged"):
        model.merge_adapter()  # the second handle's layers are still patched
    assert not any(layer.merged for _, layer in lora_linears(model))
    second.revert()
    model.merge_adapter()
    assert all(layer.merged for _, layer in lora_linears(model))
    model = make_model()
    block = model.base_model.model.transformer.h[1]
    peft_lora(block.mlp, "bounded", omega=1.0)  # a submodule: the tuner is above it
    with pytest.raises(RuntimeError, match=r"nothing was merged"):
        model.merge_and_unload()
    assert len(lora_linears(model)) == 8 and not any(layer.merged for _, layer in lora_linears(model))


def test_gradient_difference_history():
    model = make_model(n_layer=1)
    peft_lora(model, "bounded", omega=1.0, only_mlp=True)
    hist = gradient_difference(model, ids(seed=4), ids(seed=5), steps=3, lr=1e-2, batch_size=2, progress=False)
    assert set(hist) == {"forget_loss", "retain_loss", "weight_norm", "grad_norm"}
    for values in hist.values():
        assert len(values) == 3 and all(math.isfinite(v) for v in values)
    assert hist["grad_norm"][0] > 0
    assert len(set(hist["weight_norm"])) > 1  # the MLP adapters moved


def test_gradient_difference_tracks_only_the_trained_adapter():
    """A peft model keeps an inactive adapter's parameters (frozen) under the same MLP layers:
    they were counted in the history's weight and gradient norms, which then measured an
    adapter that never moved (25.67 throughout, for a trained adapter of norm 0.53)."""
    from peft import LoraConfig

    from lucidops.train import mlp_lora_parameters

    model = make_model(n_layer=1, targets=("c_fc",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("old", LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 1.0 if ".old." in name else 0.01)
    active = [p for n, p in model.named_parameters() if "lora_" in n and ".default." in n]
    assert active and all(p.requires_grad for p in active)
    assert [id(p) for p in mlp_lora_parameters(model, trainable_only=True)] == [id(p) for p in active]
    assert len(mlp_lora_parameters(model)) == 2 * len(active)
    hist = gradient_difference(model, ids(seed=4), ids(seed=5), steps=2, lr=1e-2, batch_size=2, progress=False)
    norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in active))
    assert hist["weight_norm"][-1] == pytest.approx(norm)
    # No trainable adapter in an MLP layer: nothing to track.
    for p in active:
        p.requires_grad_(False)
    model.base_model.model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="no trainable LoRA parameter in an MLP layer"):
        gradient_difference(model, ids(), ids(), steps=1, lr=1e-2, progress=False)


def test_mixed_batches_run_the_patched_adapter_on_its_rows():
    """peft's adapter_names (one adapter per row): rows naming the patched adapter get the
    fused bounded layer (before: peft's plain LoRA, silently), the others what peft gives
    them (another adapter's plain LoRA, "__base__" the base), in the batch's order."""
    from peft import LoraConfig

    model = make_model(targets=("c_fc",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc"], fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.other" in name:
                p.normal_(0.0, 0.3)
    handle = peft_lora(model, "bounded", omega=2.0, fn="tanh")
    x = ids(n=5)
    names = ["default", "__base__", "other", "default", "other"]
    with torch.no_grad():
        mixed = model(x, adapter_names=names).logits
        bounded = model(x).logits
        with model.disable_adapter():
            base = model(x).logits
        handle.revert()
        model.set_adapter("other")
        other = model(x).logits
        model.set_adapter("default")
        plain = model(x).logits
    for row, name in enumerate(names):
        want = {"default": bounded, "__base__": base, "other": other}[name][row]
        torch.testing.assert_close(mixed[row], want, rtol=1e-5, atol=1e-5)
    assert (mixed[0] - plain[0]).abs().max() > 1e-3  # the bounded adapter, not plain LoRA


def test_patched_layer_returns_peft_dtype_under_autocast():
    model = make_model(targets=("c_fc",), n_layer=1)
    layer = lora_linears(model)[0][1]
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = layer(x)
        with peft_lora(model, "bounded", fn="tanh", omega=1.0):
            got = layer(x)
    assert want.dtype == got.dtype == torch.bfloat16


def test_adapters_on_other_layer_kinds_are_named_as_left_plain():
    model = make_model(targets=("wte", "c_fc"), n_layer=1)
    with pytest.warns(RuntimeWarning, match="stays plain LoRA on 1 layer.*transformer.wte") as caught:
        handle = peft_lora(model, "sine", omega=3.0)
    assert caught[0].filename == __file__  # attributed to the caller, not to lucidops
    assert len(handle) == 1 and "transformer.wte" in handle.notes[0]
    handle.revert()
    with pytest.warns(RuntimeWarning, match="stays plain LoRA") as caught:  # through patch.apply: still here
        apply_patches(model, attention=False, lora={"variant": "sine", "omega": 3.0}).revert()
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.revert()
        peft_lora(model, "sine", omega=3.0, only_mlp=True).revert()  # an embedding is not an MLP layer


def test_what_the_fused_op_cannot_compute_is_refused_at_call_time_too():
    """Checked only when patching: a DoRA adapter re-added under the patched name ran without
    its magnitude, and Opacus' per-sample hooks on lora_A/lora_B never fired (grad_sample None),
    silently."""
    from peft import LoraConfig

    model = make_model(n_layer=1)
    handle = peft_lora(model, "bounded", omega=1.0)
    model.delete_adapter("default")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_adapter("default", LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True,
                                                fan_in_fan_out=True))
    model.set_adapter("default")
    with pytest.raises(ValueError, match="uses a peft LoRA variant"):
        model(ids())
    handle.revert()
    model = make_model(n_layer=1)
    peft_lora(model, "bounded", omega=1.0)
    _, layer = lora_linears(model)[0]
    layer.lora_A["default"].register_forward_hook(lambda *args: None)  # as Opacus' GradSampleModule does
    with pytest.raises(RuntimeError, match="which the fused op would never run"):
        model(ids())
