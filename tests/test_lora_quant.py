"""Quantized LoRA adapters (methods.md section 4): quantizers, sizes, and the ops on them."""

import dataclasses
import math

import pytest
import torch

import lucidops
from lucidops.quant import QuantizedAdapter, quantize_adapter
from lucidops.reference import lora as ref
from conftest import TRITON_DEVICE, backend_device_params, needs_triton


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


@pytest.mark.parametrize("method", ["uniform", "kmeans"])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-8, 1e-6, 1e5, 1e30])
def test_error_does_not_depend_on_the_factors_scale(method, magnitude):
    """A B a few small steps from its zero start (~1e-6) put float16 side data among the
    subnormals (before: 0.05 relative error at 1e-6, all of B lost at 1e-8), and a factor
    above 65504 overflowed it (NaN). Each factor is normalised by a power of two first, so
    the error is the one at unit scale."""
    a, b = adapter(seed=3)
    unit = quantize_adapter(a, b / b.abs().max(), bits=8, group_size=32, method=method).stats
    q = quantize_adapter(a, b / b.abs().max() * magnitude, bits=8, group_size=32, method=method)
    assert q.stats["rel_err_B"] < 1.1 * unit["rel_err_B"] < 0.01, (q.stats["rel_err_B"], unit["rel_err_B"])
    assert q.stats["rel_err_update"] < 1.1 * unit["rel_err_update"]
    assert all(torch.isfinite(t).all() for t in (q.B.scales, q.B.minimums, q.B.codebook) if t is not None)


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear_quant"))
@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_ops_undo_the_factors_exponents(backend, device, method):
    """The kernels read tables that decode A / 2^e_A and B / 2^e_B and fold 2^(e_A + e_B)
    into omega: a tiny B (1e-6) with a large omega (phase of order one) must give the layer
    of the dequantized factors, forward and dx."""
    a, b = adapter(r=4, k=33, n=17, seed=6)
    b = b / b.abs().max() * 1e-6
    q = quantize_adapter(a, b, bits=8, group_size=16, method=method)
    assert q.B.exponent < -15 and q.phase_multiplier() == 2.0 ** (q.A.exponent + q.B.exponent)
    q = q.to(device)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 33, generator=g).to(device).requires_grad_(True)
    w = (torch.randn(17, 33, generator=g) / 6).to(device)
    with lucidops.use_backend(backend):
        y = lucidops.ops.sine_lora_linear(x, w, q, omega=2e6, scale=0.5)
        y.sum().backward()
    a_hat, b_hat = q.dequantize(torch.float64)
    x2, w2 = x.detach().double().cpu(), w.double().cpu()
    expected = ref.forward(x2, w2, a_hat.cpu(), b_hat.cpu(), None, "sin", "weight", 2e6, 0.5)
    assert rel(y, expected) < 1e-5
    dx = ref.backward(torch.ones(5, 17, dtype=torch.float64), x2, w2, a_hat.cpu(), b_hat.cpu(), "sin", "weight",
                      2e6, 0.5, True, False, False)[0]
    assert rel(x.grad, dx) < 1e-5
    # and the dequantized factors are the originals to 8 bits (the update has O(1) phase)
    update = torch.sin(2e6 * (b.double() @ a.double()))
    assert ((torch.sin(2e6 * (b_hat.cpu() @ a_hat.cpu())) - update).norm() / update.norm()) < 0.02


