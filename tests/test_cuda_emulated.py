"""The CUDA kernels of csrc/cuda, run on the CPU through the emulator of tests/cuda_emulator.py.

On a machine without a GPU the kernels are otherwise only compiled. Here their indexing, tiling,
barriers, warp collectives, tie rule and partial-sum layouts run for real, behind the same
Python glue as on a GPU (``_ext.load("cuda")`` answers with the emulated extension), with guard
bands around every buffer and NaN in every output before the launch. The emulator's own checks
are shown to fail on kernels with known defects (tests/cuda_emulation/selftest.cu).
"""

import ctypes
import importlib
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from lucidops import _ext, backends
from lucidops.ops.activations import KIND
from lucidops.reference import gaussian_mixture as ref
import cuda_emulator
from child_python import run_python
from comparisons import rel_err
from test_activations import (CANCELLATION_CASES, assert_matches_float64_reference,
                              assert_overflowing_quotients_give_zeros, cancelling_sigma_gradient_case, make_input)
from test_cpp_random_shapes import assert_mixture_close
from test_gaussian_mixture import BOX_FACE_THRESHOLD, box_face_inputs, make_params, make_points
from test_gaussian_mixture_cuda import (CASES, assert_matches_float64, assert_ties_went_to_point_zero,
                                         float64_truth, tie_inputs)

gm_mod = importlib.import_module("lucidops.ops.gaussian_mixture")

pytestmark = pytest.mark.skipif(cuda_emulator.compiler() is None, reason="needs a host C++ compiler (g++)")


@pytest.fixture(scope="module")
def emulated():
    return cuda_emulator.EmulatedCudaExtension()


@pytest.fixture
def cuda_ext_emulated(emulated, monkeypatch):
    """_ext.load("cuda") answers with the emulated extension (other kinds as before); the
    schedule is thread order."""
    load = _ext.load
    monkeypatch.setattr(_ext, "load", lambda kind: emulated if kind == "cuda" else load(kind))
    emulated.set_schedule_seed(0)
    yield emulated
    emulated.set_schedule_seed(0)


def test_every_launch_is_rewritten():
    for source in sorted(cuda_emulator.CUDA_SOURCES.glob("*.cu")):
        text = source.read_text()
        launches = text.count("<<<")
        assert launches > 0, source.name
        rewritten = cuda_emulator.emulable_source(text)
        assert rewritten.count("lucidops_emulation::launcher(") == launches, source.name


# ---------------------------------------------------------------- gaussian_mixture


def emulated_forward_backward(tensors, reduce, cull, grad_seed=5):
    """The cuda backend's forward and backward functions (what the op dispatches to on a GPU)."""
    points, means, prec, weight, bias = tensors
    lead, n = points.shape[:-2], points.shape[-2]
    flat = points.reshape(math.prod(lead), n, 3)
    out, arg = gm_mod._cuda_forward(flat, means, prec, weight, bias, reduce == "max", cull)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed),
                           dtype=torch.float64).to(out.dtype)
    use_arg = arg if reduce == "max" else torch.empty(0, dtype=torch.int64)  # reduce none reads no arg-max
    grads = gm_mod._cuda_backward(grad_out, flat, means, prec, weight, use_arg, reduce == "max", cull)
    grads = [grads[0].reshape(points.shape), *grads[1:4], grads[4] if bias is not None else None]
    out = out.reshape(*lead, *out.shape[1:])
    return out, arg, grads, grad_out.reshape(out.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("reduce", ["max", "none"])
@pytest.mark.parametrize("cull", [None, 0.3])
def test_gaussian_mixture_matches_float64_reference(cuda_ext_emulated, dtype, case, reduce, cull):
    lead, n, G, K = case
    means, prec, weight, bias = make_params(G, K, dtype, seed=n + G)
    points = make_points((*lead, n), dtype, seed=K)
    tensors = (points, means, prec, weight, bias)
    out, arg, grads, grad_out = emulated_forward_backward(tensors, reduce, cull)
    assert out.shape == ((*lead, K) if reduce == "max" else (*lead, n, K)) and out.dtype == dtype
    assert_matches_float64(tensors, reduce, cull, out, arg, grads, grad_out)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lead=st.lists(st.integers(1, 3), max_size=2), n=st.sampled_from([1, 2, 31, 63, 64, 65, 129, 255, 256, 257]),
       gaussians=st.sampled_from([1, 2, 15, 16, 17, 31, 32, 33, 40]), channels=st.sampled_from([1, 3, 31, 32, 33, 127,
                                                                                                128, 129, 140]),
       dtype=st.sampled_from([torch.float32, torch.float64]), reduce=st.sampled_from(["max", "none"]),
       cull=st.sampled_from([None, 0.05, 0.3]), with_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_gaussian_mixture_on_drawn_shapes(cuda_ext_emulated, lead, n, gaussians, channels, dtype, reduce, cull,
                                          with_bias, seed):
    """Shapes around the kernels' 64-point tiles, 256-point chunks, 16/32-Gaussian tiles and
    128-channel blocks, drawn by hypothesis (the fixed CASES cover chosen ones)."""
    means, prec, weight, bias = make_params(gaussians, channels, dtype, seed=seed)
    tensors = (make_points((*lead, n), dtype, seed=seed + 1), means, prec, weight, bias if with_bias else None)
    out, arg, grads, grad_out = emulated_forward_backward(tensors, reduce, cull)
    assert_mixture_close(tensors, reduce, cull, out, arg if reduce == "max" else None, grads, grad_out)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["max", "none"])
