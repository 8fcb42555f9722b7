"""gaussian_mixture: every backend against the float64 reference; culling, ties, bad input, module."""

import math

import pytest
import torch

import lucidops
from lucidops import backends
from lucidops.nn.gaussian_mixture import GaussianPointEncoder, precision_from_factor
from lucidops.ops.gaussian_mixture import backward_flops, forward_flops, gaussian_mixture
from lucidops.reference import gaussian_mixture as ref
from comparisons import rel_err
from conftest import backend_device_params

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 1e-2}
UPPER = ([0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2])
IMPLEMENTED = set(backends.registered_ops()["gaussian_mixture"].impls)


def backend_params():
    """(backend, device) pairs of this session that gaussian_mixture implements."""
    return backend_device_params("gaussian_mixture")


def make_params(G, K, dtype=torch.float64, device="cpu", seed=0, spread=0.3, scale=2.0):
    """Random SPD precisions (L L^T with L near scale * I), means in the unit cube, mixer."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(G, 3, generator=gen, dtype=torch.float64) * 2 - 1
    factor = torch.eye(3, dtype=torch.float64) * scale + spread * torch.randn(G, 3, 3, generator=gen, dtype=torch.float64)
    prec = (factor @ factor.transpose(1, 2))[:, UPPER[0], UPPER[1]]
    weight = torch.randn(K, G, generator=gen, dtype=torch.float64)
    bias = torch.randn(K, generator=gen, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (means, prec, weight, bias)]


def make_points(shape, dtype=torch.float64, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, 3, generator=gen, dtype=torch.float64) * 2.4 - 1.2).to(dtype=dtype, device=device)


def run_op(backend, points, means, prec, weight, bias, reduce="max", cull=None, grad_seed=5):
    """Forward + backward through the public function; returns (out, grads of the 5 inputs)."""
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in (points, means, prec, weight, bias)]
    with lucidops.use_backend(backend):
        out = gaussian_mixture(*inputs, reduce=reduce, cull_threshold=cull)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed),
                               dtype=torch.float64).to(out.dtype).to(out.device)
        out.backward(grad_out)
        assert backends.last_used("gaussian_mixture") == backend
        assert backends.last_used("gaussian_mixture_backward") == backend
    grads = [t.grad if t is not None else None for t in inputs]
    return out, grads, grad_out


def ground_truth(points, means, prec, weight, bias, reduce, cull, grad_out, argmax=None, dtype=torch.float64):
    """float64 forward and backward. For "max" the backward is routed through ``argmax``
    (the backend's own, so that a float32 near-tie cannot swap the winner) by the reference
    backward, which test_reference_backward_matches_autograd checks against autograd.

    ``dtype=torch.float32`` gives the reference in float32 instead: there the culling rule's
    x - mu is rounded as the float32 kernels round it, so a point within a rounding of a box
    face is culled (or kept) as they cull it, where float64 may decide the other way."""
    x, mu, p, w = (t.detach().to(dtype).cpu() for t in (points, means, prec, weight))
    b = bias.detach().to(dtype).cpu() if bias is not None else None
    lead, n = x.shape[:-2], x.shape[-2]
    flat = x.reshape(math.prod(lead), n, 3)
    out, arg64 = ref.forward(flat, mu, p, w, b, reduce == "max", cull)
    g = grad_out.detach().to(dtype).cpu().reshape(out.shape)
    use_arg = argmax if argmax is not None else arg64
    grads = ref.backward(g, flat, mu, p, w, use_arg, reduce == "max", cull)
    gx = grads[0].reshape(x.shape)
    out = out.reshape(*lead, *out.shape[1:])
    return out, [gx, grads[1], grads[2], grads[3], grads[4] if b is not None else None], arg64


def backend_argmax(backend, points, means, prec, weight, bias, cull):
    lead, n = points.shape[:-2], points.shape[-2]
    flat = points.detach().reshape(math.prod(lead), n, 3)
    with lucidops.use_backend(backend):
        _, arg = torch.ops.lucidops.gaussian_mixture(flat, means.detach(), prec.detach(), weight.detach(),
                                                     None if bias is None else bias.detach(), True, cull)
    return arg.cpu()


CASES = [  # (leading dims, N, G, K)
    ((1,), 1, 1, 1),
    ((3,), 5, 7, 9),
    ((2, 3), 67, 32, 64),
    ((3,), 67, 7, 9),
    ((2,), 600, 5, 11),  # several 256-point chunks: the cross-chunk max merge
    ((), 33, 3, 17),  # a single cloud without batch dims
    ((2,), 40, 70, 33),  # G > 32: triton's 128-wide Gaussian tiles
    ((2,), 37, 150, 9),  # G > 128: triton's backward takes the Gaussians in two 128-wide blocks
]


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("reduce", ["max", "none"])
@pytest.mark.parametrize("cull", [None, 0.3])
def test_matches_float64_reference(backend, device, dtype, case, reduce, cull, poison_allocator):
    lead, n, G, K = case
    if dtype == torch.bfloat16 and (case[1] > 100 or backend == "triton"):
        pytest.skip("bf16 runs on the smaller cases (triton: half inputs are upcast, as for fp32)")
    if backend == "triton" and device == "cpu" and math.prod(lead) * n * K > 3000 and (dtype, cull) != (torch.float32, None):
        pytest.skip("the interpreter is slow: large cases run in float32, unculled only")
    means, prec, weight, bias = make_params(G, K, dtype, device, seed=n + G)
    points = make_points((*lead, n), dtype, device, seed=K)
    poison_allocator(math.prod(lead) * n * K * 4, device, dtype)
    out, grads, grad_out = run_op(backend, points, means, prec, weight, bias, reduce, cull)
    expected_shape = (*lead, K) if reduce == "max" else (*lead, n, K)
    assert out.shape == expected_shape and out.dtype == dtype and out.device.type == device
    arg = backend_argmax(backend, points, means, prec, weight, bias, cull) if reduce == "max" else None
    out64, grads64, arg64 = ground_truth(points, means, prec, weight, bias, reduce, cull, grad_out, arg)
    tol = TOL[dtype]
    assert rel_err(out, out64) < tol
    if reduce == "max" and dtype != torch.bfloat16:
        # The backend's winner attains the float64 max up to rounding (near-ties may differ).
        assert (arg == arg64).float().mean() > 0.95
    for name, g, g64 in zip(["points", "means", "precisions", "weight", "bias"], grads, grads64):
        assert g.shape == g64.shape and g.dtype == dtype, name
        assert rel_err(g, g64) < tol * 4, name


@pytest.mark.parametrize("reduce", ["max", "none"])
@pytest.mark.parametrize("cull", [None, 0.3])
def test_reference_backward_matches_autograd(reduce, cull):
    means, prec, weight, bias = make_params(6, 10, seed=3)
    points = make_points((2, 3, 40), seed=4)
    out, grads, grad_out = run_op("reference", points, means, prec, weight, bias, reduce, cull)
    inputs = [t.clone().requires_grad_(True) for t in (points, means, prec, weight, bias)]
    expected = ref.gaussian_mixture(*inputs, reduce=reduce, cull_threshold=cull)
    expected.backward(grad_out)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)
    for g, t in zip(grads, inputs):
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-12)


CPU_BACKENDS = ["reference", "cpp"] + (["triton"] if "triton" in IMPLEMENTED and backends.triton_interpreting() else [])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduce", ["max", "none"])
@pytest.mark.parametrize("cull", [None, 0.4])
def test_gradcheck_float64(backend, reduce, cull):
    """Every backend's gradient against finite differences. The interpreted Triton kernels check
    random projections of the Jacobian (gradcheck's fast mode: a wrong gradient still fails),
    the full Jacobian's 194 interpreted calls having taken 10-24 s per case."""
    means, prec, weight, bias = make_params(4, 5, seed=7)
    points = make_points((2, 6), seed=8)
    inputs = tuple(t.clone().requires_grad_(True) for t in (points, means, prec, weight, bias))
    with lucidops.use_backend(backend):
        assert torch.autograd.gradcheck(
            lambda *a: gaussian_mixture(*a, reduce=reduce, cull_threshold=cull), inputs, eps=1e-6, atol=1e-6,
            fast_mode=backend == "triton")


# ---------------------------------------------------------------- culling


def test_cull_half_widths_follow_the_rule():
    means, prec, weight, _ = make_params(5, 8, seed=11)
    weight[:, 2] = 0.05  # alpha = 0.05 <= t: dropped everywhere
    t = 0.1
    half = ref.cull_half_widths(means, prec, weight, t)
    sigma = torch.linalg.inv(ref.precision_matrix(prec))
    alpha = weight.abs().amax(dim=0)
    for g in range(5):
        if g == 2:
            assert (half[g] < 0).all()
            continue
        expected = torch.sqrt(2 * torch.log(alpha[g] / t) * torch.diagonal(sigma[g]))
        torch.testing.assert_close(half[g], expected, rtol=1e-12, atol=0)
    assert torch.isinf(ref.cull_half_widths(means, prec, weight, None)).all()
    # float32 half-widths are rounded up, never below the exact ones.
    m32, p32, w32 = means.float(), prec.float(), weight.float()
    half32 = ref.cull_half_widths(m32, p32, w32, t)
    exact = ref.cull_half_widths(m32.double(), p32.double(), w32.double(), t)
    assert half32.dtype == torch.float32 and (half32.double() >= exact).all()
    assert ((half32.double() - exact).abs() <= 1e-6 * exact.abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cull_half_widths_are_the_same_on_the_gpu_path(dtype):
    """cull_half_widths computes in NumPy for CPU tensors and in torch for GPU ones (no
    synchronisation there): the two must draw the same boxes. The torch path, run here on the
    CPU, against the NumPy one. The libraries' float64 sqrt and log may round an ulp apart
    (torch's sqrt did in 9 of 1000 random arguments), which a nearly singular precision's
    cofactors amplify (to 2e-12 relative here): the float32 boxes may then sit one float32
    ulp apart, the float64 ones within 1e-10."""
    from lucidops._dtypes import opmath_dtype
    from lucidops.reference.gaussian_mixture import _half_widths_float64, _rounded_up

    g = torch.Generator().manual_seed(21)
    kinds = set()
    for case in range(60):
        G = 24
        factor = torch.randn(G, 3, 3, generator=g).tril() * 10 ** torch.empty(G, 1, 1).uniform_(-3, 3, generator=g)
        matrices = factor @ factor.transpose(1, 2)
        if case % 5 == 0:  # indefinite and singular precisions: no box
            matrices[:4] = torch.randn(4, 3, 3, generator=g)
            matrices[:4] = matrices[:4] + matrices[:4].transpose(1, 2)
            matrices[4] = 0
        prec = matrices[:, [0, 0, 0, 1, 1, 2], [0, 1, 2, 1, 2, 2]].to(dtype)
        weight = (torch.randn(7, G, generator=g) * 10 ** torch.empty(1).uniform_(-2, 2, generator=g)).to(dtype)
        weight[:, 5] = 0  # alpha = 0 <= t: culled everywhere
        t = float(10 ** torch.empty(1).uniform_(-4, 0, generator=g))
        on_cpu = ref.cull_half_widths(torch.zeros(G, 3, dtype=dtype), prec, weight, t)
        alpha = weight.abs().amax(dim=0).double()
        exact = _half_widths_float64(prec.double(), alpha, t, torch)
        on_gpu_path = _rounded_up(exact, opmath_dtype(dtype), torch)
        assert (on_gpu_path.double() >= exact).all()  # rounded up, as on the CPU path
        assert on_cpu.dtype == on_gpu_path.dtype == opmath_dtype(dtype)
        assert (on_cpu[5] == -1).all()
        kinds.update(("no box" if torch.isinf(row).all() else "culled everywhere" if (row == -1).all() else "box")
                     for row in on_cpu)
        if dtype == torch.float64:
            torch.testing.assert_close(on_cpu, on_gpu_path, rtol=1e-10, atol=0)
        else:
            neighbours = (torch.nextafter(on_cpu, torch.full_like(on_cpu, -math.inf)),
                          torch.nextafter(on_cpu, torch.full_like(on_cpu, math.inf)))
            assert ((on_gpu_path == on_cpu) | (on_gpu_path == neighbours[0]) | (on_gpu_path == neighbours[1])).all()
    assert kinds == {"no box", "culled everywhere", "box"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kernels_cull_exactly_the_reference_pairs(dtype):
    from lucidops import _ext

    means, prec, weight, _ = make_params(9, 12, dtype, seed=13, scale=3.0)
    points = make_points((500,), dtype, seed=14)
    t = 0.2
    half = ref.cull_half_widths(means, prec, weight, t)
    phi_ref = ref.gaussian_phi(points, means, prec, half)
    phi_cpp = _ext.load("cpu").gaussian_phi(points, means, prec, half, True)
    culled_ref = phi_ref == 0
    assert culled_ref.any() and (~culled_ref).any(), "the test needs both culled and kept pairs"
    assert torch.equal(phi_cpp == 0, culled_ref)
    if "triton" in CPU_BACKENDS:
        from lucidops.triton_kernels import gaussian_mixture as tk

        assert torch.equal(tk.phi(points, means, prec, half, True) == 0, culled_ref)
    dense = ref.gaussian_phi(points, means, prec)
    assert (dense[culled_ref] > 0).all()  # culled pairs were not zero to begin with


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduce", ["max", "none"])
def test_culled_within_g_t_of_dense_and_identical_across_backends(backend, device, reduce):
    G, K, t = 16, 24, 0.1
    means, prec, weight, bias = make_params(G, K, torch.float64, device, seed=21, scale=3.0)
    weight[:, 0] = 0.05  # one Gaussian below the threshold everywhere
    # Spatially clustered clouds, so whole tiles miss some boxes (the tile-skip path).
    centers = make_points((4, 1), seed=22)
    points = (centers + 0.15 * torch.randn(4, 300, 3, generator=torch.Generator().manual_seed(23),
                                            dtype=torch.float64)).to(device)
    with lucidops.use_backend(backend):
        dense = gaussian_mixture(points, means, prec, weight, bias, reduce=reduce)
        culled = gaussian_mixture(points, means, prec, weight, bias, reduce=reduce, cull_threshold=t)
    diff = (culled - dense).abs()
    assert diff.max() > 0, "culling changed nothing: the test would not notice a no-op"
    assert diff.max() <= G * t
    expected = ref.gaussian_mixture(points.cpu(), means.cpu(), prec.cpu(), weight.cpu(), bias.cpu(), reduce=reduce,
                                    cull_threshold=t)
    torch.testing.assert_close(culled.cpu(), expected, rtol=1e-13, atol=1e-13)


def test_cull_skips_gaussians_far_from_every_point():
    means, prec, weight, bias = make_params(3, 4, seed=31, scale=4.0)
    means[1] = torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64)
    weight[:, 1] = 1e6  # dense: this Gaussian still adds a tiny nonzero amount to every point
    points = make_points((2, 70), seed=32)
    half = ref.cull_half_widths(means, prec, weight, 0.5)
    keep = [0, 2]
    expected = ref.gaussian_phi(points, means[keep], prec[keep], half[keep]) @ weight[:, keep].t() + bias
    for backend in [b for b in sorted(IMPLEMENTED) if backends.backend_problem(b, "cpu") is None]:
        with lucidops.use_backend(backend):
            culled = gaussian_mixture(points, means, prec, weight, bias, reduce="none", cull_threshold=0.5)
            dense = gaussian_mixture(points, means, prec, weight, bias, reduce="none")
        torch.testing.assert_close(culled, expected, rtol=1e-13, atol=1e-13)
        assert (ref.gaussian_phi(points, means, prec)[..., 1] > 0).any()
        assert not torch.equal(culled, dense)


# ---------------------------------------------------------------- ties


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("n", [5, 40, 300])
@pytest.mark.parametrize("cull", [None, 0.05])  # culling visits points in a spatial order
def test_ties_go_to_the_lowest_point_index(backend, device, n, cull):
    means, prec, weight, bias = make_params(4, 6, torch.float64, device, seed=41)
    weight[2] = 0.0  # channel 2 is constant over the points: every point ties
    points = make_points((2, n), torch.float64, device, seed=42)
    points[1] = points[1, 3]  # cloud 1: all points identical, every channel ties everywhere
    inputs = [t.clone().requires_grad_(True) for t in (points, means, prec, weight, bias)]
    grad_out = torch.randn(2, 6, generator=torch.Generator().manual_seed(43), dtype=torch.float64).to(device)
    with lucidops.use_backend(backend):
        out = gaussian_mixture(*inputs, cull_threshold=cull)
        out.backward(grad_out)
    gx = inputs[0].grad
    assert gx[1, 1:].abs().max() == 0 and gx[1, 0].abs().max() > 0
    # Channel 2's weight gradient comes from point 0 of each cloud.
    half = ref.cull_half_widths(means.cpu(), prec.cpu(), weight.cpu(), cull) if cull else None
    phi0 = ref.gaussian_phi(points[:, 0].cpu(), means.cpu(), prec.cpu(), half)  # (2, G)
    expected_w2 = (grad_out[:, 2:3].cpu() * phi0).sum(0)
    torch.testing.assert_close(inputs[3].grad[2].cpu(), expected_w2, rtol=1e-12, atol=1e-14)
    arg = backend_argmax(backend, points, means, prec, weight, bias, cull)
    assert (arg[1] == 0).all() and arg[0, 2] == 0


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_copies_of_a_point_give_the_max_to_the_first_copy(backend, device, dtype):
    """Clouds padded or resampled with repeated points: every backend gives the max (and its
    gradient) to the first copy. The reference's BLAS product rounds identical rows of phi
    differently (float32, G 5, K 9, N 40: it picked copy 1), so it maps copies explicitly."""
    means, prec, weight, bias = (t.to(dtype) for t in make_params(5, 9, torch.float64, device, seed=44))
    points = make_points((4, 40), dtype, device, seed=45)
    points[:2] = points[:2, 7:8]  # clouds 0, 1: 40 copies of one point
    points[2, 20:] = points[2, 5:25].clone()  # cloud 2: points 5..24 repeated at 20..39
    points[3, ::2] = points[3, 1::2]  # cloud 3: each odd point repeated just before it
    arg = backend_argmax(backend, points, means, prec, weight, bias, None)
    assert (arg[:2] == 0).all(), arg[:2]
    first = ref.lowest_duplicate(points.cpu())
    assert torch.equal(first.gather(1, arg), arg)  # never a later copy
    assert torch.equal(first[3], torch.arange(0, 40, 2).repeat_interleave(2))
    inputs = [t.clone().requires_grad_(True) for t in (points, means, prec, weight, bias)]
    with lucidops.use_backend(backend):
        gaussian_mixture(*inputs).sum().backward()
    later_copies = first.to(device) != torch.arange(40, device=device)
    assert inputs[0].grad[later_copies].abs().max() == 0


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distinct_points_that_every_gaussian_sees_alike_give_the_max_to_the_first(backend, device, dtype):
    """Gaussians far wider than the cloud: phi is exactly 1 at every (distinct) point, so every
    channel ties over all points. The reference's BLAS product rounded the identical rows by
    their position and gave the max (and its gradient) to points 1 and 3 of 37."""
    means = torch.zeros(5, 3, dtype=dtype, device=device)
    prec = torch.tensor([1e-30, 0.0, 0.0, 1e-30, 0.0, 1e-30], dtype=dtype, device=device).repeat(5, 1)
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(6, 5, generator=generator, dtype=dtype).to(device)
    bias = torch.randn(6, generator=generator, dtype=dtype).to(device)
    points = (torch.rand(2, 37, 3, generator=generator, dtype=dtype) * 2 - 1).to(device)
    assert (ref.gaussian_phi(points.cpu(), means.cpu(), prec.cpu(), None) == 1).all()  # every row alike
    arg = backend_argmax(backend, points, means, prec, weight, bias, None)
    assert (arg == 0).all(), arg
    inputs = [t.clone().requires_grad_(True) for t in (points, means, prec, weight, bias)]
    with lucidops.use_backend(backend):
        gaussian_mixture(*inputs).sum().backward()
    assert inputs[0].grad[:, 1:].abs().max() == 0


# ---------------------------------------------------------------- layouts


@pytest.mark.parametrize("backend,device", backend_params())
def test_non_contiguous_and_empty_batch(backend, device):
    G, K = 5, 7
    means, prec, weight, bias = make_params(G, K, torch.float32, device, seed=51)
    points = make_points((3, 20), torch.float32, device, seed=52)
    views = (points.transpose(1, 2).contiguous().transpose(1, 2),  # (3, 20, 3) with strides of (3, 3, 20)
             torch.cat([means, means], dim=1)[:, ::2],
             prec.t().contiguous().t(),
             weight.t().contiguous().t(),
             torch.stack([bias, bias], dim=1)[:, 0])
    assert not any(v.is_contiguous() for v in views)
    for reduce in ("max", "none"):
        with lucidops.use_backend(backend):
            out = gaussian_mixture(*views, reduce=reduce)
            expected = gaussian_mixture(*(v.contiguous() for v in views), reduce=reduce)
        if backend == "reference":
            # PyTorch's matmul may round differently for a transposed operand or another
            # alignment (a CI run saw it): the reference is held to the layout, not the bits.
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
        else:  # the kernels read any layout into the same computation: bitwise
            assert torch.equal(out, expected)
    empty = torch.empty(0, 4, 20, 3, device=device, requires_grad=True)
    w = weight.clone().requires_grad_(True)
    with lucidops.use_backend(backend):
        out = gaussian_mixture(empty, means, prec, w, bias)
        out.sum().backward()
    assert out.shape == (0, 4, K) and empty.grad.shape == empty.shape
    assert torch.equal(w.grad, torch.zeros_like(w))


# ---------------------------------------------------------------- bad input


def _bad_cases():
    m, p, w, b = make_params(4, 5, torch.float32, seed=61)
    x = make_points((2, 8), torch.float32, seed=62)
    return [
        (dict(points=x.numpy()), TypeError, "points"),
        (dict(points=x.long()), TypeError, "points"),
        (dict(points=x[..., :2]), ValueError, "points"),
        (dict(points=x[0, 0]), ValueError, "points"),
        (dict(points=x[:, :0]), ValueError, "points"),
        (dict(means=m[:, :2]), ValueError, "means"),
        (dict(means=m[:0], precisions=p[:0], weight=w[:, :0]), ValueError, "means"),
        (dict(precisions=p[:3]), ValueError, "precisions"),
        (dict(precisions=p[:, :5]), ValueError, "precisions"),
        (dict(weight=w[:, :3]), ValueError, "weight"),
        (dict(weight=w[0]), ValueError, "weight"),
        (dict(bias=b[:4]), ValueError, "bias"),
        (dict(means=m.double()), TypeError, "means"),
        (dict(weight=w.half()), TypeError, "weight"),
        (dict(bias=b.double()), TypeError, "bias"),
        (dict(points=x.clone().index_put_((torch.tensor([0]),), torch.tensor(float("nan")))), ValueError,
         r"points must be finite \(it holds NaN or inf\)"),
        # The finiteness check's own message: the overflow check's message names these arguments too.
        (dict(means=m.clone().fill_(float("inf"))), ValueError, r"means must be finite \(it holds NaN or inf\)"),
        (dict(precisions=p.clone().fill_(float("nan"))), ValueError, r"precisions must be finite \(it holds NaN or inf\)"),
        (dict(weight=w.clone().fill_(float("-inf"))), ValueError, r"weight must be finite \(it holds NaN or inf\)"),
        # One bad value among finite ones, last in memory (the check reduces max |w|).
        (dict(weight=w.clone().index_put_((torch.tensor([-1]), torch.tensor([-1])), torch.tensor(float("nan")))),
         ValueError, r"weight must be finite \(it holds NaN or inf\)"),
        (dict(bias=b.clone().fill_(float("nan"))), ValueError, r"bias must be finite \(it holds NaN or inf\)"),
        # Finite, but past float32 inside the op: (x - mu)^T P (x - mu) was +inf - inf = NaN.
        (dict(points=x.clone().index_put_((torch.tensor([0]),), torch.tensor(2e19))), ValueError,
         r"points lie up to .* can overflow float32.*pass float64"),
        (dict(weight=w.clone().fill_(1e38)), ValueError, r"weight \(up to 1e\+38 over 4 Gaussians\) and bias"),
        (dict(weight=w.clone().fill_(2e37), bias=b.clone().fill_(3e38)), ValueError,
         r"and bias \(up to 3e\+38\): the mixer's sums can overflow"),
        (dict(reduce="mean"), ValueError, "reduce"),
        (dict(cull_threshold=0.0), ValueError, "cull_threshold"),
        (dict(cull_threshold=-1.0), ValueError, "cull_threshold"),
        (dict(cull_threshold=float("nan")), ValueError, "cull_threshold"),
        (dict(cull_threshold="0.1"), TypeError, "cull_threshold"),
        # Indefinite: phi grows away from the mean and overflows; the reference crashed on the
        # NaN (0 * inf) with an index error while the kernels passed over it.
        (dict(precisions=p.clone().index_put_((torch.tensor([2]), torch.tensor([3])), torch.tensor(-1.0))),
         ValueError, r"precisions must be positive semidefinite: Gaussian\(s\) 2 have"),
    ], dict(points=x, means=m, precisions=p, weight=w, bias=b)


@pytest.mark.parametrize("index", range(len(_bad_cases()[0])))  # every case, however many
def test_bad_input_raises_naming_the_argument(index):
    cases, good = _bad_cases()
    change, exc, name = cases[index]
    kwargs = {**good, **change}
    with pytest.raises(exc, match=name):
        gaussian_mixture(**kwargs)


def test_a_large_finite_bias_within_float32_runs():
    """The mixer bound was refused from half of float32's range on, blaming weight: a bias
    of 2e38 plus at most G max|W| = 2 is a float32, and every backend gives it."""
    points = make_points((1, 8), torch.float32, seed=91)
    means, prec = torch.rand(4, 3), torch.tensor([[1.0, 0, 0, 1, 0, 1]]).repeat(4, 1)
    weight, bias = torch.full((2, 4), 0.5), torch.tensor([2e38, 0.0])
    expected = ref.gaussian_mixture(points.double(), means.double(), prec.double(), weight.double(), bias.double())
    for backend in CPU_BACKENDS:
        with backends.use_backend(backend):
            out = gaussian_mixture(points, means, prec, weight, bias)
        assert torch.isfinite(out).all(), backend
        torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=0)


def test_far_points_are_refused_in_float32_and_exact_in_float64():
    """A point 2e19 from the means (precisions with off-diagonal terms) squared past float32:
    p00 d0^2 = +inf, 2 p01 d0 d1 = -inf, so phi was NaN and the output NaN (or, where the
    kernels' max passed over it, some other point's value). Refused in float32; in float64
    every backend agrees, the far point contributing 0. Just inside the bound it runs."""
    means = torch.zeros(2, 3)
    prec = torch.tensor([[2.0, -1.5, 0.0, 2.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0, 0.0, 1.0]])
    weight = torch.tensor([[1.0, -0.5], [0.5, 2.0]])
    points = torch.tensor([[[0.1, 0.2, 0.0], [2e19, 2e19, 0.0]]])
    with pytest.raises(ValueError, match="points lie up to 2e\\+19"):
        gaussian_mixture(points, means, prec, weight)
    exact = ref.gaussian_mixture(points[:, :1].double(), means.double(), prec.double(), weight.double(),
                                 reduce="none")
    for backend in CPU_BACKENDS:
        with backends.use_backend(backend):
            out = gaussian_mixture(points.double(), means.double(), prec.double(), weight.double(), reduce="none")
        assert torch.equal(out[:, 1], torch.zeros_like(out[:, 1])), backend
        torch.testing.assert_close(out[:, :1], exact, rtol=1e-12, atol=0)
    near = points.clone()
    near[0, 1] = 1e18
    for backend in CPU_BACKENDS:
        with backends.use_backend(backend):
            out = gaussian_mixture(near, means, prec, weight, reduce="none")
        assert torch.isfinite(out).all() and torch.equal(out[:, 1], torch.zeros_like(out[:, 1])), backend


def test_encoder_names_the_points_when_their_dtype_is_not_its_own():
    """float64 points into a float32 encoder: the op's error named means, a parameter the
    caller never passed. Under autocast half points still meet float32 parameters."""
    enc = GaussianPointEncoder(4, 8)
    with pytest.raises(TypeError, match=r"points are torch.float64 but this GaussianPointEncoder is torch.float32"):
        enc(torch.rand(2, 50, 3, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert enc(torch.rand(2, 50, 3).bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_singular_precisions_rounded_to_their_dtype_are_accepted(dtype):
    """L L^T with a zero on L's diagonal is singular, positive semidefinite: rounding it to
    the dtype can show a tiny negative eigenvalue, which must not read as indefinite."""
    g = torch.Generator().manual_seed(71)
    factor = torch.randn(64, 3, 3, generator=g, dtype=torch.float64).tril() * 3
    factor[:, 2, 2] = 0.0
    prec = (factor @ factor.transpose(1, 2))[:, UPPER[0], UPPER[1]].to(dtype)
    assert (torch.linalg.eigvalsh(ref.precision_matrix(prec.double()))[:, 0] < 0).any(), "no rounding to tolerate"
    means, _, weight, bias = make_params(64, 5, dtype, seed=72)
    out = gaussian_mixture(make_points((2, 16), dtype, seed=73), means, prec, weight, bias)
    assert out.shape == (2, 5) and torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flat_half_precisions_are_accepted_under_autocast(dtype):
    """Autocast casts half inputs to float32 first: the check took float32's rounding as the
    tolerance and refused flat but valid bfloat16 Gaussians (L[2, 2] = 0.3) it accepted
    without autocast."""
    g = torch.Generator().manual_seed(74)
    factor = torch.randn(256, 6, generator=g)
    factor[:, [0, 3]] = factor[:, [0, 3]].abs() + 0.5
    factor[:, 5] = 0.01
    prec = precision_from_factor(factor.to(dtype))
    means, weight = torch.randn(256, 3, generator=g).to(dtype), torch.randn(4, 256, generator=g).to(dtype)
    points = torch.randn(1, 5, 3, generator=g).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        out = gaussian_mixture(points, means, prec, weight)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("in_dims", [0, 1, 2])
def test_precision_check_under_vmap_reads_each_example(in_dims):
    """The check reads the unwrapped (physical) tensor, whose vmap dim sits where vmap put
    it: with in_dims=2 it mixed examples into 3x3 matrices and refused valid precisions,
    with in_dims=1 it named the wrong Gaussian."""
    G, B = 4, 3
    prec = torch.tensor([1.0, 0.2, 0, 1, 0, 1]).repeat(B, G, 1)  # (B, G, 6), all positive definite
    points = make_points((1, 5), torch.float32, seed=75)
    run = torch.func.vmap(lambda p: gaussian_mixture(points, torch.zeros(G, 3), p, torch.ones(2, G)), in_dims=in_dims)
    assert run(prec.movedim(0, in_dims)).shape == (B, 1, 2)
    prec[0, 1, 3] = -1.0  # Gaussian 1 of example 0 indefinite
    with pytest.raises(ValueError, match=r"Gaussian\(s\) 1 have"):
        run(prec.movedim(0, in_dims))


@pytest.mark.parametrize("scale", [1e160, 1e-160])
def test_extreme_precisions_cull_alike_in_every_backend(scale):
    """float64 P = 1e160 I: the cofactors and determinant of P overflowed, Sigma_ii was
    inf / inf = NaN, and the backends disagreed (reference and cpp never culled, triton and
    cuda culled everywhere: 1.0 off the dense value with G t = 0.2)."""
    means = torch.zeros(2, 3, dtype=torch.float64)
    prec = torch.tensor([[scale, 0, 0, scale, 0, scale], [scale, 0.5 * scale, 0, scale, 0, 2 * scale]],
                        dtype=torch.float64)
    weight = torch.tensor([[1.0, 0.5], [-2.0, 1.0]], dtype=torch.float64)
    half = ref.cull_half_widths(means, prec, weight, 0.1)
    sigma = torch.linalg.inv(ref.precision_matrix(prec / scale)).diagonal(dim1=1, dim2=2) / scale
    expected = torch.sqrt(2 * torch.log(weight.abs().amax(dim=0) / 0.1)[:, None] * sigma)
    torch.testing.assert_close(half, expected, rtol=1e-12, atol=0)
    # At the means, and at half a box and two boxes out along x: kept, kept, culled.
    offsets = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)[:, None] * half[0, 0] * torch.tensor([1.0, 0, 0])
    points = offsets.to(torch.float64)[None]
    dense = ref.gaussian_mixture(points, means, prec, weight, reduce="none")
    expected = ref.gaussian_mixture(points, means, prec, weight, reduce="none", cull_threshold=0.1)
    assert not torch.equal(expected[:, 2], dense[:, 2])  # the far point is culled
    for backend in CPU_BACKENDS:
        with lucidops.use_backend(backend):
            culled = gaussian_mixture(points, means, prec, weight, reduce="none", cull_threshold=0.1)
        torch.testing.assert_close(culled[:, :2], dense[:, :2], rtol=1e-12, atol=0)
        torch.testing.assert_close(culled, expected, rtol=1e-12, atol=0)
        assert (culled - dense).abs().max() <= 2 * 0.1


def test_mixed_devices_raise():
    if not torch.cuda.is_available():
        meta = torch.empty(4, 3, device="meta")
        m, p, w, b = make_params(4, 5, torch.float32)
        with pytest.raises(ValueError, match="means"):
            gaussian_mixture(make_points((2, 3), torch.float32), meta, p, w, b)
    else:  # pragma: no cover - GPU machines
        m, p, w, b = make_params(4, 5, torch.float32)
        with pytest.raises(ValueError, match="weight"):
            gaussian_mixture(make_points((2, 3), torch.float32), m, p, w.cuda(), b)


# ---------------------------------------------------------------- op contract, FLOPs


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("reduce_max", [True, False])
def test_opcheck(backend, device, reduce_max):
    m, p, w, b = make_params(3, 4, torch.float32, device, seed=71)
    x = make_points((2, 5), torch.float32, device, seed=72)
    args = (x.requires_grad_(True), m.requires_grad_(True), p, w.requires_grad_(True), b, reduce_max, 0.2)
    with lucidops.use_backend(backend):
        torch.library.opcheck(torch.ops.lucidops.gaussian_mixture.default, args)
        out, arg = torch.ops.lucidops.gaussian_mixture(*(a.detach() if torch.is_tensor(a) else a for a in args))
        grad = torch.randn_like(out)
        torch.library.opcheck(torch.ops.lucidops.gaussian_mixture_backward.default,
                              (grad, x.detach(), m.detach(), p, w.detach(), arg, reduce_max, 0.2))


def test_compile_fullgraph_matches_eager():
    enc = GaussianPointEncoder(num_gaussians=6, out_channels=10)
    x = torch.rand(2, 3, 30, 3) * 2 - 1
    compiled = torch.compile(enc, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), enc(x), rtol=0, atol=0)


def test_flop_counter_uses_the_formula():
    from lucidops.profile.flops import count_flops

    m, p, w, b = make_params(5, 7, torch.float32)
    x = make_points((3, 11), torch.float32).requires_grad_(True)
    counts = count_flops(lambda pts: gaussian_mixture(pts, m, p, w, b), x, backward=True)
    fwd = forward_flops((3, 11, 3), (5, 3), (5, 6), (7, 5), (7,), True, None)
    bwd = backward_flops((3, 7), (3, 11, 3), (5, 3), (5, 6), (7, 5), (3, 7), True, None)
    assert fwd == 3 * 11 * (23 * 5 + 2 * 5 * 7 + 7 + 7)
    assert counts["total"] == fwd + bwd
    none = forward_flops((3, 11, 3), (5, 3), (5, 6), (7, 5), None, False, 0.1)
    assert none == 3 * 11 * (23 * 5 + 2 * 5 * 7)
    # reduce="none": the two (M x K x G) products, the bias sum, and per (point, Gaussian) pair
    # phi (23), the coefficient (1), P d (15), the mean (6), precision (18) and point (6) terms;
    # the weight gradient and dL/dphi were counted again per pair (3 M G too many).
    assert backward_flops((3, 11, 7), (3, 11, 3), (5, 3), (5, 6), (7, 5), None, False, None) == (
        4 * 33 * 7 * 5 + 33 * 7 + 33 * 5 * (23 + 1 + 15 + 6 + 18 + 6))


# ---------------------------------------------------------------- the module


def test_precision_from_factor_is_l_lt():
    factor = torch.randn(7, 6, dtype=torch.float64)
    L = torch.zeros(7, 3, 3, dtype=torch.float64)
    a, b, d, c, e, f = factor.unbind(-1)
    L[:, 0, 0], L[:, 1, 0], L[:, 2, 0], L[:, 1, 1], L[:, 2, 1], L[:, 2, 2] = a, b, d, c, e, f
    full = L @ L.transpose(1, 2)
    torch.testing.assert_close(precision_from_factor(factor), full[:, UPPER[0], UPPER[1]])


def test_encoder_module():
    torch.manual_seed(0)
    enc = GaussianPointEncoder(num_gaussians=8, out_channels=12, cloud_range=2.0).double()
    assert enc.means.abs().max() <= 2.0
    prec = ref.precision_matrix(enc.precisions())
    assert (prec - torch.eye(3, dtype=torch.float64)).abs().max() < 0.1  # near identity
    torch.testing.assert_close(enc.covariances(), torch.linalg.inv(prec))
    x = make_points((2, 3, 25), seed=81)
    out = enc(x)
    assert out.shape == (2, 3, 12)
    expected = ref.gaussian_mixture(x, enc.means, enc.precisions(), enc.mixer.weight, enc.mixer.bias)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    for name, param in enc.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    enc.cull_threshold = 0.05
    culled = enc(x)
    assert (culled - out.detach()).abs().max() <= 8 * 0.05
    with pytest.raises(ValueError, match="cull_threshold"):
        enc.cull_threshold = -1
    enc.cull_threshold = None
    torch.testing.assert_close(enc(x), out.detach())
    per_point = GaussianPointEncoder(4, 5, reduce="none")(torch.rand(3, 9, 3))
    assert per_point.shape == (3, 9, 5)
    with pytest.raises(ValueError, match="reduce"):
        GaussianPointEncoder(4, 5, reduce="sum")
    with pytest.raises(ValueError, match="num_gaussians"):
        GaussianPointEncoder(0, 5)
    for bad, exc in ((-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("0.01", TypeError)):
        with pytest.raises(exc, match="off_diagonal_init"):
            GaussianPointEncoder(4, 5, off_diagonal_init=bad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_encoder_covariances_and_spread(dtype):
    """cholesky_inverse has no half kernels: the covariances are inverted in float32 (the spread
    penalty of a half student needs them)."""
    enc = GaussianPointEncoder(6, 4)
    expected = enc.covariances()
    enc = enc.to(dtype)
    torch.testing.assert_close(enc.covariances().float(), expected, rtol=2e-2, atol=1e-3)
    assert enc.covariances().dtype == dtype and enc.spread().dtype == dtype


# ---------------------------------------------------------------- cpp kernel paths: all-culled tiles, chunking


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_all_culled_tiles_and_clouds_match_reference(dtype):
    """Clouds far from every box (every tile takes the bias-only path), clouds partly inside,
    K > N for some clouds' arg-max table; forward, arg-max and gradients against the reference."""
    G, K, t = 12, 40, 0.2
    means, prec, weight, bias = make_params(G, K, torch.float64, seed=61, scale=4.0)
    gen = torch.Generator().manual_seed(62)
    near = means[:3].unsqueeze(1) + 0.2 * torch.randn(3, 700, 3, generator=gen, dtype=torch.float64)
    far = 6.0 + torch.rand(2, 700, 3, generator=gen, dtype=torch.float64)  # no box reaches these
    points = torch.cat([near, far]).to(dtype)
    means, prec, weight, bias = (x.to(dtype) for x in (means, prec, weight, bias))
    half = ref.cull_half_widths(means, prec, weight, t)
    assert (ref.gaussian_phi(points[3:], means, prec, half) == 0).all()
    out, grads, grad_out = run_op("cpp", points, means, prec, weight, bias, cull=t)
    arg = backend_argmax("cpp", points, means, prec, weight, bias, t)
    expected, expected_grads, arg64 = ground_truth(points, means, prec, weight, bias, "max", t, grad_out, arg)
    assert torch.equal(out[3:], bias.expand(2, K))  # all culled: bias, from point 0
    assert (arg[3:] == 0).all()
    assert rel_err(out, expected) < TOL[dtype]
    if dtype == torch.float64:
        assert torch.equal(arg, arg64)
    for g, e in zip(grads, expected_grads):
        assert rel_err(g, e) < TOL[dtype]


def test_cpp_float32_ties_at_the_bias_under_culling():
    """Narrow Gaussians, culled: wherever every box misses a point, each channel is exactly its
    bias there. Channels with negative weights and zero bias reach their max (0) only at such
    points, at hundreds of them, and the lowest index must win; float32 goes through the
    vectorised block-of-8-channels test, which decides when a tie can still matter."""
    G, K, t = 24, 43, 0.1
    gen = torch.Generator().manual_seed(81)
    means = torch.rand(G, 3, generator=gen) * 2 - 1
    prec = torch.tensor([40.0, 0.0, 0.0, 40.0, 0.0, 40.0]).expand(G, 6).contiguous()
    weight = torch.randn(K, G, generator=gen)
    bias = torch.randn(K, generator=gen)
    negative = torch.arange(K) % 3 == 0  # spread over every block of 8 and the tail
    weight[negative] = -weight[negative].abs()
    bias[negative] = 0.0
    points = torch.rand(4, 2000, 3, generator=gen) * 2.4 - 1.2
    points[:, :5] = means[:5]  # the lowest indices sit at Gaussian centres: the winner is not point 0
    half = ref.cull_half_widths(means, prec, weight, t)
    all_culled = (ref.gaussian_phi(points, means, prec, half) == 0).all(-1)  # (B, N)
    first_culled = all_culled.float().argmax(-1)
    assert all_culled.sum(-1).min() > 100 and (first_culled > 0).all()
    with lucidops.use_backend("cpp"):
        out, arg = torch.ops.lucidops.gaussian_mixture(points, means, prec, weight, bias, True, t)
    assert (out[:, negative] == 0).all()
    assert torch.equal(arg[:, negative], first_culled[:, None].expand(4, int(negative.sum())))
    expected, _ = ref.forward(points.double(), means.double(), prec.double(), weight.double(), bias.double(), True, t)
    assert rel_err(out, expected) < TOL[torch.float32]


@pytest.mark.parametrize("cull", [None, 0.1])
def test_cpp_result_independent_of_chunking_and_threads(cull):
    """A cloud alone (split into several chunks) and inside a batch (one chunk per cloud), on one
    thread and on two: bitwise the same output and arg-max."""
    G, K = 16, 33
    means, prec, weight, bias = make_params(G, K, torch.float32, seed=71, scale=3.0)
    points = make_points((8, 1500), torch.float32, seed=72)
    weight[5] = 0.0  # a constant channel: ties everywhere, the lowest index must win
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with lucidops.use_backend("cpp"):
                batch = torch.ops.lucidops.gaussian_mixture(points, means, prec, weight, bias, True, cull)
                alone = torch.ops.lucidops.gaussian_mixture(points[2:3], means, prec, weight, bias, True, cull)
            results.append((batch, alone))
    finally:
        torch.set_num_threads(before)
    for (batch, alone) in results:
        assert torch.equal(batch[0][2:3], alone[0]) and torch.equal(batch[1][2:3], alone[1])
        assert torch.equal(batch[0], results[0][0][0]) and torch.equal(batch[1], results[0][0][1])
        assert (batch[1][:, 5] == 0).all()
    expected, arg64 = ref.forward(points.double(), means.double(), prec.double(), weight.double(), bias.double(),
                                  True, cull)
    assert rel_err(results[0][0][0], expected) < TOL[torch.float32]


@pytest.mark.parametrize("cull", [None, 0.1])
def test_cpp_backward_is_bitwise_the_same_on_one_and_two_threads(cull):
    """The reduce-max backward sums the Gaussians' gradients per cloud and adds the clouds in
    order, and a cloud owns its points' gradient: no result depends on the thread count."""
    means, prec, weight, bias = make_params(12, 40, torch.float32, seed=91, scale=3.0)
    points = make_points((5, 300), torch.float32, seed=92)
    before = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads.append(run_op("cpp", points, means, prec, weight, bias, cull=cull)[1])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*grads):
        assert torch.equal(one, two)
    assert all(g.abs().sum() > 0 for g in grads[0])


def test_cpp_dense_skips_underflowed_gaussians_exactly():
    """Very narrow Gaussians: phi underflows to 0 on whole tiles even without culling (those
    rows are dropped from the mix); the result still matches the reference."""
    means, prec, weight, bias = make_params(10, 24, torch.float32, seed=81, scale=60.0)
    points = make_points((3, 400), torch.float32, seed=82)
    phi = ref.gaussian_phi(points, means, prec)
    assert (phi == 0).float().mean() > 0.5, "the test needs mostly underflowed pairs"
    for reduce in ("max", "none"):
        out, grads, grad_out = run_op("cpp", points, means, prec, weight, bias, reduce=reduce)
        arg = backend_argmax("cpp", points, means, prec, weight, bias, None) if reduce == "max" else None
        expected, expected_grads, _ = ground_truth(points, means, prec, weight, bias, reduce, None, grad_out, arg)
        assert rel_err(out, expected) < TOL[torch.float32]
        for g, e in zip(grads, expected_grads):
            assert rel_err(g, e) < 1e-4  # float32 gradients of near-zero phi


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 37, 2048])
def test_cpp_spatial_order_is_the_stable_morton_order(dtype, n):
    """The culled forward visits points in Morton order over the cloud's box (a radix sort in
    C++): a permutation, codes non-decreasing, equal codes in index order. Checked against a
    stable sort of the codes computed here, with duplicated points to force ties."""
    from lucidops import _ext

    gen = torch.Generator().manual_seed(81)
    points = torch.randn(n, 3, generator=gen, dtype=torch.float64).to(dtype)
    if n > 2:
        points[n // 2:n // 2 + 2] = points[0]  # ties: three points share a code
        points[:, 2] *= 0.01  # a flat cloud: its own box, not a cube, sets the grid
    order = _ext.load("cpu").gaussian_spatial_order(points)
    lo, hi = points.amin(0), points.amax(0)
    extent = hi - lo
    unit = torch.where(extent > 0, (points - lo) / torch.where(extent > 0, extent, 1), 0)
    cells = (unit * 1023).clamp(0, 1023).long()  # the C++ rounding: truncation of u * 1023
    codes = torch.zeros(n, dtype=torch.long)
    for bit in range(10):
        for axis in range(3):
            codes |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    assert torch.equal(order, torch.argsort(codes, stable=True))
    with pytest.raises(RuntimeError, match="points must be"):
        _ext.load("cpu").gaussian_spatial_order(points[:, :2])


@pytest.mark.parametrize("backend,device", [p for p in backend_params() if p.values[0] in ("cpp", "triton")])
def test_backward_refuses_out_of_range_argmax(backend, device):
    """The raw backward op with an arg-max index outside the cloud: the triton launcher read
    out of bounds (the cpp and cuda kernels checked already)."""
    m, p, w, _ = make_params(3, 4, torch.float32, device)
    x = make_points((2, 5), torch.float32, device)
    grad = torch.ones(2, 4, device=device)
    for bad in (5, -1):
        arg = torch.full((2, 4), bad, dtype=torch.long, device=device)
        with lucidops.use_backend(backend), pytest.raises((ValueError, RuntimeError), match="argmax out of range"):
            torch.ops.lucidops.gaussian_mixture_backward(grad, x, m, p, w, arg, True, None)


@pytest.mark.parametrize("dtype, negative, far", [(torch.bfloat16, -0.05, 64.0), (torch.float16, -0.005, 200.0),
                                                  (torch.float32, -5e-4, 600.0)])
def test_a_tolerated_negative_eigenvalue_that_would_overflow_is_refused(dtype, negative, far):
    """The rounding tolerance (1/16 of the largest eigenvalue for bfloat16) let a plainly
    indefinite precision through: phi = exp(-q/2) overflowed far from the mean, a zero weight
    made NaN, the reference crashed (its argmax met NaN) and the kernels returned inf."""
    points = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, far]]], dtype=dtype)
    means = torch.zeros(1, 3, dtype=dtype)
    precisions = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, negative]], dtype=dtype)
    weight = torch.tensor([[1.0], [0.0]], dtype=dtype)
    with pytest.raises(ValueError, match="precisions must be positive semidefinite: an eigenvalue of"):
        gaussian_mixture(points, means, precisions, weight)  # checked before any backend runs
    near = points.clone()
    near[0, 1, 2] = 1.0  # the same rounding-sized eigenvalue near the mean is harmless
    assert torch.isfinite(gaussian_mixture(near, means, precisions, weight)).all()


