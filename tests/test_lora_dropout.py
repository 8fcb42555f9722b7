"""peft's lora_dropout with the fused LoRA ops: the adapter reads dropout(x), the base reads x
(``adapter_input``), through the op on every backend, the modules and the quantized adapter."""

import math

import pytest
import torch
from torch import nn

import lucidops
from comparisons import rel_err
from conftest import backend_device_params

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
OMEGA, SCALE, P = 2.0, 0.7, 0.3


def definition(x, u, w, a, b, bias, fn, placement, omega=OMEGA, scale=SCALE):
    """x W^T + bias + the adapter on u, in float64 by plain autograd."""
    f = torch.sin if fn == "sin" else torch.tanh
    y = x @ w.T + (0 if bias is None else bias)
    if placement == "weight":
        return y + u @ (scale * f(omega * b @ a)).T
    return y + scale * f(omega * (u @ a.T) @ b.T)


def dropped(x, keep):
    """dropout(x) with a fixed mask, differentiable in x as nn.Dropout is."""
    return x * keep / (1 - P)


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
@pytest.mark.parametrize("placement,fn", [("weight", "sin"), ("weight", "tanh"), ("output", "sin")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen_base", "trained_base"])
def test_adapter_input_matches_the_definition(backend, device, placement, fn, dtype, train_base):
    m, k, n, r = 13, 37, 21, 4
    g = torch.Generator().manual_seed(7)
    leaves64 = [torch.randn(2, m, k, generator=g), torch.randn(n, k, generator=g) / math.sqrt(k),
                torch.randn(r, k, generator=g) * 0.5, torch.randn(n, r, generator=g) * 0.5, torch.randn(n, generator=g)]
    keep = (torch.rand(2, m, k, generator=g) > P).to(dtype)
    trained = [True, train_base, True, True, train_base]
    leaves = [t.to(dtype=dtype, device=device).requires_grad_(need) for t, need in zip(leaves64, trained)]
    x, w, a, b, bias = leaves
    grad = torch.randn(2, m, n, generator=g).to(dtype=dtype, device=device)
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn=fn, omega=OMEGA, scale=SCALE, placement=placement,
                                             adapter_input=dropped(x, keep.to(device)))
        y.backward(grad)
        assert lucidops.backends.last_used("bounded_lora_linear") == backend
    assert y.dtype == dtype and y.shape == (2, m, n)

    exact = [t.detach().double().cpu().requires_grad_(need) for t, need in zip(leaves, trained)]
    # The op gets dropout(x) rounded to the dtype (as peft's dropout gives it): the float64
    # truth reads that value, with dropout's derivative.
    u_rounded = dropped(x.detach(), keep.to(device)).double().cpu()
    u_exact = u_rounded + dropped(exact[0] - exact[0].detach(), keep.double())
    want = definition(exact[0], u_exact, *exact[1:], fn, placement)
    want.backward(grad.double().cpu())
    assert rel_err(y, want) < TOL[dtype]
    for name, got, expected, need in zip("x weight lora_A lora_B bias".split(), leaves, exact, trained):
        if need:
            assert rel_err(got.grad, expected.grad) < TOL[dtype], name
        else:
            assert got.grad is None, name
    # and the adapter did read the dropped input: without it the output differs
    with torch.no_grad(), lucidops.use_backend(backend):
        plain = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn=fn, omega=OMEGA, scale=SCALE,
                                                 placement=placement)
    assert rel_err(plain, want) > 10 * TOL[dtype]


def test_adapter_input_equal_to_x_is_the_plain_op():
    x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    plain = lucidops.ops.sine_lora_linear(x, w, a, b, omega=3.0, scale=0.5)
    same = lucidops.ops.sine_lora_linear(x, w, a, b, omega=3.0, scale=0.5, adapter_input=x.clone())
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)


def test_quantized_adapter_reads_the_adapter_input():
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(4, 64, generator=g), torch.randn(8, 64, generator=g) / 8
    a, b = torch.randn(4, 64, generator=g) * 0.3, torch.randn(8, 4, generator=g) * 0.3
    adapter = lucidops.quant.quantize_adapter(a, b, bits=4, group_size=16)
    u = dropped(x, (torch.rand(4, 64, generator=g) > P).float())
    got = lucidops.ops.sine_lora_linear(x, w, adapter, None, omega=2.0, scale=0.5, adapter_input=u)
    a_q, b_q = adapter.dequantize(torch.float64)
    want = definition(x.double(), u.double(), w.double(), a_q, b_q, None, "sin", "weight", omega=2.0, scale=0.5)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("placement", ["weight", "output"])
def test_module_dropout_in_training_only(placement):
    torch.manual_seed(0)
    layer = lucidops.nn.BoundedLoRALinear(nn.Linear(16, 12), rank=4, fn="tanh", omega=2.0, alpha=4,
                                          placement=placement, dropout=0.25)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    assert isinstance(layer.lora_dropout, nn.Dropout) and "dropout=0.25" in repr(layer)
    x = torch.randn(3, 16)
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)  # the module's dropout draws the same mask again
    u = nn.functional.dropout(x, 0.25, training=True)
    w, bias = layer.base.weight.detach(), layer.base.bias.detach()
    want = definition(x, u, w, layer.lora_A.detach(), layer.lora_B.detach(), bias, "tanh", placement, scale=1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, layer.eval()(x))
    want_eval = definition(x, x, w, layer.lora_A.detach(), layer.lora_B.detach(), bias, "tanh", placement, scale=1.0)
    torch.testing.assert_close(layer(x), want_eval, rtol=1e-5, atol=1e-5)  # eval: no dropout


def test_merged_module_is_its_linear_whatever_the_dropout():
    layer = lucidops.nn.SineLoRALinear(nn.Linear(16, 12), rank=4, omega=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    layer.merge()
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), layer.base(x))  # as peft: a merged layer applies no adapter dropout


@pytest.mark.parametrize("value,error", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                         ("0.1", TypeError), (True, TypeError)])
def test_module_rejects_bad_dropout(value, error):
    with pytest.raises(error, match="dropout"):
        lucidops.nn.SineLoRALinear(nn.Linear(4, 4), rank=2, omega=1.0, dropout=value)


def test_bad_adapter_input_names_it():
    x, w, a, b = torch.randn(5, 8), torch.randn(6, 8), torch.randn(2, 8), torch.randn(6, 2)
    call = lambda u: lucidops.ops.sine_lora_linear(x, w, a, b, omega=1.0, scale=1.0, adapter_input=u)  # noqa: E731
    with pytest.raises(ValueError, match="adapter_input must have x's shape"):
        call(torch.randn(4, 8))
    with pytest.raises(TypeError, match="adapter_input must have x's dtype"):
        call(x.double())
    with pytest.raises(TypeError, match="adapter_input must be a torch.Tensor"):
        call(x.tolist())
    with pytest.raises(TypeError, match="adapter_input must be a floating-point tensor"):
        call(x.long())
    with pytest.raises(ValueError, match="adapter_input.*device"):
        call(x.to("meta"))
