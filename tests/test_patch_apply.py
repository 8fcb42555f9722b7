"""lucidops.patch.apply and the shared PatchHandle, on real timm ViT/DeiT models and peft
LoRA models built from configs (no weights downloaded) and on lucidops' PointNet."""

import functools
import math
import sys
import warnings

import pytest
import torch
from torch import nn

import lucidops
from lucidops.nn import Gaussian, ManyHeadAttention, Sinc
from lucidops.patch import PatchHandle, PeftLoRAHandle, apply
from lucidops.patch.handle import describe

timm = pytest.importorskip("timm")
from timm.layers.attention import Attention  # noqa: E402

DEPTH = 2


def tiny_vit(name="vit_tiny_patch16_224", seed=0):
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, img_size=32, patch_size=8, depth=DEPTH, num_classes=5).eval()


def peft_vit(seed=0, targets=("qkv", "fc1", "fc2")):
    """A tiny timm ViT with peft LoRA adapters (B randomised so they change the output)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model = tiny_vit(seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def images(seed=1, dtype=torch.float32):
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


def snapshot(model):
    """Module objects by name and a copy of the state dict."""
    return dict(model.named_modules()), {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_restored(model, snap):
    modules, state = snap
    now = dict(model.named_modules())
    assert list(now) == list(modules)
    assert all(now[n] is m for n, m in modules.items())  # the original objects, not copies
    sd = model.state_dict()
    assert list(sd) == list(state)
    assert all(torch.equal(sd[k], v) for k, v in state.items())
    assert not any("forward" in m.__dict__ for m in now.values())  # no instance forward left behind


# ---------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_patch16_224"])
def test_attention_swap_matches_and_reverts_bit_for_bit(name, dtype):
    model = tiny_vit(name).to(dtype)
    x = images(dtype=dtype)
    with torch.no_grad():
        expected = model(x)
    snap = snapshot(model)
    params = dict(model.named_parameters())

    handle = apply(model)
    assert isinstance(handle, PatchHandle) and len(handle) == DEPTH and not handle.nothing_patched
    assert list(handle.parts) == ["attention"] and handle.settings == {}
    assert all(isinstance(b.attn, ManyHeadAttention) for b in model.blocks)
    assert all(p is params[n] for n, p in model.named_parameters())  # shared parameters
    assert [r.path for r in handle.replaced] == [f"blocks.{i}.attn" for i in range(DEPTH)]
    assert all(r.original is snap[0][r.path] for r in handle.replaced)
    with torch.no_grad():
        got = model(x)
    assert got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got, expected, **tol)

    assert handle.revert() is model
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    handle.revert()  # twice: a no-op
    assert_restored(model, snap)
    assert handle.nothing_patched and len(handle) == 0
    assert str(handle) == f"nothing patched (reverted {DEPTH} replacements)"


def test_handle_table_lists_paths_and_types():
    model = tiny_vit()
    handle = apply(model)
    before, after = describe(Attention), describe(ManyHeadAttention)
    assert before.startswith("timm.") and before.endswith(".Attention")
    assert after == "lucidops.nn.ManyHeadAttention"
    assert handle.table().splitlines() == ["| path | before | after |", "|---|---|---|"] + [
        f"| blocks.{i}.attn | {before} | {after} |" for i in range(DEPTH)]
    assert str(handle) == handle.table()
    assert repr(handle) == "PatchHandle(model=VisionTransformer, replaced=2)"
    handle.revert()


def test_context_manager_reverts_even_on_error():
    model = tiny_vit()
    snap = snapshot(model)
    x = images()
    with torch.no_grad():
        expected = model(x)
    with apply(model) as handle:
        assert type(model.blocks[0].attn) is ManyHeadAttention and len(handle) == DEPTH
    assert_restored(model, snap)
    with pytest.raises(KeyError):
        with apply(model):
            raise KeyError("inside")
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


# ---------------------------------------------------------------------------------- lora


def lora_layers(model):
    from peft.tuners.lora import Linear

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]


def by_hand(layer, x, fn, omega, scale, placement):
    """The sine / bounded LoRA layer from its weights, in float64 (nn.Linear base: W0 is (N_out, K_in))."""
    base = layer.get_base_layer()
    w0, bias = base.weight.double(), base.bias.double()
    a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    f = torch.sin if fn == "sin" else torch.tanh
    x = x.double()
    if placement == "weight":
        return x @ (w0 + scale * f(omega * b @ a)).T + bias
    return x @ w0.T + scale * f(omega * (x @ a.T) @ b.T) + bias


@pytest.mark.parametrize("lora,fn,placement", [
    ({"variant": "sine", "omega": 2.5}, "sin", "weight"),
    ({"variant": "bounded", "omega": 1.5, "fn": "tanh", "placement": "output"}, "tanh", "output"),
])
def test_lora_layers_compute_the_definition_and_revert(lora, fn, placement):
    model = peft_vit()
    x = images()
    with torch.no_grad():
        expected = model(x)
    snap = snapshot(model)
    handle = apply(model, attention=False, lora=lora)
    layers = lora_layers(model)
    assert len(layers) == 3 * DEPTH and len(handle) == len(layers)
    assert list(handle.parts) == ["lora"] and isinstance(handle.parts["lora"], PeftLoRAHandle)
    assert handle.parts["lora"].settings["omega"] == lora["omega"]
    assert handle.settings == {"attention": False, "lora": lora}
    assert all(type(b.attn) is Attention for b in model.base_model.model.blocks)  # attention=False
    gen = torch.Generator().manual_seed(3)
    for name, layer in layers:
        xin = torch.randn(2, 5, layer.get_base_layer().in_features, generator=gen)
        gain = math.sqrt(xin.shape[-1]) if lora["variant"] == "sine" else 1.0
        want = by_hand(layer, xin, fn, lora["omega"], layer.scaling["default"] / gain, placement)
        with torch.no_grad():
            got = layer(xin)
            plain = layer._lucidops_lora["original"](xin)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        assert (got - plain).abs().max() > 1e-3, name  # a different function from plain LoRA, by design
    row = next(line for line in handle.table().splitlines() if line.startswith("| base_model.model.blocks.0.attn.qkv"))
    assert "peft" in row and "Linear" in row and "forward -> lucidops" in row
    handle.revert()
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_attention_and_lora_merge_into_one_handle():
    model = peft_vit()
    x = images()
    lora = {"variant": "bounded", "omega": 2.0, "fn": "tanh", "only_mlp": True}
    with torch.no_grad():
        expected = model(x)
        # Reference for the merged patch: the LoRA patch alone (the attention swap keeps the function).
        with lucidops.patch.peft_lora(model, **lora):
            lora_only = model(x)
    snap = snapshot(model)
    handle = apply(model, lora=lora)
    assert list(handle.parts) == ["attention", "lora"]
    blocks = [f"base_model.model.blocks.{i}" for i in range(DEPTH)]
    assert handle.paths == [f"{b}.attn" for b in blocks] + [f"{b}.mlp.{fc}" for b in blocks for fc in ("fc1", "fc2")]
    assert len(handle) == len(handle.parts["attention"]) + len(handle.parts["lora"]) == 3 * DEPTH
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, lora_only, rtol=1e-5, atol=1e-5)
    assert (got - expected).abs().max() > 1e-3
    # Reverting a family handle first, then the merged one: every undo runs exactly once.
    handle.parts["lora"].revert()
    assert len(handle) == DEPTH and len(handle.parts["lora"]) == 0
    handle.revert()
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


# ---------------------------------------------------------------------------------- nothing to patch, errors


def pointnet():
    torch.manual_seed(0)
    return lucidops.models.PointNet(num_classes=3, feature_transform=False).eval()


def points(seed=2):
    return torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(seed))


def test_attention_requested_again_on_a_patched_model_says_so():
    """apply(attention=True) on a model apply had patched said it has no attention module at
    all; timm_vit, on the same model, says what happened."""
    model = tiny_vit()
    handle = apply(model)
    with pytest.raises(ValueError, match=r"attention=True was requested .* already runs on lucidops \(patched "
                                         r"before\? revert\(\) that handle first\)"):
        apply(model, attention=True)
    handle.revert()
    with pytest.raises(ValueError, match="attention=True") as err:
        apply(pointnet(), attention=True)
    assert "patched before" not in str(err.value)


def test_nothing_to_patch_leaves_the_model_untouched():
    model = pointnet()
    p = points()
    with torch.no_grad():
        expected = model(p)
    snap = snapshot(model)
    handle = apply(model)
    assert handle.nothing_patched and len(handle) == 0 and handle.parts == {} and handle.notes == []
    assert str(handle) == "nothing patched"
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(p), expected)
    handle.revert()
    assert_restored(model, snap)
    # strict=False: an explicit request that finds nothing becomes a note.
    lenient = apply(model, attention=True, strict=False)
    assert lenient.nothing_patched and len(lenient.notes) == 1 and "attention=True" in lenient.notes[0]
    assert lenient.table().splitlines() == ["nothing patched", f"note: {lenient.notes[0]}"]


def test_explicit_options_that_do_not_apply_raise_and_leave_the_model():
    model = pointnet()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"attention=True .*timm ViT/DeiT Attention"):
        apply(model, attention=True)
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match=r"lora=\{.*'sine'.*peft LoRA Linear"):
        apply(model, lora={"variant": "sine", "omega": 1.0})
    with pytest.raises(ValueError, match=r"activations\[torch.nn.GELU\]: the model has no module"):
        apply(model, activations={nn.GELU: "sinc"})
    assert_restored(model, snap)
    # A later family failing undoes what the earlier ones already patched.
    vit = tiny_vit()
    vit_snap = snapshot(vit)
    with pytest.raises(ValueError, match="lora="):
        apply(vit, activations={nn.GELU: "sinc"}, lora={"variant": "bounded", "omega": 1.0})
    assert_restored(vit, vit_snap)


def test_learnable_activations_go_to_the_device_of_the_model():
    """GELU holds no tensor: the learnable sigma must follow the surrounding layers (the meta
    device stands in for a GPU here; before, the sigma stayed on the CPU)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2)).to("meta")
    apply(model, activations={nn.GELU: functools.partial(Sinc, learnable=True)})
    assert model[1].sigma.device.type == "meta"
    assert model(torch.empty(3, 4, device="meta")).shape == (3, 2)


