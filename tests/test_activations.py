"""sinc and gaussian: every backend against the float64 reference, forward and backward."""

import math
import re

import pytest
import torch

import lucidops
from lucidops.reference import activations as ref
from comparisons import rel_err, spacings
from conftest import TRITON_DEVICE, backend_device_params, needs_triton

KINDS = ["sinc", "gaussian"]
TOL = {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 1e-2, torch.bfloat16: 1e-2}
SHAPES = [(1,), (1023,), (3, 5, 7), (4097,), (2, 1, 33), ((1 << 20) + 3,)]


def op(kind):
    return getattr(lucidops.ops, kind)


def make_input(shape, dtype, device, generator=None):
    """Fresh random values with exact zeros and values near zero mixed in."""
    x = torch.randn(shape, generator=generator) * 4
    flat = x.view(-1)
    specials = torch.tensor([0.0, -0.0, 1e-7, -3e-5, 0.01, 0.49, 0.51, -0.5, 20.0, -9000.0])
    k = min(flat.numel(), specials.numel())
    idx = torch.randperm(flat.numel(), generator=generator)[:k]
    flat[idx] = specials[:k]
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward_match_reference(backend, device, kind, dtype, shape, poison_allocator):
    if backend == "triton" and device == "cpu" and math.prod(shape) > 100_000 and dtype != torch.float32:
        pytest.skip("the interpreter is slow; large sizes run in float32 only")
    x = make_input(shape, dtype, device).requires_grad_(True)
    sigma = torch.tensor(0.5 + torch.rand(()).item(), device=device, requires_grad=True)
    grad_out = torch.randn(shape, device=device).to(dtype)

    poison_allocator(x.numel() * 2, device, dtype)
    with lucidops.use_backend(backend):
        y = op(kind)(x, sigma)
        y.backward(grad_out)
        assert lucidops.backends.last_used(kind) == backend
        assert lucidops.backends.last_used(f"{kind}_backward") == backend
    assert y.dtype == dtype and y.shape == x.shape and y.device == x.device

    assert_matches_float64_reference(kind, x.detach(), sigma.detach(), grad_out, y, x.grad, sigma.grad)


