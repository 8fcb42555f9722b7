"""The C++ CPU kernels against the float64 reference on shapes hypothesis draws.

Each op's own test file covers chosen corners (size 1, one past a tile, several chunks);
these draw sizes around every tile and vector width of the cpp kernels at random, forward
and backward, and run under tests/sanitize.sh too. A failure prints the shape that broke.
50 examples per op here; 3 runs of 3000 (and 1000 under the sanitizers) passed on 2026-12-04.
"""

import math

import torch
from hypothesis import given, settings, strategies as st

import lucidops
from lucidops import backends

from comparisons import assert_close
from test_attention import assert_cpp_half_is_the_float32_kernel_rounded, check_against_float64_reference
from test_gaussian_mixture import backend_argmax, ground_truth, make_params, make_points, run_op
from test_lora import SCALE, make, reference_grads


def assert_mixture_close(tensors, reduce, cull, out, arg, grads, grad_out):
    """A gaussian_mixture run's output and five gradients (None for a missing bias) against the
    reference, whose backward goes through the run's own arg-max. Culled, the float32 rule
    decides a point within a rounding of a box face in float32, where the float64 reference may
    decide otherwise (an error of up to t), so culled runs are compared in their own dtype."""
    dtype = out.dtype
    exact_dtype = dtype if cull is not None else torch.float64
    out64, grads64, _ = ground_truth(*tensors, reduce, cull, grad_out, arg, exact_dtype)
    tol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-12, 1e-10)
    assert_close("out", out, out64, tol, atol)
    for name, g, g64 in zip(["points", "means", "precisions", "weight", "bias"], grads, grads64):
        if g64 is None:
            assert g is None, name
        else:
            assert_close(name, g, g64, 4 * tol, atol)


def check_gaussian_mixture(backend, device, lead, n, gaussians, channels, dtype, reduce, cull, with_bias, seed):
    """One drawn gaussian_mixture case on ``backend``, forward and backward, against the reference."""
    if reduce == "none" and math.prod(lead) * n * channels > 200_000:
        n = 33  # keep the (..., N, K) output, and the float64 reference of it, small
    means, prec, weight, bias = make_params(gaussians, channels, dtype, device, seed=seed)
    bias = bias if with_bias else None
    points = make_points((*lead, n), dtype, device, seed=seed + 1)
    out, grads, grad_out = run_op(backend, points, means, prec, weight, bias, reduce, cull)
    assert out.shape == ((*lead, channels) if reduce == "max" else (*lead, n, channels))
    arg = backend_argmax(backend, points, means, prec, weight, bias, cull) if reduce == "max" else None
    assert_mixture_close((points, means, prec, weight, bias), reduce, cull, out, arg, grads, grad_out)


def check_bounded_lora_linear(backend, device, lead, m, k_in, n_out, rank, fn, placement, train_base, with_bias,
                              omega, seed):
    """One drawn float32 bounded_lora_linear case on ``backend``: output and gradients against the
    float64 reference; a frozen base (weight and bias) must get no gradient at all."""
    x, w, a, b, bias = make((*lead, m, k_in), n_out, rank, torch.float32, device, seed=seed, bias=with_bias)
    for t in (x, a, b) + ((w, bias) if train_base else ()):
        if t is not None:
            t.requires_grad_(True)
    grad = torch.randn(*lead, m, n_out, generator=torch.Generator().manual_seed(seed)).to(device)
    with lucidops.use_backend(backend):
        y = lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn=fn, omega=omega, scale=SCALE, placement=placement)
        y.backward(grad)
        assert backends.last_used("bounded_lora_linear") == backend
        assert backends.last_used("bounded_lora_linear_backward") == backend
    exact = reference_grads(grad, x, w, a, b, bias, fn, placement, omega=omega)
    got = [y.reshape(-1, n_out), x.grad.reshape(-1, k_in), w.grad, None if bias is None else bias.grad, a.grad, b.grad]
    # The phase's rounding grows with omega. Float32 itself reaches 1.12x of 1e-5 max(1, omega / 2)
    # in the 'output' placement's factor gradients (2 of 5500 draws, the float32 reference alike),
    # so twice that; a wrong index or bound errs by O(1).
    tol, atol = 2e-5 * max(1.0, omega / 2), 1e-4 * omega
    wanted = [True, True, train_base, train_base and bias is not None, True, True]
    for name, g, e, want in zip(["y", "x", "weight", "bias", "lora_A", "lora_B"], got, exact, wanted):
        if want:
            assert_close(name, g, e, tol, atol)
        else:
            assert g is None, name


