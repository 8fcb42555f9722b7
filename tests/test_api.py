"""The op contract around the kernels: bad input, backend forcing, modules, torch.compile,
FLOP counting, the CLI."""

import os
import subprocess
import threading
import sys

import pytest
import torch

import lucidops
from lucidops import backends
from small_modules import small_modules

KINDS = ["sinc", "gaussian"]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_input_names_the_argument(kind):
    f = getattr(lucidops.ops, kind)
    x = torch.randn(4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        f([1.0, 2.0])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        f(torch.arange(4))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            f(x, bad)
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            f(x, torch.tensor(bad))
    with pytest.raises(TypeError, match="sigma must be a real number"):
        f(x, "1.0")
    with pytest.raises(TypeError, match="sigma must be a real number"):
        f(x, True)
    with pytest.raises(ValueError, match="sigma must be a number or a one-element tensor"):
        f(x, torch.ones(2))
    with pytest.raises(TypeError, match="sigma must be a floating-point tensor"):
        f(x, torch.tensor(2))
    with pytest.raises(ValueError, match="sigma must be on the same device as x"):
        f(x, torch.tensor(1.0, device="meta"))


@pytest.mark.parametrize("value,bound,error,message", [
    (0.0, "> 0", ValueError, "x must be finite and > 0, got 0.0"),
    (-1, ">= 0", ValueError, "x must be finite and >= 0, got -1.0"),
    (0, "!= 0", ValueError, "x must be finite and != 0, got 0.0"),
    (float("nan"), None, ValueError, "x must be finite, got nan"),
    (float("-inf"), "!= 0", ValueError, "x must be finite and != 0, got -inf"),
    (True, None, TypeError, "x must be a real number, got bool"),
    ("1", "> 0", TypeError, "x must be a real number, got str"),
    (torch.tensor(1.0), None, TypeError, "x must be a real number, got Tensor"),  # tensors only with tensor_ok
])
def test_every_scalar_setting_is_checked_by_one_rule(value, bound, error, message):
    """_validate.real_number serves every float argument of the package (ops, modules,
    training, data), so they all fail the same way."""
    with pytest.raises(error, match=message):
        lucidops._validate.real_number(value, "x", bound)


def test_real_number_accepts_numbers_and_with_tensor_ok_one_element_tensors():
    import numpy as np

    real_number = lucidops._validate.real_number
    assert real_number(np.float32(2.5), "x", "> 0") == 2.5 and real_number(0, "x", ">= 0") == 0.0
    assert real_number(torch.tensor([3.0]), "x", tensor_ok=True) == 3.0
    with pytest.raises(ValueError, match="x must be a number or a one-element tensor, got shape"):
        real_number(torch.ones(2), "x", tensor_ok=True)
    with pytest.raises(ValueError, match="x must be finite and > 0, got -2.0"):
        real_number(torch.tensor(-2.0), "x", "> 0", tensor_ok=True)


@pytest.mark.parametrize("value,bounds,error,message", [
    (0, dict(minimum=1), ValueError, "n must be an int >= 1, got 0"),
    (9, dict(minimum=2, maximum=8), ValueError, r"n must be an int in \[2, 8\], got 9"),
    (5, dict(maximum=4), ValueError, "n must be an int <= 4, got 5"),
    (2.0, {}, TypeError, "n must be an int, got float"),
    (True, dict(minimum=0), TypeError, "n must be an int, got bool"),
    ("3", {}, TypeError, "n must be an int, got str"),
])
def test_every_integer_setting_is_checked_by_one_rule(value, bounds, error, message):
    with pytest.raises(error, match=message):
        lucidops._validate.integer(value, "n", **bounds)


def test_use_backend_validates_and_restores():
    with pytest.raises(ValueError, match="backend must be one of"):
        with lucidops.use_backend("fastest"):
            pass
    x = torch.randn(8)
    with lucidops.use_backend("reference"):
        lucidops.ops.sinc(x)
        assert backends.last_used("sinc") == "reference"
        with lucidops.use_backend("cpp"):
            lucidops.ops.sinc(x)
            assert backends.last_used("sinc") == "cpp"
        lucidops.ops.sinc(x)
        assert backends.last_used("sinc") == "reference"
    assert backends.forced_backend() is None


def _backward_on_another_thread(loss):
    # A new thread starts with an empty context, as the autograd engine's CUDA device threads do.
    failures = []
    worker = threading.Thread(target=lambda: _record_failure(loss.backward, failures))
    worker.start()
    worker.join()
    assert not failures, failures


def _record_failure(call, failures):
    try:
        call()
    except Exception as err:  # reraised by the caller, on the test's thread
        failures.append(err)


def _vjp_after_the_block(module, x):
    """torch.func.vjp's forward inside the block, its pullback after it."""
    params = dict(module.named_parameters())
    loss_of = lambda p, x: torch.func.functional_call(module, p, (x,)).float().square().sum()  # noqa: E731
    with lucidops.use_backend("reference"):
        _, pullback = torch.func.vjp(loss_of, params, x)
    pullback(torch.ones(()))


@pytest.mark.parametrize("name", sorted(small_modules()))
@pytest.mark.parametrize("where", ["after_the_block", "another_thread", "torch_func_vjp"])
def test_backward_runs_on_the_backend_forced_around_its_forward(name, where, monkeypatch):
    """The forced backend holds for the backward of the calls made in the block (as PyTorch's
    sdpa_kernel does), also when the backward runs outside it or on a thread of its own."""
    module, x, _, _ = small_modules()[name]
    x.requires_grad_(True)  # the quantized adapter has no trainable parameter
    monkeypatch.setattr(backends, "_last_used", {})
    if where == "torch_func_vjp":
        _vjp_after_the_block(module.eval(), x)  # eval: batch norm may not update buffers under torch.func
    else:
        with lucidops.use_backend("reference"):
            loss = module(x).float().square().sum()
        if where == "after_the_block":
            loss.backward()
        else:
            _backward_on_another_thread(loss)
    used = {op: backend for op, backend in backends._last_used.items() if op.endswith("_backward")}
    assert used and set(used.values()) == {"reference"}, used


def test_checkpoint_recomputes_on_the_env_forced_backend_from_any_thread(monkeypatch):
    """A checkpoint's recomputation runs inside the backward: on another thread (a GPU's autograd
    threads) only LUCIDOPS_BACKEND, not a use_backend block, reaches it."""
    module, x, _, _ = small_modules()["attention"]
    monkeypatch.setenv("LUCIDOPS_BACKEND", "reference")
    loss = torch.utils.checkpoint.checkpoint(module, x.requires_grad_(True), use_reentrant=False).square().sum()
    monkeypatch.setattr(backends, "_last_used", {})
    _backward_on_another_thread(loss)
    assert backends._last_used == {"attention": "reference", "attention_backward": "reference"}


def test_automatic_choice_on_cpu_is_the_cpp_extension():
    lucidops.ops.gaussian(torch.randn(8))
    assert backends.last_used("gaussian") == "cpp"


def test_forcing_an_unavailable_backend_raises():
    with lucidops.use_backend("cuda"):
        with pytest.raises(lucidops.BackendUnavailable, match="cuda backend runs CUDA tensors only"):
            lucidops.ops.sinc(torch.randn(3))
    with lucidops.use_backend("aten"):  # a known backend this op does not implement
        with pytest.raises(lucidops.BackendUnavailable, match="has no aten implementation"):
            lucidops.ops.sinc(torch.randn(3))


def test_backend_names_and_where_they_run():
    assert lucidops.BACKENDS == ("reference", "cpp", "aten", "triton", "cuda")
    assert backends.backend_problem("aten", "cpu") is None  # PyTorch's own CPU kernels need no build
    assert "CPU tensors only" in backends.backend_problem("aten", "cuda")
    for name, entry in backends.registered_ops().items():
        assert set(entry.impls) <= set(backends.BACKENDS), name
        for device, order in entry.preference.items():
            assert set(order) <= set(backends.BACKENDS), (name, device)


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setenv("LUCIDOPS_BACKEND", "reference")
    lucidops.ops.sinc(torch.randn(3))
    assert backends.last_used("sinc") == "reference"
    monkeypatch.setenv("LUCIDOPS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LUCIDOPS_BACKEND must be one of"):
        lucidops.ops.sinc(torch.randn(3))


def test_triton_on_cpu_needs_the_interpreter():
    problem = backends.backend_problem("triton", "cpu")
    if backends.triton_interpreting():
        assert problem is None
    else:
        assert "TRITON_INTERPRET" in problem


@pytest.mark.parametrize("cls", [lucidops.nn.Sinc, lucidops.nn.Gaussian])
def test_modules_learn_sigma(cls):
    m = cls(sigma=0.8, learnable=True)
    x = torch.randn(16, requires_grad=True)
    m(x).sum().backward()
    assert m.sigma.grad is not None and m.sigma.grad.abs() > 0 and x.grad is not None
    assert "learnable=True" in repr(m)
    fixed = cls(sigma=2.0)
    assert list(fixed.parameters()) == []
    with pytest.raises(ValueError, match="sigma"):
        cls(sigma=-1.0)
    # An optimiser step may take a learned sigma below zero: read as |sigma| (the functions
    # depend on its size only), the run goes on instead of raising "sigma must be > 0".
    with torch.no_grad():
        m.sigma.fill_(-0.8)
    x = torch.randn(16, requires_grad=True)
    y = m(x)
    torch.testing.assert_close(y, cls(sigma=0.8)(x))
    y.sum().backward()
    assert torch.isfinite(m.sigma.grad)


def test_half_module_sigma_keeps_its_dtype():
    m = lucidops.nn.Sinc(0.5, learnable=True).to(torch.bfloat16)
    x = torch.randn(10, dtype=torch.bfloat16, requires_grad=True)
    m(x).float().sum().backward()
    assert m.sigma.grad.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16


def test_torch_compile_fullgraph_on_cpu():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), lucidops.nn.Sinc(0.7, learnable=True),
                                torch.nn.Linear(16, 4), lucidops.nn.Gaussian(1.5))
    x = torch.randn(5, 8)
    expected = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert model[1].sigma.grad is not None