def assert_matches_float64_reference(kind, x, sigma, grad_out, y, grad_x, grad_sigma):
    """y, grad_x and grad_sigma of a backend against the float64 reference on the same
    (already rounded) inputs."""
    dtype = x.dtype
    x64, s64, g64 = x.double().cpu(), sigma.double().cpu(), grad_out.double().cpu()
    y_ref = ref.forward(kind, x64, s64)
    gx_ref, gs_ref = ref.backward(kind, g64, x64, s64, True)
    assert rel_err(y, y_ref) < TOL[dtype]
    assert rel_err(grad_x, gx_ref) < TOL[dtype]
    # A sum of many terms: its rounding error scales with the sum of their magnitudes. And each
    # term g f'(u) u / sigma inherits the one rounding of u = x / sigma in the kernel's compute
    # dtype (|du| <= eps |u|), which at x = -9000 (|u| ~ 10^4, where sinc' ~ cos(u) / u swings)
    # moves that term by ~1e-3: without this part the bound failed 11 of 800 random draws,
    # with it none (worst at 0.2 of the bound), and it stays below a typical single term.
    u = (x64 / s64).requires_grad_(True)
    first = ref.derivative(kind, u)
    (second,) = torch.autograd.grad(first.sum(), u)
    u, first = u.detach(), first.detach()
    terms_abs_sum = (g64 * first * u / s64).abs().sum().item()
    u_sensitivity = (g64 * (second * u + first) * u / s64).abs().sum().item()
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps / 2
    bound = 10 * TOL[dtype] * (1.0 + terms_abs_sum) + 4 * eps * u_sensitivity
    assert abs(grad_sigma.item() - gs_ref.item()) <= bound


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", KINDS)
def test_float64_and_exact_values(backend, device, kind):
    x = make_input((513,), torch.float64, device).requires_grad_(True)
    with lucidops.use_backend(backend):
        y = op(kind)(x, 0.8)
        y.sum().backward()
    y_ref = ref.forward(kind, x.detach().cpu(), torch.tensor(0.8, dtype=torch.float64))
    gx_ref, _ = ref.backward(kind, torch.ones(513, dtype=torch.float64), x.detach().cpu(),
                             torch.tensor(0.8, dtype=torch.float64), False)
    tol = 1e-12 if backend != "triton" else 1e-8  # Triton's literal constants are float32
    assert rel_err(y, y_ref) < tol and rel_err(x.grad, gx_ref) < tol


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_float64_sinc_gradient_below_the_float32_series_bound(backend, device):
    """Between 0.05 and 0.5 float64 takes the direct formula (the 5-term series is only float32
    accurate there: Triton's was off by 5e-12 at 0.49)."""
    x = torch.tensor([0.051, 0.2, 0.49, -0.3], dtype=torch.float64, device=device, requires_grad=True)
    with lucidops.use_backend(backend):
        op("sinc")(x, 1.0).sum().backward()
    u = x.detach().cpu()
    exact = (u * torch.cos(u) - torch.sin(u)) / (u * u)
    # Per element, what rounding of the direct formula allows: u cos u - sin u cancels ~1000x
    # at 0.051, so an ulp of sin or cos (CUDA's are within 2, and may fuse a multiply-add)
    # moves it by ~1e-13 relative, where a norm-wise 1e-14 held only with the CPU's own libm.
    # 16 eps of the terms is 3.4e-14 at 0.051 and 1.3e-14 at 0.49, far below the series' 5e-12.
    bound = 16 * torch.finfo(torch.float64).eps * ((u * torch.cos(u)).abs() + torch.sin(u).abs()) / (u * u)
    assert ((x.grad.cpu() - exact).abs() <= bound).all(), (x.grad.cpu() - exact, bound)