def test_bad_arguments_raise_clear_errors():
    model = tiny_vit()
    snap = snapshot(model)
    cases = [
        (dict(lora="cosine"), ValueError, r"lora must be None, one of \('sine', 'bounded'\)"),
        (dict(lora="sine"), ValueError, r"lora='sine': the frequency omega"),
        (dict(lora={"variant": "sine"}), ValueError, "lora: 'omega' is required"),
        (dict(lora={"variant": "cosine", "omega": 1.0}), ValueError, "lora: variant"),
        (dict(lora={"omgea": 1.0}), TypeError, r"lora: unknown peft_lora argument\(s\) \['omgea'\]"),
        (dict(lora=3), TypeError, "lora must be"),
        (dict(activations={nn.GELU: "relu"}), ValueError, r"activations\[torch.nn.GELU\]: must be one of "
                                                          r"\['gaussian', 'sinc'\].*'relu'"),
        (dict(activations={nn.GELU: nn.Sigmoid()}), TypeError, "zero-argument callable"),
        (dict(activations={int: "sinc"}), TypeError, "not an nn.Module class"),
        (dict(activations={3: "sinc"}), TypeError, "keys must be"),
        (dict(activations=[(nn.GELU, "sinc")]), TypeError, "activations must be None or a mapping"),
        (dict(activations={nn.GELU: lambda: "sinc"}), TypeError, "factory returned str"),
        (dict(activations={nn.GELU: "sinc", "GELU": "gaussian"}), ValueError, "more than one key"),
        (dict(attention="yes"), TypeError, "attention must be True or False"),
        (dict(strict=1), TypeError, "strict"),
        (dict(point_encoders="pointnet"), TypeError, "point_encoders must be"),
    ]
    for kwargs, err, message in cases:
        with pytest.raises(err, match=message):
            apply(model, **kwargs)
        assert_restored(model, snap)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        apply("vit")