# Sizes that straddle the kernels' tiles and vector widths (8, 16, 32, 64, 256) and a few others.
AWKWARD = st.sampled_from([1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 129])
EXAMPLES = settings(max_examples=50, deadline=None)


@EXAMPLES
@given(lead=st.lists(st.integers(1, 3), max_size=2), n=st.one_of(AWKWARD, st.integers(250, 300)),
       gaussians=AWKWARD.filter(lambda g: g <= 65), channels=AWKWARD, dtype=st.sampled_from([torch.float32, torch.float64]),
       reduce=st.sampled_from(["max", "none"]), cull=st.sampled_from([None, 0.05, 0.3]), with_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_gaussian_mixture(lead, n, gaussians, channels, dtype, reduce, cull, with_bias, seed):
    check_gaussian_mixture("cpp", "cpu", lead, n, gaussians, channels, dtype, reduce, cull, with_bias, seed)


@EXAMPLES
@given(b=st.integers(1, 2), h=st.integers(1, 5), nq=AWKWARD, nk=AWKWARD,
       d=st.one_of(AWKWARD.filter(lambda v: 4 <= v <= 128), st.integers(4, 128)), causal=st.booleans(),
       mask=st.sampled_from([None, "random", "first_key_off", "batch0_off"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), dropout_p=st.sampled_from([0.0, 0.0, 0.3]))
def test_attention(b, h, nq, nk, d, causal, mask, dtype, dropout_p):
    # Inputs are O(1), so a wrong index errs by O(1); float32 rounding stays far below 1e-4, float64's
    # below 1e-10 (at 1e-4 for both, a float64 kernel computing in float32 passed).
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    check_against_float64_reference("cpp", (b, h, nq, nk, d, causal, mask, dtype), atol=atol, dropout_p=dropout_p)


@EXAMPLES
@given(b=st.integers(1, 2), h=st.integers(1, 5), nq=AWKWARD, nk=AWKWARD,
       d=st.one_of(AWKWARD.filter(lambda v: 4 <= v <= 128), st.integers(4, 128)), causal=st.booleans(),
       mask=st.sampled_from([None, "random", "first_key_off", "batch0_off"]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), dropout_p=st.sampled_from([0.0, 0.0, 0.3]))
def test_attention_half(b, h, nq, nk, d, causal, mask, dtype, dropout_p):
    # Half inputs are converted inside the kernel: bit for bit the float32 kernel's results rounded by torch.
    assert_cpp_half_is_the_float32_kernel_rounded(dtype, b, h, nq, nk, d, causal, mask, dropout_p)


@EXAMPLES
@given(lead=st.lists(st.integers(1, 3), max_size=2), m=AWKWARD, k_in=AWKWARD, n_out=AWKWARD,
       rank=st.sampled_from([1, 2, 4, 7, 16, 33]), fn=st.sampled_from(["sin", "tanh"]),
       placement=st.sampled_from(["weight", "output"]), train_base=st.booleans(), with_bias=st.booleans(),
       omega=st.sampled_from([0.5, 2.0, 30.0]), seed=st.integers(0, 2**16))
def test_bounded_lora_linear(lead, m, k_in, n_out, rank, fn, placement, train_base, with_bias, omega, seed):
    check_bounded_lora_linear("cpp", "cpu", lead, m, k_in, n_out, rank, fn, placement, train_base, with_bias, omega,
                              seed)
