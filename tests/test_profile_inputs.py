"""lucidops.profile: count_flops and report agree on their inputs and leave the model as they
found it (gradients, compiled calls); the meta device; compare()'s png preflight."""

import copy
import math
import os

import pytest
import torch
from torch import nn

import lucidops


class Pair(nn.Module):
    """Takes one tuple argument."""

    def forward(self, pair):
        return pair[0] @ pair[1].T


class Holder(nn.Module):
    """Holds a tensor that requires grad as a plain attribute, not an nn.Parameter."""

    def __init__(self):
        super().__init__()
        self.w = torch.randn(4, 8, requires_grad=True)

    def forward(self, t):
        return t @ self.w.T


class ParamThroughSubmodule(nn.Module):
    """Passes its parameter itself to a submodule (FlopCounterMode's tracker hooks that leaf)."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.randn(3, 8))
        self.lin = nn.Linear(8, 4)

    def forward(self, t):
        return self.lin(self.p) + t.sum()


def test_backward_counts_leave_every_grad_alone():
    """count_flops(backward=True) restored .grad for model.parameters() and top-level tensor
    arguments only: weights a function closes over, tensors nested in the inputs and tensor
    attributes that are not Parameters kept the gradients of the count; a .grad that was
    there was added to in place (and put back, added to)."""
    w = torch.randn(4, 8, requires_grad=True)
    x = torch.randn(3, 8)
    counts = lucidops.profile.count_flops(lambda t: t @ w.T, x, backward=True)
    assert counts["total"] == 2 * (2 * 3 * 8 * 4)  # forward, dW
    assert w.grad is None

    xx = torch.randn(3, 8, requires_grad=True)
    nested = lucidops.profile.count_flops(Pair(), ((xx, w),), backward=True)
    assert nested["total"] == 3 * (2 * 3 * 8 * 4)  # forward, d(xx), dW
    assert xx.grad is None and w.grad is None

    holder = Holder()
    assert lucidops.profile.count_flops(holder, x, backward=True)["total"] == counts["total"]
    assert holder.w.grad is None

    model = ParamThroughSubmodule()
    before = torch.ones(3, 8)
    model.p.grad = before
    lucidops.profile.count_flops(model, x, backward=True)
    assert model.p.grad is before and torch.equal(before, torch.ones(3, 8))
    assert model.lin.weight.grad is None


def test_report_backward_differentiates_every_leaf_like_count_flops():
    """report(backward=True) took gradients of the parameters and top-level inputs only: a
    nested input's backward went uncounted, a model with only a plain tensor attribute was
    refused, and a parameter passed to a submodule failed in torch's module tracker."""
    w = torch.randn(4, 8, requires_grad=True)
    xx = torch.randn(3, 8, requires_grad=True)
    rep = lucidops.profile.report(Pair(), ((xx, w),), backward=True, repeat=1, warmup=0, fvcore=False)
    assert rep.flops == lucidops.profile.count_flops(Pair(), ((xx, w),), backward=True)["total"] == 3 * 192
    assert xx.grad is None and w.grad is None

    x = torch.randn(3, 8)
    holder = Holder()
    assert lucidops.profile.report(holder, x, backward=True, repeat=1, warmup=0, fvcore=False).flops == 2 * 192
    assert holder.w.grad is None

    model = ParamThroughSubmodule()
    rep = lucidops.profile.report(model, x, backward=True, repeat=1, warmup=0, fvcore=False)
    assert rep.flops == lucidops.profile.count_flops(model, x, backward=True)["total"]
    assert rep.flops == 3 * (2 * 3 * 8 * 4)  # forward, dW, d(p)
    assert all(p.grad is None for p in model.parameters())


def test_count_flops_and_report_take_the_same_inputs():
    """A list was the positional arguments to report but one argument to count_flops; a frozen
    model raised autograd's own error. Now both read a tuple/list as the arguments (() for a
    model without any) and any other value (a tensor, a dict) as the one argument."""
    lin, x = nn.Linear(8, 4), torch.randn(3, 8)
    expected = 2 * 3 * 8 * 4
    assert lucidops.profile.count_flops(lin, [x])["total"] == expected
    assert lucidops.profile.count_flops(lin, (x,))["total"] == expected
    assert lucidops.profile.report(lin, [x], repeat=1, warmup=0, fvcore=False).flops == expected
    assert lucidops.profile.fvcore_flops(lin, [x])["total"] == expected // 2

    class TakesDict(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, batch):
            return self.lin(batch["x"])

    assert lucidops.profile.count_flops(TakesDict(), {"x": x})["total"] == expected
    assert lucidops.profile.report(TakesDict(), {"x": x}, repeat=1, warmup=0, fvcore=False).flops == expected

    class NoArguments(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.randn(3, 8))

        def forward(self):
            return lin(self.x)

    assert lucidops.profile.count_flops(NoArguments(), ())["total"] == expected
    assert lucidops.profile.count_flops(lambda: lin(x), ())["total"] == expected
    with pytest.raises(TypeError, match="inputs must be the model's positional arguments"):
        lucidops.profile.count_flops(lin, None)
    frozen = nn.Linear(8, 4).requires_grad_(False)
    with pytest.raises(ValueError, match="backward=True but neither the model's parameters nor the inputs"):
        lucidops.profile.count_flops(frozen, x, backward=True)
    with pytest.raises(ValueError, match="backward=True but neither the model's parameters nor the inputs"):
        lucidops.profile.report(frozen, x, backward=True)


