"""lucidops.profile: every op's FLOP formula against its analytic count in both counters,
report() / compare() fields, and the `lucidops profile` command."""

import copy
import dataclasses
import importlib
import math

import pytest
import torch
from torch import nn

import lucidops
from lucidops import cli
from lucidops.ops.attention import visible_pairs
from small_modules import small_modules

fvcore = pytest.importorskip("fvcore")


def fv_counts(fn, *inputs):
    """fvcore's count by operator for ``fn(*inputs)`` wrapped in a module (fvcore traces modules)."""

    class Wrap(nn.Module):
        def forward(self, *args):
            return fn(*args)

    return lucidops.profile.fvcore_flops(Wrap(), tuple(inputs))


def lambda_module(fn):
    class Wrap(nn.Module):
        def forward(self, *args):
            return fn(*args)

    return Wrap()


def rand(*shape, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return (torch.randn(*shape, generator=g) * 0.5).requires_grad_(grad)


# ---------------------------------------------------------------- the formulas, op by op
# Convention: torch counts a multiply-add as 2 FLOPs and every other arithmetic operation or
# transcendental as 1; fvcore counts a matrix-product multiply-add as 1, the rest as torch.


@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 4)])
def test_activation_formulas(shape):
    n = math.prod(shape)
    x = rand(*shape, grad=True)
    # sinc forward: u = x / sigma, sin u, sin u / u = 3. Backward: u, sin u, cos u (3),
    # g' = (u cos u - sin u) / u^2 (4: product, difference, square, quotient), dx = grad g' / sigma
    # (2), the sigma gradient's term -u dx and its sum (2) = 11.
    c = lucidops.profile.count_flops(lambda t: lucidops.ops.sinc(t, torch.tensor(0.7, requires_grad=True)), x,
                                     backward=True)
    assert c["lucidops.sinc"] == 3 * n and c["lucidops.sinc_backward"] == 11 * n
    # gaussian forward: u = x / sigma, u^2, * -1/2, exp = 4. Backward: those 4 again, f u and
    # its product with grad (2), dx = -(...) / sigma (2), the sigma term and its sum (2) = 10.
    c = lucidops.profile.count_flops(lambda t: lucidops.ops.gaussian(t, torch.tensor(1.3, requires_grad=True)), x,
                                     backward=True)
    assert c["lucidops.gaussian"] == 4 * n and c["lucidops.gaussian_backward"] == 10 * n
    # Elementwise only: fvcore gets the same counts.
    assert fv_counts(lambda t: lucidops.ops.sinc(t, 0.7), x.detach())["sinc"] == 3 * n
    assert fv_counts(lambda t: lucidops.ops.gaussian(t, 1.3), x.detach())["gaussian"] == 4 * n


@pytest.mark.parametrize("b,h,nq,nk,d,causal", [(1, 1, 1, 1, 4, False), (2, 3, 5, 7, 8, False),
                                                 (1, 2, 6, 6, 4, True), (2, 1, 7, 3, 8, True)])
def test_attention_formula(b, h, nq, nk, d, causal):
    q, k, v = rand(b, h, nq, d, grad=True), rand(b, h, nk, d, grad=True, seed=1), rand(b, h, nk, d, grad=True, seed=2)
    # Scored pairs: all, or key j <= query i when causal (top-left aligned).
    pairs = sum(min(i + 1, nk) for i in range(nq)) if causal else nq * nk
    assert visible_pairs(nq, nk, causal) == pairs
    c = lucidops.profile.count_flops(lambda q, k, v: lucidops.ops.attention(q, k, v, causal=causal), (q, k, v),
                                     backward=True)
    macs = b * h * pairs * d  # per matrix product: Q K^T and P V forward
    assert c["lucidops.attention"] == 2 * (2 * macs)
    # Backward: S = Q K^T recomputed, dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q.
    assert c["lucidops.attention_backward"] == 5 * (2 * macs)
    fv = fv_counts(lambda q, k, v: lucidops.ops.attention(q, k, v, causal=causal), q.detach(), k.detach(), v.detach())
    assert fv["attention"] == 2 * macs


