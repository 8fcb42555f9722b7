"""torch.func through the ops: per-sample gradients (vmap of grad with functional_call),
jacrev, and the clear errors for what has no formula (second derivatives, forward mode).

PyTorch's own wrapper of a custom op's autograd formula is refused by torch.func
(pytorch/pytorch#168393), so lucidops runs a twin autograd.Function with the same formula
while a transform is active (python/lucidops/ops/_functorch.py). These tests compare
every transform's result with eager autograd, example by example.
"""

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap

import lucidops
from conftest import backend_device_params
from small_modules import small_modules

# The ops each small module calls (a backend is forced for all of them).
MODULE_OPS = {
    "attention": ["attention"],
    "sine_lora": ["bounded_lora_linear"],
    "bounded_lora_output": ["bounded_lora_linear"],
    "quantized_sine_lora": ["bounded_lora_linear_quant"],
    "gaussian_encoder_max": ["gaussian_mixture"],
    "gaussian_encoder_none": ["gaussian_mixture"],
    "gaussian_pointnet": ["gaussian_mixture"],
    "sinc": ["sinc"],
    "learnable_sinc": ["sinc"],
}


def test_every_small_module_is_covered():
    assert set(MODULE_OPS) == set(small_modules())


def _skip_without(backend, device, ops):
    for op in ops:
        if backend not in lucidops.backends.availability(op, [device])[device]:
            pytest.skip(f"{op} has no {backend} backend")


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("name", sorted(MODULE_OPS))
def test_per_sample_gradients_equal_a_loop_of_eager_autograd(name, backend, device):
    """vmap(grad(loss)) over examples, for the trainable parameters and the input: the
    per-sample-gradient recipe of differentially private training and influence functions."""
    _skip_without(backend, device, MODULE_OPS[name])
    module, example, _, _ = small_modules()[name]
    dtype = torch.float64 if backend in ("reference", "cpp") else torch.float32  # Triton and CUDA: no float64
    module = module.to(device=device, dtype=dtype).eval()  # eval: BatchNorm's batch statistics are per batch
    inputs = example.to(device=device, dtype=dtype)
    params = {k: v.detach() for k, v in module.named_parameters() if v.requires_grad}
    target = torch.randn(module(inputs).shape, dtype=dtype, device=device)

    def loss(p, x, y):
        return ((functional_call(module, p, (x[None],)) - y[None]) ** 2).sum()

    with lucidops.use_backend(backend):
        got_params, got_inputs = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0, 0))(params, inputs, target)
        for op in MODULE_OPS[name]:
            assert lucidops.backends.last_used(op) == backend
        for i in range(inputs.shape[0]):
            leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            x = inputs[i].clone().requires_grad_(True)
            want = torch.autograd.grad(loss(leaves, x, target[i]), [*leaves.values(), x])
            for key, want_param in zip(leaves, want):
                torch.testing.assert_close(got_params[key][i], want_param, msg=f"{name} {key} example {i}")
            torch.testing.assert_close(got_inputs[i], want[-1], msg=f"{name} input example {i}")


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_jacrev_of_attention_equals_autograd_jacobian(backend, device):
    _skip_without(backend, device, ["attention"])
    dtype = torch.float64 if backend in ("reference", "cpp") else torch.float32
    q, k, v = (torch.randn(1, 2, 3, 4, dtype=dtype, device=device) for _ in range(3))
    mask = torch.tensor([[True, False, True]], device=device)

    def f(q, k, v):
        return lucidops.ops.attention(q, k, v, key_padding_mask=mask, causal=True)

    with lucidops.use_backend(backend):
        got = jacrev(f, argnums=(0, 1, 2))(q, k, v)
        want = torch.autograd.functional.jacobian(f, (q, k, v))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert bool(got[1].abs().sum() > 0)  # the keys matter: a non-trivial Jacobian


def test_plain_autograd_keeps_the_op_and_transforms_use_the_twin():
    """Eager autograd records PyTorch's own node of the custom op (what compile and export
    trace); only a torch.func transform switches to the twin."""
    from lucidops.ops import _functorch

    x = torch.randn(5, requires_grad=True)
    assert not _functorch.transforms_active()
    assert "functorch" not in type(lucidops.ops.sinc(x, 1.0).grad_fn).__name__
    seen = []
    vmap(lambda t: seen.append(_functorch.transforms_active()) or t)(x.detach())
    assert seen == [True]


