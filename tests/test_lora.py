"""Sine and bounded LoRA: every backend against the float64 reference, forward and backward."""

import copy
import io
import math

import pytest
import torch
from torch import Tensor, nn

import lucidops
from lucidops.reference import lora as ref
from comparisons import rel_err
from conftest import TRITON_DEVICE, backend_device_params, needs_triton

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# (x shape, N_out, r): odd K_in / N_out, r in {1, 4, 16}, leading batch dims, size-1 dims.
CASES = [((37, 29), 23, 1), ((2, 3, 17), 33, 4), ((5, 40), 31, 16), ((1, 7), 5, 4), ((3, 1, 65), 19, 16),
         ((1, 9), 1, 1),
         ((6, 70), 45, 40), ((33, 12), 66, 20),  # ranks past 16: the triton 'output' kernel's R_PAD 64 and 32
         ((130, 24), 40, 8)]  # M > 64: triton's large-M tiles (128 rows when it regenerates the update)
OMEGA, SCALE = 2.0, 0.7


def make(x_shape, n_out, r, dtype, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    k = x_shape[-1]
    x = torch.randn(x_shape, generator=g)
    w = torch.randn(n_out, k, generator=g) / math.sqrt(k)
    a = torch.randn(r, k, generator=g) * 0.5
    b = torch.randn(n_out, r, generator=g) * 0.5
    bias_t = torch.randn(n_out, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(x), cast(w), cast(a), cast(b), cast(bias_t)


def reference_grads(grad, x, w, a, b, bias, fn, placement, omega=OMEGA, scale=SCALE):
    """float64 (y, dx, dW, dbias, dA, dB) from the (already rounded) inputs."""
    d = lambda t: t.detach().double().cpu()  # noqa: E731
    k = x.shape[-1]
    x2, g2 = d(x).reshape(-1, k), d(grad).reshape(-1, w.shape[0])
    y = ref.forward(x2, d(w), d(a), d(b), None if bias is None else d(bias), fn, placement, omega, scale)
    grads = ref.backward(g2, x2, d(w), d(a), d(b), fn, placement, omega, scale, True, True, True)
    return (y,) + grads


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
@pytest.mark.parametrize("placement", ["weight", "output"])
@pytest.mark.parametrize("fn", ["sin", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_backward_match_float64_reference(backend, device, placement, fn, dtype, case, poison_allocator):
    x_shape, n_out, r = CASES[case]
    if dtype != torch.float32 and math.prod(x_shape[:-1]) * n_out < 4:
        pytest.skip("one half-precision output: its relative error is one rounding, not a test of the kernel")
    train_base = case % 2 == 1  # weight and bias get gradients in every other case
    x, w, a, b, bias = make(x_shape, n_out, r, dtype, device, seed=case)
    for t in (x, a, b):
        t.requires_grad_(True)
    if train_base:
        w.requires_grad_(True)
        bias.requires_grad_(True)
    grad = torch.randn(*x_shape[:-1], n_out).to(dtype=dtype, device=device)

    poison_allocator(4 * (x.numel() + w.numel() + grad.numel()), device, dtype)
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn=fn, omega=OMEGA, scale=SCALE, placement=placement)
        y.backward(grad)
        assert lucidops.backends.last_used("bounded_lora_linear") == backend
        assert lucidops.backends.last_used("bounded_lora_linear_backward") == backend
    assert y.shape == (*x_shape[:-1], n_out) and y.dtype == dtype and y.device == x.device

    y_ref, gx, gw, gbias, ga, gb = reference_grads(grad, x, w, a, b, bias, fn, placement)
    tol = TOL[dtype]
    assert rel_err(y.reshape(-1, n_out), y_ref) < tol
    assert rel_err(x.grad.reshape(-1, x_shape[-1]), gx) < tol
    assert rel_err(a.grad, ga) < tol
    assert rel_err(b.grad, gb) < tol
    if train_base:
        assert rel_err(w.grad, gw) < tol
        assert rel_err(bias.grad, gbias) < tol
    else:
        assert w.grad is None and bias.grad is None


def test_reference_backward_matches_autograd():
    # The explicit formulas of the reference against autograd through its own forward.
    for placement in ref.PLACEMENTS:
        for fn in ref.FNS:
            x, w, a, b, bias = make((9, 13), 11, 3, torch.float64, "cpu", seed=3)
            grad = torch.randn(9, 11, dtype=torch.float64)
            leaves = [t.clone().requires_grad_(True) for t in (x, w, a, b, bias)]
            ref.forward(*leaves, fn, placement, OMEGA, SCALE).backward(grad)
            ours = ref.backward(grad, x, w, a, b, fn, placement, OMEGA, SCALE, True, True, True)
            auto = (leaves[0].grad, leaves[1].grad, leaves[4].grad, leaves[2].grad, leaves[3].grad)
            for mine, theirs in zip(ours, auto):
                torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("placement", ["weight", "output"])
@pytest.mark.parametrize("fn", ["sin", "tanh"])
def test_gradcheck_float64(backend, placement, fn):
    x, w, a, b, bias = make((4, 2, 5), 6, 3, torch.float64, "cpu", seed=7)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, a, b, bias))
    with lucidops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *t: lucidops.ops.bounded_lora_linear(*t, fn=fn, omega=1.3, scale=0.8, placement=placement),
            inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
def test_sine_lora_linear_is_the_weight_placement_with_sin(backend, device):
    x, w, a, b, bias = make((6, 18), 10, 4, torch.float32, device, seed=11)
    with lucidops.use_backend(backend):
        y = lucidops.ops.sine_lora_linear(x, w, a, b, bias, omega=OMEGA, scale=SCALE)
    w_eff = w.double() + SCALE * torch.sin(OMEGA * (b.double() @ a.double()))
    expected = x.double() @ w_eff.T + bias.double()
    assert rel_err(y, expected) < 1e-5


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
@pytest.mark.parametrize("placement", ["weight", "output"])
def test_non_contiguous_and_empty_batch(backend, device, placement):
    x, w, a, b, bias = make((12, 21), 9, 4, torch.float32, device, seed=5)
    xt = x.t().contiguous().t()[::2]  # non-contiguous rows
    wt = w.t().contiguous().t()       # column-major weight
    assert not xt.is_contiguous() and not wt.is_contiguous()
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(xt, wt, a, b, bias, fn="sin", omega=OMEGA, scale=SCALE,
                                             placement=placement)
    expected = ref.forward(xt.double(), w.double(), a.double(), b.double(), bias.double(), "sin", placement,
                           OMEGA, SCALE)
    assert rel_err(y, expected) < 1e-5

    x0 = torch.empty(0, 21, device=device, requires_grad=True)
    a0, b0 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    with lucidops.use_backend(backend):
        y0 = lucidops.ops.bounded_lora_linear(x0, w, a0, b0, bias, fn="sin", omega=OMEGA, scale=SCALE,
                                              placement=placement)
        y0.sum().backward()
    assert y0.shape == (0, 9) and x0.grad.shape == (0, 21)
    assert torch.equal(a0.grad, torch.zeros_like(a)) and torch.equal(b0.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
def test_phase_is_formed_in_float32_for_half_inputs(backend, device):
    # With omega = 100 a bfloat16 phase would be off by ~1 radian; a float32 one is not.
    x, w, a, b, _ = make((8, 32), 16, 16, torch.bfloat16, device, seed=2)
    omega = 100.0
    with lucidops.use_backend(backend):
        y = lucidops.ops.sine_lora_linear(x, w, a, b, omega=omega, scale=1.0)
    truth = ref.forward(x.double(), w.double(), a.double(), b.double(), None, "sin", "weight", omega, 1.0)
    bf16_phase = (omega * (b @ a)).float()  # what a phase in the input dtype would give
    naive = x.double() @ (w.double() + torch.sin(bf16_phase.double())).T
    assert rel_err(naive, truth) > 0.05  # the test can tell the two apart
    assert rel_err(y, truth) < 1e-2


# Float32 factors over a half x (peft's autocast_adapter_dtype): x's leading shape, N_out, r.
# M = 130 takes triton's chunked paths; r = 20 its 'output' kernel's R_PAD 32.
FLOAT32_FACTOR_CASES = [((2, 7, 33), 19, 4), ((130, 24), 40, 8), ((9, 40), 31, 20)]


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
@pytest.mark.parametrize("placement", ["weight", "output"])
@pytest.mark.parametrize("fn", ["sin", "tanh"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", range(len(FLOAT32_FACTOR_CASES)))
def test_float32_factors_over_a_half_x_are_not_rounded(backend, device, placement, fn, dtype, case):
    """Omega 300 (tanh: 10), against float64 from the float32 factors themselves, forward and
    backward; the base trains in odd cases. dA and dB come back float32. Rounding the factors to x's
    dtype first (what the op required before) misses by far more, which the test checks it
    can tell apart."""
    x_shape, n_out, r = FLOAT32_FACTOR_CASES[case]
    # sine LoRA's omega "of order 100s"; tanh there would saturate, its gradients vanishing
    # into float16's subnormals, so bounded (unlearning) adapters take a tanh omega of order 10.
    omega = 300.0 if fn == "sin" else 10.0
    x, w, _, _, bias = make(x_shape, n_out, r, dtype, device, seed=40 + case)
    _, _, a, b, _ = make(x_shape, n_out, r, torch.float32, device, seed=40 + case)
    w, bias = w * 0, bias * 0  # y is the update alone: its error is not diluted by x W^T + bias
    leaves = [x, a, b] + ([w, bias] if case % 2 else [])
    for t in leaves:
        t.requires_grad_(True)
    grad = torch.randn(*x_shape[:-1], n_out, generator=torch.Generator().manual_seed(case)).to(dtype=dtype,
                                                                                              device=device)
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn=fn, omega=omega, scale=SCALE, placement=placement)
        y.backward(grad)
        assert lucidops.backends.last_used("bounded_lora_linear_backward") == backend
    assert y.dtype == dtype and a.grad.dtype == b.grad.dtype == torch.float32 and x.grad.dtype == dtype
    y_ref, gx, gw, gbias, ga, gb = reference_grads(grad, x, w, a, b, bias, fn, placement, omega=omega)
    rounded = reference_grads(grad, x, w, a.to(dtype), b.to(dtype), bias, fn, placement, omega=omega)[0]
    # Measured: y and dx within 3.5e-4 (float16) and 2.5e-3 (bfloat16, one rounding of the
    # output), dA and dB within 5.2e-4; rounded factors: 5% to 138% off with sin.
    tol = {torch.float16: 1e-3, torch.bfloat16: 5e-3}[dtype]
    if fn == "sin":  # (at tanh's omega rounding the factors moves y by less than 10x the tolerance)
        assert rel_err(rounded, y_ref) > 10 * tol  # what rounding the factors costs: the test tells it apart
    n = y_ref.shape[-1]
    assert rel_err(y.reshape(-1, n), y_ref) < tol
    assert rel_err(x.grad.reshape(-1, x_shape[-1]), gx) < tol
    assert rel_err(a.grad, ga) < tol and rel_err(b.grad, gb) < tol
    if case % 2:
        assert rel_err(w.grad, gw) < tol and rel_err(bias.grad, gbias) < tol


def test_factor_dtypes_the_op_refuses_are_named():
    x, w, a, b, bias = make((3, 8), 5, 2, torch.bfloat16, "cpu")
    call = lambda *t, **kw: lucidops.ops.bounded_lora_linear(*t, omega=1.0, scale=1.0, **kw)  # noqa: E731
    with pytest.raises(TypeError, match=r"lora_A must have x's dtype \(torch.bfloat16\) or float32, got torch.float16"):
        call(x, w, a.half(), b.half())
    with pytest.raises(TypeError, match="lora_B must have x's dtype .* or float32, got torch.float64"):
        call(x, w, a.float(), b.double())
    with pytest.raises(TypeError, match="lora_A and lora_B must share one dtype, got torch.float32 and torch.bfloat16"):
        call(x, w, a.float(), b)
    with pytest.raises(TypeError, match=r"lora_A must have x's dtype \(torch.float32\), got torch.bfloat16"):
        call(x.float(), w.float(), a, b)  # float32 x: half factors are not taken
    with pytest.raises(TypeError, match=r"lora_A must have x's dtype \(torch.float64\), got torch.float32"):
        call(x.double(), w.double(), a.float(), b.float())


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
def test_opcheck_float32_factors_over_a_half_x(backend, device):
    x, w, _, _, bias = make((6, 20), 9, 4, torch.bfloat16, device, seed=8)
    _, _, a, b, _ = make((6, 20), 9, 4, torch.float32, device, seed=8)
    with lucidops.use_backend(backend):
        for placement in ("weight", "output"):
            torch.library.opcheck(torch.ops.lucidops.bounded_lora_linear.default,
                                  (x.requires_grad_(True), w, a.requires_grad_(True), b.requires_grad_(True), bias,
                                   "sin", placement, OMEGA, SCALE))
            grad = torch.randn(6, 9, device=device).to(torch.bfloat16)
            for need_lora in (True, False):  # unneeded dA, dB: empty, of one dtype on every backend and the fake
                torch.library.opcheck(torch.ops.lucidops.bounded_lora_linear_backward.default,
                                      (grad, x.detach(), w, a.detach(), b.detach(), "tanh", placement, OMEGA, SCALE,
                                       True, True, True, need_lora))


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
def test_frozen_weight_and_bias_cost_nothing(backend, device):
    x, w, a, b, _ = make((5, 12), 7, 4, torch.float32, device, seed=1)
    grad = torch.randn(5, 7, device=device)
    with lucidops.use_backend(backend):
        gx, gw, gbias, ga, gb = torch.ops.lucidops.bounded_lora_linear_backward(
            grad, x, w, a, b, "sin", "weight", OMEGA, SCALE, True, False, False, True)
        assert gw.numel() == 0 and gbias.numel() == 0 and ga.shape == a.shape and gb.shape == b.shape
        gx2, _, _, ga2, gb2 = torch.ops.lucidops.bounded_lora_linear_backward(
            grad, x, w, a, b, "sin", "weight", OMEGA, SCALE, True, False, False, False)
        assert ga2.numel() == 0 and gb2.numel() == 0
    torch.testing.assert_close(gx, gx2)


@pytest.mark.parametrize("placement", ["weight", "output"])
def test_only_x_and_adapter_are_saved_for_backward(placement):
    """No N_out x K_in tensor besides the weight itself is kept for backward (cpp path)."""
    x, w, a, b, bias = make((64, 48), 40, 4, torch.float32, "cpu", seed=4)
    x.requires_grad_(True)
    a.requires_grad_(True)
    b.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with lucidops.use_backend("cpp"):
            y = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn="sin", omega=OMEGA, scale=SCALE,
                                                 placement=placement)
    ptrs = {t.data_ptr() for t in saved}
    assert ptrs <= {x.data_ptr(), w.data_ptr(), a.data_ptr(), b.data_ptr()}, [tuple(t.shape) for t in saved]
    y.sum().backward()
    assert a.grad is not None


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
@pytest.mark.parametrize("placement", ["weight", "output"])
def test_opcheck(backend, device, placement):
    x, w, a, b, bias = make((6, 20), 9, 4, torch.float32, device, seed=8)
    with lucidops.use_backend(backend):
        torch.library.opcheck(torch.ops.lucidops.bounded_lora_linear.default,
                              (x.requires_grad_(True), w, a.requires_grad_(True), b.requires_grad_(True), bias,
                               "sin", placement, OMEGA, SCALE))
        grad = torch.randn(6, 9, device=device)
        torch.library.opcheck(torch.ops.lucidops.bounded_lora_linear_backward.default,
                              (grad, x.detach(), w, a.detach(), b.detach(), "tanh", placement, OMEGA, SCALE, True,
                               True, True, True))


def test_torch_compile_fullgraph():
    x, w, a, b, bias = make((2, 5, 12), 7, 4, torch.float32, "cpu", seed=9)
    a.requires_grad_(True)

    def f(x, a):
        return lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn="tanh", omega=OMEGA, scale=SCALE)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y = compiled(x, a)
    y.sum().backward()
    a_grad = a.grad.clone()
    a.grad = None
    f(x, a).sum().backward()
    torch.testing.assert_close(a_grad, a.grad)


def test_flop_formula_is_counted():
    from lucidops.profile.flops import count_flops
    from lucidops.ops.lora import backward_flops, forward_flops

    m, k, n, r = 32, 24, 20, 4
    x, w, a, b, bias = make((m, k), n, r, torch.float32, "cpu", seed=10)
    a.requires_grad_(True)
    b.requires_grad_(True)
    counts = count_flops(lambda x: lucidops.ops.sine_lora_linear(x, w, a, b, bias, omega=OMEGA, scale=SCALE), x,
                         backward=True)
    fwd = forward_flops((m, k), (n, k), (r, k), (n, r), (n,), "sin", "weight")
    bwd = backward_flops((m, n), (m, k), (n, k), (r, k), (n, r), "sin", "weight", OMEGA, SCALE, False, False,
                         False, True)
    assert counts["lucidops.bounded_lora_linear"] == fwd
    assert counts["lucidops.bounded_lora_linear_backward"] == bwd
    # The formula covers at least the matmuls: 2MNK forward, G = dY^T X and dA, dB backward.
    assert fwd >= 2 * m * n * k + 2 * n * r * k and bwd >= 2 * m * n * k + 4 * n * r * k


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(omega=float("nan")), ValueError, "omega"),
    (dict(scale=float("inf")), ValueError, "scale"),
    (dict(fn="relu"), ValueError, "fn"),
    (dict(placement="input"), ValueError, "placement"),
    (dict(omega="1"), TypeError, "omega"),
    # A learnable omega or scale read as a number would silently get no gradient.
    (dict(omega=torch.tensor(2.0, requires_grad=True)), TypeError, "omega is a tensor that requires grad"),
    (dict(scale=torch.tensor(0.5, requires_grad=True)), TypeError, "scale is a tensor that requires grad"),
    # Finite, but inf in the float32 the update is formed in: sin(inf) or inf * 0 made NaN.
    (dict(omega=1e39), ValueError, "omega = 1e.39 overflows float32.*pass float64"),
    (dict(scale=-1e39, placement="output"), ValueError, "scale = -1e.39 overflows float32"),
])
def test_bad_scalars(kwargs, exc, match):
    x, w, a, b, _ = make((3, 8), 5, 2, torch.float32, "cpu")
    args = dict(fn="sin", omega=1.0, scale=1.0, placement="weight")
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        lucidops.ops.bounded_lora_linear(x, w, a, b, **args)


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
@pytest.mark.parametrize("placement", ["weight", "output"])
def test_strided_bias(backend, device, placement):
    """A bias view with stride 2 (the Triton kernel read it at unit stride: column j got 2j's
    neighbour, off by j)."""
    x, w, a, b, _ = make((3, 16), 8, 4, torch.float32, device)
    bias = torch.arange(16.0, device=device)[::2]
    with lucidops.use_backend(backend):
        got = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, omega=1.0, scale=0.5, placement=placement)
    expected = ref.forward(x.double(), w.double(), a.double(), b.double(), bias.double(), "sin", placement, 1.0, 0.5)
    assert rel_err(got, expected) < 1e-5


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("placement", ["weight", "output"])
def test_triton_weight_offsets_past_two_to_the_31(placement):
    """Output feature j of the kernel's weight.t() view sits j * K_in elements in: past 2^31
    for a (256000, 18432) LM head, where int32 offsets wrapped. Reproduced small: 9 rows
    2^28 elements apart, 2^31 into an 8 GiB storage that is only virtual (a few pages touched);
    row 8 read the decoy planted where the wrapped offset lands."""
    k, rows, row_stride, base = 16, 9, 2 ** 28, 2 ** 31
    storage = torch.empty(base + (rows - 1) * row_stride + k, dtype=torch.float16, device=TRITON_DEVICE)
    weight = storage.as_strided((rows, k), (row_stride, 1), base)
    g = torch.Generator().manual_seed(5)
    weight.copy_(torch.randn(rows, k, generator=g).half())
    storage[:k] = 3.0  # the decoy
    x = torch.randn(2, k, generator=g).half().to(TRITON_DEVICE)
    a, b = (torch.randn(*shape, generator=g).half().to(TRITON_DEVICE) * 0.1 for shape in ((4, k), (rows, 4)))
    with lucidops.use_backend("triton"):
        got = lucidops.ops.bounded_lora_linear(x, weight, a, b, omega=1.0, scale=0.0, placement=placement)
    expected = x.float() @ weight.float().t()
    assert (got.float() - expected).abs().max() < 1e-2