def _bad_number_calls():
    q = torch.randn(1, 2, 5, 8)
    x, w, a, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(2, 6), torch.randn(3, 2)
    pts, means = torch.randn(2, 7, 3), torch.randn(4, 3)
    prec, mixer = torch.tensor([[1.0, 0, 0, 1, 0, 1]]).repeat(4, 1), torch.randn(5, 4)
    return [
        (lambda: lucidops.ops.attention(q, q, q, scale=float("nan")), "scale must be finite"),
        (lambda: lucidops.ops.bounded_lora_linear(x, w, a, b, omega=float("inf"), scale=1.0), "omega must be finite"),
        (lambda: lucidops.ops.gaussian_mixture(pts, means, prec, mixer, cull_threshold=-0.5),
         "cull_threshold must be finite and > 0"),
    ]


@pytest.mark.parametrize("index", range(3))
def test_numbers_are_checked_under_torch_compile_too(index):
    """math.isfinite made the checks stand aside while tracing: compiled, a NaN scale gave NaN
    outputs, an infinite omega NaN, a negative cull_threshold the unculled mixture."""
    call, message = _bad_number_calls()[index]
    with pytest.raises(ValueError, match=message):
        call()
    with pytest.raises(ValueError, match=message):
        torch.compile(call, backend="eager")()
    with pytest.raises(Exception, match=message):  # fullgraph: Dynamo's error carries ours
        torch.compile(call, backend="eager", fullgraph=True)()


