"""The ops inside ``torch.autocast``: PyTorch's policy for the nearest native op, on every backend.

Inside a region, attention and the LoRA linears run in the region's dtype (as SDPA and
``linear`` do; float32 LoRA factors stay float32, which the op takes over a half x to form
the phase omega B A unrounded) and the Gaussian mixture in float32 (as ``exp`` does). The contract checked
here is exact: an op called in a region gives, bit for bit, what it gives outside the region
on the inputs cast by that policy, forward and backward, so a backend's own torch calls
are not autocast a second time (that would, e.g., form the LoRA phase in bfloat16).
"""

import math
from contextlib import nullcontext

import pytest
import torch
from torch import Tensor, nn

import lucidops
from conftest import backend_device_params

REGION_DTYPES = [torch.bfloat16, torch.float16]


def attention_inputs(g):
    q, k, v = (torch.randn(2, 3, 9, 12, generator=g) for _ in range(3))
    mask = torch.rand(2, 9, generator=g) > 0.3
    mask[:, 0] = True
    return (q, k, v), dict(key_padding_mask=mask, causal=False)


def lora_inputs(g):
    k_in, n_out, r = 24, 17, 4
    x = torch.randn(5, 3, k_in, generator=g)
    w = torch.randn(n_out, k_in, generator=g) / math.sqrt(k_in)
    a, b = torch.randn(r, k_in, generator=g) * 0.5, torch.randn(n_out, r, generator=g) * 0.5
    return (x, w, a, b, torch.randn(n_out, generator=g)), dict(fn="sin", omega=3.0, scale=0.7, placement="weight")


def mixture_inputs(g):
    points = torch.rand(2, 30, 3, generator=g) * 2 - 1
    means = torch.rand(5, 3, generator=g) * 2 - 1
    precisions = torch.tensor([4.0, 0.5, 0.0, 3.0, 0.2, 5.0]).repeat(5, 1) + 0.1 * torch.rand(5, 6, generator=g)
    return (points, means, precisions, torch.randn(7, 5, generator=g), torch.randn(7, generator=g)), dict(reduce="max")


# op name (for use_backend's registry), callable, inputs, what autocast does to the inputs.
OPS = {
    "attention": (lucidops.ops.attention, attention_inputs, "region"),
    "bounded_lora_linear": (lucidops.ops.bounded_lora_linear, lora_inputs, "region_but_factors"),
    "gaussian_mixture": (lucidops.ops.gaussian_mixture, mixture_inputs, "float32"),
}


def cast_by_policy(tensors, policy, region_dtype):
    target = torch.float32 if policy == "float32" else region_dtype
    kept = {2, 3} if policy == "region_but_factors" else set()  # x, weight, A, B, bias: A and B keep float32
    return [t.to(target) if t.dtype != torch.float64 and i not in kept else t for i, t in enumerate(tensors)]


def run(fn, leaves, kwargs, grad_seed, device, region_dtype=None, policy=None):
    """fn on fresh leaf copies of ``leaves`` on ``device`` (inside a region, or on inputs cast
    by ``policy``): (output, grads of the leaves)."""
    fresh = [t.detach().to(device).requires_grad_(True) for t in leaves]
    kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    context = torch.autocast(device, dtype=region_dtype) if policy is None and region_dtype else nullcontext()
    inputs = fresh if policy is None else cast_by_policy(fresh, policy, region_dtype)
    with context:
        out = fn(*inputs, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out)
    out.backward(grad)  # outside the region, as PyTorch recommends
    return out.detach(), [t.grad for t in fresh]


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("region_dtype", REGION_DTYPES)
@pytest.mark.parametrize("op", sorted(OPS))
def test_op_in_a_region_is_the_op_on_inputs_cast_by_the_policy(op, region_dtype, backend, device):
    if backend not in lucidops.backends.availability(op, [device])[device]:
        pytest.skip(f"{op} has no {backend} backend")
    fn, make, policy = OPS[op]
    leaves, kwargs = make(torch.Generator().manual_seed(7))
    with lucidops.use_backend(backend):
        got, got_grads = run(fn, leaves, kwargs, 3, device, region_dtype=region_dtype)
        want, want_grads = run(fn, leaves, kwargs, 3, device, region_dtype=region_dtype, policy=policy)
        assert lucidops.backends.last_used(op) == backend
    expected_dtype = torch.float32 if policy == "float32" else region_dtype
    assert got.dtype == want.dtype == expected_dtype
    assert torch.equal(got, want), (got - want).abs().max()
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        assert g.dtype == torch.float32, i  # a float32 leaf gets a float32 gradient through the cast
        assert torch.equal(g, w), (i, (g - w).abs().max())