@pytest.mark.parametrize("m,k,n,r", [(1, 1, 1, 1), (5, 6, 4, 2), (7, 9, 11, 3)])
@pytest.mark.parametrize("placement", ["weight", "output"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_lora_forward_formula(m, k, n, r, placement, with_bias):
    x, w, a, b = rand(m, k), rand(n, k, seed=1), rand(r, k, seed=2), rand(n, r, seed=3)
    bias = rand(n, seed=4) if with_bias else None

    def f(x, w, a, b, *bias_):
        return lucidops.ops.bounded_lora_linear(x, w, a, b, bias_[0] if bias_ else None, fn="tanh", omega=2.0,
                                                scale=0.5, placement=placement)

    args = (x, w, a, b) + ((bias,) if with_bias else ())
    if placement == "weight":
        # W' = W + s fn(omega B A): B A (n r k MACs), then omega *, fn, s * and W + per
        # element (4), then x W'^T (m n k MACs).
        macs, elementwise = n * r * k + m * n * k, 4 * n * k
    else:
        # x W^T, U = x A^T, Z = U B^T (MACs), then omega *, fn, s * and + per output (4 m n).
        macs, elementwise = m * n * k + m * k * r + m * r * n, 4 * m * n
    elementwise += m * n if with_bias else 0
    assert lucidops.profile.count_flops(f, args)["lucidops.bounded_lora_linear"] == 2 * macs + elementwise
    assert fv_counts(f, *args)["bounded_lora_linear"] == macs + elementwise


@pytest.mark.parametrize("m,k,n,r", [(1, 1, 1, 1), (6, 5, 4, 2)])
@pytest.mark.parametrize("need", ["lora", "x", "weight_bias", "all"])
def test_lora_backward_formula_weight_placement(m, k, n, r, need):
    x = rand(m, k, grad=need in ("x", "all"))
    w = rand(n, k, grad=need in ("weight_bias", "all"), seed=1)
    bias = rand(n, grad=need in ("weight_bias", "all"), seed=4)
    a, b = rand(r, k, grad=need in ("lora", "all"), seed=2), rand(n, r, grad=need in ("lora", "all"), seed=3)
    if not any(t.requires_grad for t in (x, w, a, b)):
        pytest.skip("nothing to differentiate")
    c = lucidops.profile.count_flops(
        lambda x: lucidops.ops.sine_lora_linear(x, w, a, b, bias, omega=3.0, scale=0.1), x, backward=True)
    need_x, need_w, need_lora = need in ("x", "all"), need in ("weight_bias", "all"), need in ("lora", "all")
    expected = m * n if need_w else 0  # the bias gradient: a sum over the m rows
    if need_w or need_lora:
        expected += 2 * m * n * k  # G = dY^T X
    if need_lora:
        # H = G s omega fn'(omega B A): B A again (2 n r k), then omega *, fn', * s omega, * G
        # per element (4); dB = H A^T, dA = B^T H.
        expected += 2 * n * r * k + 4 * n * k + 2 * (2 * n * r * k)
    if need_x:
        expected += 2 * n * r * k + 4 * n * k + 2 * m * n * k  # W' rebuilt as forward, dX = dY W'
    assert c["lucidops.bounded_lora_linear_backward"] == expected


@pytest.mark.parametrize("m,k,n,r", [(1, 1, 1, 1), (6, 5, 4, 2)])
def test_lora_backward_formula_output_placement(m, k, n, r):
    x, w, bias = rand(m, k, grad=True), rand(n, k, grad=True, seed=1), rand(n, grad=True, seed=4)
    a, b = rand(r, k, grad=True, seed=2), rand(n, r, grad=True, seed=3)
    c = lucidops.profile.count_flops(
        lambda x: lucidops.ops.bounded_lora_linear(x, w, a, b, bias, fn="sin", omega=2.0, scale=0.1,
                                                   placement="output"), x, backward=True)
    # U = x A^T, Z = U B^T recomputed (2 m k r + 2 m r n), Gz = dY s omega fn'(omega Z)
    # (omega *, fn', * s omega, * dY: 4 m n),
    # dU = Gz B (2 m n r); dB = Gz^T U (2 m n r), dA = dU^T x (2 m r k); dX = dY W + dU A
    # (2 m n k + 2 m r k); dW = dY^T x (2 m n k); the bias sum (m n).
    expected = (2 * m * k * r + 2 * m * r * n + 4 * m * n + 2 * m * n * r + 2 * m * n * r + 2 * m * r * k
                + 2 * m * n * k + 2 * m * r * k + 2 * m * n * k + m * n)
    assert c["lucidops.bounded_lora_linear_backward"] == expected


@pytest.mark.parametrize("lead,n,g,kc", [((1,), 1, 1, 1), ((2,), 9, 5, 7), ((2, 3), 4, 3, 2)])
@pytest.mark.parametrize("reduce", ["max", "none"])
def test_gaussian_mixture_formula(lead, n, g, kc, reduce):
    gen = torch.Generator().manual_seed(3)
    pts = (torch.rand(*lead, n, 3, generator=gen) * 2 - 1).requires_grad_(True)
    mu = (torch.rand(g, 3, generator=gen) * 2 - 1).requires_grad_(True)
    prec = torch.tensor([4.0, 0.1, 0.0, 4.0, 0.2, 4.0]).repeat(g, 1).requires_grad_(True)
    w, bias = torch.randn(kc, g, generator=gen, requires_grad=True), torch.randn(kc, generator=gen)
    points = math.prod(lead) * n
    c = lucidops.profile.count_flops(lambda p: lucidops.ops.gaussian_mixture(p, mu, prec, w, bias, reduce=reduce),
                                     pts, backward=True)
    # phi per (point, Gaussian): d = x - mu (3), the 6 monomials d_i d_j and their 6
    # coefficients (12), 5 sums, x2 on the off-diagonal part and x(-1/2) (2), exp (1) = 23.
    # The mixer: g kc multiply-adds per point; the bias and the max: kc each per point.
    phi = 3 + 12 + 5 + 2 + 1
    macs = points * g * kc
    elementwise = points * (phi * g + kc + (kc if reduce == "max" else 0))
    assert c["lucidops.gaussian_mixture"] == 2 * macs + elementwise
    # Per back-propagated (point, Gaussian) pair: phi again (23), dW (2), dL/dphi phi (2), P d
    # (9 products 6 sums = 15), the mean (6), the 6 precision entries (18), the point (6).
    pair = phi + 2 + 2 + 15 + 6 + 18 + 6
    if reduce == "max":
        # Per (cloud, channel) only the arg-max point back-propagates; +1 per channel for the bias.
        assert c["lucidops.gaussian_mixture_backward"] == math.prod(lead) * kc * (pair * g + 1)
    else:
        # dW = grad^T phi and dL/dphi = grad W (2 products of m kc g MACs), the bias sum, and
        # the per-(point, Gaussian) terms above without the weight's share (2) and with one
        # multiply for the coefficient dL/dphi phi, whose sum is in the product (72 counted both).
        assert c["lucidops.gaussian_mixture_backward"] == (2 * 2 * macs + points * kc + points * g * (pair - 3))
    consts = [t.detach() for t in (mu, prec, w, bias)]  # jit tracing refuses closed-over leaves with grad
    fv = fv_counts(lambda p: lucidops.ops.gaussian_mixture(p, *consts, reduce=reduce), pts.detach())
    assert fv["gaussian_mixture"] == macs + elementwise


class EveryOp(nn.Module):
    """Uses each lucidops op once, on tiny shapes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.w, self.a, self.b = (nn.Parameter(torch.randn(*s) * 0.3) for s in ((8, 8), (2, 8), (8, 2)))
        self.mu, self.mix = nn.Parameter(torch.rand(3, 3) * 2 - 1), nn.Parameter(torch.randn(4, 3))
        self.register_buffer("prec", torch.tensor([4.0, 0.1, 0.0, 4.0, 0.2, 4.0]).repeat(3, 1))

    def forward(self, x, pts):
        h = lucidops.ops.gaussian(lucidops.ops.sinc(self.lin(x), 0.5))
        h = lucidops.ops.sine_lora_linear(h, self.w, self.a, self.b, omega=2.0, scale=0.1)
        h = lucidops.ops.bounded_lora_linear(h, self.w, self.a, self.b, fn="tanh", scale=0.1, placement="output")
        q = h.reshape(1, 2, -1, 4)
        att = lucidops.ops.attention(q, q, q, causal=True)
        return att.flatten(1), lucidops.ops.gaussian_mixture(pts, self.mu, self.prec, self.mix)


def test_fvcore_supports_every_lucidops_op():
    from fvcore.nn import FlopCountAnalysis

    model, args = EveryOp(), (torch.randn(3, 6), torch.rand(2, 5, 3))
    analysis = FlopCountAnalysis(model, args).set_op_handle(**lucidops.profile.fvcore_handles())
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = analysis.by_operator()
    for name in ("sinc", "gaussian", "bounded_lora_linear", "attention", "gaussian_mixture"):
        assert by_op[name] > 0, name
    assert not [op for op in analysis.unsupported_ops() if "lucidops" in op]
    # Every forward op of the library is served (a new op without a formula fails here).
    ops = {n for n in lucidops.backends.registered_ops() if not n.endswith("_backward")}
    assert {f"lucidops::{n}" for n in ops} <= set(lucidops.profile.fvcore_handles())


@pytest.mark.parametrize("state", ["plain", "merged", "quantized"])
def test_fvcore_counts_models_holding_lucidops_modules(state):
    """fvcore's tracer takes a module's whole state dict as trace inputs, tensors only: the LoRA
    modules' extra state (merged flag, quantized adapter) must be tensors (a bool failed)."""
    torch.manual_seed(0)
    layer = lucidops.nn.SineLoRALinear(nn.Linear(16, 8), rank=2, omega=1.0)
    if state == "merged":
        layer.merge()
    elif state == "quantized":
        layer.quantize_(bits=4, group_size=8)
    model = nn.Sequential(layer, nn.ReLU())
    counts = lucidops.profile.fvcore_flops(model, (torch.randn(4, 16),))
    assert counts["total"] > 0


def test_count_flops_backward_takes_tuple_outputs_and_leaves_grads_alone():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 4), nn.Linear(6, 2)

        def forward(self, x):
            return self.a(x), {"b": self.b(x)}

    model = TwoHeads()
    x = torch.randn(3, 6)
    counts = lucidops.profile.count_flops(model, x, backward=True)
    # forward 2*3*6*(4+2); backward: the weight gradients only (x needs none): the same again
    assert counts["total"] == 2 * (2 * 3 * 6 * 6)
    assert all(p.grad is None for p in model.parameters())  # before: filled in (a tuple output raised)


def test_pytorch_attention_is_counted_on_cpu():
    # The baseline a patched model is compared with: F.scaled_dot_product_attention on CPU.
    q, k, v = rand(2, 3, 5, 8, grad=True), rand(2, 3, 7, 8, grad=True, seed=1), rand(2, 3, 7, 8, grad=True, seed=2)
    c = lucidops.profile.count_flops(nn.functional.scaled_dot_product_attention, (q, k, v), backward=True)
    assert c["total"] == (2 + 5) * 2 * (2 * 3 * 5 * 7 * 8)
    fv = fv_counts(nn.functional.scaled_dot_product_attention, q.detach(), k.detach(), v.detach())
    assert fv["scaled_dot_product_attention"] == 2 * (2 * 3 * 5 * 7 * 8)


# ---------------------------------------------------------------- report()


def test_report_fields_on_a_small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), lucidops.nn.Gaussian(1.0))
    x = torch.randn(4, 10)
    rep = lucidops.profile.report(model, x, repeat=3, warmup=1)
    assert rep.params == 10 * 20 + 20 == rep.trainable_params
    assert rep.flops == 2 * 4 * 10 * 20 + 4 * (4 * 20)  # addmm, then gaussian's 4 per element
    assert rep.fvcore_flops == 4 * 10 * 20 + 4 * (4 * 20) and rep.fvcore_error is None
    assert rep.latency_s > 0 and len(rep.latencies_s) == 3 and min(rep.latencies_s) <= rep.latency_s
    assert rep.device == "cpu" and rep.peak_rss_bytes > 0
    assert set(rep.by_module) == {"", "0", "1"}
    assert rep.by_module["0"].params == 220 and rep.by_module["0"].flops == 2 * 4 * 10 * 20
    assert rep.by_module["1"].flops == 4 * 80 and rep.by_module[""].flops == rep.flops

    back = lucidops.profile.report(model, x, backward=True, repeat=1, warmup=0)
    # x needs no grad: dW = dY^T x (2 m n k) only, and gaussian's backward (10 per element).
    assert back.flops == rep.flops + 2 * 4 * 10 * 20 + 10 * 80
    assert back.fvcore_flops == rep.fvcore_flops  # fvcore counts the forward only
    assert model[0].weight.grad is None  # gradients are taken, not accumulated into .grad
    d = back.to_dict()
    assert d["flops"] == back.flops and d["by_module"]["0"]["params"] == 220
    # Per module, the forward (PyTorch's tracker charged backward ops to modules without
    # arithmetic: a Dropout showed as much as the Linear after it).
    chain = nn.Sequential(nn.Linear(10, 20), nn.Dropout(0.0), nn.Linear(20, 20), nn.Identity())
    per_module = lucidops.profile.report(chain, x, backward=True, repeat=1, warmup=0, fvcore=False).by_module
    assert {k: v.flops for k, v in per_module.items()} == {"": 2 * 4 * 20 * 30, "0": 2 * 4 * 10 * 20, "1": 0,
                                                          "2": 2 * 4 * 20 * 20, "3": 0}
    # A container that is never called itself (nn.ModuleList) is credited its children's FLOPs.
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(10, 10), nn.Linear(10, 10)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    stacked = lucidops.profile.report(Stack(), x, repeat=1, warmup=0, fvcore=False, depth=1).by_module
    assert stacked["layers"].flops == stacked[""].flops == 2 * (2 * 4 * 10 * 10)
    text = str(back)
    for piece in ("forward + backward", "params", "220", "FLOPs (torch", "latency", "lucidops.gaussian_backward"):
        assert piece in text, piece