def test_reference_argmax_of_a_nan_max_is_its_first_nan():
    # amax propagates NaN and values == NaN matched nothing: the sentinel index n reached gather
    values = torch.tensor([[[1.0], [float("nan")], [float("nan")]]])
    top, first = ref._first_argmax(values)
    assert top.isnan().all() and first.tolist() == [[1]]


def test_encoder_names_float64_points_inside_an_autocast_region():
    # autocast never casts float64: the op then named means, which the caller never passed
    enc = lucidops.nn.GaussianPointEncoder(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="points are torch.float64 but this GaussianPointEncoder is torch.float32"):
            enc(torch.rand(2, 10, 3, dtype=torch.float64))
        assert enc(torch.rand(2, 10, 3).bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("reduce", ["max", "none"])
def test_cpp_flushes_subnormals_in_float32_only_and_within_the_stated_bound(reduce):
    """The C++ forward flushes float32 subnormals for speed (README: a channel moves by at most
    1.2e-38 times the sum of its |weight|); float64 keeps them, as the reference does. It
    flushed float64 too: weights near 1e300 over a phi of 2.3e-309 gave 0 for 2.3e-9."""
    if "cpp" not in CPU_BACKENDS:
        pytest.skip("needs the C++ extension")
    for dtype, x0, w in ((torch.float64, 37.7, 1e300), (torch.float32, 13.3, 1e30)):
        points = torch.tensor([[[x0, 0.0, 0.0]]], dtype=dtype)
        means = torch.zeros(1, 3, dtype=dtype)
        prec = torch.tensor([[1.0, 0, 0, 1.0, 0, 1.0]], dtype=dtype)
        weight = torch.tensor([[w]], dtype=dtype)
        phi = math.exp(-0.5 * x0 * x0)
        assert 0 < phi < torch.finfo(dtype).tiny  # a subnormal phi
        outs = {}
        for backend in ("reference", "cpp"):
            with lucidops.use_backend(backend):
                outs[backend] = gaussian_mixture(points, means, prec, weight, reduce=reduce).double()
        exact = w * phi
        if dtype == torch.float64:
            torch.testing.assert_close(outs["cpp"], outs["reference"], rtol=1e-12, atol=0)
            assert abs(outs["cpp"].item() / exact - 1) < 1e-6
        else:
            assert abs(outs["cpp"].item() - outs["reference"].item()) <= 1.2e-38 * w


def test_encoder_cloud_center_takes_numbers_as_tensors_and_numpy_arrays():
    """A 0-d tensor was refused as "1 number" and a NumPy array of three as "not a real number"."""
    np = pytest.importorskip("numpy")
    for given, expected in ((torch.tensor(2.0), (2.0,) * 3), (np.array([1.0, 2, 3]), (1.0, 2.0, 3.0)),
                            (np.float32(1.5), (1.5,) * 3), (torch.tensor([1.0, 2, 3]), (1.0, 2.0, 3.0))):
        assert GaussianPointEncoder(4, 4, cloud_center=given).cloud_center == expected
    for bad in (torch.tensor([1.0, 2.0]), np.array([1, 2])):
        with pytest.raises(ValueError, match="cloud_center must be a number or 3 numbers, got 2"):
            GaussianPointEncoder(4, 4, cloud_center=bad)


def test_encoder_names_its_factor_when_its_precisions_are_not_finite():
    """A float16 encoder whose L L^T overflowed float16 said 'precisions must be finite', an
    argument its caller never passed."""
    enc = GaussianPointEncoder(4, 4)
    with torch.no_grad():
        enc.factor[:, 0] = 300.0  # 300^2 overflows float16
    enc.half()
    with pytest.raises(ValueError, match=r"precisions L L\^T overflow torch.float16 .*encoder.float\(\)"):
        enc(torch.rand(1, 5, 3).half())
    enc.float()(torch.rand(1, 5, 3))  # float32 holds it
    with torch.no_grad():
        enc.factor[1, 2] = math.nan
    with pytest.raises(ValueError, match="its factor holds NaN or inf"):
        enc(torch.rand(1, 5, 3))


@pytest.mark.parametrize("backend,device", backend_params())
def test_more_clouds_than_the_max_backward_slices(backend, device):
    """67 clouds: triton's max backward runs 64 programs per channel block, each over the
    clouds split, split + 64, ... (BACKWARD_SPLITS): past 64 a program takes a second cloud.
    CASES have at most 6 clouds."""
    means, prec, weight, bias = make_params(5, 7, torch.float64, device, seed=71)
    points = make_points((67, 9), torch.float64, device, seed=72)
    out, grads, grad_out = run_op(backend, points, means, prec, weight, bias, "max")
    arg = backend_argmax(backend, points, means, prec, weight, bias, None)
    out64, grads64, _ = ground_truth(points, means, prec, weight, bias, "max", None, grad_out, arg)
    assert rel_err(out, out64) < TOL[torch.float64]
    for name, g, g64 in zip(["points", "means", "precisions", "weight", "bias"], grads, grads64):
        assert rel_err(g, g64) < TOL[torch.float64] * 4, name


BOX_FACE_THRESHOLD = 0.3


def box_face_inputs(dtype):
    """(points, means, precisions, weight, bias) whose clouds each hold 9 points (one past the
    float32 C++ tile of 8) exactly on one face of one Gaussian's culling box at
    BOX_FACE_THRESHOLD, the other two coordinates well inside it: means are 0, so x - mu is
    the half-width itself."""
    G, K, t = 3, 5, BOX_FACE_THRESHOLD
    means = torch.zeros(G, 3, dtype=dtype)
    prec = torch.tensor([[2.0, 0, 0, 3.0, 0, 5.0], [4.0, 0.5, 0, 1.0, 0, 2.0], [1.0, 0, 0.3, 6.0, 0.2, 3.0]],
                        dtype=dtype)
    gen = torch.Generator().manual_seed(101)
    weight = torch.randn(K, G, generator=gen, dtype=torch.float64).to(dtype)
    bias = torch.randn(K, generator=gen, dtype=torch.float64).to(dtype)
    half = ref.cull_half_widths(means, prec, weight, t)
    assert (half > 0).all() and torch.isfinite(half).all()
    clouds = []
    for g in range(G):
        for axis in range(3):
            for sign in (1.0, -1.0):
                inner = (torch.rand(9, 3, generator=gen, dtype=torch.float64) - 0.5).to(dtype) * 0.2 * half[g]
                inner[:, axis] = sign * half[g, axis]
                clouds.append(inner)
    points = torch.stack(clouds)  # (6 G, 9, 3)
    phi = ref.gaussian_phi(points, means, prec, half)
    on_face = torch.arange(G).repeat_interleave(6)
    assert (phi[torch.arange(6 * G), :, on_face] > 0).all(), "the reference keeps every face point"
    return points, means, prec, weight, bias


@pytest.mark.parametrize("backend,device", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduce", ["max", "none"])
def test_points_exactly_on_a_box_face_are_kept(backend, device, dtype, reduce):
    """The culling rule drops a pair when |x - mu| > h on some axis: a point exactly on a box
    face is kept, where phi is about t / alpha (no rounding hides it). Every tile's bounding box
    touches the face (box_face_inputs): a '>=' in the cpp kernel's per-tile box test
    (culled_for_box), its per-point test or the backward's dropped a contribution of about t
    that no random point ever lands on; so did one in the Triton kernels' per-point test
    (_culled)."""
    t = BOX_FACE_THRESHOLD
    points, means, prec, weight, bias = (v.to(device) for v in box_face_inputs(dtype))
    out, grads, grad_out = run_op(backend, points, means, prec, weight, bias, reduce, t)
    arg = backend_argmax(backend, points, means, prec, weight, bias, t) if reduce == "max" else None
    expected, expected_grads, _ = ground_truth(points, means, prec, weight, bias, reduce, t, grad_out, arg, dtype)
    assert rel_err(out, expected) < TOL[dtype]
    for name, g, e in zip(["points", "means", "precisions", "weight", "bias"], grads, expected_grads):
        assert rel_err(g, e) < 4 * TOL[dtype], name


def test_point_features_restores_reduce_when_the_call_raises():
    """point_features sets reduce "none" for its call only: a refused call (float64 points into
    a float32 encoder) left the encoder returning per-point features from then on."""
    enc = GaussianPointEncoder(4, 5)
    with pytest.raises(TypeError, match="points are torch.float64"):
        enc.point_features(torch.rand(2, 9, 3, dtype=torch.float64))
    assert enc.reduce == "max"
    assert enc(torch.rand(2, 9, 3)).shape == (2, 5)


@pytest.mark.parametrize("dtype, relative", [(torch.bfloat16, 8 * 2.0 ** -7), (torch.float16, 8 * 2.0 ** -10),
                                             (torch.float32, 2.0 ** -10), (torch.float64, 8 * 2.0 ** -52)])
def test_a_negative_eigenvalue_twice_the_rounding_tolerance_is_refused(dtype, relative):
    """The tolerance is the dtype's rounding (8 eps of the largest eigenvalue, 2^-10 in float32
    for TF32 products): twice it is an indefinite precision, refused even near the mean (a
    tolerance 10 times looser let it through)."""
    points = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=dtype)
    means = torch.zeros(1, 3, dtype=dtype)
    precisions = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.0, -2 * relative]], dtype=dtype)
    weight = torch.tensor([[1.0]], dtype=dtype)
    with pytest.raises(ValueError, match="Gaussian\\(s\\) 0 have a negative eigenvalue"):
        gaussian_mixture(points, means, precisions, weight)