def test_gaussian_mixture_half_inputs_and_no_bias(cuda_ext_emulated, dtype, reduce):
    means, prec, weight, _ = make_params(7, 9, dtype, seed=3)
    points = make_points((3, 67), dtype, seed=4)
    tensors = (points, means, prec, weight, None)
    out, arg, grads, grad_out = emulated_forward_backward(tensors, reduce, 0.3)
    assert out.dtype == dtype
    assert_matches_float64(tensors, reduce, 0.3, out, arg, grads, grad_out)


@pytest.mark.parametrize("reduce", ["max", "none"])
def test_gaussian_mixture_tile_skipping_is_exact(cuda_ext_emulated, reduce):
    """Points sorted along x (cloud 0 ascending, cloud 1 descending), so each 64-point tile is a
    slab and narrow Gaussians miss whole tiles: the kernel skips them per tile, and must still
    keep every pair the per-point rule keeps (a tile box built from part of the tile would drop
    some)."""
    G, K, t = 40, 20, 0.05
    means, prec, weight, bias = make_params(G, K, torch.float64, seed=31, scale=8.0, spread=1.0)
    points = make_points((2, 300), torch.float64, seed=32)
    order = points[..., :1].argsort(dim=1)
    order[1] = order[1].flip(0)
    points = torch.gather(points, 1, order.expand(-1, -1, 3))
    half = ref.cull_half_widths(means, prec, weight, t)
    tiles = points[:, :256].reshape(2, 4, 64, 3)  # the first chunk's tiles
    lo, hi = tiles.amin(dim=2, keepdim=True), tiles.amax(dim=2, keepdim=True)  # (2, 4, 1, 3)
    misses = ((lo - means > half) | (means - lo > half + (hi - lo))).any(-1)  # (2, 4, G)
    assert misses.any() and (~misses).any(), "the test needs skipped and kept (tile, Gaussian) pairs"
    out, arg, grads, grad_out = emulated_forward_backward((points, means, prec, weight, bias), reduce, t)
    dense = ref.forward(points, means, prec, weight, bias, reduce == "max", None)[0]
    assert (out - dense).abs().max() > 0, "culling changed nothing"
    out64, grads64, _ = float64_truth((points, means, prec, weight, bias), reduce, t, grad_out,
                                      arg if reduce == "max" else None)
    torch.testing.assert_close(out, out64, rtol=1e-13, atol=1e-13)
    for name, g, g64 in zip(["points", "means", "precisions", "weight", "bias"], grads, grads64):
        assert rel_err(g, g64) < 1e-12, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduce", ["max", "none"])
def test_gaussian_mixture_keeps_points_exactly_on_a_box_face(cuda_ext_emulated, dtype, reduce):
    """A point on a culling box face is kept (the rule drops |x - mu| > h only), by the tile
    skip, the per-point test and the backward alike (see test_gaussian_mixture's test)."""
    tensors = box_face_inputs(dtype)
    out, arg, grads, grad_out = emulated_forward_backward(tensors, reduce, BOX_FACE_THRESHOLD)
    assert_mixture_close(tensors, reduce, BOX_FACE_THRESHOLD, out, arg if reduce == "max" else None, grads, grad_out)