def test_compiled_models_are_counted_like_their_eager_originals():
    """Dynamo refuses to run under FlopCounterMode and fvcore cannot trace it: the counters go
    through the eager original of a torch.compile'd module or function (README's first example)."""
    model = nn.Sequential(nn.Linear(10, 20), lucidops.nn.Sinc(0.5, learnable=True))
    x = torch.randn(4, 10)
    compiled = torch.compile(model, fullgraph=True)
    assert lucidops.profile.eager(compiled) is model and lucidops.profile.eager(model) is model
    assert lucidops.profile.count_flops(compiled, x) == lucidops.profile.count_flops(model, x)
    assert lucidops.profile.count_flops(compiled, x)["total"] == 2 * 4 * 10 * 20 + 3 * 80  # addmm, sinc
    assert lucidops.profile.fvcore_flops(compiled, x) == lucidops.profile.fvcore_flops(model, x)

    def function(t):
        return lucidops.ops.gaussian(t, sigma=2.0)

    assert lucidops.profile.eager(torch.compile(function)) is function
    assert lucidops.profile.count_flops(torch.compile(function), x)["total"] == 4 * 40

    rep = lucidops.profile.report(compiled, x, backward=True, repeat=1, warmup=1)
    plain = lucidops.profile.report(model, x, backward=True, repeat=1, warmup=0)
    assert rep.model == "Sequential" and rep.params == plain.params
    assert (rep.flops, rep.fvcore_flops, rep.by_module) == (plain.flops, plain.fvcore_flops, plain.by_module)
    assert rep.fvcore_error is None and rep.latency_s > 0


