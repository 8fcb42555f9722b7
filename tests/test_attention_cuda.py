"""The triton backend of attention on CUDA tensors: the compiled kernels (tensor cores, real
bfloat16 and float16 products), not the interpreter that test_attention.py runs on the CPU.

Every test here is marked cuda: skipped, with its reason, without a GPU; bench/gpu_check.sh
runs them. The checks themselves are test_attention's (the same helpers, on device "cuda").
"""

import pytest
import torch

import lucidops
from lucidops.reference import attention as ref
from test_attention import (CASES, TOL, attention_module, case_id, check_against_float64_reference,
                            check_non_contiguous_inputs, rel_err)

pytestmark = pytest.mark.cuda

# (B, H, Nq, Nk, d, causal, mask kind, dtype), sizes the interpreter cannot afford: many
# packed heads, rows spanning many query and key blocks, every padded head dim (16..128),
# head counts that leave a partial group, Nq != Nk.
GPU_CASES = [
    (2, 96, 197, 197, 8, False, None, torch.bfloat16),
    (2, 48, 197, 197, 16, True, "random", torch.float16),
    (1, 12, 1024, 1024, 64, True, None, torch.bfloat16),
    (1, 6, 300, 1000, 32, False, "first_key_off", torch.float32),
    (2, 2, 513, 513, 128, True, "batch0_off", torch.bfloat16),
    (3, 7, 100, 77, 24, False, "random", torch.float16),
    (1, 5, 257, 257, 4, True, "first_key_off", torch.float32),
]


@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=case_id)
def test_triton_on_cuda_matches_float64_reference(case, poison_allocator):
    check_against_float64_reference("triton", case, "cuda", poison_allocator)


@pytest.mark.parametrize("case", [GPU_CASES[0], GPU_CASES[2]], ids=case_id)
def test_triton_on_cuda_dropout_matches_the_reference_mask(case, poison_allocator):
    """The compiled kernels' uint32 hash drops exactly the reference's probabilities."""
    check_against_float64_reference("triton", case, "cuda", poison_allocator, dropout_p=0.2)


def test_triton_is_the_cuda_default():
    q, k, v = (torch.randn(1, 3, 5, 8, device="cuda") for _ in range(3))
    lucidops.ops.attention(q, k, v)
    assert lucidops.backends.last_used("attention") == "triton"


def test_triton_on_cuda_reads_strided_inputs_and_grad_out():
    check_non_contiguous_inputs("triton", "cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_cuda_stores_token_major(dtype):
    """The kernel writes (B, H, Nq, d) laid out (B, Nq, H, d) itself; merging heads is a view."""
    q, k, v = (torch.randn(2, 3, n, 8, device="cuda", dtype=dtype) for n in (5, 7, 7))
    out = attention_module._triton_forward(q, k, v, None, False, 0.3)[0]
    assert out.stride() == attention_module._token_major_strides(*out.shape)
    merged = lucidops.ops.attention(q, k, v, scale=0.3).transpose(1, 2).reshape(2, 5, 24)
    assert merged._base is not None
    expected = ref.attention(q.double(), k.double(), v.double(), scale=0.3).transpose(1, 2).reshape(2, 5, 24)
    assert rel_err(merged, expected) < TOL[dtype]


def test_triton_on_cuda_empty_sizes():
    for b, nq, nk in ((0, 5, 5), (2, 0, 5), (2, 5, 0)):
        q, k, v = (torch.randn(b, 2, n, 8, device="cuda", requires_grad=True) for n in (nq, nk, nk))
        out, lse = lucidops.ops.attention(q, k, v, return_lse=True)
        out.sum().backward()
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
        for t in (q, k, v):
            assert torch.equal(t.grad, torch.zeros_like(t))


def test_triton_on_cuda_opcheck():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 3, n, 8, generator=g).cuda() for n in (5, 7, 7))
    mask = torch.tensor([[True, True, False, True, True, False, True]], device="cuda")
    torch.library.opcheck(torch.ops.lucidops.attention.default, (q, k, v, mask, True, 0.3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_timm_vit_on_cuda_matches_the_original(dtype):
    """The issue's promise on the GPU default: a timm ViT patched for the triton kernel gives
    the original's outputs and parameter gradients within the dtype's tolerance."""
    import copy

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_heads=12).cuda().to(dtype)
    patched = copy.deepcopy(model)
    handle = lucidops.patch.timm_vit(patched)
    x = torch.randn(2, 3, 64, 64, device="cuda", dtype=dtype)
    outs, grads = [], []
    for m in (model, patched):
        out = m(x)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append({n: p.grad.float() for n, p in m.named_parameters()})
    assert lucidops.backends.last_used("attention") == "triton"
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2}[dtype]
    assert rel_err(outs[1], outs[0]) < tol
    for name, grad in grads[0].items():
        assert rel_err(grads[1][name], grad) < tol, name
    handle.revert()
