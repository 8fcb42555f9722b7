"""The C++ bounded-LoRA kernels (csrc/cpu/bounded_lora.cpp) on their own: the effective weight
W + s fn(omega B A) and the backward's G fn'(omega B A), against float64 math on phases that
are exact in float32, so the comparison measures fn alone, over the whole range of the
vectorised sin/cos (and past it, where libm takes over) and both regimes of tanh."""

import math

import pytest
import torch

import lucidops
from lucidops import _ext
from lucidops.ops._lora_backends import FN_CODE

from comparisons import rel_err, spacings
from test_lora import make, reference_grads


@pytest.fixture(scope="module")
def ext():
    return _ext.load("cpu")


def exact_phase_factors(n_out, k_in, rank, b_max, a_steps, a_denominator, seed):
    """A and B whose products, and their sums over the rank, are exact in float32: B holds
    integers in [-b_max, b_max], A integers in [-a_steps, a_steps] over a power of two (with
    rank * b_max * a_steps < 2^24). omega = 1 keeps the phase exact too."""
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(-b_max, b_max + 1, (n_out, rank), generator=g).float()
    a = torch.randint(-a_steps, a_steps + 1, (rank, k_in), generator=g).float() / a_denominator
    b[0] = 0.0  # a zero phase row: sin 0 = tanh 0 = 0, fn' = 1
    return a, b


# (b_max, a_steps, a_denominator): phases up to 0.125 (tanh's series), 48 (sin's usual
# range) and 7.7e6 (far past the vectorised reduction's bound of 8192, where libm takes
# over). K_in = 300 and 517 cross the 256-column tile.
RANGES = {"small": (1, 64, 1024), "medium": (12, 2048, 1024), "huge": (60000, 64, 1)}


@pytest.mark.parametrize("fn", ["sin", "tanh"])
@pytest.mark.parametrize("phase_range,k_in", [("small", 300), ("medium", 517), ("huge", 300)])
def test_effective_weight_and_backward_step_match_float64(ext, fn, phase_range, k_in):
    n_out, rank, scale = 37, 2, 0.37
    a, b = exact_phase_factors(n_out, k_in, rank, *RANGES[phase_range], seed=k_in)
    w = torch.randn(n_out, k_in)
    phase = b.double() @ a.double()
    assert torch.equal(phase, (b @ a).double()), "test setup: the phase must be exact in float32"
    value = torch.sin(phase) if fn == "sin" else torch.tanh(phase)
    deriv = torch.cos(phase) if fn == "sin" else 1 - torch.tanh(phase) ** 2
    if phase_range == "huge":
        assert phase.abs().max() > 2e6
    if phase_range == "small":
        assert phase.abs().max() < 0.25

    effective = ext.lora_effective_weight(w, a, b, FN_CODE[fn], 1.0, scale)
    torch.testing.assert_close(effective.double(), w.double() + scale * value, rtol=0, atol=4e-7)

    grad_weight = torch.randn(n_out, k_in)
    expected_h = grad_weight.double() * deriv
    h = grad_weight.clone()
    again = ext.lora_weight_backward(w, a, b, h, FN_CODE[fn], 1.0, scale, True)
    torch.testing.assert_close(h.double(), expected_h, rtol=2e-7, atol=4e-7)
    assert torch.equal(again, effective), "the backward rebuilds the forward's effective weight bitwise"
    h_only = grad_weight.clone()
    assert ext.lora_weight_backward(w, a, b, h_only, FN_CODE[fn], 1.0, scale, False).numel() == 0
    assert torch.equal(h_only, h)


def test_float64_kernels_match_float64_math(ext):
    g = torch.Generator().manual_seed(5)
    w, a, b = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((19, 270), (3, 270), (19, 3)))
    for fn, f in (("sin", torch.sin), ("tanh", torch.tanh)):
        effective = ext.lora_effective_weight(w, a, b, FN_CODE[fn], 2.5, 0.3)
        torch.testing.assert_close(effective, w + 0.3 * f(2.5 * (b @ a)), rtol=1e-13, atol=1e-13)