@pytest.mark.parametrize("n", [5, 65, 300])  # one tile, two tiles, two chunks
@pytest.mark.parametrize("cull", [None, 0.05])
def test_gaussian_mixture_ties_go_to_the_lowest_point_index(cuda_ext_emulated, n, cull):
    tensors = tie_inputs(n, "cpu")
    _, arg, grads, grad_out = emulated_forward_backward(tensors, "max", cull)
    assert_ties_went_to_point_zero(tensors, cull, arg, grads[0], grads[3], grad_out)


@pytest.mark.parametrize("reduce", ["max", "none"])
def test_gaussian_mixture_is_bitwise_the_same_under_any_thread_schedule(cuda_ext_emulated, reduce):
    """The kernels claim reproducible results (fixed-order reductions, no atomics): a result
    that depended on the order threads run between barriers would be a race."""
    means, prec, weight, bias = make_params(33, 131, torch.float32, seed=9)
    points = make_points((2, 300), torch.float32, seed=10)  # 2 chunks, 2 Gaussian tiles, 2 channel blocks
    results = []
    for seed in (0, 1, 2):
        cuda_ext_emulated.set_schedule_seed(seed)
        out, arg, grads, _ = emulated_forward_backward((points, means, prec, weight, bias), reduce, 0.3)
        results.append([out, *grads] + ([arg] if reduce == "max" else []))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.slow
def test_gaussian_mixture_at_the_benchmark_size_matches_cpp(cuda_ext_emulated):
    """B 16, N 2048, G 32, K 1024, culled: 8 chunks per cloud, 8 channel blocks, 16 slices."""
    means, prec, weight, bias = make_params(32, 1024, torch.float32, seed=1)
    points = make_points((16, 2048), torch.float32, seed=2)
    out, arg = gm_mod._cuda_forward(points, means, prec, weight, bias, True, 0.1)
    cpp_out, cpp_arg = gm_mod._cpp_forward(points, means, prec, weight, bias, True, 0.1)
    assert rel_err(out, cpp_out) < 1e-6 and (arg == cpp_arg).float().mean() > 0.99
    grad = torch.randn(16, 1024)
    grads = gm_mod._cuda_backward(grad, points, means, prec, weight, arg, True, 0.1)
    cpp_grads = gm_mod._cpp_backward(grad, points, means, prec, weight, arg, True, 0.1)
    for name, g, g_cpp in zip(["points", "means", "precisions", "weight", "bias"], grads, cpp_grads):
        assert rel_err(g, g_cpp) < 1e-5, name


# ---------------------------------------------------------------- sinc / gaussian activations