# ---------------------------------------------------------------------------------- activations


def test_activation_swap_changes_the_function_as_defined_and_reverts():
    model = pointnet()
    p = points()
    with torch.no_grad():
        expected = model(p)
    snap = snapshot(model)
    handle = apply(model, activations={nn.ReLU: "gaussian"})
    assert handle.paths == ["head.2", "head.5"] and list(handle.parts) == ["activations"]
    assert all(type(model.head[i]) is Gaussian for i in (2, 5))
    assert "| head.2 | torch.nn.ReLU | lucidops.nn.Gaussian |" in handle.table().splitlines()
    # By hand: the head with exp(-h^2 / 2) in place of each ReLU, in float64.
    with torch.no_grad():
        h = model.global_feature(p).double()
        for i, layer in enumerate(model.head):
            h = torch.exp(-h * h / 2) if i in (2, 5) else layer.double()(h)
        model.float()
        got = model(p)
    torch.testing.assert_close(got.double(), h, rtol=1e-5, atol=1e-5)
    assert (got - expected).abs().max() > 1e-3
    handle.revert()
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(p), expected)


def test_activation_factories_and_class_names():
    model = tiny_vit()
    factory = functools.partial(Sinc, sigma=0.5, learnable=True)
    handle = apply(model, attention=False, activations={"GELU": factory})
    acts = [b.mlp.act for b in model.blocks]
    assert len(handle) == DEPTH and all(type(a) is Sinc and a.learnable for a in acts)
    assert acts[0] is not acts[1] and acts[0].sigma is not acts[1].sigma  # a fresh module per site
    z = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(acts[0](z), torch.sinc(z / 0.5 / math.pi), rtol=1e-6, atol=1e-6)
    handle.revert()
    assert all(type(b.mlp.act) is nn.GELU for b in model.blocks)