@pytest.mark.parametrize("shift", [0.0, 7.5e18])
def test_points_whose_squared_distance_passes_half_of_float32_are_refused(shift):
    """The bound keeps a factor 2 of room: at |x - mu| = 1.5e19 (squared 2.25e38, past half of
    float32's 3.4e38) the reference's reduce "none" backward made the precisions' gradient
    inf, silently. Refused, also when the distance is split between the points and the means
    (|x| and |mu| both 7.5e18: it is their sum); at 1.2e19 (1.44e38) every CPU backend runs."""
    means = torch.full((2, 3), -shift)
    prec = torch.tensor([[0.1, 0.05, 0.0, 0.1, 0.0, 0.1], [0.1, 0.0, 0.0, 0.1, 0.0, 0.1]])
    weight = torch.tensor([[1.0, -0.5], [0.5, 2.0]])
    points = torch.tensor([[[0.1, 0.2, 0.0], [1.5e19, 1.5e19, 1.5e19]]]) - shift
    with pytest.raises(ValueError, match="points lie up to 1.5e\\+19"):
        gaussian_mixture(points, means, prec, weight, reduce="none")
    if shift:
        return
    near = points.clone()
    near[0, 1] = 1.2e19
    for backend in CPU_BACKENDS:
        inputs = [t.clone().requires_grad_(True) for t in (near, means, prec, weight)]
        with backends.use_backend(backend):
            gaussian_mixture(*inputs, reduce="none").sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in inputs), backend