def test_a_meta_tensor_setting_is_a_clear_error():
    """A one-element tensor omega or cull_threshold on the meta device failed in .item()."""
    meta = dict(device="meta")
    x, w, a, b = (torch.empty(*shape, **meta) for shape in ((4, 6), (3, 6), (2, 6), (3, 2)))
    with pytest.raises(TypeError, match="omega is a tensor on the meta device"):
        lucidops.ops.bounded_lora_linear(x, w, a, b, omega=torch.tensor(2.0, **meta), scale=1.0)
    pts, means, prec, mixer = (torch.empty(*shape, **meta) for shape in ((2, 7, 3), (4, 3), (4, 6), (5, 4)))
    with pytest.raises(TypeError, match="cull_threshold is a tensor on the meta device"):
        lucidops.ops.gaussian_mixture(pts, means, prec, mixer, cull_threshold=torch.tensor(0.1, **meta))
    assert lucidops.ops.gaussian_mixture(pts, means, prec, mixer, cull_threshold=0.1).device.type == "meta"


def test_flop_counter_mode_counts_the_ops():
    x = torch.randn(3, 100, requires_grad=True)
    counts = lucidops.profile.count_flops(lambda t: lucidops.ops.sinc(t, 0.5), x, backward=True)
    assert counts["lucidops.sinc"] == 3 * 300
    assert counts["lucidops.sinc_backward"] == 11 * 300
    counts = lucidops.profile.count_flops(lambda t: lucidops.ops.gaussian(t), x)
    assert counts["total"] == 4 * 300