def test_backward_counts_run_the_model_as_it_is():
    """Counting must not change what the model sees or refuse what a backward runs: a
    reentrant checkpoint (torch.autograd.grad refuses it), a submodule that checks it was
    given a Parameter, a branch on is_leaf (views of leaves had changed both)."""
    from torch.utils.checkpoint import checkpoint

    lin = nn.Linear(8, 8)

    class Reentrant(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return checkpoint(self.lin, x, use_reentrant=True)

    class WantsParameter(nn.Module):
        def forward(self, x, w):
            assert isinstance(w, nn.Parameter) and w.is_leaf
            return x @ w

    class PassesParameter(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 8))
            self.inner = WantsParameter()

        def forward(self, x):
            return self.inner(x, self.w)

    x = torch.randn(4, 8, requires_grad=True)
    lin.weight.grad = torch.ones_like(lin.weight)
    before = lin.weight.grad.clone()
    counts = lucidops.profile.count_flops(Reentrant(), x, backward=True)
    assert counts["total"] == 4 * (2 * 4 * 8 * 8)  # forward, its recomputation, dX, dW
    assert torch.equal(lin.weight.grad, before) and x.grad is None
    model = PassesParameter()
    assert lucidops.profile.count_flops(model, x, backward=True)["total"] == 3 * (2 * 4 * 8 * 8)
    assert lucidops.profile.report(model, x, backward=True, repeat=1, warmup=0, fvcore=False).flops == 3 * 512
    assert model.w.grad is None and x.grad is None


def test_report_on_the_meta_device_counts_and_measures_nothing():
    """On meta, report gave 0 B of "saved for backward" memory and a timed latency of ops
    that compute nothing, and refused device="meta": now FLOPs and parameters are counted,
    memory and latency are n/a."""
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    real = lucidops.profile.report(model, x, backward=True, repeat=1, warmup=0, fvcore=False)
    meta_model = copy.deepcopy(model).to("meta")
    meta = lucidops.profile.report(meta_model, x.to("meta"), backward=True, repeat=3, warmup=1, fvcore=False)
    assert meta.device == "meta" and (meta.flops, meta.params) == (real.flops, real.params)
    assert meta.by_module == real.by_module and meta.flops_by_op == real.flops_by_op
    assert meta.peak_memory_bytes is None and meta.memory_kind == "not measured on meta"
    assert math.isnan(meta.latency_s) and meta.latencies_s == []
    rows = {line.rsplit("  ", 1)[0].strip(): line.rsplit("  ", 1)[1].strip() for line in str(meta).splitlines()
            if "  " in line}
    assert rows["peak memory (not measured on meta)"] == "n/a" and rows["latency"] == "n/a (not run on meta)"
    assert "nan" not in str(meta)

    moved = lucidops.profile.report(copy.deepcopy(model), x, device="meta", repeat=1, warmup=0, fvcore=False)
    assert moved.device == "meta" and moved.peak_memory_bytes is None and moved.flops == 2 * 3 * (8 * 16 + 16 * 4)

    cmp = lucidops.profile.compare(meta_model, copy.deepcopy(meta_model), x.to("meta"), repeat=2, warmup=0,
                                   fvcore=False)
    ratios = cmp.ratios()
    assert ratios["flops"] == 1.0 and ratios["peak_memory_bytes"] is None
    assert ratios["latency_s"] is None and ratios["speedup"] is None
    assert "n/a" in str(cmp) and "nan" not in str(cmp)