# ---------------------------------------------------------------------------------- point encoders option


def test_point_encoders_option_passes_kwargs_and_merges(monkeypatch):
    calls = []

    def fake_point_encoders(model, **kwargs):  # stands in for the real family: records one swap
        calls.append(kwargs)
        handle = PatchHandle(model)
        if kwargs.get("find", True):
            handle.swap_child(model, "conv3", nn.Identity())
        return handle

    # The real family distils for a minute; apply's plumbing is what is tested here.
    monkeypatch.setattr(sys.modules["lucidops.patch.point_encoders"], "point_encoders", fake_point_encoders)
    model = pointnet()
    snap = snapshot(model)
    handle = apply(model, point_encoders={"find": True, "k": 8})
    assert calls == [{"allow_none": True, "find": True, "k": 8}] and handle.paths == ["conv3"] and list(handle.parts) == ["point_encoders"]
    assert type(model.conv3) is nn.Identity
    handle.revert()
    assert_restored(model, snap)
    # An explicit request whose family finds nothing raises (strict) or is noted.
    with pytest.raises(ValueError, match=r"point_encoders=\{'find': False\} was requested"):
        apply(model, point_encoders={"find": False})
    assert "point_encoders" in apply(model, point_encoders={"find": False}, strict=False).notes[0]
    assert_restored(model, snap)


# ---------------------------------------------------------------------------------- the handle itself