@pytest.mark.parametrize("placement", ["weight", "output"])
def test_settings_past_float32_run_in_float64(placement):
    """omega = 1e39 is refused for float32 inputs (above) but is a float64 number: with B = 0
    the update is exactly 0 (phase 0), so y = x W^T + bias in every CPU backend."""
    x, w, a, b, bias = make((3, 8), 5, 2, torch.float64, "cpu")
    for backend in ["reference", "cpp"]:
        with lucidops.use_backend(backend):
            y = lucidops.ops.bounded_lora_linear(x, w, a, torch.zeros_like(b), bias, omega=1e39, scale=1e39,
                                                 placement=placement)
        torch.testing.assert_close(y, x @ w.t() + bias, rtol=1e-12, atol=1e-12)


def test_bad_tensors():
    x, w, a, b, bias = make((3, 8), 5, 2, torch.float32, "cpu")
    call = lambda *t, **kw: lucidops.ops.bounded_lora_linear(*t, omega=1.0, scale=1.0, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="x's last dimension"):
        call(x[:, :7], w, a, b)
    with pytest.raises(ValueError, match="K_in"):  # no input features: refused, not a reshape error
        call(x[:, :0], w[:, :0], a[:, :0], b)
    with pytest.raises(ValueError, match="lora_A"):
        call(x, w, a[:, :7], b)
    with pytest.raises(ValueError, match="lora_B"):
        call(x, w, a, b[:, :1])
    with pytest.raises(ValueError, match="lora_B"):
        call(x, w, a, b[:4])
    with pytest.raises(ValueError, match="bias"):
        call(x, w, a, b, bias[:3])
    with pytest.raises(ValueError, match="weight must be 2-D"):
        call(x, w[0], a, b)
    with pytest.raises(TypeError, match="lora_A must have x's dtype"):
        call(x, w, a.double(), b)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        call(x.long(), w, a, b)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        call(x, w.tolist(), a, b)
    with pytest.raises(ValueError, match="rank r >= 1"):
        call(x, w, a[:0], b[:, :0])
    with pytest.raises(ValueError, match="lora_B must be on the same device"):
        call(x, w, a, b.to("meta"))