def test_result_is_bitwise_independent_of_threads(ext):
    g = torch.Generator().manual_seed(9)
    w, a, b = torch.randn(101, 700, generator=g), torch.randn(16, 700, generator=g), torch.randn(101, 16, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            h = torch.ones(101, 700)
            results.append((ext.lora_effective_weight(w, a, b, 0, 30.0, 0.1),
                            ext.lora_weight_backward(w, a, b, h, 1, 30.0, 0.1, True), h))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("k_in", [17, 24, 40, 513])
def test_a_rows_result_does_not_depend_on_the_rows_after_it(ext, k_in):
    """Rows go in blocks of four; the rows of a last, partial block once rounded otherwise
    (a block of one row had its own, non-fused multiply-adds), so a weight's row 4 changed
    with the weight's height. Column counts with a single-vector pass and a scalar tail."""
    g = torch.Generator().manual_seed(k_in)
    w, a, b = torch.randn(8, k_in, generator=g), torch.randn(64, k_in, generator=g), torch.randn(8, 64, generator=g)
    h = torch.randn(8, k_in, generator=g)
    full = ext.lora_effective_weight(w, a, b, 0, 3.0, 0.7)
    full_grad = h.clone()
    ext.lora_weight_backward(w, a, b, full_grad, 1, 3.0, 0.7, False)
    for rows in (5, 6, 7):
        assert torch.equal(ext.lora_effective_weight(w[:rows], a, b[:rows], 0, 3.0, 0.7), full[:rows])
        part_grad = h[:rows].clone()
        ext.lora_weight_backward(w[:rows], a, b[:rows], part_grad, 1, 3.0, 0.7, False)
        assert torch.equal(part_grad, full_grad[:rows])


@pytest.mark.parametrize("fn", ["sin", "tanh"])
@pytest.mark.parametrize("train_base", [False, True])
def test_op_at_sizes_that_span_tiles_and_threads(fn, train_base):
    """The whole cpp op at K_in and N_out past one tile and one row-block, against float64."""
    x, w, a, b, bias = make((45, 530), 70, 16, torch.float32, "cpu", seed=11)
    a, b = a * 0.3, b * 0.3  # phases of a few units: every branch of sin and tanh
    for t in (x, a, b) + ((w, bias) if train_base else ()):
        t.requires_grad_(True)
    grad = torch.randn(45, 70)
    with lucidops.use_backend("cpp"):
        y = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn=fn, omega=3.0, scale=0.2)
        y.backward(grad)
    y_ref, gx, gw, gbias, ga, gb = reference_grads(grad, x, w, a, b, bias, fn, "weight", omega=3.0, scale=0.2)
    for mine, expected in [(y, y_ref), (x.grad, gx), (a.grad, ga), (b.grad, gb)] + (
            [(w.grad, gw), (bias.grad, gbias)] if train_base else []):
        assert rel_err(mine, expected) < 1e-5


