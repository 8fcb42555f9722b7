"""Deploying models that use lucidops: torch.export with dynamic sizes, and torch.compile
that does not recompile when the batch or the point/token count changes.

Each exported program keeps lucidops' custom op in its graph (the fused kernel, not a
decomposition), survives a save/load round trip, and on inputs of other sizes gives what
the eager module gives, bit for bit.
"""

import io

import pytest
import torch

from small_modules import small_modules

CASES = sorted(small_modules())


def lucidops_ops(graph) -> set:
    return {str(node.target) for node in graph.nodes if str(node.target).startswith("lucidops.")}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_export_with_dynamic_sizes_round_trips(name, strict):
    module, example, other, dims = small_modules()[name]
    module.eval()
    program = torch.export.export(module, (example,), dynamic_shapes=(dims,), strict=strict)
    assert lucidops_ops(program.graph), "the exported graph lost lucidops' op"
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for x in (example, other):
        with torch.no_grad():
            want = module(x)
        got = loaded(x)
        assert got.shape == want.shape and torch.equal(got, want)


def test_export_refuses_what_eager_refuses():
    """The wrapper's checks still run while exporting: a shape error is not traced away."""
    encoder = small_modules()["gaussian_encoder_max"][0].eval()
    with pytest.raises(ValueError, match="points"):
        torch.export.export(encoder, (torch.rand(2, 20, 2),))


@pytest.mark.parametrize("name", ["gaussian_encoder_max", "gaussian_encoder_none", "sine_lora", "attention"])
def test_dynamic_compile_does_not_recompile_for_new_sizes(name):
    module, example, other, _ = small_modules()[name]
    module.eval()
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(module, backend=counting_backend, dynamic=True, fullgraph=True)
    with torch.no_grad():
        for x in (example, other):
            assert torch.equal(compiled(x), module(x))
    assert len(compiles) == 1, f"{len(compiles)} compilations for two input sizes"


@pytest.mark.parametrize("tracing_mode", ["fake", "symbolic"])
@pytest.mark.parametrize("name", CASES)
def test_make_fx_and_fake_tensors_trace_every_module(name, tracing_mode):
    """The wrappers' data-dependent checks stand aside for fake tensors, as they do while
    torch.compile traces (they read the values before: gaussian_mixture and a learnable sigma
    failed under FakeTensorMode and make_fx's fake and symbolic tracing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    module, example, _, _ = small_modules()[name]
    module.eval()
    with torch.no_grad():
        graph = make_fx(lambda x: module(x), tracing_mode=tracing_mode, _allow_non_fake_inputs=True)(example)
    assert lucidops_ops(graph.graph), "the traced graph lost lucidops' op"
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        out = module(mode.from_tensor(example))
    assert out.shape == module(example).shape