def test_fvcore_counts_the_ops():
    pytest.importorskip("fvcore")
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), lucidops.nn.Gaussian(1.0))
    counts = lucidops.profile.fvcore_flops(model, torch.randn(4, 10))
    assert counts["gaussian"] == 4 * 80  # fvcore names ops without their namespace
    assert counts["total"] == 4 * 80 + 4 * 10 * 20  # fvcore: one MAC per multiply-add


def _cli(*args):
    env = {k: v for k, v in os.environ.items() if k != "LUCIDOPS_BACKEND"}
    return subprocess.run([sys.executable, "-m", "lucidops", *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_cli_info_lists_ops_backends_and_versions():
    proc = _cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("torch", "triton", "sinc", "gaussian", "reference", "cpp", "aten", "cuda"):
        assert word in out
    assert "no CUDA GPU" in out or "cuda: available" in out


def test_cli_version_prints_the_package_version(capsys):
    import lucidops
    from lucidops import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lucidops {lucidops.__version__}"


def test_cli_info_reports_the_forced_backend_and_a_bad_one(monkeypatch):
    from lucidops import cli

    monkeypatch.setenv("LUCIDOPS_BACKEND", "reference")
    text = cli.info()
    assert "forced backend: reference" in text and "cpu: default -> cpp (now forced: reference)" in text
    monkeypatch.setenv("LUCIDOPS_BACKEND", "garbage")  # the setup info is run to diagnose: not a traceback
    text = cli.info()
    assert "forced backend: invalid, every op call will raise" in text and "'garbage'" in text


def test_cli_build_takes_no_argument_or_the_kinds_named(monkeypatch, capsys):
    """``lucidops build`` (the README's form) builds both extensions; Python 3.11's argparse
    refused it while the argument had choices. A wrong name is a usage error naming it."""
    from lucidops import _ext, cli

    built = []
    monkeypatch.setattr(_ext, "build", lambda kind: built.append(kind) or sys.modules[__name__])
    assert cli.main(["build"]) == 0 and built == ["cpu", "cuda"]
    built.clear()
    assert cli.main(["build", "cpu"]) == 0 and built == ["cpu"]
    with pytest.raises(SystemExit):
        cli.main(["build", "gpu"])
    assert "unknown extension 'gpu'" in capsys.readouterr().err


@pytest.mark.skipif(not lucidops.backends.triton_interpreting(), reason="needs the Triton interpreter")
def test_interpreter_rounds_bf16_like_a_gpu():
    # conftest patches the interpreter's truncating float32 -> bfloat16 cast; without it the
    # bf16 kernels' errors under the interpreter are biased toward zero (tests/interpreter_rounding.py).
    from interpreter_rounding import interpreter_rounds_bf16_to_nearest

    values = torch.randn(4096, dtype=torch.float32).numpy()
    values[:4] = [1.0 + 0.75 * 2.0**-7, 1.0 + 0.5 * 2.0**-7, 1.0 + 1.5 * 2.0**-7, -(1.0 + 0.75 * 2.0**-7)]
    assert interpreter_rounds_bf16_to_nearest(values)


@pytest.mark.parametrize("op", ["sinc", "attention", "lora", "gaussian_mixture"])
def test_double_backward_raises_instead_of_dropping_the_ops_terms(op):
    """The backward kernels have no derivative of their own. A second derivative through an op
    (a gradient penalty) must fail loudly, even when another path keeps the first gradient
    differentiable: silently treating the op's backward as constant would be wrong."""
    x = torch.randn(4, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 8)
    h = lin(x)
    if op == "sinc":
        y = lucidops.ops.sinc(h, sigma=0.5)
    elif op == "attention":
        t = h.view(1, 1, 4, 8)
        y = lucidops.ops.attention(t, t, t)
    elif op == "lora":
        y = lucidops.ops.sine_lora_linear(h, torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2), omega=1.0,
                                          scale=1.0)
    else:
        y = lucidops.ops.gaussian_mixture(h.view(4, -1, 2)[..., :1].expand(4, 4, 3), torch.randn(3, 3),
                                          torch.tensor([2.0, 0, 0, 2, 0, 2]).repeat(3, 1), torch.randn(5, 3))
    (grad,) = torch.autograd.grad(y.sum() + h.square().sum(), x, create_graph=True)
    assert grad.requires_grad  # the other path keeps it differentiable
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad.square().sum().backward()


@pytest.mark.parametrize("name", ["attention", "sine_lora", "gaussian_encoder_max"])
def test_activation_checkpointing_recomputes_bit_for_bit(name):
    from torch.utils.checkpoint import checkpoint

    module, x, _, _ = small_modules()[name]
    plain, recomputed = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    module(plain).square().sum().backward()
    checkpoint(module, recomputed, use_reentrant=False).square().sum().backward()
    assert torch.equal(plain.grad, recomputed.grad)


def test_cuda_kernels_launch_on_their_tensors_device(monkeypatch):
    """Triton launches on the current device: dispatch makes it the device of the op's
    first tensor (a model split over GPUs leaves cuda:0 current)."""
    entered = []

    class RecordingDevice:  # stands in for torch.cuda.device, which needs a GPU to enter
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    tensor = torch.empty(2, device="meta")
    with backends.on_device_of("cuda", ("max", None, tensor, torch.empty(1))):
        pass
    assert entered == [tensor.device]
    with backends.on_device_of("cpu", (tensor,)):
        pass
    assert entered == [tensor.device]  # nothing to switch off CUDA

    calls = []
    real = backends.on_device_of
    monkeypatch.setattr(backends, "on_device_of", lambda device_type, args: calls.append((device_type, args)) or
                        real(device_type, args))
    x = torch.randn(5, requires_grad=True)
    lucidops.ops.sinc(x, sigma=0.5).sum().backward()
    assert [c[0] for c in calls] == ["cpu", "cpu"]  # forward and backward both go through it
    assert any(isinstance(a, torch.Tensor) and a.data_ptr() == x.data_ptr() for a in calls[0][1])


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_ops_on_the_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    x = torch.randn(64, 32)
    q = torch.randn(2, 3, 17, 16)
    w, a, b = torch.randn(24, 32), torch.randn(4, 32), torch.randn(24, 4)
    points, means = torch.rand(2, 40, 3) * 2 - 1, torch.rand(5, 3) * 2 - 1
    precisions, mixer = torch.tensor([4.0, 0, 0, 4, 0, 4]).repeat(5, 1), torch.randn(7, 5)
    results = {}
    for device in ("cuda:0", "cuda:1"):
        d = lambda t: t.to(device)  # noqa: E731
        results[device] = (
            lucidops.ops.sinc(d(x), sigma=0.5),
            lucidops.ops.attention(d(q), d(q), d(q)),
            lucidops.ops.sine_lora_linear(d(x), d(w), d(a), d(b), omega=2.0, scale=0.5),
            lucidops.ops.gaussian_mixture(d(points), d(means), d(precisions), d(mixer)),
        )
        assert torch.cuda.current_device() == 0
    for on0, on1 in zip(results["cuda:0"], results["cuda:1"]):
        assert on1.device == torch.device("cuda:1") and torch.equal(on0, on1.to("cuda:0"))


def _dense_inputs():
    """One valid call per op family: name -> (op, positional tensors by argument name, keywords)."""
    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    return {
        "sinc": (lucidops.ops.sinc, {"x": r(4, 5)}, {"sigma": 1.0}),
        "attention": (lucidops.ops.attention, {"q": r(1, 2, 3, 8), "k": r(1, 2, 3, 8), "v": r(1, 2, 3, 8)}, {}),
        "lora": (lucidops.ops.bounded_lora_linear, {"x": r(3, 6), "weight": r(5, 6), "lora_A": r(2, 6),
                                                    "lora_B": r(5, 2), "bias": r(5)}, {"scale": 1.0}),
        "gaussian_mixture": (lucidops.ops.gaussian_mixture,
                             {"points": r(2, 7, 3), "means": r(4, 3),
                              "precisions": torch.tensor([[1.0, 0, 0, 1, 0, 1]]).repeat(4, 1), "weight": r(6, 4),
                              "bias": r(6)}, {}),
    }


@pytest.mark.parametrize("layout", ["sparse", "mkldnn"])
@pytest.mark.parametrize("family", ["sinc", "attention", "lora", "gaussian_mixture"])
def test_sparse_or_mkldnn_tensors_are_refused_naming_the_argument(family, layout):
    # they passed validation and failed inside each backend ("unsupported memory format option
    # Contiguous", an ATen internal assert, "Cannot access data pointer ...")
    op, tensors, keywords = _dense_inputs()[family]
    op(*tensors.values(), **keywords)  # valid as they are
    for name in tensors:
        bad = dict(tensors)
        bad[name] = tensors[name].to_sparse() if layout == "sparse" else tensors[name].to_mkldnn()
        with pytest.raises(TypeError, match=rf"{name} must be a dense \(strided\) tensor, got layout torch\."):
            op(*bad.values(), **keywords)


@pytest.mark.parametrize("fn, placement", [("SIN", "output"), ("cos", "weight"), ("sin", "Weight")])
def test_raw_lora_op_refuses_unknown_fn_or_placement_on_every_backend(fn, placement):
    # torch.ops.lucidops.bounded_lora_linear on cpp read any fn but "sin" as tanh, and any
    # placement but "weight" as "output"
    x, w, a, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(2, 6), torch.randn(5, 2)
    for backend in ("reference", "cpp"):
        with lucidops.use_backend(backend):
            with pytest.raises(ValueError, match="fn must be one of|placement must be one of"):
                torch.ops.lucidops.bounded_lora_linear(x, w, a, b, None, fn, placement, 1.0, 1.0)
            with pytest.raises(ValueError, match="fn must be one of|placement must be one of"):
                torch.ops.lucidops.bounded_lora_linear_backward(torch.ones(4, 5), x, w, a, b, fn, placement, 1.0,
                                                                1.0, True, True, True, True)


PUBLIC_MODULES = ("", "backends", "reference", "ops", "nn", "models", "patch", "profile", "train", "optim", "quant",
                  "conditioning", "init", "data")


def _public_names(module):
    return getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])


def test_every_public_function_class_and_method_has_a_docstring():
    """What ``help()`` and an editor show: every name the public modules export, and every
    public method their classes define, says what it does."""
    import importlib
    import inspect

    undocumented = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(f"lucidops.{module_name}" if module_name else "lucidops")
        for name in _public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or not getattr(obj, "__module__", "").startswith("lucidops"):
                continue  # a submodule, a constant, or a name imported from elsewhere
            if not (inspect.getdoc(obj) or "").strip():
                undocumented.append(f"{module_name}.{name}")
            if inspect.isclass(obj):
                for attr, value in vars(obj).items():
                    if attr.startswith("_") or not callable(value):
                        continue
                    if not (inspect.getdoc(value) or "").strip():
                        undocumented.append(f"{module_name}.{name}.{attr}")
    assert not undocumented, f"no docstring: {undocumented}"