def test_sigma_outside_the_compute_precision_is_refused_naming_it():
    x = torch.randn(4)
    for sigma in (1e-50, 1e300):  # float32 would round them to 0 or inf
        with pytest.raises(ValueError, match=f"sigma must be within torch.float32's normal range.*{re.escape(repr(sigma))}"):
            lucidops.ops.sinc(x, sigma)
        # As a float64 tensor too: it was rounded first, and the error said "got 0.0" or "got inf".
        with pytest.raises(ValueError, match=f"normal range.*{re.escape(repr(sigma))}"):
            lucidops.ops.sinc(x, torch.tensor(sigma, dtype=torch.float64))
    assert torch.isfinite(lucidops.ops.sinc(x.double(), 1e-50)).all()  # float64 holds it
    assert torch.isfinite(lucidops.ops.sinc(x, torch.tensor(0.5, dtype=torch.float64))).all()
    for learnable in ("False", None, 1):  # "False" made sigma learnable
        with pytest.raises(TypeError, match="learnable must be a bool"):
            lucidops.nn.Sinc(1.0, learnable=learnable)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_sinc_at_zero_is_one_with_zero_gradient(backend, device):
    x = torch.zeros(5, device=device, requires_grad=True)
    with lucidops.use_backend(backend):
        y = lucidops.ops.sinc(x, 2.0)
        y.sum().backward()
    assert torch.equal(y.cpu(), torch.ones(5))
    assert torch.equal(x.grad.cpu(), torch.zeros(5))


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_or_inf_for_extreme_finite_inputs(backend, device, kind):
    x = torch.tensor([0.0, 1e-30, -1e-38, 1e-4, 3e4, -1e6, 3e38, -3e38, 1e-45], device=device, requires_grad=True)
    with lucidops.use_backend(backend):
        y = op(kind)(x, 1.0)
        y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    y_ref = ref.forward(kind, x.detach().double().cpu(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(y.double().cpu(), y_ref, atol=1e-6, rtol=1e-5)


def assert_overflowing_quotients_give_zeros(forward, backward, device="cpu"):
    """x / sigma overflowing to +-inf (finite x, a sigma inside the compute precision): the
    function and its derivatives tend to 0 there (|sinc u| <= 1/|u|), so outputs and both
    gradients are finite, ~0 for the overflowing elements, and the others are untouched."""
    for dtype, big in ((torch.float32, 3e38), (torch.float64, 1.7e308)):
        x = torch.tensor([big, -1e30 if dtype == torch.float32 else -1e300, 2e-10], dtype=dtype, device=device)
        sigma = torch.tensor(1e-10, dtype=dtype, device=device)
        for kind in KINDS:
            y = forward(kind, x, sigma)
            grad_x, grad_sigma = backward(kind, torch.ones_like(x), x, sigma)
            assert torch.isfinite(y).all() and torch.isfinite(grad_x).all() and torch.isfinite(grad_sigma), kind
            assert (y[:2].abs() < 1e-30).all() and (grad_x[:2].abs() < 1e-20).all(), kind
            u = torch.tensor(2.0, dtype=torch.float64)
            torch.testing.assert_close(y[2].double().cpu(), ref.value(kind, u), rtol=1e-6, atol=0)
            expected_grad = ref.derivative(kind, u) / 1e-10
            torch.testing.assert_close(grad_x[2].double().cpu(), expected_grad, rtol=1e-6, atol=0)
            if kind == "gaussian":  # d/dsigma: the finite element's -f'(u) u / sigma, the others add 0
                expected_sigma = -ref.derivative(kind, u) * u / 1e-10
                torch.testing.assert_close(grad_sigma.double().cpu().reshape(()), expected_sigma, rtol=1e-5, atol=0)
            # (sinc's -f'(u) u / sigma ~ -cos(u) / sigma does not vanish as u grows: finite is all there is)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e19), (torch.float64, 1e19), (torch.float64, 1e160)])
def test_sinc_sigma_gradient_where_u_squared_overflows(backend, device, dtype, scale):
    """sigma's gradient is -f'(u) u / sigma summed, with f'(u) u ~ cos u: O(1) per element at
    any |u|. (u cos u - sin u) / u^2 gave f' = 0 once u * u overflowed (float32 past 1.8e19:
    the reference and triton; float64 past 1.3e154: every backend)."""
    x = torch.tensor([3.0, -5.0, 10.0, 7.5], dtype=dtype) * scale
    sigma = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    with lucidops.use_backend(backend):
        op("sinc")(x.to(device), sigma.to(device)).sum().backward()
    u = x.double()
    exact = -(torch.cos(u) - torch.sin(u) / u).sum()  # d/dsigma of sin(x/sigma)/(x/sigma) at sigma = 1
    assert abs(float(exact)) > 0.1  # not a sum that cancels to ~0
    assert abs(float(sigma.grad) - float(exact)) < 1e-5 * abs(float(exact)), (float(sigma.grad), float(exact))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_quotient_overflow_gives_zeros_not_nan(backend, device):
    def forward(kind, x, sigma):
        with lucidops.use_backend(backend):
            return op(kind)(x, sigma)

    def backward(kind, grad, x, sigma):
        x = x.clone().requires_grad_(True)
        sigma = sigma.clone().requires_grad_(True)
        with lucidops.use_backend(backend):
            op(kind)(x, sigma).backward(grad)
        return x.grad, sigma.grad

    assert_overflowing_quotients_give_zeros(forward, backward, device)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_and_empty(backend, device, kind):
    base = make_input((9, 14), torch.float32, device)
    for x in (base.t(), base[:, ::3], base.unsqueeze(0).expand(2, 9, 14)):
        assert not x.is_contiguous()
        with lucidops.use_backend(backend):
            y = op(kind)(x, 0.9)
        torch.testing.assert_close(y, ref.forward(kind, x.contiguous(), torch.tensor(0.9, device=device)),
                                   rtol=2e-6, atol=1e-7)
    for shape in [(0,), (3, 0, 2)]:
        x = torch.empty(shape, device=device, requires_grad=True)
        sigma = torch.tensor(1.3, device=device, requires_grad=True)
        with lucidops.use_backend(backend):
            y = op(kind)(x, sigma)
            y.sum().backward()
        assert y.shape == shape and x.grad.shape == shape and sigma.grad.item() == 0.0


@pytest.mark.parametrize("backend", ["reference", "cpp"] + (["triton"] if lucidops.backends.triton_interpreting() else []))
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(backend, kind):
    x = (torch.randn(37, dtype=torch.float64) * 3)
    x[0] = 0.0
    x[1] = 1e-3
    x.requires_grad_(True)
    sigma = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    with lucidops.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, s: op(kind)(a, s), (x, sigma), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", KINDS)
def test_opcheck(backend, device, kind):
    x = make_input((6, 5), torch.float32, device).requires_grad_(True)
    sigma = torch.tensor(0.6, device=device, requires_grad=True)
    with lucidops.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.lucidops, kind).default, (x, sigma))
        grad = torch.randn(6, 5, device=device)
        torch.library.opcheck(getattr(torch.ops.lucidops, f"{kind}_backward").default,
                              (grad, x.detach(), sigma.detach(), True))