@pytest.mark.parametrize("placement", ["output", "weight"])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_float16_layers_keep_a_tiny_b_out_of_the_subnormals(backend, placement):
    """In float16 a B of 1e-6 is subnormal (4 bits left): the CPU paths dequantize the factors
    without their exponents and fold those into omega (before: 0.097 relative error with
    placement "output", 0.066 in a float16 layer's delta_weight; now 5e-4 and 3e-4)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 64, generator=g) * 0.2
    b = torch.randn(32, 4, generator=g)
    b = b / b.abs().max() * 1e-6
    q = quantize_adapter(a, b, bits=8, group_size=16)
    a_hat, b_hat = q.dequantize(torch.float64)
    x = torch.randn(8, 64, generator=g)
    w = torch.zeros(32, 64)  # the output is the adapter's alone
    expected = ref.forward(x.double(), w.double(), a_hat, b_hat, None, "sin", placement, 2e6, 1.0)
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(x.half(), w.half(), q, None, fn="sin", omega=2e6, scale=1.0,
                                             placement=placement)
    assert rel(y, expected) < 2e-3
    if placement == "weight":
        layer = lucidops.nn.BoundedLoRALinear(torch.nn.Linear(64, 32, bias=False), rank=4, omega=2e6, alpha=4)
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        layer.quantize_(bits=8, group_size=16)
        update = layer.half().delta_weight()
        assert update.dtype == torch.float16
        assert rel(update, torch.sin(2e6 * (b_hat @ a_hat))) < 2e-3


@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_state_round_trips_the_exponent_and_reads_states_saved_before_it(method):
    a, b = adapter(seed=4)
    q = quantize_adapter(a, b * 1e-6, bits=4, group_size=16, method=method)
    back = QuantizedAdapter.from_state(q.state())
    assert back.B.exponent == q.B.exponent < 0
    assert all(torch.equal(x, y) for x, y in zip(back.dequantize(), q.dequantize()))
    # A state saved before the exponent existed decoded its tables as they are: exponent 0,
    # which is what a factor whose largest magnitude is in [0.5, 1) gets now.
    q = quantize_adapter(a / a.abs().max() * 0.75, b / b.abs().max() * 0.75, bits=4, method=method)
    assert q.A.exponent == q.B.exponent == 0
    old = QuantizedAdapter.from_state({k: v for k, v in q.state().items() if not k.endswith(".exponent")})
    assert all(torch.equal(x, y) for x, y in zip(old.dequantize(), q.dequantize()))


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
    # packed codes + a float16 scale and minimum per group + an int16 exponent, for each factor
    expected = sum(math.ceil(numel * bits / 8) + 4 * math.ceil(numel / group) + 2 for numel in (r * k, n * r))
    assert q.nbytes == expected == q.stats["bytes"]
    assert q.stats["full_precision_bytes"] == 4 * (r * k + n * r)
    qk = quantize_adapter(a, b, bits=bits, method="kmeans")
    assert qk.nbytes == sum(math.ceil(numel * bits / 8) + 2 * (1 << bits) + 2 for numel in (r * k, n * r))


def test_update_error_is_measured_after_the_sine():
    a, b = adapter(seed=2)
    q = quantize_adapter(a, b, bits=3, omega=50.0)
    a_hat, b_hat = q.dequantize(torch.float64)
    exact = torch.sin(50.0 * (b.double() @ a.double()))
    approx = torch.sin(50.0 * (b_hat @ a_hat))
    assert q.stats["rel_err_update"] == pytest.approx(((approx - exact).norm() / exact.norm()).item(), rel=1e-9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kmeans_quantization_on_cuda_is_deterministic_and_matches_the_cpu():
    """Cluster sums came from index_add_, whose CUDA atomics add in a different order each run."""
    a, b = adapter(r=16, k=4096, n=512, seed=5)
    first = quantize_adapter(a.cuda(), b.cuda(), bits=4, method="kmeans")
    again = quantize_adapter(a.cuda(), b.cuda(), bits=4, method="kmeans")
    on_cpu = quantize_adapter(a, b, bits=4, method="kmeans")
    for x, y, z in ((first.A, again.A, on_cpu.A), (first.B, again.B, on_cpu.B)):
        assert torch.equal(x.codebook, y.codebook) and torch.equal(x.codes, y.codes)
        torch.testing.assert_close(x.codebook.cpu().float(), z.codebook.float(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear_quant"))
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
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="lora_B must be finite"):
            quantize_adapter(a, torch.where(b > 0.3, bad, b))
    # omega and fn of the error report: a NaN omega gave a NaN error, a typo in fn was ignored.
    for kwargs, error, message in ((dict(omega=float("nan")), ValueError, "omega must be finite"),
                                   (dict(omega=float("inf")), ValueError, "omega must be finite"),
                                   (dict(omega="10"), TypeError, "omega must be a real number"),
                                   (dict(omega=True), TypeError, "omega must be a real number"),
                                   (dict(fn="cos"), ValueError, "fn must be one of"),
                                   (dict(omega=10.0, fn="cos"), ValueError, "fn must be one of")):
        with pytest.raises(error, match=message):
            quantize_adapter(a, b, **kwargs)
    assert quantize_adapter(a, b, omega=torch.tensor(10.0), fn="tanh").stats["rel_err_update"] > 0
    q = quantize_adapter(a, b)
    assert isinstance(q, QuantizedAdapter) and q.rank == 8
    x, w = torch.randn(3, 96), torch.randn(40, 96)
    with pytest.raises(ValueError, match="lora_B must be None"):
        lucidops.ops.sine_lora_linear(x, w, q, b, omega=1.0, scale=1.0)
    with pytest.raises(TypeError, match="as lora_A"):
        lucidops.ops.sine_lora_linear(x, w, a, q, omega=1.0, scale=1.0)


# --------------------------------------------------------------------------- in-kernel dequantization (triton)

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}

# (leading dims of x, K_in, N_out, r, group_size): groups larger than K_in (they straddle
# rows of A, and B is one or two groups), K_in not a multiple of the group (straddling
# again), M = 1, and r = 17 > 16 (two rank chunks, the second mostly masked).
QUANT_CASES = [((2, 3), 33, 17, 4, 64), ((1,), 100, 9, 3, 16), ((5,), 48, 20, 17, 32)]


@pytest.fixture
def no_pytorch_dequant(monkeypatch):
    """Inside the block, QuantizedTensor.dequantize raises: the kernels must read codes."""
    from contextlib import contextmanager

    from lucidops.quant import QuantizedTensor

    @contextmanager
    def block():
        with monkeypatch.context() as m:
            def refuse(self, dtype=None):
                raise AssertionError("QuantizedTensor.dequantize was called on the in-kernel path")

            m.setattr(QuantizedTensor, "dequantize", refuse)
            yield

    return block


def quant_problem(lead, k, n, r, group, bits, method, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, k, generator=g) * 0.3, torch.randn(n, r, generator=g) * 0.3
    q = quantize_adapter(a, b, bits=bits, group_size=group, method=method).to(TRITON_DEVICE)
    x = torch.randn(*lead, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return q, x.to(TRITON_DEVICE), w.to(TRITON_DEVICE), bias.to(TRITON_DEVICE)


def quant_expected(q, x, w, bias, fn, omega, scale, placement="weight"):
    """float64: x (W + s fn(omega Q(B) Q(A)))^T + bias (or placement "output"), Q dequantized in PyTorch."""
    a_hat, b_hat = q.dequantize(torch.float64)
    x2 = x.detach().cpu().double().reshape(-1, x.shape[-1])
    bias64 = None if bias is None else bias.detach().cpu().double()
    return ref.forward(x2, w.detach().cpu().double(), a_hat.cpu(), b_hat.cpu(), bias64, fn, placement, omega, scale)


def rel(got, expected):
    got = got.detach().cpu().double().reshape(expected.shape)
    return ((got - expected).norm() / expected.norm()).item()


@needs_triton
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_triton_dequantizes_in_kernel(method, bits, no_pytorch_dequant):
    # Every dtype for every (method, bits); the shape case each dtype gets rotates with bits,
    # so that every dtype meets every case (and both fns) across the parametrization.
    for index, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
        lead, k, n, r, group = QUANT_CASES[(index + bits) % len(QUANT_CASES)]
        fn = ("sin", "tanh")[(index + bits // 2) % 2]
        q, x, w, bias = quant_problem(lead, k, n, r, group, bits, method, dtype, seed=10 * bits + index)
        expected = quant_expected(q, x, w, bias, fn, 4.0, 0.7)
        with no_pytorch_dequant(), lucidops.use_backend("triton"):
            y = lucidops.ops.bounded_lora_linear(x, w, q, None, bias, fn=fn, omega=4.0, scale=0.7)
        assert lucidops.backends.last_used("bounded_lora_linear_quant") == "triton"
        assert y.shape == (*lead, n) and y.dtype == dtype
        assert rel(y, expected) < TOL[dtype], (dtype, lead, k, n, r, group, fn)


@needs_triton
@pytest.mark.parametrize("method,bits,group", [("uniform", 3, 7), ("uniform", 8, 64), ("kmeans", 8, 0)])
def test_triton_update_equals_fn_of_dequantized_product(method, bits, group, no_pytorch_dequant):
    # x = I and W = 0 make the output the update itself, s fn(omega Q(B) Q(A))^T, element by
    # element: a wrong group, a sign-extended uint8 code (8 bits: codes > 127) or an
    # unmasked padded rank lane would show here at full size.
    k, n, r = 37, 11, 5
    g = torch.Generator().manual_seed(bits + group)
    a, b = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    q = quantize_adapter(a, b, bits=bits, group_size=max(group, 1), method=method).to(TRITON_DEVICE)
    assert int(q.A.codes.max()) >= (128 if bits == 8 else 1)
    a_hat, b_hat = q.dequantize(torch.float64)
    eye = torch.eye(k, device=TRITON_DEVICE)
    w = torch.zeros(n, k, device=TRITON_DEVICE)
    # The float32 phase's rounding, the classical bound r eps sum |omega b a| (1.5e-5 here; a
    # wrong code or lane is off by 0.1 or more). 2e-6 held by luck of BLAS's summation order.
    atol = r * torch.finfo(torch.float32).eps * float((2.5 * (b_hat.abs() @ a_hat.abs())).max())
    with no_pytorch_dequant(), lucidops.use_backend("triton"):
        for fn in ("sin", "tanh"):
            y = lucidops.ops.bounded_lora_linear(eye, w, q, None, fn=fn, omega=2.5, scale=1.0)
            expected = ref.bounded(fn, 2.5 * (b_hat.cpu() @ a_hat.cpu())).T
            torch.testing.assert_close(y.cpu().double(), expected, rtol=0, atol=atol)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_triton_backward_dequantizes_in_kernel(method, dtype, no_pytorch_dequant):
    lead, k, n, r, group = (3, 2), 45, 13, 6, 16
    q, x, w, bias = quant_problem(lead, k, n, r, group, 4, method, dtype, seed=7)
    x.requires_grad_(True)
    w.requires_grad_(True)
    bias.requires_grad_(True)
    g = torch.Generator().manual_seed(8)
    grad = torch.randn(*lead, n, generator=g).to(dtype).to(TRITON_DEVICE)
    a_hat, b_hat = q.dequantize(torch.float64)
    with no_pytorch_dequant(), lucidops.use_backend("triton"):
        y = lucidops.ops.bounded_lora_linear(x, w, q, None, bias, fn="tanh", omega=3.0, scale=0.4)
        y.backward(grad)
    assert lucidops.backends.last_used("bounded_lora_linear_quant_backward") == "triton"
    x2, g2 = x.detach().cpu().double().reshape(-1, k), grad.cpu().double().reshape(-1, n)
    dx, dw, dbias = ref.backward(g2, x2, w.detach().cpu().double(), a_hat.cpu(), b_hat.cpu(), "tanh", "weight", 3.0,
                                 0.4, True, True, True)[:3]
    tol = TOL[dtype]
    assert rel(x.grad, dx) < tol and rel(w.grad, dw) < tol and rel(bias.grad, dbias) < tol


@needs_triton
@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_triton_large_batches_dequantize_while_building_chunks(method, no_pytorch_dequant, monkeypatch):
    # 260 rows (past FUSED_MAX_ROWS): forward and dx build Weff from the codes in column
    # chunks (2 KiB here: 64 columns), with groups of 24 that straddle rows and chunks.
    from lucidops.triton_kernels import lora as tk

    monkeypatch.setattr(tk, "MATERIALIZE_CHUNK_BYTES", 2 << 10)
    lead, k, n, r = (2, 130), 100, 70, 5
    q, x, w, bias = quant_problem(lead, k, n, r, 24, 4, method, torch.float32, seed=11)
    x.requires_grad_(True)
    w.requires_grad_(True)  # dW = dY^T X in chunks of rows too, without the adapter
    grad = torch.randn(*lead, n, generator=torch.Generator().manual_seed(12)).to(TRITON_DEVICE)
    with no_pytorch_dequant(), lucidops.use_backend("triton"):
        y = lucidops.ops.bounded_lora_linear(x, w, q, None, bias, fn="sin", omega=3.0, scale=0.5)
        y.backward(grad)
    assert lucidops.backends.last_used("bounded_lora_linear_quant_backward") == "triton"
    a_hat, b_hat = q.dequantize(torch.float64)
    assert rel(y, quant_expected(q, x, w, bias, "sin", 3.0, 0.5)) < TOL[torch.float32]
    x2, g2 = x.detach().cpu().double().reshape(-1, k), grad.cpu().double().reshape(-1, n)
    dx, dw = ref.backward(g2, x2, w.detach().cpu().double(), a_hat.cpu(), b_hat.cpu(), "sin", "weight", 3.0, 0.5,
                          True, True, False)[:2]
    assert rel(x.grad, dx) < TOL[torch.float32] and rel(w.grad, dw) < TOL[torch.float32]


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_cpu_backends_dequantize_in_pytorch(backend):
    q, x, w, bias = quant_problem((4,), 21, 6, 3, 8, 4, "uniform", torch.float32, seed=11)
    q, x, w, bias = q.to("cpu"), x.cpu(), w.cpu(), bias.cpu()
    calls = []
    from lucidops.quant import QuantizedTensor

    original = QuantizedTensor.dequantize

    def counting(self, dtype=None):
        calls.append(dtype)
        return original(self, dtype)

    expected = quant_expected(q, x, w, bias, "sin", 2.0, 0.5)
    QuantizedTensor.dequantize = counting
    try:
        with lucidops.use_backend(backend):
            y = lucidops.ops.sine_lora_linear(x, w, q, None, bias, omega=2.0, scale=0.5)
    finally:
        QuantizedTensor.dequantize = original
    assert lucidops.backends.last_used("bounded_lora_linear_quant") == backend
    assert calls == [torch.float32, torch.float32]  # A and B, in float32
    assert rel(y, expected) < 1e-6


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)], ids=str)
@pytest.mark.parametrize("placement", ["weight", "output"])
@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear_quant"))
def test_half_inputs_form_the_phase_from_exact_factors_on_every_backend(backend, device, placement, dtype,
                                                                         tolerance):
    """Omega 300: against x (W + s sin(omega Q(B) Q(A)))^T + bias (or placement "output") in
    float64. Weight placement: the reference and cpp paths dequantized in x's dtype, rounding
    Q(A) and Q(B) before the phase: in bfloat16 the output erred by 14% and dx by 15%, in
    float16 by 1.6% and 1.9% (Triton, dequantizing in float32: 0.26% and 0.03%; now all three
    alike). Output placement dequantized in x's dtype on every backend (the plain op took
    factors of x's dtype only): bfloat16 27%, now float32 factors go to the plain op."""
    q, x, w, bias = quant_problem((16,), 96, 40, 8, 32, 8, "uniform", dtype, seed=5)
    q, x, w, bias = q.to(device), x.to(device).requires_grad_(True), w.to(device), bias.to(device)
    grad = torch.randn(16, 40, generator=torch.Generator().manual_seed(6)).to(dtype)
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(x, w, q, None, bias, omega=300.0, scale=0.5, placement=placement)
        y.backward(grad.to(device))
    op = "bounded_lora_linear_quant" if placement == "weight" else "bounded_lora_linear"
    assert lucidops.backends.last_used(op) == backend
    assert rel(y, quant_expected(q, x, w, bias, "sin", 300.0, 0.5, placement)) < tolerance
    a_hat, b_hat = q.dequantize(torch.float64)
    dx = ref.backward(grad.double(), x.detach().cpu().double(), w.cpu().double(), a_hat.cpu(), b_hat.cpu(), "sin",
                      placement, 300.0, 0.5, True, False, False)[0]
    assert rel(x.grad, dx) < tolerance


