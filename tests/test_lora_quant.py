"""Quantized LoRA adapters (methods.md section 4): quantizers, sizes, and the ops on them."""

import math

import pytest
import torch

import lucidops
from lucidops.quant import QuantizedAdapter, quantize_adapter
from lucidops.reference import lora as ref
from conftest import backend_device_params


def adapter(r=8, k=96, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(r, k, generator=g) * 0.2, torch.randn(n, r, generator=g) * 0.2


@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_error_falls_with_bits(method):
    a, b = adapter()
    errors = [quantize_adapter(a, b, bits=bits, group_size=32, method=method).stats["rel_err_update"]
              for bits in range(2, 9)]
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.02 and errors[0] > 0.05


def test_kmeans_is_never_worse_than_one_uniform_grid_per_factor():
    a, b = adapter(seed=5)
    for bits in range(2, 9):
        km = quantize_adapter(a, b, bits=bits, method="kmeans").stats
        uni = quantize_adapter(a, b, bits=bits, group_size=a.numel() + b.numel(), method="uniform").stats
        assert km["rel_err_A"] <= uni["rel_err_A"] * 1.01 and km["rel_err_B"] <= uni["rel_err_B"] * 1.01


def test_uniform_is_exact_on_its_own_grid():
    # Each group of 16 holds 16 equally spaced values (min, min + step, ...): 4 bits store them exactly.
    base = torch.arange(16, dtype=torch.float32) * 0.25
    a = torch.stack([base - 1.0, base * 2 + 3.0])            # (2, 16): two groups
    b = torch.stack([base[:2] + 0.5 * i for i in range(8)])  # (8, 2): one group per 8 rows
    q = quantize_adapter(a, b, bits=4, group_size=16, method="uniform")
    a_hat, b_hat = q.dequantize()
    assert torch.equal(a_hat, a) and q.stats["rel_err_A"] == 0.0
    assert torch.equal(q.A.codes.reshape(2, 16)[0], torch.arange(16, dtype=torch.uint8))
    assert q.A.codes.max() <= 15 and q.B.codes.max() <= 15
    torch.testing.assert_close(b_hat, b, rtol=0, atol=2e-3)


def test_kmeans_recovers_a_small_codebook():
    values = torch.tensor([-0.7, -0.1, 0.2, 0.9])
    g = torch.Generator().manual_seed(1)
    a = values[torch.randint(0, 4, (6, 50), generator=g)]
    b = values[torch.randint(0, 4, (30, 6), generator=g)]
    q = quantize_adapter(a, b, bits=2, method="kmeans")
    torch.testing.assert_close(q.A.codebook.float(), values.half().float())
    a_hat, b_hat = q.dequantize()
    torch.testing.assert_close(a_hat, a, rtol=0, atol=1e-3)
    torch.testing.assert_close(b_hat, b, rtol=0, atol=1e-3)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sizes_in_bytes(bits):
    r, k, n, group = 4, 100, 30, 64
    a, b = adapter(r, k, n)
    q = quantize_adapter(a, b, bits=bits, group_size=group, method="uniform")
    # packed codes + a float16 scale and minimum per group, for each factor
    expected = sum(math.ceil(numel * bits / 8) + 4 * math.ceil(numel / group) for numel in (r * k, n * r))
    assert q.nbytes == expected == q.stats["bytes"]
    assert q.stats["full_precision_bytes"] == 4 * (r * k + n * r)
    qk = quantize_adapter(a, b, bits=bits, method="kmeans")
    assert qk.nbytes == sum(math.ceil(numel * bits / 8) + 2 * (1 << bits) for numel in (r * k, n * r))


def test_update_error_is_measured_after_the_sine():
    a, b = adapter(seed=2)
    q = quantize_adapter(a, b, bits=3, omega=50.0)
    a_hat, b_hat = q.dequantize(torch.float64)
    exact = torch.sin(50.0 * (b.double() @ a.double()))
    approx = torch.sin(50.0 * (b_hat @ a_hat))
    assert q.stats["rel_err_update"] == pytest.approx(((approx - exact).norm() / exact.norm()).item(), rel=1e-9)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("method", ["uniform", "kmeans"])
@pytest.mark.parametrize("placement", ["weight", "output"])
def test_ops_accept_a_quantized_adapter(backend, device, method, placement):
    a, b = adapter(r=4, k=33, n=17, seed=3)
    q = quantize_adapter(a, b, bits=4, group_size=16, method=method).to(device)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 5, 33, generator=g).to(device).requires_grad_(True)
    w = (torch.randn(17, 33, generator=g) / 6).to(device)
    bias = torch.randn(17, generator=g).to(device)
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(x, w, q, None, bias, fn="sin", omega=3.0, scale=0.5,
                                             placement=placement)
        y.sum().backward()
    a_hat, b_hat = q.dequantize(torch.float64)
    x2 = x.detach().double().cpu().reshape(-1, 33)
    expected = ref.forward(x2, w.double().cpu(), a_hat.cpu(), b_hat.cpu(), bias.double().cpu(), "sin", placement,
                           3.0, 0.5)
    out = y.detach().double().cpu().reshape(-1, 17)
    assert ((out - expected).norm() / expected.norm()).item() < 1e-5
    gx = ref.backward(torch.ones(10, 17, dtype=torch.float64), x2, w.double().cpu(), a_hat.cpu(), b_hat.cpu(),
                      "sin", placement, 3.0, 0.5, True, False, False)[0]
    got = x.grad.double().cpu().reshape(-1, 33)
    assert ((got - gx).norm() / gx.norm()).item() < 1e-5


def test_bad_arguments():
    a, b = adapter()
    with pytest.raises(ValueError, match="bits"):
        quantize_adapter(a, b, bits=1)
    with pytest.raises(ValueError, match="bits"):
        quantize_adapter(a, b, bits=9)
    with pytest.raises(ValueError, match="method"):
        quantize_adapter(a, b, method="nf4")
    with pytest.raises(ValueError, match="group_size"):
        quantize_adapter(a, b, group_size=0)
    with pytest.raises(ValueError, match="agree in r"):
        quantize_adapter(a, b[:, :3])
    with pytest.raises(TypeError, match="lora_A"):
        quantize_adapter(a.long(), b)
    q = quantize_adapter(a, b)
    assert isinstance(q, QuantizedAdapter) and q.rank == 8
    x, w = torch.randn(3, 96), torch.randn(40, 96)
    with pytest.raises(ValueError, match="lora_B must be None"):
        lucidops.ops.sine_lora_linear(x, w, q, b, omega=1.0, scale=1.0)
    with pytest.raises(TypeError, match="as lora_A"):
        lucidops.ops.sine_lora_linear(x, w, a, q, omega=1.0, scale=1.0)