def test_backward_is_deterministic():
    x = make_input((300_001,), torch.float32, "cpu").requires_grad_(True)
    grads = []
    for _ in range(2):
        sigma = torch.tensor(0.9, requires_grad=True)
        with lucidops.use_backend("cpp"):
            lucidops.ops.sinc(x, sigma).sum().backward()
        grads.append(sigma.grad.item())
    assert grads[0] == grads[1]


def cancelling_sigma_gradient_case(kind: str, rows: int):
    """(x, grad_out, exact sigma gradient) where the sigma gradient's terms cancel in long runs:
    one row of x repeated ``rows`` times, against a gradient that changes sign along it."""
    base = (torch.randn(1, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3).float()
    x = base.expand(rows, 48).contiguous()
    grad_out = torch.linspace(-1, 1, x.numel(), dtype=torch.float64).reshape(x.shape)
    sigma = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    exact = torch.autograd.grad(ref.forward(kind, x.double(), sigma), sigma, grad_out)[0].item()
    return x, grad_out.float(), exact


# (rows, bound on the relative error). Sums of float32 products in double measured 1.2e-5
# (64 rows) and 1.4e-4 (4096 rows) for sinc; float32 sums within each 512-element tile of the
# C++ kernel lost 5e-4 at 64 rows, float32 partials of the Triton kernel 3.2e-4 and 1.7e-3.
CANCELLATION_CASES = [(64, 1e-4), (4096, 5e-4)]


@pytest.mark.parametrize("backend,device", [("cpp", "cpu"), pytest.param("triton", TRITON_DEVICE, marks=needs_triton)])
@pytest.mark.parametrize("rows,bound", CANCELLATION_CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_sigma_gradient_keeps_float64_accuracy_under_cancellation(backend, device, rows, bound, kind):
    """The sigma gradient sums grad * f'(u) * u over every element; each kernel sums the float32
    terms in double (the CUDA kernel's twin is in test_cuda_emulated)."""
    if backend == "cpp" and lucidops.backends.backend_problem("cpp", "cpu") is not None:
        pytest.skip("no C++ extension")
    x, grad_out, exact = cancelling_sigma_gradient_case(kind, rows)
    sigma = torch.tensor(1.3, device=device, requires_grad=True)
    with lucidops.use_backend(backend):
        y = getattr(lucidops.ops, kind)(x.to(device), sigma)
    grad_sigma = torch.autograd.grad(y, sigma, grad_out.to(device))[0].item()
    assert abs(grad_sigma - exact) <= bound * abs(exact), (grad_sigma, exact)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpp_half_kernels_are_the_float32_kernels_rounded_by_torch(kind, dtype):
    """The C++ kernels convert half tiles to float32 and back themselves (F16C for float16, bit
    operations for bfloat16). Exactly: y, grad_x and the sigma gradient of a half x equal the
    float32 kernels' on x and grad raised to float32, y and grad_x rounded by torch's .to(dtype).
    Truncating instead of rounding to nearest even errs by one unit in about half the elements,
    within the 1-ulp tolerances above; here it fails. 70001 elements: whole and partial vectors,
    tiles and chunks; with infinities, NaN, signed zeros and subnormal halves."""
    if lucidops.backends.backend_problem("cpp", "cpu") is not None:
        pytest.skip("no C++ extension")
    gen = torch.Generator().manual_seed(5)
    x32 = torch.randn(70001, generator=gen) * 4
    finfo = torch.finfo(dtype)
    specials = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, finfo.tiny / 4, -finfo.tiny / 2, finfo.max])
    x32[torch.randperm(x32.numel(), generator=gen)[:specials.numel()]] = specials
    x = x32.to(dtype)
    grad = (torch.randn(x.shape, generator=gen) * 3).to(dtype)
    fn = getattr(lucidops.ops, kind)

    def run(x, grad):
        x = x.clone().requires_grad_(True)
        sigma = torch.tensor(0.7, requires_grad=True)
        with lucidops.use_backend("cpp"):
            y = fn(x, sigma)
        y.backward(grad)
        return y.detach(), x.grad, sigma.grad

    y, grad_x, grad_sigma = run(x, grad)
    y32, grad_x32, grad_sigma32 = run(x.float(), grad.float())

    def assert_bitwise(actual, expected):
        assert actual.dtype == dtype
        same_nan = actual.isnan() == expected.isnan()
        assert same_nan.all()
        bits, expected_bits = actual.view(torch.int16), expected.view(torch.int16)
        differ = (bits != expected_bits) & ~actual.isnan()
        assert not differ.any(), (actual[differ][:5], expected[differ][:5])

    assert_bitwise(y, y32.to(dtype))
    assert_bitwise(grad_x, grad_x32.to(dtype))
    # The sigma gradient sums over every element, NaN included: compare it without the NaN.
    x = x.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf)
    grad_sigma, grad_sigma32 = run(x, grad)[2], run(x.float(), grad.float())[2]
    assert torch.isfinite(grad_sigma) and torch.equal(grad_sigma, grad_sigma32)


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=4),
    sigma=st.floats(1e-3, 1e3),
    scale=st.floats(1e-3, 1e4),
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31 - 1),
)
def test_cpp_matches_reference_on_any_shape_and_scale(shape, sigma, scale, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * scale).requires_grad_(True)
    with lucidops.use_backend("cpp"):
        y = op(kind)(x, sigma)
        y.sum().backward()
    x64 = x.detach().double()
    s64 = torch.tensor(sigma, dtype=torch.float64)
    torch.testing.assert_close(y.double(), ref.forward(kind, x64, s64), rtol=1e-5, atol=1e-6)
    gx_ref, _ = ref.backward(kind, torch.ones_like(x64), x64, s64, False)
    torch.testing.assert_close(x.grad.double(), gx_ref, rtol=1e-5, atol=1e-6 / sigma)


