"""The cuda backend of gaussian_mixture (csrc/cuda/gaussian_mixture.cu).

Without a GPU this file checks the build, the registration and the Python glue (routing the
"cuda" extension to the CPU extension, which has the same functions and contract); the kernels
themselves run on the CPU in tests/test_cuda_emulated.py. Every kernel test below is marked
cuda and skipped, with its reason, elsewhere.
"""

import importlib
import math

import pytest
import torch

import lucidops
from lucidops import _ext, backends
from lucidops.ops.gaussian_mixture import gaussian_mixture
from lucidops.reference import gaussian_mixture as ref
from comparisons import rel_err
from test_gaussian_mixture import make_params, make_points  # the CPU tests' inputs

# The module (lucidops.ops.gaussian_mixture the attribute is the function).
gm_mod = importlib.import_module("lucidops.ops.gaussian_mixture")

HAS_CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (the cuda kernels cannot run here)")

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
EXT_FUNCTIONS = ("gaussian_mixture_forward", "gaussian_mixture_backward_max", "gaussian_phi", "gaussian_phi_backward")


def forward_backward(backend, tensors, reduce, cull, grad_seed=5):
    """(out, grads of the five inputs, grad_out) through the public function under ``backend``."""
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    with lucidops.use_backend(backend):
        out = gaussian_mixture(*inputs, reduce=reduce, cull_threshold=cull)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed),
                               dtype=torch.float64).to(dtype=out.dtype, device=out.device)
        out.backward(grad_out)
        assert backends.last_used("gaussian_mixture") == backend
        assert backends.last_used("gaussian_mixture_backward") == backend
    return out, [t.grad if t is not None else None for t in inputs], grad_out


def op_argmax(backend, points, means, prec, weight, bias, cull):
    """The arg-max (B, K) the backend's forward op returns, on the CPU."""
    flat = points.detach().reshape(-1, points.shape[-2], 3)
    with lucidops.use_backend(backend):
        _, arg = torch.ops.lucidops.gaussian_mixture(flat, means, prec, weight, bias, True, cull)
    return arg.cpu()


def float64_truth(tensors, reduce, cull, grad_out, argmax=None):
    """float64 reference forward, and backward routed through ``argmax`` when given (so that a
    float32 near-tie picking another winner does not count as a gradient error)."""
    x, mu, p, w, b = (t.detach().double().cpu() if t is not None else None for t in tensors)
    lead, n = x.shape[:-2], x.shape[-2]
    flat = x.reshape(math.prod(lead), n, 3)
    out, arg64 = ref.forward(flat, mu, p, w, b, reduce == "max", cull)
    g = grad_out.detach().double().cpu().reshape(out.shape)
    grads = ref.backward(g, flat, mu, p, w, argmax if argmax is not None else arg64, reduce == "max", cull)
    grads = [grads[0].reshape(x.shape), grads[1], grads[2], grads[3], grads[4] if b is not None else None]
    return out.reshape(*lead, *out.shape[1:]), grads, arg64


def assert_matches_float64(tensors, reduce, cull, out, arg, grads, grad_out):
    """A cuda run's output, arg-max (flat (B, K), for reduce max) and five gradients (None for a
    missing bias) against float64_truth, whose backward goes through the run's own arg-max."""
    dtype = tensors[0].dtype
    out64, grads64, arg64 = float64_truth(tensors, reduce, cull, grad_out, arg if reduce == "max" else None)
    assert rel_err(out, out64) < TOL[dtype]
    if reduce == "max" and dtype == torch.float64:
        assert torch.equal(arg, arg64)
    elif reduce == "max" and dtype == torch.float32:
        assert (arg == arg64).float().mean() > 0.95  # near-ties may differ in float32
    for name, g, g64 in zip(["points", "means", "precisions", "weight", "bias"], grads, grads64):
        if g64 is None:
            assert g is None, name
            continue
        assert g.shape == g64.shape and g.dtype == dtype, name
        assert rel_err(g, g64) < 4 * TOL[dtype], name


def tie_inputs(n, device):
    """(points, means, precisions, weight, bias) of 2 clouds of n points where points tie:
    channel 2 is the bias at every point, and cloud 1's points are all the same."""
    means, prec, weight, bias = make_params(4, 6, torch.float64, device, seed=41)
    weight[2] = 0.0
    points = make_points((2, n), torch.float64, device, seed=42)
    points[1] = points[1, 3]
    return points, means, prec, weight, bias