def test_second_derivatives_and_forward_mode_raise_clear_errors():
    x = torch.randn(6, dtype=torch.float64)
    sinc_sum = lambda t: lucidops.ops.sinc(t, 0.7).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="first derivatives only"):
        jacrev(jacrev(sinc_sum))(x)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        grad(lambda t: grad(sinc_sum)(t).sum())(x)
    with pytest.raises(NotImplementedError, match="no forward-mode formula"):
        torch.func.jvp(sinc_sum, (x,), (torch.ones_like(x),))


def test_value_checks_see_every_example_under_vmap():
    """The non-finite checks read the unwrapped batch: one bad example is caught, not skipped
    and not an error about data-dependent control flow."""
    encoder = lucidops.nn.GaussianPointEncoder(4, 8)
    clouds = torch.rand(3, 2, 10, 3) * 2 - 1
    vmap(encoder)(clouds)  # fine
    clouds[1, 0, 4, 2] = float("nan")
    with pytest.raises(ValueError, match="points must be finite"):
        vmap(encoder)(clouds)
    sigmas = torch.tensor([0.5, -1.0, 2.0])
    with pytest.raises(ValueError, match="sigma must be finite and > 0, got -1.0"):
        vmap(lucidops.ops.sinc)(torch.randn(3, 4), sigmas)
    x, sigmas = torch.randn(3, 4), sigmas.abs()
    torch.testing.assert_close(vmap(lucidops.ops.sinc)(x, sigmas),
                               torch.stack([lucidops.ops.sinc(x[i], sigmas[i]) for i in range(3)]))


@pytest.mark.parametrize("name", sorted(MODULE_OPS))
def test_vmap_forward_equals_a_loop(name):
    module, example, _, _ = small_modules()[name]
    module.eval()
    batch = torch.stack([example, 0.5 * example, example.flip(0)])
    got = vmap(module)(batch)
    torch.testing.assert_close(got, torch.stack([module(b) for b in batch]))


class DispatchCounter:
    """Counts the backend calls per op: one call for a vmapped batch means the vmap rule
    folded it into the kernel's batch; one per example means it ran per example."""

    def __init__(self, monkeypatch):
        from collections import Counter

        self.calls = Counter()
        real = lucidops.backends.dispatch

        def counting(name, *args):
            self.calls[name] += 1
            return real(name, *args)

        monkeypatch.setattr(lucidops.backends, "dispatch", counting)

    def take(self):
        calls, self.calls = dict(self.calls), type(self.calls)()
        return calls