def test_triton_backend_rejects_float64_clearly():
    if not lucidops.backends.triton_interpreting():
        pytest.skip("needs the Triton interpreter or a GPU")
    x, w, a, b, _ = make((3, 8), 5, 2, torch.float64, "cpu")
    with lucidops.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        lucidops.ops.sine_lora_linear(x, w, a, b, omega=1.0, scale=1.0)


@pytest.fixture
def chunk_log(monkeypatch):
    """Shrinks the triton backend's Weff chunks to 3 KiB and records each call's chunk width."""
    from lucidops.triton_kernels import lora as tk

    widths = []
    plan = tk.materialize_chunk_columns

    def recorded(rows, columns, element_size, **block):
        widths.append((rows, columns, plan(rows, columns, element_size, **block)))
        return widths[-1][2]

    monkeypatch.setattr(tk, "MATERIALIZE_CHUNK_BYTES", 3 << 10)
    monkeypatch.setattr(tk, "materialize_chunk_columns", recorded)
    return widths


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fn,train_base", [("sin", False), ("tanh", True)])
def test_triton_large_batches_work_in_chunks(dtype, fn, train_base, chunk_log, monkeypatch):
    # 300 rows (past FUSED_MAX_ROWS): forward and dx build Weff in column chunks and the
    # backward forms G = dY^T X in groups of rows, here of 64 (3 KiB budget, one 64-wide block
    # at least), so 150 output columns, 150 input features and G's 150 rows split 64 + 64 + 22,
    # and each chunk must land in its own place (G's rows in dW's when the base trains).
    from lucidops.triton_kernels import lora as tk

    x, w, a, b, bias = make((3, 100, 150), 150, 8, dtype, TRITON_DEVICE, seed=3)
    for t in (x, a, b) + ((w, bias) if train_base else ()):
        t.requires_grad_(True)
    grad = torch.randn(3, 100, 150).to(dtype=dtype, device=TRITON_DEVICE)
    with lucidops.use_backend("triton"):
        y = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn=fn, omega=OMEGA, scale=SCALE)
        y.backward(grad)
    assert [entry[1:] for entry in chunk_log] == [(150, 64)] * 2  # forward (N_out), dx (K_in)
    assert tk.wgrad_group_rows(150, 150, 8, 0 if train_base else x.element_size()) == 64  # G's rows
    y_ref, gx, gw, gbias, ga, gb = reference_grads(grad, x, w, a, b, bias, fn, "weight")
    tol = TOL[dtype]
    assert rel_err(y.reshape(-1, 150), y_ref) < tol
    assert rel_err(x.grad.reshape(-1, 150), gx) < tol
    assert rel_err(a.grad, ga) < tol and rel_err(b.grad, gb) < tol
    if train_base:
        assert rel_err(w.grad, gw) < tol and rel_err(bias.grad, gbias) < tol

    # The tile-fused kernels compute the same function: in float32 the two agree to the sums'
    # rounding (the fused dots are tf32x3 on a GPU); in bfloat16 outputs may round to
    # neighbouring values (and the chunks round G to bfloat16).
    grads = [t.grad.clone() for t in (x, a, b)]
    for t in (x, a, b):
        t.grad = None
    monkeypatch.setattr(tk, "FUSED_MAX_ROWS", 10 ** 9)
    with lucidops.use_backend("triton"):
        fused = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn=fn, omega=OMEGA, scale=SCALE)
        fused.backward(grad)
    assert len(chunk_log) == 2  # no chunk formed this time
    same = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert rel_err(fused, y.detach()) < same
    for t, chunked in zip((x, a, b), grads):
        assert rel_err(t.grad, chunked) < same


