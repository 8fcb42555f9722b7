"""Plain eager calls run each op's body without the dispatcher (ops/_eager.py); any call that
autograd, a dispatch or torch-function mode, a tracer or the profiler would see still goes
through the custom op, and both paths give the same bits."""

import pytest
import torch
from torch._library.custom_ops import CustomOpDef
from torch.utils.flop_counter import FlopCounterMode

import lucidops
from lucidops import ops
from lucidops.ops import _eager
from lucidops.quant import quantize_adapter

from test_gaussian_mixture import make_params, make_points
from test_lora import make


@pytest.fixture
def dispatched(monkeypatch):
    """The names of the custom ops called through the dispatcher, in call order."""
    names = []
    call = CustomOpDef.__call__

    def counting(op, *args, **kwargs):
        names.append(str(op._qualname))
        return call(op, *args, **kwargs)

    monkeypatch.setattr(CustomOpDef, "__call__", counting)
    return names


def _calls(seed: int):
    """One small call of every op family (each returns a tensor or a tuple of them)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q, k, v = rand(2, 3, 5, 8), rand(2, 3, 7, 8), rand(2, 3, 7, 8)
    mask = torch.rand(2, 7, generator=gen) > 0.3
    mask[:, 0] = True
    points = make_points((2, 9), torch.float32, seed=seed)
    means, precisions, mixer, mixer_bias = make_params(4, 6, torch.float32, seed=seed)
    x, weight, lora_a, lora_b, bias = make((5, 16), 12, 4, torch.float32, "cpu", seed=seed)
    quantized = quantize_adapter(lora_a, lora_b, bits=4, group_size=8)

    def attention_with_dropout():
        torch.manual_seed(seed)
        return ops.attention(q, k, v, dropout_p=0.25, return_lse=True)

    return {
        "attention": lambda: ops.attention(q, k, v, key_padding_mask=mask, causal=True, return_lse=True),
        "attention dropout": attention_with_dropout,
        "gaussian_mixture": lambda: ops.gaussian_mixture(points, means, precisions, mixer, mixer_bias),
        "gaussian_mixture culled": lambda: ops.gaussian_mixture(points, means, precisions, mixer, None,
                                                                reduce="none", cull_threshold=0.1),
        "sine_lora_linear": lambda: ops.sine_lora_linear(x, weight, lora_a, lora_b, bias, omega=3.0, scale=0.5),
        "bounded_lora_linear output": lambda: ops.bounded_lora_linear(x, weight, lora_a, lora_b, fn="tanh",
                                                                      scale=0.5, placement="output"),
        "quantized adapter": lambda: ops.sine_lora_linear(x, weight, quantized, None, bias, omega=3.0, scale=0.5),
        "sinc": lambda: ops.sinc(x, 0.7),
        "gaussian": lambda: ops.gaussian(x, torch.tensor(0.7)),
    }


CALLS = list(_calls(0))


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("name", CALLS)
def test_a_plain_call_skips_the_dispatcher_and_gives_the_custom_ops_bits(name, dispatched, monkeypatch):
    direct = _as_tuple(_calls(1)[name]())
    assert dispatched == []
    monkeypatch.setattr(_eager, "enabled", False)
    through_op = _as_tuple(_calls(1)[name]())
    assert dispatched, "the forced path did not reach the custom op"
    assert len(direct) == len(through_op)
    for a, b in zip(direct, through_op):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a, b)


def test_inputs_that_require_grad_go_through_the_op_and_their_backward_runs_directly(dispatched, monkeypatch):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=gen).requires_grad_() for _ in range(3))
    out = ops.attention(q, k, v, causal=True)
    assert dispatched == ["lucidops::attention"]
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert dispatched == ["lucidops::attention"]  # grad mode is off inside the backward

    monkeypatch.setattr(_eager, "enabled", False)
    again = torch.autograd.grad(ops.attention(q, k, v, causal=True).square().sum(), (q, k, v))
    assert dispatched[1:] == ["lucidops::attention", "lucidops::attention_backward"]
    for a, b in zip(grads, again):
        assert torch.equal(a, b)


def test_grad_mode_with_frozen_inputs_runs_directly(dispatched):
    x = torch.randn(4, 8)
    with torch.enable_grad():
        ops.sinc(x, 0.5)
    assert dispatched == []


class _Tagged(torch.Tensor):
    """A tensor subclass with torch's default __torch_function__."""


def _attention_call():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=gen) for _ in range(3))
    return q, k, v


def test_flop_counting_sees_the_op(dispatched):
    q, k, v = _attention_call()
    with FlopCounterMode(display=False) as counter:
        ops.attention(q, k, v)
    assert dispatched == ["lucidops::attention"]
    assert counter.get_total_flops() == 4 * 1 * 2 * 3 * 3 * 8


def test_the_profiler_sees_the_op(dispatched):
    q, k, v = _attention_call()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.attention(q, k, v)
    assert dispatched == ["lucidops::attention"]
    assert "lucidops::attention" in {event.name for event in prof.events()}


def test_jit_tracing_records_the_op(dispatched):
    q, k, v = _attention_call()
    traced = torch.jit.trace(lambda q, k, v: ops.attention(q, k, v), (q, k, v), check_trace=False)
    assert "lucidops::attention" in str(traced.graph)


@pytest.mark.parametrize("context", ["default device", "fake tensors", "subclass", "meta"])
def test_modes_subclasses_and_meta_tensors_go_through_the_op(context, dispatched):
    q, k, v = _attention_call()
    if context == "default device":  # a torch-function mode
        with torch.device("cpu"):
            ops.attention(q, k, v)
    elif context == "fake tensors":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode():
            ops.attention(torch.empty(1, 2, 3, 8), torch.empty(1, 2, 3, 8), torch.empty(1, 2, 3, 8))
    elif context == "subclass":
        ops.attention(q.as_subclass(_Tagged), k, v)
    else:
        out = ops.attention(q.to("meta"), k.to("meta"), v.to("meta"))
        assert out.device.type == "meta"
    assert dispatched == ["lucidops::attention"]


def test_a_forced_backend_holds_on_the_direct_path(dispatched):
    x = torch.randn(3, 5)
    with lucidops.use_backend("reference"):
        ops.sinc(x, 0.5)
    assert dispatched == []
    assert lucidops.backends.last_used("sinc") == "reference"