def test_vmap_rules_fold_into_the_kernels_batch_when_the_result_allows(monkeypatch):
    counter = DispatchCounter(monkeypatch)
    n = 3
    # attention: q batched on dim 0, k shared, v batched on dim 2, the mask batched: one kernel call
    q, v = torch.randn(n, 2, 3, 5, 8), torch.randn(2, 3, n, 7, 8)
    k, mask = torch.randn(2, 3, 7, 8), torch.rand(n, 2, 7) > 0.3

    def att(q, k, v, m):
        return lucidops.ops.attention(q, k, v, key_padding_mask=m, causal=True)

    got = vmap(att, in_dims=(0, None, 2, 0))(q, k, v, mask)
    assert counter.take() == {"attention": 1}
    want = torch.stack([att(q[i], k, v[:, :, i], mask[i]) for i in range(n)])
    assert torch.equal(got, want)
    counter.take()
    grads = vmap(grad(lambda q: att(q, k, v[:, :, 0], mask[0]).square().sum()))(q)
    assert counter.take() == {"attention": 1, "attention_backward": 1}
    for i in range(n):
        leaf = q[i].clone().requires_grad_(True)
        att(leaf, k, v[:, :, 0], mask[0]).square().sum().backward()
        assert torch.equal(grads[i], leaf.grad)

    # sinc with a shared sigma folds; a per-example sigma (and its gradient) runs per example
    counter.take()
    x, sigmas = torch.randn(n, 6), torch.tensor([0.5, 1.0, 2.0])
    got = vmap(lambda t: lucidops.ops.sinc(t, 0.7))(x)
    assert counter.take() == {"sinc": 1}
    assert torch.equal(got, lucidops.ops.sinc(x, 0.7))
    counter.take()
    vmap(grad(lambda t: lucidops.ops.sinc(t, 0.7).sum()))(x)
    assert counter.take() == {"sinc": 1, "sinc_backward": 1}
    vmap(grad(lambda s: lucidops.ops.sinc(x[0], s).sum()))(sigmas)
    assert counter.take() == {"sinc": n, "sinc_backward": n}

    # LoRA: inputs fold into the rows; the adapter's per-example gradient runs per example
    w, a, b = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)

    def lora(x, a):
        return lucidops.ops.sine_lora_linear(x, w, a, b, omega=2.0, scale=0.5).square().sum()

    rows = torch.randn(n, 4, 8)
    vmap(grad(lora), in_dims=(0, None))(rows, a)
    assert counter.take() == {"bounded_lora_linear": 1, "bounded_lora_linear_backward": 1}
    per_example = vmap(grad(lora, argnums=1), in_dims=(0, None))(rows, a)
    assert counter.take() == {"bounded_lora_linear": 1, "bounded_lora_linear_backward": n}
    for i in range(n):
        leaf = a.clone().requires_grad_(True)
        lora(rows[i], leaf).backward()
        torch.testing.assert_close(per_example[i], leaf.grad)
    counter.take()

    # Gaussian mixture: point sets fold into the clouds; the backward (parameter gradients) per example
    encoder = lucidops.nn.GaussianPointEncoder(4, 8)
    clouds = torch.rand(n, 2, 10, 3) * 2 - 1
    params = dict(encoder.named_parameters())
    vmap(grad(lambda p, c: functional_call(encoder, p, (c,)).sum()), in_dims=(None, 0))(params, clouds)
    assert counter.take() == {"gaussian_mixture": 1, "gaussian_mixture_backward": n}


def test_forward_mode_names_what_to_use_instead():
    x = torch.randn(4)
    with pytest.raises(NotImplementedError, match="no forward-mode formula.*jacrev"):
        torch.func.jvp(lambda t: lucidops.ops.attention(t, t, t), (x.view(1, 1, 1, 4),), (x.view(1, 1, 1, 4),))
    with pytest.raises(NotImplementedError, match="no forward-mode formula"):
        torch.func.jacfwd(lambda t: lucidops.ops.sinc(t, 1.0))(x)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch's own forward-AD decompositions
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", sorted(MODULE_OPS))
@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "trainable"])
def test_forward_ad_dual_tensors_raise_instead_of_losing_the_tangent(name, backend, frozen):
    """torch.autograd.forward_ad's dual tensors: with no input requiring grad (a frozen model,
    the usual JVP) the op returned no tangent, so a residual around it carried a wrong one; with
    one, PyTorch's generic error. Both raise the jvp's error now."""
    import torch.autograd.forward_ad as fwAD

    _skip_without(backend, "cpu", MODULE_OPS[name])
    module, example, _, _ = small_modules()[name]
    module = module.double().eval().requires_grad_(not frozen)
    x = example.double()
    with lucidops.use_backend(backend), fwAD.dual_level():
        module(x)  # a dual level alone changes nothing
        with pytest.raises(NotImplementedError, match="no forward-mode formula"):
            module(fwAD.make_dual(x, torch.randn_like(x)))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_forward_ad_dual_tensors_raise_under_torch_compile_too():
    """The check stood aside while compiling, so a compiled function returned the residual's
    tangent alone, the op's part silently dropped."""
    import torch.autograd.forward_ad as fwAD

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: lucidops.ops.sinc(t, 1.0) + t, backend="eager")
    x = torch.randn(5)
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode formula"):
        compiled(fwAD.make_dual(x, torch.ones(5)))
    torch.testing.assert_close(compiled(x), lucidops.ops.sinc(x, 1.0) + x)  # and without one, as before
    torch._dynamo.reset()