def test_bad_arguments_raise(ext):
    w, a, b = torch.randn(4, 6), torch.randn(2, 6), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="unknown fn"):
        ext.lora_effective_weight(w, a, b, 7, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="lora_B"):
        ext.lora_effective_weight(w, a, torch.randn(4, 3), 0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ext.lora_effective_weight(w, a.double(), b, 0, 1.0, 1.0)
    with pytest.raises(RuntimeError, match="grad_weight"):
        ext.lora_weight_backward(w, a, b, torch.randn(6, 4).T, 0, 1.0, 1.0, True)
    assert math.isfinite(ext.lora_effective_weight(w, a, b, 0, 1.0, 1.0).sum().item())


def float32_ulps(got, exact, floor=2.0 ** -8):
    """|got - exact| in float32 spacings at |exact| (at ``floor`` below it: next to a zero of sin
    or cos the absolute error of the reduced argument, not the result's spacing, is the measure)."""
    return (got.double() - exact).abs() / spacings(exact, torch.float32, floor)


@pytest.mark.parametrize("fn", ["sin", "tanh"])
def test_fn_is_within_a_few_float32_ulps_of_float64(ext, fn):
    """vec_math's sin/cos and tanh at about an ulp (measured: 1.5 for sin and cos, 1.0 in tanh's
    series range, 4.1 just past it, where 1 - 2 / (e^2v + 1) cancels), element-wise. A polynomial
    coefficient off by one digit (sin's r^5, tanh's v^9) erred by 5.4 ulp, within the tolerances
    above. Without FMA contraction (e.g. -march=x86-64-v2) the vectorised range past 8192, where
    the three-part pi/2 products stop being exact, errs too: the rows of 8000 to 73520 check it
    (contracted into FMAs the reduction stays within 1.5 ulp there). Phases exact in float32, scale 1, W = 0:
    the effective weight is fn itself, the backward step's H fn' itself."""
    if fn == "sin":
        # grid k / 1024 up to 255 (every quadrant), then rows of up to 73520 in blocks that lie
        # wholly inside 8192 < |u| <= 65536 or reach past it
        factors = [(torch.arange(512.0)[:, None], torch.arange(512.0)[None, :] / 1024),
                   (8000 + 16 * torch.arange(4096.0)[:, None], torch.arange(1.0, 17)[None, :] / 16)]
    else:
        # |v| up to 4 in steps of 2^-14: the series below 0.25, the exp formula above
        factors = [(torch.tensor([[1.0], [-1.0]]), torch.arange(65536.0)[None, :] / 16384)]
    for b, a in factors:
        phase = b.double() @ a.double()
        assert torch.equal(phase, (b @ a).double()), "test setup: the phase must be exact in float32"
        w = torch.zeros(b.shape[0], a.shape[1])
        value = ext.lora_effective_weight(w, a, b, FN_CODE[fn], 1.0, 1.0)
        step = torch.ones_like(w)
        ext.lora_weight_backward(w, a, b, step, FN_CODE[fn], 1.0, 1.0, False)
        if fn == "sin":
            assert float32_ulps(value, torch.sin(phase)).max() <= 2
            assert float32_ulps(step, torch.cos(phase)).max() <= 2
        else:
            exact = torch.tanh(phase)
            ulps = float32_ulps(value, exact)
            series = phase.abs() < 0.25
            assert ulps[series].max() <= 2 and ulps[~series].max() <= 6
            # fn' = 1 - tanh^2 of the kernel's own rounded tanh: one or two roundings of values below 1
            assert (step.double() - (1 - value.double() ** 2)).abs().max() <= 2 ** -24


def test_bfloat16_products_run_in_bfloat16_only_where_onednn_has_a_bfloat16_gemm(monkeypatch):
    """The cpp path's full-size products take bfloat16 operands for a bfloat16 x where oneDNN
    has a bfloat16 GEMM (4x faster forward+backward than float32 there), and float32 otherwise:
    for float16 (whose CPU GEMM took 160 ms against float32's 44), and for bfloat16 where the
    GEMM is missing. Both ways match the float64 reference within bfloat16's tolerance, and
    agree with each other to about one bfloat16 rounding."""
    from lucidops.ops import _lora_backends as backends_module

    has_bf16_gemm = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    probe = {dtype: torch.empty(0, dtype=dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32)}
    assert backends_module._product_dtype(probe[torch.bfloat16]) == (torch.bfloat16 if has_bf16_gemm else torch.float32)
    assert backends_module._product_dtype(probe[torch.float16]) == torch.float32
    assert backends_module._product_dtype(probe[torch.float32]) == torch.float32

    x, w, a, b, bias = make((96, 70), 50, 4, torch.bfloat16, "cpu", seed=4)
    grad = torch.randn(96, 50).to(torch.bfloat16)

    def run(placement):
        leaves = [t.clone().requires_grad_(True) for t in (x, w, a, b)]
        with lucidops.use_backend("cpp"):
            y = lucidops.ops.bounded_lora_linear(*leaves, bias, fn="sin", omega=3.0, scale=0.2, placement=placement)
        y.backward(grad)
        return [y.detach()] + [t.grad for t in leaves]

    for placement in ("weight", "output"):
        results = {}
        expected = reference_grads(grad, x, w, a, b, bias, "sin", placement, omega=3.0, scale=0.2)
        for gemm in (True, False):
            monkeypatch.setattr(backends_module, "_onednn_has_bf16_gemm", lambda gemm=gemm: gemm)
            assert backends_module._product_dtype(probe[torch.bfloat16]) == (torch.bfloat16 if gemm else torch.float32)
            results[gemm] = run(placement)
            for got, exact in zip(results[gemm], [expected[i] for i in (0, 1, 2, 4, 5)]):  # y, dx, dW, dA, dB
                assert rel_err(got, exact) < 1e-2, placement
        for bf16_products, float32_products in zip(results[True], results[False]):
            assert rel_err(bf16_products, float32_products.double()) < 8e-3, placement
