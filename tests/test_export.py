"""Deploying models that use lucidops: torch.export with dynamic sizes, and torch.compile
that does not recompile when the batch or the point/token count changes.

Each exported program keeps lucidops' custom op in its graph (the fused kernel, not a
decomposition), survives a save/load round trip, and on inputs of other sizes gives what
the eager module gives, bit for bit.
"""

import io

import pytest
import torch
from torch import nn
from torch.export import Dim

import lucidops


def modules():
    """name -> (module in eval mode, example input, input of other sizes, its dynamic dims)."""
    torch.manual_seed(0)
    batch, tokens, points = Dim("batch"), Dim("tokens"), Dim("points")
    sine = lucidops.nn.SineLoRALinear(nn.Linear(32, 16), rank=4, omega=2.0, alpha=4)
    bounded = lucidops.nn.BoundedLoRALinear(nn.Linear(32, 16), rank=4, fn="tanh", omega=2.0, alpha=4,
                                            placement="output")
    quantized = lucidops.nn.SineLoRALinear(nn.Linear(64, 16), rank=4, omega=2.0, alpha=4)
    for layer in (sine, bounded, quantized):
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.3)  # B starts at zero: make the adapter count
    quantized.quantize_(bits=4, group_size=16)
    return {
        "attention": (lucidops.nn.ManyHeadAttention(32, 8), torch.randn(2, 5, 32), torch.randn(3, 11, 32),
                      {0: batch, 1: tokens}),
        "sine_lora": (sine, torch.randn(2, 3, 32), torch.randn(4, 7, 32), {0: batch, 1: tokens}),
        "bounded_lora_output": (bounded, torch.randn(3, 32), torch.randn(9, 32), {0: batch}),
        "quantized_sine_lora": (quantized, torch.randn(3, 64), torch.randn(6, 64), {0: batch}),
        "gaussian_encoder_max": (lucidops.nn.GaussianPointEncoder(4, 16), torch.rand(2, 20, 3) * 2 - 1,
                                 torch.rand(3, 33, 3) * 2 - 1, {0: batch, 1: points}),
        "gaussian_encoder_none": (lucidops.nn.GaussianPointEncoder(4, 16, reduce="none"),
                                  torch.rand(2, 20, 3) * 2 - 1, torch.rand(5, 9, 3) * 2 - 1, {0: batch, 1: points}),
        "gaussian_pointnet": (lucidops.nn.GaussianPointNet(num_classes=3, num_gaussians=4, out_channels=16,
                                                           tnet_gaussians=3),
                              torch.rand(2, 20, 3) * 2 - 1, torch.rand(4, 25, 3) * 2 - 1, {0: batch, 1: points}),
        "sinc": (nn.Sequential(nn.Linear(8, 8), lucidops.nn.Sinc(sigma=0.5)), torch.randn(2, 8), torch.randn(5, 8),
                 {0: batch}),
    }


CASES = sorted(modules())


def lucidops_ops(graph) -> set:
    return {str(node.target) for node in graph.nodes if str(node.target).startswith("lucidops.")}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("name", CASES)
def test_export_with_dynamic_sizes_round_trips(name, strict):
    module, example, other, dims = modules()[name]
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
    encoder = lucidops.nn.GaussianPointEncoder(4, 16).eval()
    with pytest.raises(ValueError, match="points"):
        torch.export.export(encoder, (torch.rand(2, 20, 2),))


@pytest.mark.parametrize("name", ["gaussian_encoder_max", "gaussian_encoder_none", "sine_lora", "attention"])
def test_dynamic_compile_does_not_recompile_for_new_sizes(name):
    module, example, other, _ = modules()[name]
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