@pytest.mark.parametrize("kind", ["sinc", "gaussian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (1023,), (3, 5, 7), (4097,)], ids=str)
def test_activation_matches_float64_reference(cuda_ext_emulated, kind, dtype, shape):
    forward = backends.registered_ops()[kind].impls["cuda"]
    backward = backends.registered_ops()[f"{kind}_backward"].impls["cuda"]
    x = make_input(shape, dtype, "cpu")
    sigma = torch.tensor(0.5 + torch.rand(()).item(), dtype=torch.float64 if dtype == torch.float64 else None)
    grad_out = torch.randn(shape).to(dtype)
    y = forward(x, sigma)
    grad_x, grad_sigma = backward(grad_out, x, sigma, True)
    assert y.dtype == dtype and grad_x.dtype == dtype and y.shape == x.shape
    assert_matches_float64_reference(kind, x, sigma, grad_out, y, grad_x, grad_sigma)
    grad_x_only, _ = backward(grad_out, x, sigma, False)
    assert torch.equal(grad_x_only, grad_x)


def test_float64_sinc_gradient_below_the_float32_series_bound(cuda_ext_emulated):
    """Between 0.05 and 0.5 float64 takes the direct formula, as the cpu and Triton kernels (the
    CUDA kernel took the five-term series up to 0.5: 6e-12 off near 0.5)."""
    backward = backends.registered_ops()["sinc_backward"].impls["cuda"]
    x = torch.tensor([0.051, 0.2, 0.45, 0.49, -0.3], dtype=torch.float64)
    grad_x, _ = backward(torch.ones_like(x), x, torch.tensor(1.0, dtype=torch.float64), False)
    exact = (x * torch.cos(x) - torch.sin(x)) / (x * x)
    torch.testing.assert_close(grad_x, exact, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype, scale", [(torch.float32, 1e19), (torch.float64, 1e160)])
def test_sinc_sigma_gradient_where_u_squared_overflows(cuda_ext_emulated, dtype, scale):
    """(u cos u - sin u) / u^2 was 0 once u * u overflowed; sigma's gradient needs f'(u) u ~ cos u."""
    x = torch.tensor([3.0, -5.0, 10.0, 7.5], dtype=dtype) * scale
    _, grad_sigma = cuda_ext_emulated.activation_backward(torch.ones_like(x), x, torch.tensor(1.0, dtype=dtype),
                                                          0, True)
    u = x.double()
    exact = -(torch.cos(u) - torch.sin(u) / u).sum()
    assert abs(float(grad_sigma.sum()) - float(exact)) < 1e-5 * abs(float(exact))


@pytest.mark.parametrize("rows,bound", CANCELLATION_CASES)
@pytest.mark.parametrize("kind", ["sinc", "gaussian"])
def test_sigma_gradient_keeps_float64_accuracy_under_cancellation(cuda_ext_emulated, rows, bound, kind):
    """As test_activations' twin: the block partials are summed in double."""
    x, grad_out, exact = cancelling_sigma_gradient_case(kind, rows)
    _, grad_sigma = cuda_ext_emulated.activation_backward(grad_out, x, torch.tensor(1.3), KIND[kind], True)
    assert abs(grad_sigma.item() - exact) <= bound * abs(exact), (grad_sigma.item(), exact)


def test_activation_quotient_overflow_gives_zeros_not_nan(cuda_ext_emulated):
    kinds = {"sinc": 0, "gaussian": 1}

    def backward(kind, grad, x, sigma):
        return cuda_ext_emulated.activation_backward(grad, x, sigma, kinds[kind], True)

    assert_overflowing_quotients_give_zeros(
        lambda kind, x, sigma: cuda_ext_emulated.activation_forward(x, sigma, kinds[kind]), backward)


@pytest.mark.slow
def test_activation_grid_stride_loop(cuda_ext_emulated):
    """More elements than the 4096 x 256 threads of the largest grid: each thread takes several."""
    shape = ((1 << 20) + 3,)
    x = make_input(shape, torch.float32, "cpu")
    sigma, grad_out = torch.tensor(0.7), torch.randn(shape)
    y = cuda_ext_emulated.activation_forward(x, sigma, 0)
    grad_x, grad_sigma = cuda_ext_emulated.activation_backward(grad_out, x, sigma, 0, True)
    assert_matches_float64_reference("sinc", x, sigma, grad_out, y, grad_x, grad_sigma)


# ---------------------------------------------------------------- the real adapters (csrc/bindings.cpp)


@pytest.fixture(scope="module")
def real_adapters():
    return cuda_emulator.build_bindings()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_adapters_give_bitwise_the_python_adapters_results(real_adapters, emulated, dtype):
    """bindings.cpp's CUDA section on the emulated kernels against EmulatedCudaExtension's
    Python adapters: the same allocations and partial sums, so the same bits."""
    assert real_adapters.DEVICE == "cuda"
    emulated.set_schedule_seed(0)
    means, prec, weight, bias = make_params(33, 131, dtype, seed=1)
    points = make_points((2, 300), dtype, seed=2)
    half = ref.cull_half_widths(means, prec, weight, 0.3)
    for reduce_max in (True, False):
        outputs = [ext.gaussian_mixture_forward(points, means, prec, weight, bias, half, True, reduce_max)
                   for ext in (real_adapters, emulated)]
        assert all(torch.equal(a, b) for a, b in zip(*outputs))
    argmax = real_adapters.gaussian_mixture_forward(points, means, prec, weight, bias, half, True, True)[1]
    grad = torch.randn(2, 131, dtype=dtype)
    grads = [ext.gaussian_mixture_backward_max(grad, points, means, prec, weight, argmax, half, True)
             for ext in (real_adapters, emulated)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    flat, coef = points.reshape(-1, 3), torch.randn(600, 33, dtype=dtype)
    assert torch.equal(real_adapters.gaussian_phi(flat, means, prec, half, True),
                       emulated.gaussian_phi(flat, means, prec, half, True))
    phi_grads = [ext.gaussian_phi_backward(coef, flat, means, prec) for ext in (real_adapters, emulated)]
    assert all(torch.equal(a, b) for a, b in zip(*phi_grads))
    x, grad_x = torch.randn(5000, dtype=dtype), torch.randn(5000, dtype=dtype)
    sigma = torch.tensor(0.7, dtype=dtype)
    for kind in (0, 1):
        assert torch.equal(real_adapters.activation_forward(x, sigma, kind), emulated.activation_forward(x, sigma, kind))
        pairs = [ext.activation_backward(grad_x, x, sigma, kind, True) for ext in (real_adapters, emulated)]
        assert all(torch.equal(a, b) for a, b in zip(*pairs))


@pytest.mark.slow
@pytest.mark.parametrize("reduce", ["max", "none"])
def test_op_glue_through_the_real_adapters(real_adapters, monkeypatch, reduce):
    monkeypatch.setattr(_ext, "load", lambda kind: real_adapters if kind == "cuda" else pytest.fail(kind))
    means, prec, weight, bias = make_params(7, 9, torch.float32, seed=3)
    points = make_points((3, 67), torch.float32, seed=4)
    tensors = (points, means, prec, weight, bias)
    out, arg, grads, grad_out = emulated_forward_backward(tensors, reduce, 0.3)
    assert_matches_float64(tensors, reduce, 0.3, out, arg, grads, grad_out)


@pytest.mark.slow
def test_real_adapters_reject_bad_input(real_adapters):
    means, prec, weight, bias = make_params(3, 4, torch.float32, seed=5)
    points = make_points((2, 5), torch.float32, seed=6)
    half = ref.cull_half_widths(means, prec, weight, None)
    grad = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="argmax out of range"):
        real_adapters.gaussian_mixture_backward_max(grad, points, means, prec, weight, torch.full((2, 4), 5), half,
                                                    False)
    with pytest.raises(RuntimeError, match="float32 or float64 only"):
        real_adapters.gaussian_mixture_forward(*(t.half() for t in (points, means, prec, weight, bias, half)),
                                               False, True)
    with pytest.raises(RuntimeError, match="precisions must be"):
        real_adapters.gaussian_phi(points.reshape(-1, 3), means, prec[:, :5], half, False)
    with pytest.raises(RuntimeError, match="weight must be"):
        real_adapters.gaussian_mixture_forward(points, means, prec, weight[:, :2], bias, half, False, True)


# ---------------------------------------------------------------- the emulator catches defects


@pytest.fixture(scope="module")
def selftest():
    lib = cuda_emulator.build([cuda_emulator.EMULATION / "selftest.cu"], "selftest")
    lib.emu_selftest_shift.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_bool]
    lib.emu_selftest_write_past_the_end.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.emu_set_schedule_seed.argtypes = [ctypes.c_uint64]
    yield lib
    lib.emu_set_schedule_seed(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_emulator_exposes_a_missing_barrier(selftest, seed):
    selftest.emu_set_schedule_seed(seed)
    for synced in (True, False):
        x = torch.randn(256)  # fresh values: the shared stage still holds the last launch's
        out = torch.full((256,), float("nan"))
        assert selftest.emu_selftest_shift(x.data_ptr(), out.data_ptr(), synced) == 0
        assert torch.equal(out, x.roll(-1)) == synced


def test_emulator_guard_bands_catch_a_write_out_of_bounds(selftest):
    run = cuda_emulator.GuardedLaunch("write_past_the_end")
    _, ptr = run.output("out", (300,), torch.float32)
    with pytest.raises(AssertionError, match="wrote outside out"):
        run.check(selftest.emu_selftest_write_past_the_end(ptr, 300))


@pytest.mark.parametrize("kernel,message", [
    ("divergent_shuffle", "__shfl_xor_sync after some of the warp's lanes returned"),
    ("deadlock", "deadlock: thread 0 waits forever in __syncthreads"),
])
def test_emulator_reports_divergent_collectives_and_deadlocks(kernel, message):
    # The emulator aborts the process on these: run it in a child.
    code = ("import ctypes, sys, torch; sys.path.insert(0, {tests!r}); import cuda_emulator as ce; "
            "lib = ce.build([ce.EMULATION / 'selftest.cu'], 'selftest'); out = torch.zeros(256); "
            "lib.emu_selftest_{kernel}(ctypes.c_void_p(out.data_ptr()))").format(
                tests=str(cuda_emulator.Path(__file__).parent), kernel=kernel)
    done = run_python(code)
    assert done.returncode != 0 and message in done.stderr, done.stderr[-2000:]