@needs_triton
def test_triton_quantized_empty_batch_and_opcheck():
    q, x, w, bias = quant_problem((3,), 20, 9, 4, 8, 4, "kmeans", torch.float32, seed=12)
    with lucidops.use_backend("triton"):
        y = lucidops.ops.bounded_lora_linear(x[:0], w, q, None, bias, fn="sin", omega=1.0, scale=1.0)
        assert y.shape == (0, 9)
        args = (x, w, *q.kernel_tensors()[:3], *q.kernel_tensors()[4:7], bias, "kmeans", 0, 0, "sin", 1.5, 0.5)
        torch.library.opcheck(torch.ops.lucidops.bounded_lora_linear_quant.default,
                              (x.clone().requires_grad_(True),) + args[1:])
        grad = torch.randn(3, 9, device=x.device)
        torch.library.opcheck(torch.ops.lucidops.bounded_lora_linear_quant_backward.default,
                              (grad,) + args[:8] + args[9:] + (True, True, True))


def test_quantized_flop_formula_is_counted():
    from lucidops.ops.lora import forward_flops
    from lucidops.profile.flops import count_flops

    m, k, n, r = 6, 20, 9, 4
    q, x, w, bias = quant_problem((m,), k, n, r, 8, 4, "uniform", torch.float32, seed=13)
    q, x, w, bias = q.to("cpu"), x.cpu(), w.cpu(), bias.cpu()
    counts = count_flops(lambda x: lucidops.ops.sine_lora_linear(x, w, q, None, bias, omega=1.0, scale=1.0), x)
    # the weight placement's count plus code * scale + minimum per adapter element
    dequant = 2 * (r * k + n * r)
    assert counts["lucidops.bounded_lora_linear_quant"] == forward_flops((m, k), (n, k), (r, k), (n, r), (n,), "sin",
                                                                         "weight") + dequant