@needs_triton
@pytest.mark.parametrize("rows", [40, 300], ids=["fused-tiles", "chunked-G"])
def test_triton_factor_partials_are_formed_by_groups_of_rows(rows, monkeypatch):
    # The weight gradient's float32 partials of dA and dB were kept for all of G = dY^T X at
    # once (N K r / 8 bytes: 32 MiB at 4096 x 4096, r = 16). Now a group of G's rows at a
    # time: with a budget of one 64-row block's partials, N_out = 150 makes three groups
    # (64 + 64 + 22), whose partials must land in their own rows of dB and add up in dA, on
    # both paths (the chunked one also forms G's rows by group, into a buffer: frozen W).
    from lucidops.triton_kernels import lora as tk

    x, w, a, b, bias = make((rows, 150), 150, 8, torch.float32, TRITON_DEVICE, seed=8)
    grad = torch.randn(rows, 150, generator=torch.Generator().manual_seed(9)).to(TRITON_DEVICE)
    results = {}
    plan = tk.wgrad_group_rows
    for budget in (tk.MATERIALIZE_CHUNK_BYTES, 4 * 8 * (150 + 3 * 64)):
        groups = []
        monkeypatch.setattr(tk, "MATERIALIZE_CHUNK_BYTES", budget)
        monkeypatch.setattr(tk, "wgrad_group_rows", lambda *args, **kw: groups.append(plan(*args, **kw)) or groups[-1])
        x_, a_, b_ = (t.clone().requires_grad_(True) for t in (x, a, b))
        with lucidops.use_backend("triton"):
            lucidops.ops.sine_lora_linear(x_, w, a_, b_, bias, omega=OMEGA, scale=SCALE).backward(grad)
        results[groups[0]] = (a_.grad, b_.grad)
    assert sorted(results) == [64, 192]  # three groups of one block, then one group of all rows
    _, _, _, _, ga, gb = reference_grads(grad, x, w, a, b, bias, "sin", "weight")
    for grad_a, grad_b in results.values():
        assert rel_err(grad_a, ga) < TOL[torch.float32] and rel_err(grad_b, gb) < TOL[torch.float32]
    assert torch.equal(results[64][1], results[192][1])  # each row of dB sums the same K tiles
    assert rel_err(results[64][0], results[192][0]) < 1e-6