def test_condition_tokens_second_derivatives_and_forward_mode_raise():
    """once_differentiable guards eager autograd only: under torch.func the second derivative
    of condition_tokens came back zero (a gradient penalty through ConditionedEmbedding lost its
    whole second-order term). A linear loss, whose first gradient has no path back to x but
    through the SVD, raises too."""
    import torch.autograd.forward_ad as fwAD

    from lucidops.conditioning import condition_tokens

    x = torch.randn(6, 4, dtype=torch.float64)
    for outer in (lambda t: condition_tokens(t).sin().sum(), lambda t: condition_tokens(t).sum()):
        with pytest.raises(RuntimeError, match="first derivatives only"):
            grad(lambda t: grad(outer)(t).pow(2).sum())(x)
        with pytest.raises(RuntimeError, match="first derivatives only"):
            jacrev(jacrev(outer))(x)
        leaf = x.clone().requires_grad_(True)
        (first,) = torch.autograd.grad(outer(leaf), leaf, create_graph=True)
        with pytest.raises(RuntimeError, match="first derivatives only"):
            first.pow(2).sum().backward()
    with pytest.raises(NotImplementedError, match="no forward-mode formula"):
        torch.func.jvp(condition_tokens, (x,), (torch.ones_like(x),))
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="no forward-mode formula"):
        condition_tokens(fwAD.make_dual(x, torch.ones_like(x)))
    # First derivatives unchanged, wide and tall, under vmap too.
    for shape in ((5, 3), (3, 5)):
        assert torch.autograd.gradcheck(condition_tokens, (torch.randn(shape, dtype=torch.float64,
                                                                       requires_grad=True),))
    leaf = x.clone().requires_grad_(True)
    conditioned = condition_tokens(leaf)
    conditioned.mul_(2)  # the output may change in place (saving it for the check above forbade that)
    conditioned.sum().backward()
    assert torch.isfinite(leaf.grad).all()
    batch = torch.randn(3, 5, 4, dtype=torch.float64)
    per_example = vmap(grad(lambda t: condition_tokens(t).sin().sum()))(batch)
    for i in range(3):
        leaf = batch[i].clone().requires_grad_(True)
        condition_tokens(leaf).sin().sum().backward()
        torch.testing.assert_close(per_example[i], leaf.grad)


def test_token_gray_dct_keeps_forward_ad_tangents():
    """The DCT mode took scipy's path for a dual tensor that did not require grad, dropping its
    tangent; torch.func.jvp (and the SVD mode) had it right."""
    import torch.autograd.forward_ad as fwAD

    from lucidops.conditioning import token_gray

    tokens = torch.rand(2, 6, 4, dtype=torch.float64) + 0.5
    direction = torch.randn_like(tokens)
    want = torch.func.jvp(lambda t: token_gray(t, 0.9), (tokens,), (direction,))[1]
    step = 1e-6
    numeric = (token_gray(tokens + step * direction, 0.9) - token_gray(tokens - step * direction, 0.9)) / (2 * step)
    torch.testing.assert_close(want, numeric, rtol=1e-5, atol=1e-6)
    with fwAD.dual_level():
        got = fwAD.unpack_dual(token_gray(fwAD.make_dual(tokens, direction), 0.9)).tangent
    assert got is not None
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_vmap_of_bfloat16_attention_carries_its_low_part(backend, device):
    """bfloat16 attention keeps a float32 low part of the output (out_lo) for its backward;
    the vmap rules fold it like the other saved tensors."""
    _skip_without(backend, device, ["attention"])
    q, k, v = (torch.randn(3, 2, 2, 6, 8, device=device).bfloat16() for _ in range(3))

    def loss(q, k, v):
        return lucidops.ops.attention(q, k, v, causal=True).float().square().sum()

    with lucidops.use_backend(backend):
        got = vmap(grad(loss, argnums=(0, 1, 2)))(q, k, v)
        for i in range(3):
            leaves = [t[i].clone().requires_grad_(True) for t in (q, k, v)]
            loss(*leaves).backward()
            for g, leaf in zip(got, leaves):
                assert torch.equal(g[i], leaf.grad)


def test_vmap_folds_examples_with_no_rows():
    w, a, b = torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2)
    out = vmap(lambda t: lucidops.ops.sine_lora_linear(t, w, a, b, omega=1.0, scale=1.0))(torch.randn(3, 0, 8))
    assert out.shape == (3, 0, 5)