def assert_ties_went_to_point_zero(tensors, cull, arg, grad_points, grad_weight, grad_out):
    """On tie_inputs: every winner of cloud 1 and channel 2's winner in cloud 0 is point 0, so
    only point 0 of cloud 1 gets a gradient and channel 2's weight gradient is phi at point 0."""
    points, means, prec, weight, _ = (t.cpu() for t in tensors)
    assert (arg[1] == 0).all() and arg[0, 2] == 0
    assert grad_points[1, 1:].abs().max() == 0 and grad_points[1, 0].abs().max() > 0
    half = ref.cull_half_widths(means, prec, weight, cull) if cull else None
    phi0 = ref.gaussian_phi(points[:, 0], means, prec, half)  # (2, G)
    expected_w2 = (grad_out[:, 2:3].cpu() * phi0).sum(0)
    torch.testing.assert_close(grad_weight[2].cpu(), expected_w2, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------- here (no GPU needed)


def test_cuda_backend_is_registered_and_listed_by_info():
    for op in ("gaussian_mixture", "gaussian_mixture_backward"):
        entry = backends.registered_ops()[op]
        assert entry.impls["cuda"].__name__.startswith("_cuda_")
        assert entry.preference["cuda"].index("triton") < entry.preference["cuda"].index("cuda")
    from lucidops.cli import info

    text = info()
    section = text.split("\ngaussian_mixture\n", 1)[1].split("\n\n", 1)[0]
    cuda_part = section.split("  cuda: default ->", 1)[1]
    assert any(line.split()[:1] == ["cuda"] for line in cuda_part.splitlines()), section


@pytest.mark.slow
def test_cuda_extension_builds_and_exposes_the_gaussian_functions():
    problem = _ext._compiler_problem("cuda")
    if problem:
        pytest.skip(f"cannot build the CUDA extension here: {problem}")
    # The arch list of `lucidops build cuda` on a machine without a GPU: a cached build is reused.
    module = _ext.build("cuda", arch_list=["8.0", "9.0"])
    assert module.DEVICE == "cuda"
    for name in EXT_FUNCTIONS:
        assert callable(getattr(module, name)), name
    m, p, w, b = make_params(3, 4, torch.float32)
    x = make_points((2, 5), torch.float32)
    half = ref.cull_half_widths(m, p, w, None)
    # CPU tensors are refused before anything touches a GPU.
    with pytest.raises(RuntimeError, match="points must be a CUDA tensor"):
        module.gaussian_mixture_forward(x, m, p, w, b, half, False, True)
    with pytest.raises(RuntimeError, match="points must be a CUDA tensor"):
        module.gaussian_phi(x.reshape(-1, 3), m, p, half, False)


@pytest.mark.parametrize("reduce", ["max", "none"])
@pytest.mark.parametrize("cull", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_glue_with_the_extension_contract(monkeypatch, reduce, cull, dtype):
    """_cuda_forward/_cuda_backward against the reference, with _ext.load("cuda") answering with
    the CPU extension (same function names and contract): checks the dtype handling, the bias
    default and the reduce-none path of the Python side without a GPU."""
    cpu_ext = _ext.load("cpu")
    monkeypatch.setattr(_ext, "load", lambda kind: cpu_ext if kind == "cuda" else pytest.fail(kind))
    means, prec, weight, bias = make_params(5, 7, dtype, seed=3)
    points = make_points((2, 9), dtype, seed=4)
    for b in (bias, None):
        out, arg = gm_mod._cuda_forward(points, means, prec, weight, b, reduce == "max", cull)
        out64, arg64 = ref.forward(points.double(), means.double(), prec.double(), weight.double(),
                                   None if b is None else b.double(), reduce == "max", cull)
        assert out.dtype == dtype and out.shape == out64.shape
        assert rel_err(out, out64) < TOL[dtype]
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
        use_arg = arg if reduce == "max" else arg64
        grads = gm_mod._cuda_backward(grad, points, means, prec, weight, use_arg, reduce == "max", cull)
        grads64 = ref.backward(grad.double(), points.double(), means.double(), prec.double(), weight.double(),
                               use_arg, reduce == "max", cull)
        for name, g, g64 in zip(["points", "means", "precisions", "weight", "bias"], grads, grads64):
            assert g.dtype == dtype and g.shape == g64.shape, name
            assert rel_err(g, g64) < 4 * TOL[dtype], name


# ---------------------------------------------------------------- on a GPU


CASES = [  # (leading dims, N, G, K)
    ((1,), 1, 1, 1),  # N = 1, G = 1, K = 1
    ((3,), 67, 7, 9),  # N not a multiple of the 64-point tile, K odd
    ((2, 3), 300, 33, 131),  # batch dims; 2 chunks of 256 points, 2 Gaussian tiles, 2 channel blocks
    ((), 33, 3, 17),  # a single cloud without batch dims
    ((70,), 5, 4, 40),  # more clouds than backward slices (64)
    ((2,), 256, 32, 128),  # exact multiples: one full chunk, 4 full tiles, one fp32 Gaussian tile, one channel block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("reduce", ["max", "none"])
@pytest.mark.parametrize("cull", [None, 0.3])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.cuda
@needs_gpu
def test_cuda_matches_float64_reference(dtype, case, reduce, cull, with_bias):
    lead, n, G, K = case
    means, prec, weight, bias = make_params(G, K, dtype, "cuda", seed=n + G)
    points = make_points((*lead, n), dtype, "cuda", seed=K)
    tensors = (points, means, prec, weight, bias if with_bias else None)
    out, grads, grad_out = forward_backward("cuda", tensors, reduce, cull)
    assert out.shape == ((*lead, K) if reduce == "max" else (*lead, n, K))
    assert out.dtype == dtype and out.is_cuda
    arg = op_argmax("cuda", *tensors, cull) if reduce == "max" else None
    assert_matches_float64(tensors, reduce, cull, out, arg, grads, grad_out)


@pytest.mark.parametrize("reduce", ["max", "none"])
@pytest.mark.parametrize("cull", [None, 0.4])
@pytest.mark.cuda
@needs_gpu
def test_cuda_gradcheck_float64(reduce, cull):
    means, prec, weight, bias = make_params(4, 5, torch.float64, "cuda", seed=7)
    points = make_points((2, 6), torch.float64, "cuda", seed=8)
    inputs = tuple(t.clone().requires_grad_(True) for t in (points, means, prec, weight, bias))
    with lucidops.use_backend("cuda"):
        assert torch.autograd.gradcheck(
            lambda *a: gaussian_mixture(*a, reduce=reduce, cull_threshold=cull), inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [5, 65, 300])  # one tile, two tiles, two chunks
@pytest.mark.parametrize("cull", [None, 0.05])
@pytest.mark.cuda
@needs_gpu
def test_cuda_ties_go_to_the_lowest_point_index(n, cull):
    tensors = tie_inputs(n, "cuda")
    points, means, prec, weight, bias = tensors
    inputs = [t.clone().requires_grad_(True) for t in tensors]
    grad_out = torch.randn(2, 6, generator=torch.Generator().manual_seed(43), dtype=torch.float64).cuda()
    with lucidops.use_backend("cuda"):
        out = gaussian_mixture(*inputs, cull_threshold=cull)
        out.backward(grad_out)
    arg = op_argmax("cuda", points, means, prec, weight, bias, cull)
    assert_ties_went_to_point_zero(tensors, cull, arg, inputs[0].grad, inputs[3].grad, grad_out)
    # The same winners as the cpp backend on the same inputs.
    arg_cpp = op_argmax("cpp", *(t.cpu() for t in (points, means, prec, weight, bias)), cull)
    assert torch.equal(arg, arg_cpp)


@pytest.mark.cuda
@needs_gpu
def test_cuda_non_contiguous_inputs_and_empty_batch():
    G, K = 5, 7
    means, prec, weight, bias = make_params(G, K, torch.float32, "cuda", seed=51)
    points = make_points((3, 20), torch.float32, "cuda", seed=52)
    views = (points.transpose(1, 2).contiguous().transpose(1, 2), torch.cat([means, means], dim=1)[:, ::2],
             prec.t().contiguous().t(), weight.t().contiguous().t(), torch.stack([bias, bias], dim=1)[:, 0])
    assert not any(v.is_contiguous() for v in views)
    for reduce in ("max", "none"):
        with lucidops.use_backend("cuda"):
            out = gaussian_mixture(*views, reduce=reduce)
            expected = gaussian_mixture(*(v.contiguous() for v in views), reduce=reduce)
        assert torch.equal(out, expected)
    empty = torch.empty(0, 4, 20, 3, device="cuda", requires_grad=True)
    w = weight.clone().requires_grad_(True)
    with lucidops.use_backend("cuda"):
        out = gaussian_mixture(empty, means, prec, w, bias)
        out.sum().backward()
    assert out.shape == (0, 4, K) and empty.grad.shape == empty.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("reduce", ["max", "none"])
@pytest.mark.cuda
@needs_gpu
def test_cuda_gradients_are_bitwise_reproducible(reduce):
    """No atomics: two runs give identical bits, even with many channels sharing arg-max points."""
    means, prec, weight, bias = make_params(40, 300, torch.float32, "cuda", seed=71)
    points = make_points((3, 500), torch.float32, "cuda", seed=72)
    runs = [forward_backward("cuda", (points, means, prec, weight, bias), reduce, 0.1) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for g0, g1 in zip(runs[0][1], runs[1][1]):
        assert torch.equal(g0, g1)


@pytest.mark.cuda
@needs_gpu
def test_cuda_culled_matches_cpp_and_stays_within_g_t_of_dense():
    t = 0.1
    means, prec, weight, bias = make_params(32, 64, torch.float32, "cuda", seed=81)
    points = make_points((4, 700), torch.float32, "cuda", seed=82)
    with lucidops.use_backend("cuda"):
        culled = gaussian_mixture(points, means, prec, weight, bias, cull_threshold=t)
        dense = gaussian_mixture(points, means, prec, weight, bias)
        culled_rows = gaussian_mixture(points, means, prec, weight, bias, reduce="none", cull_threshold=t)
    with lucidops.use_backend("cpp"):
        cpu = [x.cpu() for x in (points, means, prec, weight, bias)]
        culled_cpp = gaussian_mixture(*cpu, cull_threshold=t)
        culled_rows_cpp = gaussian_mixture(*cpu, reduce="none", cull_threshold=t)
    assert (culled - dense).abs().max().item() <= 32 * t
    assert not torch.equal(culled, dense)  # the threshold does cull something here
    torch.testing.assert_close(culled.cpu(), culled_cpp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(culled_rows.cpu(), culled_rows_cpp, rtol=1e-5, atol=1e-5)
    # Culled pairs are exactly the reference's: where the reference's phi is 0, the rows agree
    # with a mixture that leaves those Gaussians out, within float32 rounding.
    half = ref.cull_half_widths(means, prec, weight, t)
    phi = ref.gaussian_phi(points, means, prec, half)
    rows = phi @ weight.t() + bias
    torch.testing.assert_close(culled_rows, rows, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@needs_gpu
def test_cuda_reduce_max_never_materialises_n_by_k():
    B, N, G, K = 4, 4096, 32, 1024
    means, prec, weight, bias = make_params(G, K, torch.float32, "cuda", seed=91)
    points = make_points((B, N), torch.float32, "cuda", seed=92).requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with lucidops.use_backend("cuda"):
        out = gaussian_mixture(points, means, prec, w, bias)
        out.sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    one_cloud_nk = N * K * 4  # a single (N, K) float32 slab
    assert peak < one_cloud_nk / 2, f"peak {peak} bytes vs one (N, K) slab {one_cloud_nk}"
    assert torch.isfinite(points.grad).all() and points.grad.abs().sum() > 0


@pytest.mark.cuda
@needs_gpu
def test_cuda_extension_rejects_bad_arguments():
    ext = _ext.load("cuda")
    m, p, w, b = make_params(3, 4, torch.float32, "cuda")
    x = make_points((2, 5), torch.float32, "cuda")
    half = ref.cull_half_widths(m, p, w, None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ext.gaussian_mixture_forward(x.half(), m.half(), p.half(), w.half(), b.half(), half.half(), False, True)
    with pytest.raises(RuntimeError, match="means must be"):
        ext.gaussian_mixture_forward(x, m[:, :2], p, w, b, half, False, True)
    grad = torch.ones(2, 4, device="cuda")
    bad_arg = torch.full((2, 4), 5, dtype=torch.long, device="cuda")  # N = 5: index 5 is out of range
    with pytest.raises(RuntimeError, match="argmax out of range"):
        ext.gaussian_mixture_backward_max(grad, x, m, p, w, bad_arg, half, False)