def test_learnable_sigma_in_another_dtype_reads_without_a_warning():
    # float() of a sigma that requires grad: PyTorch's "Converting a tensor with
    # requires_grad=True to a scalar" warning on every forward (an error under -W error)
    import warnings

    for module, x in ((lucidops.nn.Sinc(2.0, learnable=True).half(), torch.randn(4, dtype=torch.float16)),
                      (lucidops.nn.Sinc(2.0, learnable=True).double(), torch.randn(4))):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            module(x).sum().backward()
        assert module.sigma.grad is not None


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_float32_sinc_gradient_is_accurate_element_by_element_where_the_direct_formula_cancels(backend, device):
    """u = x / sigma across (0.01, 1): below |u| = 0.5 (u cos u - sin u) / u^2 cancels in float32
    (relative error ~3 eps / u^2, 7e-5 at u = 0.05), which is why the series takes over there.
    In test_forward_backward_match_reference these few small elements are lost in the norm of
    a random tensor (a switch at 0.05 passed it), so each element is checked here."""
    u = torch.linspace(0.01, 1.0, 991, dtype=torch.float64)
    x = torch.cat([u, -u]).float().to(device).requires_grad_(True)
    sigma = torch.tensor(1.0, device=device)
    with lucidops.use_backend(backend):
        op("sinc")(x, sigma).backward(torch.ones_like(x))
    expected = ref.derivative("sinc", x.detach().double().cpu())  # sigma 1: dy/dx = sinc'(u)
    relative = ((x.grad.double().cpu() - expected) / expected).abs()
    assert relative.max() < 1e-5, float(x[relative.argmax()])


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_are_computed_in_float32_and_rounded_once(backend, device, kind, dtype):
    """A half x is raised to float32 (sigma's compute dtype) before u = x / sigma: y is then the
    float32 value rounded once, within one unit in the last place of the float64 reference
    (plus float32's own rounding). A quotient formed in x's dtype (x / sigma rounded to
    half) errs by many units wherever u f'(u) is large, yet stays inside the 1e-2 relative
    norm that test_forward_backward_match_reference allows half inputs."""
    x = make_input((4000,), dtype, device, torch.Generator().manual_seed(11))
    sigma = torch.tensor(0.7, device=device)  # not a half-precision number: 0.7 rounds in fp16 and bf16
    with lucidops.use_backend(backend):
        y = op(kind)(x, sigma)
    x64 = x.double().cpu()
    s64 = sigma.double().cpu()
    expected = ref.forward(kind, x64, s64)
    u = x64 / s64
    slack = 1e-6 * (1 + (u * ref.derivative(kind, u)).abs())  # float32's rounding of u and f
    assert ((y.double().cpu() - expected).abs() <= spacings(expected, dtype, torch.finfo(dtype).tiny) + slack).all()