def test_handle_recording_api():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    snap = snapshot(model)
    handle = PatchHandle(model)
    undone = []
    handle.record("", "nothing", "a note", lambda: undone.append("custom"))
    handle.swap_child(model, "1", nn.Tanh())
    handle.set_instance_attrs("0", model[0], {"forward": lambda x: x * 0}, after="zero")
    assert handle.paths == ["", "1", "0"]
    assert handle.table().splitlines()[2:] == ["| (root) | nothing | a note |", "| 1 | torch.nn.GELU | torch.nn.Tanh |",
                                               "| 0 | torch.nn.Linear | zero |"]
    assert torch.equal(model[0](torch.ones(1, 3)), torch.zeros(1, 3))
    other = PatchHandle(model)
    other.swap_child(model, "2", nn.Identity())
    handle.merge(other, "extra")
    assert len(handle) == 4 and handle.parts == {"extra": other}
    handle.revert()
    handle.revert()
    other.revert()
    assert undone == ["custom"]  # each undo once, in reverse order
    assert_restored(model, snap)
    with pytest.raises(ValueError, match="root"):
        handle.swap_child(model, "", nn.Identity())
    with pytest.raises(TypeError, match="undo"):
        handle.record("0", "a", "b", undo=None)
    with pytest.raises(TypeError, match="new_module"):
        handle.swap_child(model, "1", "tanh")
    # A slot replaced again after patching is left alone on revert (with a warning).
    h = PatchHandle(model)
    h.swap_child(model, "1", nn.Tanh())
    later = nn.ReLU()
    model[1] = later
    with pytest.warns(RuntimeWarning, match="replaced again"):
        h.revert()
    assert model[1] is later
    # A failing undo does not stop the others; the first error is raised after.
    model[1] = snap[0]["1"]
    h = PatchHandle(model)
    h.swap_child(model, "1", nn.Tanh())
    h.record("2", "x", "y", lambda: (_ for _ in ()).throw(RuntimeError("undo failed")))
    with pytest.raises(RuntimeError, match="undo failed"):
        h.revert()
    assert model[1] is snap[0]["1"] and h.nothing_patched