def test_factor_partials_fit_the_budget():
    from lucidops.triton_kernels import lora as tk

    block_n, block_k = tk.WGRAD_CONFIG[:2]
    for n, k, r in [(4096, 4096, 16), (16384, 16384, 64), (150, 150, 8), (1, 3, 1), (10 ** 6, 10 ** 6, 64)]:
        for g_size in (0, 2, 4):
            rows = tk.wgrad_group_rows(n, k, r, g_size)
            assert rows % block_n == 0 and block_n <= rows <= -(-n // block_n) * block_n
            group_bytes = rows * k * g_size + 4 * r * (rows // block_n * k + -(-k // block_k) * rows)
            one_block = block_n * k * g_size + 4 * r * (k + -(-k // block_k) * block_n)
            assert group_bytes <= max(tk.MATERIALIZE_CHUNK_BYTES, one_block)
    # 4096 x 4096, r = 16 (the GPU benchmark's layer): 8 MiB groups of 1024 rows (partials
    # only, G into dW), or of 512 rows when G's bf16 rows take a buffer (frozen weight).
    assert tk.wgrad_group_rows(4096, 4096, 16) == 1024
    assert tk.wgrad_group_rows(4096, 4096, 16, 2) == 512


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_small_batches_split_the_reduction(dtype, monkeypatch):
    # 3 rows, 300 input features: one output tile, 5 BLOCK_I blocks. Two slices of the
    # reduction (192 + 108 features) write float32 partials that are added with the bias
    # afterwards; the result must equal the unsplit kernel's and the float64 reference.
    from lucidops.triton_kernels import lora as tk

    x, w, a, b, bias = make((3, 300), 20, 6, dtype, TRITON_DEVICE, seed=5)
    results = {}
    for target in (1, 2):
        monkeypatch.setattr(tk, "SPLIT_TARGET_PROGRAMS", target)
        with torch.no_grad(), lucidops.use_backend("triton"):
            results[target] = lucidops.ops.sine_lora_linear(x, w, a, b, bias, omega=OMEGA, scale=SCALE)
    assert tk.reduction_splits(1, 300, 64) == 2
    y_ref = reference_grads(torch.zeros(3, 20), x, w, a, b, bias, "sin", "weight")[0]
    assert rel_err(results[2], y_ref) < TOL[dtype] and rel_err(results[1], y_ref) < TOL[dtype]
    assert rel_err(results[2], results[1]) < (1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_reduction_splits_fill_the_gpu_at_serving_sizes():
    from lucidops.triton_kernels import lora as tk

    # M = 1, N_out = K_in = 4096: 64 output tiles of 64 columns, 8 slices of 512 features.
    assert tk.reduction_splits(64, 4096, 64) == 8
    assert tk.reduction_splits(64 * 4096, 4096, 64) == 1      # enough tiles already
    assert tk.reduction_splits(1, 40, 64) == 1                # one block: nothing to split
    assert tk.reduction_splits(1, 10 ** 6, 64) == tk.SPLIT_TARGET_PROGRAMS


def test_materialized_chunks_fit_the_budget():
    from lucidops.triton_kernels import lora as tk

    block = tk.UPDATE_CONFIG[1]
    for rows, columns, size in [(4096, 4096, 2), (1024, 1024, 4), (3, 10, 4), (10 ** 6, 300, 2), (7, 1, 2)]:
        width = tk.materialize_chunk_columns(rows, columns, size)
        assert 1 <= width <= columns
        assert width == columns or width % block == 0
        # Within the budget unless one block alone is over it.
        assert rows * width * size <= max(tk.MATERIALIZE_CHUNK_BYTES, rows * block * size)
    # 4096 x 4096 bf16 (the GPU benchmark's weight): 1024-column chunks of 8 MiB, four per call.
    assert tk.materialize_chunk_columns(4096, 4096, 2) == 1024


# --------------------------------------------------------------------------- modules

def _linear(k, n, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(k, n).to(dtype)


def test_sine_module_matches_definition_and_starts_at_base():
    base = _linear(24, 10)
    layer = lucidops.nn.SineLoRALinear(base, rank=4, omega=30.0, alpha=8.0)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: the update starts at zero
    with torch.no_grad():
        layer.lora_B.normal_()
    assert layer.scale == pytest.approx(8.0 / 4 / math.sqrt(24))
    w_eff = base.weight.double() + layer.scale * torch.sin(30.0 * layer.lora_B.double() @ layer.lora_A.double())
    expected = x.double() @ w_eff.T + base.bias.double()
    assert rel_err(layer(x), expected) < 1e-5
    assert not base.weight.requires_grad and not base.bias.requires_grad


@pytest.mark.parametrize("fn", ["sin", "tanh"])
def test_merge_is_a_linear_and_unmerge_restores(fn):
    base = _linear(33, 17, seed=1)
    original = base.weight.detach().clone()
    layer = lucidops.nn.BoundedLoRALinear(base, rank=4, fn=fn, omega=3.0, alpha=2.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 33)
    y = layer(x)
    layer.merge()
    assert layer.merged
    y_merged = layer(x)
    torch.testing.assert_close(y_merged, torch.nn.functional.linear(x, base.weight, base.bias))
    assert rel_err(y_merged, y.double()) < 1e-5
    layer.unmerge()
    assert torch.equal(base.weight, original)
    layer.merge(keep_original=False).unmerge()
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)


def test_output_placement_module_cannot_merge():
    layer = lucidops.nn.BoundedLoRALinear(_linear(8, 4), rank=2, fn="tanh", omega=2.0, placement="output")
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 8)
    expected = ref.forward(x.double(), layer.base.weight.double(), layer.lora_A.double(), layer.lora_B.double(),
                           layer.base.bias.double(), "tanh", "output", 2.0, layer.scale)
    assert rel_err(layer(x), expected) < 1e-5
    with pytest.raises(RuntimeError, match="output"):
        layer.merge()


def test_module_trains_only_the_adapter():
    layer = lucidops.nn.SineLoRALinear(_linear(16, 8, seed=2), rank=4, omega=10.0, alpha=4.0)
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.5)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    x, target = torch.randn(32, 16), torch.randn(32, 8)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.95


def test_module_quantize():
    layer = lucidops.nn.SineLoRALinear(_linear(64, 24, seed=3), rank=4, omega=5.0, alpha=4.0)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(7, 64)
    y_full = layer(x)
    q = layer.quantize_(bits=8, group_size=32)
    assert layer.lora_A is None and q.stats["bytes"] < q.stats["full_precision_bytes"]
    a_hat, b_hat = q.dequantize(torch.float64)
    expected = ref.forward(x.double(), layer.base.weight.double(), a_hat, b_hat, layer.base.bias.double(), "sin",
                           "weight", 5.0, layer.scale)
    assert rel_err(layer(x), expected) < 1e-5
    assert rel_err(layer(x), y_full.double()) < 1e-2  # 8 bits: close to the full-precision adapter
    with pytest.raises(RuntimeError, match="already"):
        layer.quantize_()


@pytest.mark.parametrize("base_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_a_half_base_gets_float32_adapters_by_default(base_dtype):
    """As peft's autocast_adapter_dtype: half factors round the phase at omega 300 by far more
    than the output's own rounding (checked below), and every optimizer step on them."""
    k = 64
    layer = lucidops.nn.SineLoRALinear(_linear(k, 24, seed=7, dtype=base_dtype), rank=4, omega=300.0,
                                       alpha=4 * math.sqrt(k))  # scale 1
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    with torch.no_grad():
        layer.lora_A.normal_(std=0.5)
        layer.lora_B.normal_(std=0.3)
        layer.base.weight.zero_()  # y is the update (and the bias): its error is not diluted
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(8)).to(base_dtype).requires_grad_(True)
    y = layer(x)
    y.float().square().sum().backward()
    assert y.dtype == base_dtype and x.grad.dtype == base_dtype
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    w, bias = layer.base.weight.double(), layer.base.bias.double()
    a, b = layer.lora_A.detach(), layer.lora_B.detach()
    exact = ref.forward(x.detach().double(), w, a.double(), b.double(), bias, "sin", "weight", 300.0, layer.scale)
    rounded = ref.forward(x.detach().double(), w, a.to(base_dtype).double(), b.to(base_dtype).double(), bias, "sin",
                          "weight", 300.0, layer.scale)
    tol = 1e-3 if base_dtype == torch.float16 else 5e-3
    assert rel_err(y, exact) < tol < 0.1 * rel_err(rounded, exact)
    # Asked for, the base's dtype; a dtype the op does not take over this base is refused by name.
    assert lucidops.nn.SineLoRALinear(_linear(k, 24, dtype=base_dtype), rank=4, omega=1.0,
                                      adapter_dtype=base_dtype).lora_A.dtype == base_dtype
    other = torch.bfloat16 if base_dtype == torch.float16 else torch.float16
    with pytest.raises(TypeError, match=f"adapter_dtype must be {base_dtype} or torch.float32 over a {base_dtype} "
                                        f"base, got {other}"):
        lucidops.nn.SineLoRALinear(_linear(k, 24, dtype=base_dtype), rank=4, omega=1.0, adapter_dtype=other)


def test_a_float32_base_keeps_float32_adapters_and_refuses_half_ones():
    layer = lucidops.nn.BoundedLoRALinear(_linear(8, 4), rank=2, fn="tanh")
    assert layer.lora_A.dtype == torch.float32
    assert lucidops.nn.BoundedLoRALinear(_linear(8, 4).double(), rank=2).lora_B.dtype == torch.float64
    with pytest.raises(TypeError, match="adapter_dtype must be torch.float32 over a torch.float32 base"):
        lucidops.nn.BoundedLoRALinear(_linear(8, 4), rank=2, adapter_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="adapter_dtype must be"):
        lucidops.nn.BoundedLoRALinear(_linear(8, 4), rank=2, adapter_dtype="float32")


def test_quantized_half_layer_merges_the_update_its_forward_computes():
    """bfloat16 base, 8-bit adapter, omega 300: merge() folds the update formed from the
    factors dequantized in float32, as forward forms it; it dequantized them in bfloat16,
    and the merged layer's output erred by far more than one rounding of the weight."""
    k = 96
    layer = lucidops.nn.SineLoRALinear(_linear(k, 40, seed=5, dtype=torch.bfloat16), rank=8, omega=300.0,
                                       alpha=8 * 0.5 * math.sqrt(k))  # scale alpha / r / sqrt(K_in) = 0.5
    with torch.no_grad():
        layer.lora_A.normal_(std=0.3)
        layer.lora_B.normal_(std=0.3)
    q = layer.quantize_(bits=8, group_size=32)
    x = torch.randn(16, k, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    a_hat, b_hat = q.dequantize(torch.float64)
    expected = ref.forward(x.double(), layer.base.weight.double(), a_hat, b_hat, layer.base.bias.double(), "sin",
                           "weight", 300.0, layer.scale)
    assert rel_err(layer(x), expected) < 5e-3
    update = ref.delta_weight(a_hat, b_hat, "sin", 300.0, layer.scale)
    assert rel_err(layer.delta_weight(), update) < 5e-3  # one bfloat16 rounding
    layer.merge()
    assert rel_err(layer(x), expected) < 1e-2  # the merged weight rounds W + update once more


def _saved(state):
    """``state`` through torch.save and torch.load's default, weights-only, unpickler."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _trained_layer(seed, **kwargs):
    layer = lucidops.nn.BoundedLoRALinear(_linear(48, 20, seed=seed), rank=4, omega=3.0, **kwargs)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.2)
    return layer


def test_quantized_adapter_survives_the_state_dict_and_device_moves():
    layer = _trained_layer(4)
    layer.quantize_(bits=4, group_size=16)
    x = torch.randn(5, 48)
    expected = layer(x)
    fresh = _trained_layer(5)
    with pytest.raises(RuntimeError, match="call quantize_"):
        fresh.load_state_dict(_saved(layer.state_dict()))
    fresh = _trained_layer(5)
    fresh.quantize_(bits=2, group_size=8)  # any settings: the loaded adapter replaces them
    fresh.load_state_dict(_saved(layer.state_dict()))
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    assert fresh.quantized.A.bits == 4 and fresh.quantized.A.scales.dtype == torch.float16
    assert (fresh.quantized.A.exponent, fresh.quantized.B.exponent) == (layer.quantized.A.exponent,
                                                                         layer.quantized.B.exponent)
    # The adapter follows the module's device, never its dtype (the kernels read float16 tables).
    fresh.double()
    assert fresh.quantized.A.scales.dtype == torch.float16 and fresh.base.weight.dtype == torch.float64
    fresh.to("meta")  # a device this machine has besides the CPU
    assert fresh.quantized.A.codes.device.type == "meta" and fresh.quantized.B.scales.device.type == "meta"


@pytest.mark.parametrize("keep_original", [True, False])
def test_merged_layer_state_loads_merged(keep_original):
    """A merged layer's state holds the merged weight: loaded into an unmerged layer it must
    not add the update a second time, and unmerge() must still give the base back."""
    layer = _trained_layer(6)
    x = torch.randn(5, 48)
    base_out = layer.base(x)
    expected = layer(x)
    layer.merge(keep_original=keep_original)
    fresh = _trained_layer(7)
    fresh.load_state_dict(_saved(layer.state_dict()))
    assert fresh.merged
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    fresh.unmerge()
    torch.testing.assert_close(fresh.base(x), base_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_flag", [False, True])
def test_adapter_only_state_loads_into_a_merged_layer(with_flag):
    """Loading only the adapter (peft-style, strict=False) into a merged layer took the flag from
    the state (or the no-extra-state fallback) while the base still held the old update: the new
    update came on top of it, and unmerge() could no longer give the base back."""
    layer = _trained_layer(10)
    source = _trained_layer(11)
    x = torch.randn(5, 48)
    base_out = layer.base(x)
    keys = ("lora_A", "lora_B") + (("_extra_state",) if with_flag else ())
    adapter = {k: v for k, v in source.state_dict().items() if k in keys}  # source is unmerged
    reference = copy.deepcopy(layer)
    reference.load_state_dict(adapter, strict=False)
    expected = reference(x)  # this layer's base with the source's adapter
    layer.merge()
    missing = layer.load_state_dict(adapter, strict=False).missing_keys
    assert set(missing) == {"base.weight", "base.bias"}  # a missing flag is the old-checkpoint case, not reported
    # A saved "not merged" flag is the state's; without one the layer stays merged.
    assert layer.merged is (not with_flag)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.base(x), base_out, rtol=1e-5, atol=1e-5)


def test_a_state_without_the_layer_or_a_refused_one_leaves_a_merged_layer_alone():
    """A head-only state (strict=False) does not mention the layer: it stays merged, bit for
    bit (an unmerge/merge round trip would round bf16 weights); a refused state (quantized
    into an unquantized layer) leaves it merged too."""
    layer = _trained_layer(12).to(torch.bfloat16)
    layer.merge(keep_original=False)
    weight = layer.base.weight.detach().clone()
    model = nn.Sequential(layer, nn.Linear(20, 3).to(torch.bfloat16))
    model.load_state_dict({"1.weight": torch.zeros(3, 20, dtype=torch.bfloat16)}, strict=False)
    assert layer.merged and torch.equal(layer.base.weight, weight)
    quantized = _trained_layer(13)
    quantized.quantize_(bits=4)
    with pytest.raises(RuntimeError, match="quantize_"):
        layer.load_state_dict({k: v for k, v in quantized.state_dict().items() if not k.startswith("base.")},
                              strict=False)
    assert layer.merged
    torch.testing.assert_close(layer.base.weight, weight, rtol=0, atol=float(weight.abs().max()) * 2 ** -7)


def test_state_dict_from_before_the_extra_state_still_loads():
    layer = _trained_layer(8)
    old = {k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")}
    fresh = _trained_layer(9).merge()
    fresh.load_state_dict(old)
    assert not fresh.merged
    x = torch.randn(3, 48)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("other", [dict(omega=2.0), dict(fn="tanh"), dict(placement="output"), dict(alpha=8.0)])
def test_a_merged_state_of_other_settings_is_refused_before_anything_loads(other):
    """The merged weight holds scale fn(omega B A) formed with the saving layer's settings: an
    omega-3 state loaded into an omega-2 layer left the weight 1.0 off after unmerge(), and a
    placement "output" layer took a merged flag it cannot unmerge."""
    layer = _trained_layer(14).merge()
    target = lucidops.nn.BoundedLoRALinear(_linear(48, 20, seed=15), rank=4, **{"omega": 3.0, **other})
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, Tensor)}
    expected = ("placement 'output' cannot be merged" if "placement" in other
                else f"merged update formed with {next(iter(other)).replace('alpha', 'scale')}")
    with pytest.raises(RuntimeError, match=expected):
        target.load_state_dict(_saved(layer.state_dict()))
    assert not target.merged
    assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items())  # nothing overwritten
    # Unmerged, the factors load into any settings (they are the layer's configuration, as in peft).
    target.load_state_dict(_saved(_trained_layer(16).state_dict()))
    assert not target.merged and torch.equal(target.lora_B, _trained_layer(16).lora_B)
    # So does a merged layer's adapter without its base weight: this layer keeps its own base,
    # merged with its own settings (the check refused it too, although no saved weight loads).
    adapter = {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}
    if other.get("placement") != "output":
        target.load_state_dict(_saved(adapter), strict=False)
        assert target.merged and torch.equal(target.lora_B, layer.lora_B)
    else:  # it cannot hold a merged update: refused before the factors load (they were overwritten)
        before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, Tensor)}
        with pytest.raises(RuntimeError, match="placement 'output' cannot be merged"):
            target.load_state_dict(_saved(adapter), strict=False)
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in before.items()) and not target.merged


def test_a_quantized_layer_goes_to_meta_and_back_and_loads_with_assign():
    """to_empty() on a quantized meta layer failed (the adapter was copied out of meta), and
    load_state_dict(assign=True) left the codes on meta (they were moved to the base's device
    before the base had loaded)."""
    layer = _trained_layer(17)
    layer.quantize_(bits=4, group_size=16)
    x = torch.randn(3, 48)
    expected = layer(x)
    state = _saved(layer.state_dict())
    empty = copy.deepcopy(layer).to("meta").to_empty(device="cpu")
    assert empty.quantized.A.codes.device.type == "cpu" and empty.quantized.B.scales.dtype == torch.float16
    empty.load_state_dict(state)
    torch.testing.assert_close(empty(x), expected, rtol=0, atol=0)
    assigned = copy.deepcopy(layer).to("meta")
    assigned.load_state_dict(state, assign=True)
    assert assigned.quantized.A.codes.device.type == "cpu" and assigned.base.weight.device.type == "cpu"
    torch.testing.assert_close(assigned(x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="meta device: quantize an adapter with values"):
        _trained_layer(18).to("meta").quantize_(bits=4)


def test_module_bad_arguments():
    with pytest.raises(TypeError, match="base"):
        lucidops.nn.SineLoRALinear(nn.Conv1d(3, 3, 1), rank=2, omega=1.0)
    with pytest.raises(ValueError, match="rank"):
        lucidops.nn.SineLoRALinear(_linear(4, 4), rank=0, omega=1.0)
    with pytest.raises(ValueError, match="omega"):
        lucidops.nn.SineLoRALinear(_linear(4, 4), rank=2, omega=float("nan"))
    # Zero omega or alpha: an update fn(0) = 0 with zero gradients, an adapter that never trains.
    with pytest.raises(ValueError, match="omega must be finite and != 0"):
        lucidops.nn.SineLoRALinear(_linear(4, 4), rank=2, omega=0.0)
    with pytest.raises(ValueError, match="alpha must be finite and != 0"):
        lucidops.nn.BoundedLoRALinear(_linear(4, 4), rank=2, alpha=0)
    with pytest.raises(TypeError, match="omega is a tensor that requires grad"):
        lucidops.nn.SineLoRALinear(_linear(4, 4), rank=2, omega=nn.Parameter(torch.tensor(3.0)))
    with pytest.raises(ValueError, match="fn"):
        lucidops.nn.BoundedLoRALinear(_linear(4, 4), rank=2, fn="gelu")
    with pytest.raises(ValueError, match="gain"):
        lucidops.nn.SineLoRALinear(_linear(4, 4), rank=2, omega=1.0, gain="sqrt_out")


def test_tensor_scalars_without_grad_are_read_as_numbers():
    """A tensor omega/scale is fine when it carries no gradient to lose (detached, or under no_grad)."""
    x, w, a, b, _ = make((3, 8), 5, 2, torch.float32, "cpu")
    want = lucidops.ops.sine_lora_linear(x, w, a, b, omega=2.0, scale=0.5)
    got = lucidops.ops.sine_lora_linear(x, w, a, b, omega=torch.tensor(2.0), scale=torch.tensor(0.5))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():
        got = lucidops.ops.sine_lora_linear(x, w, a, b, omega=torch.tensor(2.0, requires_grad=True), scale=0.5)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gpu_calls_the_triton_kernels_refuse_choose_the_reference(monkeypatch):
    """On a GPU automatic selection put triton first for every call, and its kernels refuse
    float64 x and placement "output" past rank 64: a float64 LoRA layer or a rank-128 output
    adapter on CUDA raised instead of running. Checked with the GPU faked present."""
    from lucidops.ops import _lora_backends

    monkeypatch.setattr(lucidops.backends, "backend_problem", lambda name, device_type: None)
    select = lucidops.backends.select
    for dtype, rank, placement, chosen in [(torch.float64, 4, "weight", "reference"),
                                           (torch.float32, 65, "output", "reference"),
                                           (torch.float32, 64, "output", "triton"),
                                           (torch.float32, 128, "weight", "triton"),
                                           (torch.bfloat16, 4, "output", "triton")]:
        x, w = torch.zeros(3, 8, dtype=dtype), torch.zeros(5, 8, dtype=dtype)
        a, b = torch.zeros(rank, 8, dtype=dtype), torch.zeros(5, rank, dtype=dtype)
        assert select("bounded_lora_linear", "cuda", (x, w, a, b, None, "sin", placement, 1.0, 1.0)) == chosen
        backward_args = (torch.zeros(3, 5, dtype=dtype), x, w, a, b, "sin", placement, 1.0, 1.0, True, False,
                         False, True)
        assert select("bounded_lora_linear_backward", "cuda", backward_args) == chosen
        assert select("bounded_lora_linear", "cpu", (x, w, a, b, None, "sin", placement, 1.0, 1.0)) == "cpp"
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    for dtype, chosen in [(torch.float64, "reference"), (torch.float16, "triton")]:
        x = torch.zeros(3, 8, dtype=dtype)
        assert select("bounded_lora_linear_quant", "cuda", (x, x, codes)) == chosen
        assert select("bounded_lora_linear_quant_backward", "cuda", (x, x, x)) == chosen
    tk = pytest.importorskip("lucidops.triton_kernels.lora")  # the limit is the kernels' own
    assert _lora_backends.TRITON_OUTPUT_MAX_RANK == tk.OUTPUT_R_PADS[-1]


def test_lora_has_no_cuda_backend_and_its_tests_do_not_ask_for_one():
    """The lora ops run on a GPU through triton (and the reference); forcing "cuda" raises
    by name. The tests' (backend, device) params keep to the backends an op implements: the
    first GPU run forced "cuda" in about 140 lora cases, each an error instead of a check."""
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)
    with lucidops.use_backend("cuda"):
        with pytest.raises(lucidops.BackendUnavailable, match="no cuda implementation"):
            lucidops.ops.sine_lora_linear(x, w, a, b, omega=1.0, scale=1.0)
    for op in ("bounded_lora_linear", "bounded_lora_linear_quant"):
        assert all(p.values[0] != "cuda" for p in backend_device_params(op))
    assert "cuda-cuda" in [p.id for p in backend_device_params("gaussian_mixture")]


@pytest.mark.parametrize("setting", [dict(omega=1e39), dict(alpha=4e39)])
@pytest.mark.parametrize("quantized", [False, True])
def test_merge_refuses_an_omega_or_scale_past_float32_as_forward_does(setting, quantized):
    """forward raised by name; merge() and delta_weight() formed omega B A in float32, got inf,
    and wrote NaN into the base weight."""
    torch.manual_seed(0)
    layer = lucidops.nn.BoundedLoRALinear(nn.Linear(8, 6), rank=4, fn="sin", **setting)
    with torch.no_grad():
        layer.lora_B.normal_()
    if quantized:
        layer.quantize_(bits=8, group_size=4)
    before = layer.base.weight.detach().clone()
    name = "omega" if "omega" in setting else "scale"
    for call in (lambda: layer(torch.randn(2, 8)), layer.merge, layer.delta_weight):
        with pytest.raises(ValueError, match=name):
            call()
    assert torch.equal(layer.base.weight, before) and not layer.merged
    layer.double()  # float64 forms the update in float64: then the value fits
    if not quantized:
        assert torch.isfinite(layer.delta_weight()).all()


@pytest.mark.parametrize("backend,device", backend_device_params("bounded_lora_linear"))
@pytest.mark.parametrize("r", [16, 32, 64])
def test_output_placement_on_the_triton_rank_pads(backend, device, r):
    # Ranks equal to the triton 'output' kernels' pads (OUTPUT_R_PADS): 64 is the largest rank
    # they take (r <= 64); CASES' ranks 40 and 20 lie inside the pads, never on a boundary (a
    # pad chosen by r < pad refused rank 64 and passed every other test).
    x, w, a, b, bias = make((3, 20), 10, r, torch.float32, device, seed=r)
    for t in (x, a, b):
        t.requires_grad_(True)
    grad = torch.randn(3, 10, generator=torch.Generator().manual_seed(r)).to(device)
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn="tanh", omega=OMEGA, scale=SCALE, placement="output")
        y.backward(grad)
    y_ref, gx, _, _, ga, gb = reference_grads(grad, x, w, a, b, bias, "tanh", "output")
    tol = TOL[torch.float32]
    assert rel_err(y, y_ref) < tol and rel_err(x.grad, gx) < tol
    assert rel_err(a.grad, ga) < tol and rel_err(b.grad, gb) < tol


@pytest.mark.parametrize("placement", ["weight", "output"])
def test_each_factor_alone_gets_its_gradient(placement):
    """Only lora_B (or only lora_A) requiring grad: its gradient is the one it gets when both
    do. Returning B's gradient under A's flag dropped it silently (B.grad None)."""
    x, w, a, b, bias = make((6, 12), 7, 3, torch.float32, "cpu")
    kw = dict(omega=OMEGA, scale=SCALE, placement=placement)
    both = [a.clone().requires_grad_(True), b.clone().requires_grad_(True)]
    lucidops.ops.bounded_lora_linear(x, w, *both, bias, **kw).sum().backward()
    for i in range(2):
        alone = [t.clone().requires_grad_(j == i) for j, t in enumerate((a, b))]
        lucidops.ops.bounded_lora_linear(x, w, *alone, bias, **kw).sum().backward()
        assert alone[i].grad is not None, ("lora_A", "lora_B")[i]
        torch.testing.assert_close(alone[i].grad, both[i].grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("setting", [dict(omega=1e39), dict(scale=-1e39)])
def test_omega_or_scale_past_float32_is_refused_for_half_inputs_too(dtype, setting):
    """The update is formed in float32 for half inputs as for float32 ones: 1e39 would be inf
    there, and sin(inf) NaN, silently."""
    x, w, a, b, bias = make((3, 8), 5, 2, dtype, "cpu")
    kw = {"omega": OMEGA, "scale": SCALE, **setting}
    with pytest.raises(ValueError, match=f"{next(iter(setting))} = .* overflows float32"):
        lucidops.ops.bounded_lora_linear(x, w, a, b, bias, **kw)


@pytest.mark.parametrize("gain", [-1.0, 0.0, float("inf"), torch.tensor(-2.0)])
def test_a_gain_that_is_not_positive_and_finite_is_refused_naming_it(gain):
    """gain divides the scale: a negative one flipped the update's sign silently."""
    with pytest.raises(ValueError, match="gain must be finite and > 0"):
        lucidops.nn.SineLoRALinear(_linear(4, 4), rank=2, omega=1.0, gain=gain)


def test_a_second_merge_adds_nothing_and_unmerge_still_restores():
    layer = _trained_layer(20)
    original = layer.base.weight.detach().clone()
    x = torch.randn(4, 48)
    expected = layer(x)
    layer.merge()
    layer.merge()  # a no-op: the update is in the weight once
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(layer.base.weight, original)


def test_a_merged_state_loaded_into_a_merged_layer_unmerges_to_the_loaded_base():
    """The merged layer's kept copy of its own old base weight must not survive a load: unmerge()
    after loading a merged state gives the state's base back, not the stale copy."""
    source = _trained_layer(21)
    x = torch.randn(5, 48)
    source_base = source.base(x)
    source.merge()
    layer = _trained_layer(22).merge()  # keep_original=True: holds a copy of its own base weight
    layer.load_state_dict(_saved(source.state_dict()))
    assert layer.merged
    layer.unmerge()
    torch.testing.assert_close(layer.base(x), source_base, rtol=1e-5, atol=1e-5)