def test_cpp_float32_gaussian_is_within_1_5_ulp_of_exp_down_to_its_flush_bound():
    """vec_math::exp, element-wise: within 1.5 float32 ulp (measured 0.9; its gradient -u exp,
    one rounding more, 1.6 of 3) wherever -u^2 / 2 >= -87.3, and at most exp(-87.3) below, where
    it flushes. x = k / 256, k / 1024 and k / 4096 with |k| < 2^12, sigma = 1: u^2 / 2 is exact in
    float32, so the comparison sees exp alone. The r^7 coefficient off by a factor of 10 (2.5 ulp)
    or the flush bound moved up to -83.7, into the normal range, passed the norm-wise 2e-6 above."""
    if lucidops.backends.backend_problem("cpp", "cpu") is not None:
        pytest.skip("no C++ extension")
    x = torch.cat([torch.arange(-3400, 3401) / 256, torch.arange(-4095, 4096) / 1024,
                   torch.arange(-4095, 4096) / 4096])
    x = x.float().requires_grad_(True)
    with lucidops.use_backend("cpp"):
        y = lucidops.ops.gaussian(x, 1.0)
        y.backward(torch.ones_like(y))
    x64 = x.detach().double()
    exact = torch.exp(-0.5 * x64 * x64)
    tiny = torch.finfo(torch.float32).tiny
    kept = -0.5 * x64 * x64 >= -87.3
    assert (~kept).sum() > 20
    assert ((y.double() - exact).abs() / spacings(exact, torch.float32, tiny))[kept].max() <= 1.5
    assert ((x.grad.double() + x64 * exact).abs() / spacings(x64 * exact, torch.float32, tiny))[kept].max() <= 3
    assert (y[~kept].double() <= math.exp(-87.3)).all()