@pytest.mark.parametrize("op", sorted(OPS))
def test_float64_is_not_cast_and_nothing_is_cast_outside_a_region(op):
    fn, make, policy = OPS[op]
    leaves, kwargs = make(torch.Generator().manual_seed(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(*[t.double() for t in leaves], **kwargs)
    assert out.dtype == torch.float64
    # Outside a region a mix of dtypes is still an error that names the argument.
    mixed = [leaves[0].to(torch.bfloat16)] + list(leaves[1:])
    with pytest.raises(TypeError, match="dtype"):
        fn(*mixed, **kwargs)


def test_half_cloud_meets_float32_parameters_in_a_region():
    """The case that failed before: a T-Net's bfloat16 output next to float32 Gaussians."""
    (points, means, precisions, weight, bias), kwargs = mixture_inputs(torch.Generator().manual_seed(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lucidops.ops.gaussian_mixture(points.to(torch.bfloat16), means, precisions, weight, bias, **kwargs)
    expected = lucidops.ops.gaussian_mixture(points.to(torch.bfloat16).float(), means, precisions, weight, bias,
                                             **kwargs)
    assert out.dtype == torch.float32 and torch.equal(out, expected)


@pytest.mark.parametrize("model_dtype,region_dtype", [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_half_encoder_in_a_region_of_the_other_half_dtype(model_dtype, region_dtype):
    """A float16 encoder in a bfloat16 region failed inside PyTorch ("Unexpected floating
    ScalarType in at::autocast::prioritize", from stack in precision_from_factor); it now runs
    the op in float32, as a half cloud does in any region."""
    torch.manual_seed(0)
    encoder = lucidops.nn.GaussianPointEncoder(4, 8).to(model_dtype)
    reference = lucidops.nn.GaussianPointEncoder(4, 8)
    reference.load_state_dict({k: v.float() for k, v in encoder.state_dict().items()})
    cloud = torch.rand(2, 10, 3).to(model_dtype)
    with torch.autocast("cpu", dtype=region_dtype):
        out = encoder(cloud)
    assert out.dtype == torch.float32
    # The precisions are formed in the half dtype (one rounding of L L^T), then the op runs in float32.
    torch.testing.assert_close(out, reference(cloud.float()), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("placement", ["weight", "output"])
def test_lora_phase_stays_float32_in_a_region(backend, device, placement):
    """A region must not reach the phase omega B A: with omega large, a bfloat16 phase is
    off by whole radians, far past the output's own rounding. Nor may it round float32
    factors to bfloat16 before the phase, as casting every input (linear's policy) did."""
    g = torch.Generator().manual_seed(10)
    x, w = torch.randn(4, 64, generator=g), torch.zeros(32, 64)
    a, b = torch.randn(8, 64, generator=g) * 0.5, torch.randn(32, 8, generator=g) * 0.5
    exact = lucidops.reference.lora.forward(x.to(torch.bfloat16).double(), w.double(), a.double(), b.double(), None,
                                            "sin", placement, 200.0, 1.0)
    x, w, a, b = (t.to(device) for t in (x, w, a, b))
    with lucidops.use_backend(backend), torch.autocast(device, dtype=torch.bfloat16):
        y = lucidops.ops.bounded_lora_linear(x, w, a, b, omega=200.0, scale=1.0, placement=placement)
    assert lucidops.backends.last_used("bounded_lora_linear") == backend
    assert y.dtype == torch.bfloat16
    err = (y.double().cpu() - exact).norm() / exact.norm()
    assert err < 6e-3, (backend, err)  # one bfloat16 rounding of the output, about 2^-9 relative


@pytest.mark.parametrize("a_dtype, b_dtype, factor_dtype", [
    (torch.float32, torch.float16, torch.float32),    # a pair the op refuses: both float32, lossless
    (torch.float16, torch.float16, torch.float32),    # float16 in a bfloat16 region: float32, not rounded
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),  # x's dtype: as they are
], ids=str)
def test_lora_factors_in_a_region_are_never_rounded_down(a_dtype, b_dtype, factor_dtype):
    """x, weight and bias take the region's bfloat16; the factors resolve_factor_dtype's. A
    float32 A beside a float16 B raised (only factors both float32 were kept), and casting
    them to the region's dtype, as linear's weights, would round them before the phase."""
    (x, w, a, b, bias), kwargs = lora_inputs(torch.Generator().manual_seed(13))
    a, b = a.to(a_dtype), b.to(b_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, **kwargs)
    half = [t.to(torch.bfloat16) for t in (x, w, bias)]
    expected = lucidops.ops.bounded_lora_linear(half[0], half[1], a.to(factor_dtype), b.to(factor_dtype), half[2],
                                                **kwargs)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_compiled_call_in_a_region_matches_eager():
    leaves, kwargs = lora_inputs(torch.Generator().manual_seed(11))
    compiled = torch.compile(lambda *t: lucidops.ops.bounded_lora_linear(*t, **kwargs), fullgraph=True,
                             backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, eager = compiled(*leaves), lucidops.ops.bounded_lora_linear(*leaves, **kwargs)
    assert got.dtype == torch.bfloat16 and torch.equal(got, eager)
    assert compiled(*leaves).dtype == torch.float32  # leaving the region recompiles, casting nothing


# ---------------------------------------------------------------- modules in a mixed-precision training step


def relative_error(a: Tensor, b: Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("layer_kind", ["sine", "bounded_output"])
def test_lora_layers_after_an_autocast_linear(layer_kind):
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    if layer_kind == "sine":
        layer = lucidops.nn.SineLoRALinear(base, rank=4, omega=2.0, alpha=4)
    else:
        layer = lucidops.nn.BoundedLoRALinear(base, rank=4, fn="tanh", omega=2.0, alpha=4, placement="output")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)  # B starts at zero: make the adapter count
    model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), layer)
    x = torch.randn(6, 8)
    expected = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 2e-2
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    assert layer.lora_B.grad.abs().sum() > 0


def test_gaussian_pointnet_training_step_in_a_region():
    torch.manual_seed(0)
    model = lucidops.nn.GaussianPointNet(num_classes=3, num_gaussians=4, out_channels=16, tnet_gaussians=3).eval()
    points = torch.rand(2, 40, 3) * 2 - 1
    expected = model(points)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(points)
    assert logits.dtype == torch.bfloat16 and relative_error(logits, expected) < 3e-2
    nn.functional.cross_entropy(logits.float(), torch.tensor([0, 2])).backward()
    assert model.encoder.means.grad.dtype == torch.float32 and model.encoder.means.grad.abs().sum() > 0


def test_attention_in_a_region_takes_the_mixed_dtypes_sdpa_takes():
    """On a GPU, timm's qk_norm hands attention float32 q and k (CUDA autocast runs
    layer_norm in float32) next to a half-precision v; SDPA casts all three, and so must the
    op (CPU autocast keeps layer_norm's dtype, so the mix is made by hand here)."""
    (q, k, v), kwargs = attention_inputs(torch.Generator().manual_seed(12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lucidops.ops.attention(q, k, v.to(torch.bfloat16), **kwargs)
        sdpa = nn.functional.scaled_dot_product_attention(q, k, v.to(torch.bfloat16),
                                                          attn_mask=kwargs["key_padding_mask"][:, None, None, :])
    expected = lucidops.ops.attention(*(t.to(torch.bfloat16) for t in (q, k, v)), **kwargs)
    assert got.dtype == sdpa.dtype == torch.bfloat16 and torch.equal(got, expected)


def test_patched_timm_vit_matches_timm_in_a_region():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2, qk_norm=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(x)
    handle = lucidops.patch.timm_vit(model)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(x)
    finally:
        handle.revert()
    assert got.dtype == expected.dtype == torch.bfloat16
    assert relative_error(got, expected) < 2e-2


@pytest.mark.parametrize("variant,placement", [("sine", "weight"), ("bounded", "output")])
def test_peft_model_patched_to_bounded_lora_trains_in_a_region(variant, placement):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from test_peft_lora import ids, make_model

    model = make_model()
    tokens = ids()
    with lucidops.patch.peft_lora(model, variant, omega=2.0, placement=placement):
        expected = model(tokens).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(tokens).logits
        assert logits.dtype == torch.bfloat16 and relative_error(logits, expected) < 3e-2
        logits.float().logsumexp(-1).mean().backward()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    assert all(torch.isfinite(p.grad).all() for p in lora) and sum(p.grad.abs().sum() for p in lora) > 0