def test_quantized_bad_arguments():
    a, b = adapter(r=4, k=30, n=12)
    q = quantize_adapter(a, b, bits=4, group_size=8)
    x, w = torch.randn(3, 30), torch.randn(12, 30)
    with pytest.raises(ValueError, match="lora_A .*K_in=31"):
        lucidops.ops.sine_lora_linear(torch.randn(3, 31), torch.randn(12, 31), q, omega=1.0, scale=1.0)
    with pytest.raises(ValueError, match="lora_A .*N_out=11"):
        lucidops.ops.sine_lora_linear(x, w[:11], q, omega=1.0, scale=1.0)
    with pytest.raises(ValueError, match="bias"):
        lucidops.ops.sine_lora_linear(x, w, q, None, torch.randn(5), omega=1.0, scale=1.0)
    with pytest.raises(TypeError, match="weight"):
        lucidops.ops.sine_lora_linear(x, w.double(), q, omega=1.0, scale=1.0)
    with pytest.raises(ValueError, match="fn"):
        lucidops.ops.bounded_lora_linear(x, w, q, fn="relu", scale=1.0)
    with pytest.raises(ValueError, match="omega"):
        lucidops.ops.sine_lora_linear(x, w, q, omega=float("nan"), scale=1.0)
    with pytest.raises(ValueError, match="same device"):
        lucidops.ops.sine_lora_linear(x, w, q.to("meta"), omega=1.0, scale=1.0)
    huge = quantize_adapter(a * 1e30, b * 1e30, bits=4, group_size=8)  # its phase omega B A overflows float32
    with pytest.raises(ValueError, match="overflows float32"):
        lucidops.ops.sine_lora_linear(x, w, huge, omega=1.0, scale=1.0)
    bad = QuantizedAdapter(dataclasses.replace(q.A, scales=q.A.scales[:-1]), q.B)
    with pytest.raises(ValueError, match="lora_A .*scales"):
        lucidops.ops.sine_lora_linear(x, w, bad, omega=1.0, scale=1.0)
    qk = quantize_adapter(a, b, bits=3, method="kmeans")
    bad = QuantizedAdapter(dataclasses.replace(qk.A, codebook=qk.A.codebook.float()), qk.B)
    with pytest.raises(ValueError, match="codebook"):
        lucidops.ops.sine_lora_linear(x, w, bad, omega=1.0, scale=1.0)
    with pytest.raises(ValueError, match="method"):
        lucidops.ops.sine_lora_linear(x, w, QuantizedAdapter(q.A, qk.B), omega=1.0, scale=1.0)
    if lucidops.backends.triton_interpreting():
        with lucidops.use_backend("triton"), pytest.raises(TypeError, match="float64"):
            lucidops.ops.sine_lora_linear(x.double(), w.double(), q, omega=1.0, scale=1.0)