def test_modules_compiled_in_place_are_counted_through_their_eager_forward():
    """nn.Module.compile() (in place, not a wrapper) was not unwrapped: fvcore could not trace
    the model (report: n/a, fvcore_flops: a RuntimeError)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(3, 8)
    plain = lucidops.profile.report(model, x, backward=True, repeat=1, warmup=0)
    fv_plain = lucidops.profile.fvcore_flops(model, x)
    model.compile(backend="eager")
    compiled_call = model._compiled_call_impl
    assert compiled_call is not None
    assert lucidops.profile.fvcore_flops(model, x) == fv_plain
    assert lucidops.profile.count_flops(model, x, backward=True)["total"] == plain.flops
    rep = lucidops.profile.report(model, x, backward=True, repeat=1, warmup=0)
    assert rep.fvcore_error is None and rep.fvcore_flops == plain.fvcore_flops
    assert (rep.flops, rep.by_module) == (plain.flops, plain.by_module)
    assert model._compiled_call_impl is compiled_call  # the user's module is compiled as before

    inner = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    inner[0].compile(backend="eager")  # a submodule compiled in place
    assert lucidops.profile.fvcore_flops(inner, x) == fv_plain
    assert inner[0]._compiled_call_impl is not None


def test_compare_refuses_a_png_path_that_is_a_folder_before_profiling(tmp_path):
    """png= an existing folder passed the preflight (its parent exists) and failed with
    IsADirectoryError after all the profiling."""
    pytest.importorskip("matplotlib")
    calls = []

    class Logged(nn.Linear):
        def forward(self, t):
            calls.append(1)
            return super().forward(t)

    model = Logged(8, 4)
    # A name ending in a separator (a folder to be) passed too: abspath strips the separator.
    # /proc was not checked for writability: both failed after the profiling.
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for png, error, message in [(tmp_path, IsADirectoryError, "must be a file path, got the folder"),
                                (str(tmp_path / "new") + os.sep, IsADirectoryError, "got the folder"),
                                (blocker / "x.png", NotADirectoryError, "is not a folder"),
                                ("/proc/lucidops-test/x.png", PermissionError, "cannot write in '/proc'")]:
        with pytest.raises(error, match=message):
            lucidops.profile.compare(model, copy.deepcopy(model), torch.randn(3, 8), png=png, repeat=1, warmup=0)
    assert calls == []  # refused before any profiling
    assert not (tmp_path / "new").exists()
    assert "got the folder" in lucidops.profile.png_path_problem(tmp_path)
    assert lucidops.profile.png_path_problem(tmp_path / "x.png") is None


def test_compare_makes_a_missing_png_folder_as_the_demos_do(tmp_path):
    """compare() refused a folder that did not exist yet (FileNotFoundError) while the demos
    made theirs: one rule now, the demos' (lucidops.demos._png), and the folder is made."""
    pytest.importorskip("matplotlib")
    from lucidops.demos import _png

    assert lucidops.profile.png_path_problem is _png.png_path_problem
    png = tmp_path / "no" / "sub" / "x.png"
    assert lucidops.profile.png_path_problem(png) is None
    model = nn.Linear(8, 4)
    lucidops.profile.compare(model, copy.deepcopy(model), torch.randn(3, 8), png=png, repeat=1, warmup=0,
                             fvcore=False)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_moves_namedtuple_and_dataclass_inputs_and_finds_nested_devices():
    """device= rebuilt a namedtuple from one generator (TypeError) and left dataclasses where
    they were; with no device, tensors inside a dict were not looked at, so a parameterless
    model given meta tensors was profiled as a CPU one (latency timed, memory 0)."""
    import collections
    import dataclasses

    Pair = collections.namedtuple("Pair", "a b")

    @dataclasses.dataclass
    class Batch:
        a: torch.Tensor
        b: torch.Tensor

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(8, 4)

        def forward(self, pair):
            return self.linear(pair.a) + self.linear(pair.b)

    x = torch.randn(3, 8)
    want = lucidops.profile.count_flops(Model(), (Pair(x, x),))["total"]
    for inputs in (Pair(x, x), Batch(x, x)):
        rep = lucidops.profile.report(Model(), (inputs,), device="cpu", repeat=1, warmup=0, fvcore=False)
        assert rep.flops == want

    class Parameterless(torch.nn.Module):
        def forward(self, d):
            return torch.relu(d["x"]) * 2

    rep = lucidops.profile.report(Parameterless(), {"x": torch.empty(4, 8, device="meta")}, repeat=1, warmup=0,
                                  fvcore=False)
    assert rep.device == "meta" and rep.peak_memory_bytes is None and math.isnan(rep.latency_s)


def test_report_name_must_be_a_string():
    # failed in the timing's label, after every count had run
    with pytest.raises(TypeError, match="name must be a str or None, got int"):
        lucidops.profile.report(torch.nn.Linear(8, 4), torch.randn(3, 8), name=3)