@pytest.mark.parametrize("name", ["attention", "sine_lora", "gaussian_encoder_max", "gaussian_pointnet",
                                  "learnable_sinc"])
def test_flops_counted_on_the_meta_device_equal_the_real_count(name):
    """Shape-only runs (a model on the meta device, no memory) count what real runs count,
    forward and backward: the ops' data-dependent checks (finite Gaussians, a positive
    learnable sigma) stand aside on meta tensors instead of failing on .item()."""
    model, example, _, _ = small_modules()[name]
    shape = example.shape

    def count(device):
        with torch.utils.flop_counter.FlopCounterMode(display=False) as counter:
            out = model.to(device)(torch.rand(shape, device=device))
            out.float().sum().backward()
        assert out.device.type == device
        return counter.get_total_flops()

    real = count("cpu")
    assert real > 0 and count("meta") == real


def test_fvcore_is_half_the_torch_count_for_matmul_models():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = nn.Linear(8, 24, bias=False)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(1, 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
            return lucidops.ops.attention(q, k, v)

    rep = lucidops.profile.report(Attn(), torch.randn(1, 5, 8), repeat=1, warmup=0)
    assert rep.flops == 2 * 5 * 8 * 24 + 4 * 2 * 5 * 5 * 4
    assert rep.fvcore_flops * 2 == rep.flops


def test_peak_memory_on_cpu_is_the_saved_activations():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    x = torch.randn(4, 10)
    rep = lucidops.profile.report(model, x, repeat=1, warmup=0, fvcore=False)
    # Linear 1 keeps x (for dW); ReLU keeps its output, which Linear 2 keeps too (one storage);
    # Linear 2's weight is a parameter: not counted. float32.
    assert rep.peak_memory_bytes == 4 * (4 * 10) + 4 * (4 * 20)
    assert rep.memory_kind == "saved for backward"
    assert rep.fvcore_flops is None and "skipped" in rep.fvcore_error


@dataclasses.dataclass
class Out:
    y: torch.Tensor
    index: torch.Tensor


def test_tuple_outputs_and_untraceable_models():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            y = self.lin(x)
            return Out(y, y.argmax(-1))  # fvcore's jit trace refuses custom output classes

    rep = lucidops.profile.report(Two(), torch.randn(2, 3), backward=True, repeat=1, warmup=0)
    assert rep.flops == 2 * (2 * 2 * 3 * 3)  # forward and dW of the float output only
    assert rep.fvcore_flops is None and "cannot trace" in rep.fvcore_error
    assert "n/a" in str(rep)
    tup = lucidops.profile.report(nn.Linear(3, 3), (torch.randn(2, 3),), backward=True, repeat=1, warmup=0)
    assert tup.flops == rep.flops
    two = lucidops.profile.report(lambda_module(lambda x: (x.sum(), x * 2, x.long())), torch.randn(2, 3, requires_grad=True),
                                  backward=True, repeat=1, warmup=0)
    assert two.params == 0 and two.flops == 0  # sums and scalings: no counted ops, but it runs


def test_report_rejects_bad_arguments():
    model, x = nn.Linear(3, 2), torch.randn(1, 3)
    with pytest.raises(TypeError, match="model"):
        lucidops.profile.report(lambda t: t, x)
    with pytest.raises(TypeError, match="inputs"):
        lucidops.profile.report(model, None)
    with pytest.raises(ValueError, match="device"):
        lucidops.profile.report(model, x, device="tpu")
    with pytest.raises(ValueError, match="device"):
        lucidops.profile.report(model, x, device="not a device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            lucidops.profile.report(model, x, device="cuda")
    with pytest.raises(ValueError, match="repeat"):
        lucidops.profile.report(model, x, repeat=0)
    with pytest.raises(ValueError, match="require grad"):
        lucidops.profile.report(model.requires_grad_(False), x, backward=True)


# ---------------------------------------------------------------- compare()


def test_compare_prints_ratios_and_writes_a_png(tmp_path):
    original = nn.Sequential(nn.Linear(8, 16), nn.GELU())
    patched = copy.deepcopy(original)
    patched[1] = lucidops.nn.Sinc(1.0)
    png = tmp_path / "cmp.png"
    cmp = lucidops.profile.compare(original, patched, torch.randn(3, 8), png=png, repeat=2, warmup=0)
    assert cmp.original.flops == 2 * 3 * 8 * 16  # GELU is not counted by torch
    assert cmp.patched.flops == 2 * 3 * 8 * 16 + 3 * (3 * 16)
    ratios = cmp.ratios()
    assert ratios["flops"] == pytest.approx(cmp.patched.flops / cmp.original.flops)
    assert ratios["speedup"] == pytest.approx(cmp.original.latency_s / cmp.patched.latency_s)
    text = str(cmp)
    assert f"{ratios['flops']:.3f}" in text and "speed-up" in text and "original" in text and "patched" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert cmp.to_dict()["ratios"]["params"] == 1.0


class _Logged(nn.Module):
    """Appends its name to a shared log on every call."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log
        self.linear = nn.Linear(2, 2)

    def forward(self, x):
        self.log.append(self.name)
        return self.linear(x)


def test_compare_times_the_two_models_in_alternation():
    log = []
    cmp = lucidops.profile.compare(_Logged("a", log), _Logged("b", log), torch.randn(1, 2), repeat=3, warmup=1,
                                   fvcore=False, names=("same", "same"))  # one name twice is allowed
    timed = log[-8:]  # the warm-up round and three timed rounds come last
    assert timed == ["a", "b"] * 4
    assert len(cmp.original.latencies_s) == len(cmp.patched.latencies_s) == 3
    assert cmp.original.latency_s == pytest.approx(sorted(cmp.original.latencies_s)[1])


def test_compare_rejects_one_object_twice():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="deepcopy"):
        lucidops.profile.compare(model, model, torch.randn(1, 2))
    with pytest.raises(TypeError, match="patched"):
        lucidops.profile.compare(model, "model", torch.randn(1, 2))


# ---------------------------------------------------------------- the command


def test_cli_profile_compares_a_patched_vit(tmp_path, capsys):
    png = tmp_path / "vit.png"
    rc = cli.main(["profile", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch", "--repeat", "1",
                   "--warmup", "0", "--png", str(png)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "vit_tiny_patch16_224 (patched)" in out and "speed-up" in out and "5,680,552" in out
    assert "[profile]" in err  # progress on stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_profile_depth_with_patch_prints_each_breakdown(capsys):
    """--depth was accepted with --patch and did nothing (the comparison shows totals): given,
    each model's report and breakdown follow the comparison; not given, the comparison alone."""
    argv = ["profile", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch", "--repeat", "1",
            "--warmup", "0", "--quiet"]
    assert cli.main(argv) == 0
    assert "by module" not in capsys.readouterr().out
    assert cli.main(argv + ["--depth", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("by module") == 2 and "patched/original" in out
    assert out.index("patched/original") < out.index("by module")
    assert all("\n    11 " in side for side in out.split("by module")[1:])  # depth 2 reaches blocks.11


def test_cli_profile_builds_the_many_head_variant(capsys):
    model, kind, size = cli._make_model("vit_tiny_patch16_224", 32, num_heads=24)
    assert (kind, size) == ("image", 32)
    assert all(block.attn.num_heads == 24 and block.attn.head_dim == 8 for block in model.blocks)
    rc = cli.main(["profile", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-heads", "24", "--patch",
                   "--repeat", "1", "--warmup", "0", "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "vit_tiny_patch16_224 (patched)" in out and "5,680,552" in out  # heads do not change the parameters


def test_cli_profile_runs_model_and_input_in_the_dtype_asked(capsys, monkeypatch):
    """--dtype bfloat16: both models and the input in bfloat16, and the tables say so."""
    seen = []
    compare = lucidops.profile.compare

    def recording_compare(original, patched, inputs, **kwargs):
        seen.append((next(original.parameters()).dtype, next(patched.parameters()).dtype, inputs.dtype))
        return compare(original, patched, inputs, **kwargs)

    monkeypatch.setattr(lucidops.profile, "compare", recording_compare)
    rc = cli.main(["profile", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch", "--repeat", "1",
                   "--warmup", "0", "--quiet", "--dtype", "bfloat16"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert seen == [(torch.bfloat16,) * 3]
    assert "vit_tiny_patch16_224 [bfloat16] (patched)" in out and "5,680,552" in out
    assert lucidops.backends.last_used("attention") == "cpp"  # the patched model ran lucidops' kernel


def test_cli_profile_one_point_model(capsys):
    rc = cli.main(["profile", "--model", "pointnet_vanilla", "--points", "16", "--batch", "2", "--repeat", "1",
                   "--warmup", "0", "--quiet", "--backward"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "pointnet_vanilla on cpu (forward + backward)" in out and err == ""
    params = sum(p.numel() for p in lucidops.models.PointNet(feature_transform=False,
                                                              input_transform=False).parameters())
    assert f"{params:,}" in out


@pytest.mark.parametrize("args,message", [
    (["--model", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
    (["--model", "pointnet", "--batch", "0"], "--batch must be >= 1"),
    (["--model", "pointnet", "--png", "x.png"], "use it with --patch"),
    (["--model", "pointnet", "--num-heads", "4"], "--num-heads applies to timm transformers"),
    (["--model", "pointnet_vanilla", "--img-size", "999"], "--img-size applies to timm models"),  # was ignored
    (["--model", "resnet18", "--points", "64"], "--points applies to point models"),
    (["--model", "vit_tiny_patch16_224", "--img-size", "32", "--num-heads", "5"],
     "--num-heads 5: vit_tiny_patch16_224 cannot be built"),  # 192 is not a multiple of 5
    (["--model", "vit_tiny_patch16_224", "--num-heads", "0"], "--num-heads must be >= 1"),
    (["--model", "resnet18", "--img-size", "32", "--patch"], "found nothing to patch in this model"),
    # Smaller than the patch: was a traceback from inside the profile's forward (exit 1).
    (["--model", "vit_tiny_patch16_224", "--img-size", "8"], "--img-size 8: the model cannot run on 8x8 images"),
    # Already Gaussian: apply's ValueError was a traceback (exit 1) naming an option never passed.
    (["--model", "gaussian_pointnet", "--patch"], "--patch: point_encoders=True was requested but the model has "
                                                 "no point encoder"),
    (["--model", "pointnet", "--warmup", "-1"], "--warmup must be >= 0"),  # was a traceback
    (["--model", "pointnet", "--depth", "-1"], "--depth must be >= 0"),
    (["--model", "pointnet", "--patch", "--png", "/proc/no/x.png"], "cannot write in '/proc'"),
    (["--model", "pointnet", "--patch", "--png", "/"], "must be a file path, got the folder '/'"),
] + ([] if torch.cuda.is_available() else [(["--model", "pointnet", "--device", "cuda"], "CUDA is not available")]))
def test_cli_profile_bad_input(args, message, capsys):
    assert cli.main(["profile", "--quiet"] + args) == 2
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["profile", "--model", "pointnet", "--device", "tpu"])


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_compare_chart_colours_bars_by_what_they_show(device, tmp_path, monkeypatch):
    """The last bar was always the speed-up's colour: on the meta device (no latency, no
    speed-up bar) the FLOPs ratio came out orange."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes

    compare_module = importlib.import_module("lucidops.profile.compare")  # the package exports compare()

    drawn = {}
    bar = Axes.bar

    def recording_bar(self, x, height, *args, color=None, **kwargs):
        drawn["colors"] = list(color)
        return bar(self, x, height, *args, color=color, **kwargs)

    monkeypatch.setattr(Axes, "bar", recording_bar)
    original = nn.Sequential(nn.Linear(8, 16), nn.GELU()).to(device)
    patched = copy.deepcopy(original)
    patched[1] = lucidops.nn.Sinc(1.0).to(device)
    cmp = lucidops.profile.compare(original, patched, torch.randn(3, 8, device=device), repeat=1, warmup=0)
    cmp.plot(tmp_path / "c.png")
    kinds = [compare_module.RATIO_COLOR] * (len(drawn["colors"]) - (device == "cpu"))
    assert drawn["colors"] == kinds + ([compare_module.SPEEDUP_COLOR] if device == "cpu" else [])


def test_png_without_matplotlib_says_what_to_install(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    a = nn.Linear(2, 2)
    with pytest.raises(ImportError, match=r"pip install lucidops\[plot\]"):
        lucidops.profile.compare(a, copy.deepcopy(a), torch.randn(1, 2), png=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


class _ParameterAsInput(nn.Module):
    """A module called with a parameter as its input, as timm's attention pooling (SigLIP)
    passes its latent query to its own layers."""

    def __init__(self):
        super().__init__()
        self.latent = nn.Parameter(torch.randn(1, 8))
        self.inner = nn.Linear(8, 8)
        self.outer = nn.Linear(8, 8)

    def forward(self, x):
        return self.outer(x) + self.inner(self.latent)


def test_counts_of_a_module_called_with_a_parameter_under_no_grad():
    """PyTorch's module tracker fails under no_grad there ("Expected gradient function to be
    set"): report's forward (counted under no_grad), count_flops in a no_grad block and
    patch.leaner of a SigLIP-style ViT failed with it."""
    model, x = _ParameterAsInput(), torch.randn(4, 8)
    want = lucidops.profile.count_flops(model, x)["total"]
    assert want == 2 * 4 * 8 * 8 + 2 * 8 * 8
    with torch.no_grad():
        assert lucidops.profile.count_flops(model, x)["total"] == want
        assert lucidops.profile.report(model, x, repeat=1, warmup=0, fvcore=False).flops == want
    assert all(p.grad is None for p in model.parameters())
    timm = pytest.importorskip("timm")
    if "test_vit3" in timm.list_models("test_vit3"):  # attention pooling (global_pool="map")
        report = lucidops.patch.leaner("test_vit3", depth_divisor=1)
        assert report.flops[0] > 0 and report.flops[1] > 0


@pytest.mark.parametrize("args,message", [
    (["--model", "vit_large_patch16_224", "--png", "x.png"], "use it with --patch"),
    (["--model", "vit_large_patch16_224", "--points", "10"], "--points applies to point models"),
])
def test_cli_profile_usage_errors_come_before_the_model_is_built(args, message, capsys, monkeypatch):
    # both were said after building it: 11 to 14 s and 1.9 GB for ViT-L
    monkeypatch.setattr(cli, "_make_model", lambda *a: pytest.fail("built the model before a usage error"))
    assert cli.main(["profile", "--quiet"] + args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("method, per_call", [("uniform", 0), ("kmeans", 2 * 256 * 2)])
def test_saved_bytes_leave_out_a_quantized_adapters_own_tensors(method, per_call):
    """A quantized adapter is a plain attribute, not parameters or buffers: the views of its
    codes and tables the op saves for backward were counted as activations (x's 4096 bytes
    read 8448). What a call makes (kmeans' codebooks padded to 256 entries) still counts."""
    from lucidops.profile.report import saved_tensor_bytes

    torch.manual_seed(0)
    layer = lucidops.nn.BoundedLoRALinear(nn.Linear(256, 256), rank=8, fn="sin", omega=1.0, alpha=8)
    layer.base.requires_grad_(False)
    layer.quantize_(bits=4, method=method)
    x = torch.randn(4, 256, requires_grad=True)
    assert saved_tensor_bytes(layer, (x,)) == x.numel() * 4 + per_call