@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_quantized_torch_compile_fullgraph(method):
    q, x, w, bias = quant_problem((3,), 20, 9, 4, 8, 4, method, torch.float32, seed=14)
    q, x, w, bias = q.to("cpu"), x.cpu().requires_grad_(True), w.cpu(), bias.cpu()

    def f(x):
        return lucidops.ops.sine_lora_linear(x, w, q, None, bias, omega=2.0, scale=0.5)

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    y.sum().backward()
    grad = x.grad.clone()
    x.grad = None
    f(x).sum().backward()
    torch.testing.assert_close(y, f(x))
    torch.testing.assert_close(grad, x.grad)


@pytest.mark.parametrize("dtype, magnitude", [(torch.float32, 1e-39), (torch.float32, 3e38), (torch.bfloat16, 1e-39),
                                              (torch.float64, 1e-310), (torch.float64, 1e307)])
def test_extreme_finite_factors_keep_finite_tables(dtype, magnitude):
    """2^-exponent was applied as a float32 scalar: for a subnormal float32 peak it was inf (every
    table inf, NaN stats), and dequantizing a factor near 3e38 gave -inf; in float64 ldexp
    raised OverflowError. The scaling now runs in float64, in two exact steps."""
    a, b = adapter(seed=5)
    a = (a.double() / a.double().abs().max() * magnitude).to(dtype)
    q = quantize_adapter(a, b.to(dtype), bits=8, group_size=16)
    assert torch.isfinite(q.A.scales).all() and torch.isfinite(q.A.minimums).all()
    assert 0 < q.stats["rel_err_A"] < 0.01 and math.isfinite(q.stats["rel_err_update"])
    back = q.A.dequantize()
    assert back.dtype == dtype and torch.isfinite(back).all()
    unit_back, unit_a = back.double() / magnitude, a.double() / magnitude  # norms of subnormals underflow
    assert float((unit_back - unit_a).norm() / unit_a.norm()) < 0.01