def test_revert_carries_moves_and_freezing_to_the_original_s_own_parameters():
    """A replacement without tensors (PReLU -> Tanh) told the old undo nothing: after
    model.double() while patched, revert() put back a float32 PReLU into a float64 model
    (forward failed), and requires_grad_(False) while patched missed its weight."""
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    prelu = model[1]
    handle = apply(model, activations={nn.PReLU: lambda: nn.Tanh()})
    model.double()
    model.requires_grad_(False)
    handle.revert()
    assert model[1] is prelu and prelu.weight.dtype == torch.float64 and not prelu.weight.requires_grad
    assert model(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64
    # Nothing done while patched: the original comes back as it was (a float64 PReLU in a
    # float32 model stays float64, a frozen weight stays frozen, a trainable one trainable).
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU().double(), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    with apply(model, activations={nn.PReLU: lambda: nn.Tanh()}):
        pass
    assert model[1].weight.dtype == torch.float64 and model[1].weight.requires_grad


def test_revert_follows_moves_the_way_module_to_does():
    """The undo moves the original's own tensors through Module._apply, as .to() does: to the
    meta device (assigning .data across tensor types raised, with the model left patched), and
    with the module's own _apply override (state kept beside its tensors)."""
    import copy

    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    original = model[0]
    handle = PatchHandle(model)
    handle.swap_child(model, "0", copy.deepcopy(original))
    model.to("meta")
    handle.revert()
    assert model[0] is original and original.weight.is_meta and handle.nothing_patched

    class Cached(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.table = nn.Linear(3, 3), torch.zeros(3)  # a plain attribute its _apply keeps in step

        def _apply(self, fn, recurse=True):
            out = super()._apply(fn, recurse)
            self.table = fn(self.table)
            return out

        def forward(self, x):
            return self.lin(x) + self.table

    model = nn.Sequential(Cached(), nn.ReLU())
    handle = PatchHandle(model)
    handle.swap_child(model, "0", copy.deepcopy(model[0]))
    model.double()
    handle.revert()
    assert model[0].table.dtype == torch.float64
    assert model(torch.randn(2, 3, dtype=torch.float64)).dtype == torch.float64


def test_revert_of_a_deep_tensorless_swap_under_a_later_patch_of_an_ancestor():
    """The undo looked its ancestors up again by path: with an ancestor replaced by a later
    patch that failed, and the record was marked reverted, so the original never came back."""
    inner = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    model = nn.Sequential(nn.Sequential(inner), nn.Linear(2, 2))
    relu = inner[1]
    h1 = PatchHandle(model)
    h1.swap_child(model, "0.0.1", nn.GELU())
    h2 = PatchHandle(model)
    h2.swap_child(model, "0", nn.Linear(2, 2))
    h1.revert()  # the slot lives in the detached ancestor: restored there
    assert inner[1] is relu and h1.nothing_patched
    h2.revert()
    assert model[0][0] is inner and inner[1] is relu


def test_revert_runs_the_original_s_own_train_and_takes_the_model_s_dtype_for_new_activations():
    """A module whose train() keeps its BatchNorm frozen came back with the BatchNorm training
    (the flag was set by hand once it shared a submodule); and a learnable activation built in
    float32 for a float64 model was not moved, so model.float() while patched changed nothing
    on it and the original PReLU stayed float64 after revert."""
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = nn.Linear(3, 3), nn.BatchNorm1d(3)

        def train(self, mode=True):
            super().train(mode)
            self.bn.eval()  # statistics frozen, always
            return self

    class Replacement(nn.Module):
        def __init__(self, fc):
            super().__init__()
            self.fc, self.extra = fc, nn.Linear(3, 3)

    model = nn.Sequential(Encoder(), nn.ReLU()).eval()
    handle = PatchHandle(model)
    handle.swap_child(model, "0", Replacement(model[0].fc))
    model.train()
    handle.revert()
    assert model[0].training and not model[0].bn.training

    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU(), nn.Linear(3, 3)).double()
    handle = apply(model, attention=False, activations={nn.PReLU: functools.partial(Gaussian, learnable=True)})
    assert model[1].sigma.dtype == torch.float64
    model.float()
    handle.revert()
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_patching_leaves_shared_submodules_alone_and_reads_moves_per_property():
    """The replacement's train() used to reach the submodules it shares with the original, so
    a train() override with side effects (merging LoRA weights on eval, as loralib does) ran
    and changed weights on a mere patch and revert; and a replacement owning only an integer
    buffer showed no dtype, so model.double() while patched left the original's LayerNorm
    float32."""
    class MergeOnEval(nn.Linear):
        def __init__(self):
            super().__init__(4, 4)
            self.delta = nn.Parameter(torch.randn(4, 4))
            self.merged = False

        def train(self, mode=True):
            super().train(mode)
            if mode == self.merged:  # eval merges the update into the weight, train takes it out
                with torch.no_grad():
                    self.weight += -self.delta if mode else self.delta
                self.merged = not mode
            return self

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.norm = MergeOnEval(), nn.LayerNorm(4)

    class Permuted(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin
            self.register_buffer("perm", torch.tensor([3, 0, 1, 2]))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), nn.ReLU()).train()
    model[0].lin.eval()  # merged
    weight = model[0].lin.weight.detach().clone()
    handle = PatchHandle(model)
    handle.swap_child(model, "0", Permuted(model[0].lin))
    handle.revert()
    assert model[0].lin.merged and not model[0].lin.training and torch.equal(model[0].lin.weight, weight)

    handle = PatchHandle(model)
    handle.swap_child(model, "0", Permuted(model[0].lin))
    model.double()
    model.requires_grad_(False)
    handle.revert()
    assert model[0].norm.weight.dtype == torch.float64 and not model[0].norm.weight.requires_grad


def test_revert_after_materialising_a_meta_model_while_patched():
    """Built on meta, patched, then to_empty() (deferred initialisation): the original's own
    meta tensors could not be copied, revert raised with the model left patched."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 3), nn.PReLU())
    prelu = model[1]
    handle = apply(model, attention=False, activations={nn.PReLU: functools.partial(Gaussian, learnable=True)})
    model.to_empty(device="cpu")
    with pytest.warns(RuntimeWarning, match="uninitialised"):
        handle.revert()
    assert model[1] is prelu and prelu.weight.device.type == "cpu" and handle.nothing_patched


def test_a_slot_put_back_by_hand_counts_as_reverted():
    """The undo found the original in its slot and warned, on every revert, that it had been
    replaced again; the record could never be reverted."""
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    gelu = model[1]
    handle = apply(model, activations={nn.GELU: "sinc"})
    model[1] = gelu
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.revert()
    assert handle.nothing_patched


def test_reverting_in_the_wrong_order_warns_and_finishes_later():
    """h1 patched a slot that h2 patched again: h1.revert() first cannot restore it. Before,
    the record was marked reverted anyway, and after h2.revert() an intermediate Sinc stayed
    in the model with both handles saying nothing was patched."""
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 2))
    gelu = model[1]
    h1 = apply(model, activations={nn.GELU: "sinc"})
    h2 = apply(model, activations={Sinc: "gaussian"})
    with pytest.warns(RuntimeWarning, match="revert the later patch's handle first"):
        h1.revert()
    assert isinstance(model[1], Gaussian) and h1.paths == ["1"]
    h2.revert()
    assert isinstance(model[1], Sinc) and h2.nothing_patched and h1.paths == ["1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        h1.revert()
    assert model[1] is gelu and h1.nothing_patched


def test_an_empty_activations_mapping_is_an_explicit_request_that_finds_nothing():
    """activations={} used to patch nothing silently (the documented rule: an explicit option
    that finds nothing raises, or with strict=False becomes a note)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU())
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"activations=\{\} .*names no module class"):
        apply(model, activations={}, attention=False)
    assert_restored(model, snap)
    lenient = apply(model, activations={}, attention=False, strict=False)
    assert lenient.nothing_patched and len(lenient.notes) == 1 and "activations={}" in lenient.notes[0]
    assert_restored(model, snap)

