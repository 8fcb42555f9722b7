"""Deploying models that use lucidops: torch.export with dynamic sizes, and torch.compile
that does not recompile when the batch or the point/token count changes.

Each exported program keeps lucidops' custom op in its graph (the fused kernel, not a
decomposition), survives a save/load round trip, and on inputs of other sizes gives what
the eager module gives, bit for bit.
"""

import io

import pytest
import torch

import lucidops

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


@pytest.mark.parametrize("strict", [False, True])
def test_masked_attention_exports_for_every_batch_and_token_count(strict):
    """timm's (B, 1, 1, N) key padding mask: the module asked B != N of every mask (that tells a
    2-D padding mask from a 2-D (N, N) one), a guard under symbolic shapes, so the exported
    program refused batch == tokens, and a patched timm ViT (17 tokens, dynamic batch) did not
    export at all."""
    torch.manual_seed(0)

    def mask(b, n):
        m = torch.rand(b, 1, 1, n) > 0.3
        m[..., 0] = True
        return m

    module = lucidops.nn.ManyHeadAttention(32, 8).eval()
    batch, tokens = torch.export.Dim("batch"), torch.export.Dim("tokens", min=2)
    program = torch.export.export(module, (torch.randn(3, 6, 32), mask(3, 6)),
                                  dynamic_shapes=({0: batch, 1: tokens}, {0: batch, 3: tokens}), strict=strict)
    assert lucidops_ops(program.graph)
    for b, n in [(4, 9), (6, 6)]:
        x, m = torch.randn(b, n, 32), mask(b, n)
        with torch.no_grad():
            assert torch.equal(program.module()(x, m), module(x, m))


def test_patched_timm_vit_with_a_padding_mask_exports_with_a_dynamic_batch():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2).eval()
    lucidops.patch.timm_vit(vit)
    mask = torch.ones(2, 1, 1, 17, dtype=torch.bool)
    batch = torch.export.Dim("batch")
    program = torch.export.export(vit, (torch.randn(2, 3, 32, 32), mask), dynamic_shapes=({0: batch}, {0: batch}))
    x, mask = torch.randn(17, 3, 32, 32), torch.rand(17, 1, 1, 17) > 0.3
    mask[..., 0] = True
    with torch.no_grad():
        assert torch.equal(program.module()(x, mask), vit(x, mask))  # batch == tokens


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