def test_phase_multiplier_past_float64_is_refused_by_name():
    a, b = adapter(seed=5)
    q = quantize_adapter(a.double() * 1e200, b.double() * 1e200, bits=8)  # raised OverflowError in the stats
    assert math.isfinite(q.stats["rel_err_A"]) and q.phase_multiplier() == math.inf
    with pytest.raises(ValueError, match="overflows float32"):
        lucidops.ops.sine_lora_linear(torch.randn(2, a.shape[1], dtype=torch.float64),
                                      torch.randn(b.shape[0], a.shape[1], dtype=torch.float64), q, omega=1.0, scale=1.0)


def test_group_size_past_the_factor_is_one_group_at_no_cost():
    # padded to group_size elements: 0.7 GB for 10^7, an allocator error for 10^13
    a, b = adapter(seed=5)
    one = quantize_adapter(a, b, bits=4, group_size=a.numel() + b.numel())
    for huge in (10**7, 10**13):
        q = quantize_adapter(a, b, bits=4, group_size=huge)
        assert q.A.group_size == huge and q.A.scales.numel() == 1
        assert torch.equal(q.A.codes, one.A.codes) and torch.equal(q.A.dequantize(), one.A.dequantize())
        x, w = torch.randn(3, a.shape[1]), torch.randn(b.shape[0], a.shape[1])
        with lucidops.use_backend("reference"):
            assert torch.equal(lucidops.ops.sine_lora_linear(x, w, q, omega=2.0, scale=1.0),
                               lucidops.ops.sine_lora_linear(x, w, one, omega=2.0, scale=1.0))