def test_family_functions_share_the_handle():
    model = nn.Sequential(nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 3, padding=1, groups=6), nn.ReLU())
    snap = snapshot(model)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    handle = lucidops.patch.freeze_spatial_mixing(model)
    assert type(handle) is PatchHandle and handle.model is model
    assert handle.table().splitlines()[2:] == ["| 1 | torch.nn.Conv2d | lucidops.nn.FrozenRandomDepthwise |"]
    handle.revert()
    assert_restored(model, snap)
    with torch.no_grad():
        assert torch.equal(model(x), expected)
    vit = tiny_vit()
    attn = [b.attn for b in vit.blocks]
    h = lucidops.patch.timm_vit(vit)
    assert type(h) is PatchHandle
    assert h.swapped == [(b, "attn", a) for b, a in zip(vit.blocks, attn)]  # the earlier handle's attribute
    s = lucidops.patch.skipless(vit)
    assert type(s) is PatchHandle and s.paths == ["blocks.0", "blocks.1"]
    s.revert()
    h.revert()
    assert all(b.attn is a for b, a in zip(vit.blocks, attn))


def test_instance_attribute_patches_reverted_out_of_order_stay_pending():
    """skipless and sdpa_calls both set a block's forward. Reverting the earlier first skipped
    the forward but removed its marker (sdpa's forward then failed with KeyError) or left the
    block skipless for good once the later one was reverted. Now it warns, changes nothing and
    stays pending, as a swapped module does; reverting it again after the later one finishes."""
    from timm.models.vision_transformer import Block

    x = torch.randn(1, 3, 32, 32)
    for first, second in ((lucidops.patch.skipless, lambda m: lucidops.patch.sdpa_calls(m, modules=Block)),
                          (lambda m: lucidops.patch.sdpa_calls(m, modules=Block), lucidops.patch.skipless)):
        model = tiny_vit()
        want = model(x)
        h1 = first(model)
        h2 = second(model)
        patched = model(x)
        with pytest.warns(RuntimeWarning, match="was set again after patching"):
            h1.revert()
        assert not h1.nothing_patched and torch.equal(model(x), patched)  # nothing changed
        h2.revert()
        h1.revert()
        assert h1.nothing_patched and h2.nothing_patched
        assert torch.equal(model(x), want) and all("forward" not in b.__dict__ for b in model.blocks)


def test_skipless_revert_after_another_route_leaves_a_later_patch_alone():
    # h1's marker (True) was removed from h2's blocks, so undo_skipless found nothing to undo
    model = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    want = model(x)
    h1 = lucidops.patch.skipless(model)
    lucidops.patch.undo_skipless(model)
    h2 = lucidops.patch.skipless(model)
    with pytest.warns(RuntimeWarning, match="was set again after patching"):
        h1.revert()
    lucidops.patch.undo_skipless(model)  # h2's blocks are still marked
    h2.revert()
    h1.revert()
    assert torch.equal(model(x), want) and h1.nothing_patched and h2.nothing_patched