@pytest.mark.parametrize("rank, in_features", [(8, 24), (4, 12)])
def test_quantized_state_of_another_size_is_refused(rank, in_features):
    """A rank-4 quantized state loaded into a rank-8 layer (strict=True) ran with the rank-8
    scale; one of another K_in failed only at forward."""
    def layer(rank, k_in):
        torch.manual_seed(1)
        out = lucidops.nn.BoundedLoRALinear(torch.nn.Linear(k_in, 16), rank=rank, omega=3.0, alpha=16.0)
        out.quantize_(bits=8)
        return out

    src, dst = layer(4, 24), layer(rank, in_features)
    before = dst.quantized
    with pytest.raises(RuntimeError, match="size mismatch for the quantized adapter"):
        dst.load_state_dict(src.state_dict(), strict=False)
    assert dst.quantized is before
    layer(4, 24).load_state_dict(src.state_dict())  # the same size loads


@pytest.mark.parametrize("method", ["uniform", "kmeans"])
def test_numpy_integer_bits_and_group_size_behave_as_python_ints(method):
    """An np.int8(5) was kept as given: 1 << bits and the byte count overflowed (13 bytes
    reported instead of 45), and np.uint8(8) raised OverflowError or IndexError."""
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 64, generator=g), torch.randn(32, 4, generator=g)
    for bits in (5, 8):
        plain = quantize_adapter(a, b, bits=bits, group_size=16, method=method)
        for kind in (np.int8, np.uint8, np.int64):
            given = quantize_adapter(a, b, bits=kind(bits), group_size=kind(16), method=method)
            assert given.stats == plain.stats
            assert torch.equal(given.dequantize()[0], plain.dequantize()[0])


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_decodes_each_factor_with_its_own_group_size(dtype, no_pytorch_dequant):
    # A QuantizedAdapter holds one QuantizedTensor per factor, each with its own group_size (a
    # state stores one per factor; an adapter can be assembled from two quantizations).
    # quantize_adapter gives both factors the same size, so every other test would pass a
    # kernel that read A's codes with B's groups. Forward and dx, against PyTorch's dequantization.
    k, n, r = 37, 11, 5
    g = torch.Generator().manual_seed(19)
    a, b = torch.randn(r, k, generator=g), torch.randn(n, r, generator=g)
    q = QuantizedAdapter(quantize_adapter(a, b, bits=3, group_size=16).A,
                         quantize_adapter(a, b, bits=3, group_size=7).B).to(TRITON_DEVICE)
    assert (q.A.group_size, q.B.group_size) == (16, 7)
    a_hat, b_hat = q.dequantize(torch.float64)
    x = torch.randn(4, k, generator=g).to(dtype=dtype, device=TRITON_DEVICE).requires_grad_(True)
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).to(dtype=dtype, device=TRITON_DEVICE)
    grad = torch.randn(4, n, generator=g).to(dtype=dtype, device=TRITON_DEVICE)
    with no_pytorch_dequant(), lucidops.use_backend("triton"):
        y = lucidops.ops.bounded_lora_linear(x, w, q, None, fn="sin", omega=2.5, scale=0.7)
        y.backward(grad)
    x64, w64 = x.detach().double().cpu(), w.double().cpu()
    weff = w64 + 0.7 * torch.sin(2.5 * (b_hat.cpu() @ a_hat.cpu()))
    assert rel(y, x64 @ weff.T) < TOL[dtype]
    assert rel(x.grad, grad.double().cpu() @ weff) < TOL[dtype]


@pytest.mark.parametrize("bits", [3, 5, 7])
def test_sizes_in_bytes_round_a_partial_last_byte_up(bits):
    """21 and 15 codes at an odd bit count end inside a byte: that byte is shipped too."""
    a, b = adapter(r=3, k=7, n=5)
    q = quantize_adapter(a, b, bits=bits, group_size=4, method="uniform")
    expected = sum(math.ceil(numel * bits / 8) + 4 * math.ceil(numel / 4) + 2 for numel in (21, 15))
    assert q.nbytes == expected == q.stats["bytes"]


def test_a_partial_last_group_is_padded_without_widening_its_range():
    """A factor whose size is not a multiple of group_size: its last group is padded with its
    own last value. Padded with zeros, a constant 0.75 group spanned [0, 0.75], and its
    values came back 2e-4 off instead of exact."""
    a = torch.full((2, 3), 0.75)  # 6 elements in groups of 4: the last group holds 2
    b = torch.full((5, 2), -0.375)  # 10 elements: the last group holds 2
    q = quantize_adapter(a, b, bits=4, group_size=4, method="uniform")
    a_hat, b_hat = q.dequantize()
    assert torch.equal(a_hat, a) and torch.equal(b_hat, b)
