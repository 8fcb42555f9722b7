"""Many-head attention: every backend against the float64 reference (itself checked
against torch's SDPA), forward and backward, masks, causal, awkward shapes, bad input."""

import importlib
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import lucidops
from lucidops.reference import attention as ref
from lucidops.reference import attention_dropout as dropout
from comparisons import rel_err, within
from conftest import TRITON_DEVICE, needs_triton

attention_module = importlib.import_module("lucidops.ops.attention")  # the module, not the function
BACKENDS = ["reference", "aten", "cpp"] + (["triton"] if lucidops.backends.triton_interpreting() else [])
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.float64: 1e-12}

# (B, H, Nq, Nk, d, causal, mask kind, dtype): every d in {4, 8, 12, 16, 32, 64} (and 20,
# 128), H in {1, 3} (and 5: a partial group of packed heads), N in {1, 7, 33}, Nq != Nk.
CASES = [
    (2, 1, 1, 1, 4, False, None, torch.float32),
    (1, 3, 7, 33, 8, False, "random", torch.float16),
    (2, 3, 33, 7, 12, True, "first_key_off", torch.bfloat16),
    (1, 3, 33, 33, 16, True, None, torch.float32),
    (2, 1, 7, 7, 32, False, "batch0_off", torch.float32),
    (1, 3, 7, 33, 64, True, "random", torch.bfloat16),
    (1, 3, 1, 33, 4, True, None, torch.float16),
    (2, 3, 33, 1, 16, False, "random", torch.float32),
    (1, 1, 33, 7, 64, False, None, torch.float16),
    (1, 3, 7, 7, 12, False, "batch0_off", torch.float32),
    (1, 1, 7, 9, 128, True, None, torch.float32),
    (1, 5, 7, 9, 8, False, "first_key_off", torch.float32),
    (2, 3, 9, 9, 20, True, None, torch.float32),
    (1, 4, 33, 7, 4, True, "random", torch.bfloat16),
    (1, 6, 9, 17, 24, False, "random", torch.float16),  # triton: 4 heads of d 24 per program, then 2
]


def make_mask(kind, b, nk, generator):
    if kind is None:
        return None
    mask = torch.rand(b, nk, generator=generator) > 0.3
    mask[:, -1] = True
    if kind == "first_key_off":  # with causal, query 0 sees no key
        mask[:, 0] = False
    if kind == "batch0_off":  # every query of batch element 0 sees no key
        mask[0] = False
    return mask


def case_id(case):
    b, h, nq, nk, d, causal, mask, dtype = case
    return f"B{b}H{h}q{nq}k{nk}d{d}{'-causal' if causal else ''}-{mask}-{str(dtype)[6:]}"


def check_against_float64_reference(backend, case, device="cpu", poison=None, atol=0.0, dropout_p=0.0):
    """Forward (out and lse) and backward (through out and lse) of one case under ``backend``
    on ``device``, against the float64 reference on the CPU; also test_attention_cuda's. With
    ``dropout_p`` the op draws its seed from a seeded generator and the reference drops by the
    same seed: every backend must drop exactly the reference's probabilities.

    Each result must be within TOL relative error, or within ``atol`` of the reference in every
    element: a gradient that is zero in exact arithmetic (one visible key per query) keeps
    float32 rounding that no relative bound accepts."""
    b, h, nq, nk, d, causal, mask_kind, dtype = case
    g = torch.Generator().manual_seed(nq * 1000 + nk * 10 + d)
    q = (torch.randn(b, h, nq, d, generator=g) * 1.5).to(device=device, dtype=dtype).requires_grad_(True)
    k = (torch.randn(b, h, nk, d, generator=g) * 1.5).to(device=device, dtype=dtype).requires_grad_(True)
    v = torch.randn(b, h, nk, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    mask_cpu = make_mask(mask_kind, b, nk, g)
    mask = mask_cpu.to(device) if mask_cpu is not None else None
    grad_out = torch.randn(b, h, nq, d, generator=g).to(device=device, dtype=dtype)
    grad_lse = torch.randn(b, h, nq, generator=g).to(device)

    if poison is not None:
        poison(4 * b * h * max(nq, nk) * d, device, dtype)
    generator_seed = nq * 7 + nk + d
    torch.manual_seed(generator_seed)
    seed = dropout.draw_seed(torch.device(device)).cpu() if dropout_p else None  # the draw the op makes next
    torch.manual_seed(generator_seed)
    with lucidops.use_backend(backend):
        out, lse = lucidops.ops.attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True,
                                          dropout_p=dropout_p)
        # The loss uses the lse too (its -inf entries masked out), so its gradient path is tested.
        finite = torch.isfinite(lse)
        loss = (out.float() * grad_out.float()).sum() + (lse.masked_fill(~finite, 0) * grad_lse).sum()
        loss.backward()
        assert lucidops.backends.last_used("attention") == backend
        assert lucidops.backends.last_used("attention_backward") == backend
    assert out.shape == (b, h, nq, d) and out.dtype == dtype and lse.shape == (b, h, nq)
    assert out.device == q.device and lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    scale = 1.0 / math.sqrt(d)
    q64, k64, v64 = (t.detach().double().cpu() for t in (q, k, v))
    out_ref, lse_ref, lo = ref.forward(q64, k64, v64, mask_cpu, causal, scale, dropout_p, seed)
    assert lo.numel() == 0
    gl = grad_lse.double().cpu().masked_fill(torch.isinf(lse_ref), 0)
    dq_ref, dk_ref, dv_ref = ref.backward(grad_out.double().cpu(), gl, q64, k64, v64, out_ref, lo, lse_ref, mask_cpu,
                                          causal, scale, dropout_p, seed)
    out, lse, finite = out.detach().cpu(), lse.detach().cpu(), finite.cpu()
    grads = [t.grad.cpu() for t in (q, k, v)]
    tol = TOL[dtype]

    assert within(out, out_ref, tol, atol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    assert within(lse[finite], lse_ref[finite], tol, atol)
    for grad, expected in zip(grads, (dq_ref, dk_ref, dv_ref)):
        assert grad.dtype == dtype
        assert within(grad, expected, tol, atol)

    # Queries that see no key: zeros out, zero gradient, no NaN anywhere.
    empty = torch.isneginf(lse_ref)
    if mask_kind in ("batch0_off",) or (mask_kind == "first_key_off" and causal):
        assert empty.any()
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_forward_backward_match_float64_reference(backend, case, poison_allocator):
    check_against_float64_reference(backend, case, "cpu", poison_allocator)


# The cpp forward takes 64 query rows per task through chunks of 16 KiB of K or V (64 keys at
# d = 64 in float32, 32 at d = 128 or in float64, 336 at d = 12, 1024 at d = 4, where P V
# takes all keys at once), the backward a head's rows, 32 at a time, through chunks of 16 KiB
# too (the same keys; all at d = 4): rows past one task and keys past several chunks, partial at both
# ends, with causal rows whose blocks end in different chunks. CASES stop at 33 keys. With one
# or two heads of 200 keys or more, the backward splits the keys into ranges (all but the
# 97-key cases).
CPP_CHUNK_CASES = [
    (1, 2, 150, 200, 64, False, "random", torch.float32),
    (1, 2, 150, 200, 64, True, None, torch.float32),
    (1, 1, 70, 97, 128, True, "first_key_off", torch.float32),
    (1, 1, 70, 97, 64, False, None, torch.float64),
    (2, 1, 66, 700, 12, False, "random", torch.bfloat16),
    (1, 1, 9, 1100, 4, False, "random", torch.float32),
    # At most 8 query rows (a class token, a decoding step) with a head dim of a vector or more:
    # scores from the keys' rows (the forward reading V's rows in place where it can), in the
    # backward too, which takes the keys in ranges from 200 keys on.
    (2, 3, 1, 300, 64, False, "random", torch.float32),
    (1, 2, 8, 1100, 100, True, None, torch.float32),
    (2, 1, 5, 97, 20, False, "first_key_off", torch.bfloat16),
    (1, 2, 3, 250, 16, True, "random", torch.float16),
    (2, 1, 2, 200, 64, False, None, torch.float64),
]


@pytest.mark.parametrize("case", CPP_CHUNK_CASES, ids=case_id)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_cpp_rows_past_one_task_and_keys_past_one_chunk(case, dropout_p):
    check_against_float64_reference("cpp", case, dropout_p=dropout_p)


def test_reference_matches_torch_sdpa_in_float64():
    """The reference is checked against an independent implementation (torch's SDPA)."""
    g = torch.Generator().manual_seed(0)
    for nq, nk, causal in ((9, 9, True), (5, 12, True), (12, 5, True), (7, 10, False)):
        q, k, v = (torch.randn(2, 3, n, 12, generator=g, dtype=torch.float64) for n in (nq, nk, nk))
        mask = torch.rand(2, nk, generator=g) > 0.4
        mask[:, 0] = True  # SDPA gives NaN for rows without a key; keep one for every row
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :], is_causal=False) \
            if not causal else F.scaled_dot_product_attention(q, k, v, is_causal=True)
        got = ref.attention(q, k, v, causal=causal, key_padding_mask=None if causal else mask)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        out, lse, _ = ref.forward(q, k, v, None, causal, 0.3)
        s = (q @ k.transpose(-1, -2)) * 0.3
        if causal:
            s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(), float("-inf"))
        torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-12, atol=1e-12)


def check_non_contiguous_inputs(backend, device="cpu"):
    """q, k, v as a model's views of one qkv projection, and q with a non-unit stride on d;
    the output merged back into tokens, so grad_out arrives strided too."""
    g = torch.Generator().manual_seed(1)
    b, n, h, d = 2, 9, 3, 8
    qkv = torch.randn(b, n, 3, h, d, generator=g).to(device).permute(2, 0, 3, 1, 4)  # timm's layout
    q, k, v = (t.requires_grad_(True) for t in qkv.detach().clone().unbind(0))
    q2 = torch.randn(b, h, d, n, generator=g).to(device).transpose(-1, -2).requires_grad_(True)  # d not unit-stride
    weight = torch.randn(b, n, h * d, generator=g)
    for qq in (q, q2):
        assert not qq.is_contiguous()
        for t in (qq, k, v):
            t.grad = None
        with lucidops.use_backend(backend):
            out = lucidops.ops.attention(qq, k, v, causal=True)
            (out.transpose(1, 2).reshape(b, n, h * d) * weight.to(device)).sum().backward()
        leaves = [t.detach().double().cpu().requires_grad_(True) for t in (qq, k, v)]
        expected = ref.attention(*leaves, causal=True)
        (expected.transpose(1, 2).reshape(b, n, h * d) * weight.double()).sum().backward()
        assert rel_err(out, expected.detach()) < 1e-5
        for got, want in zip((qq.grad, k.grad, v.grad), leaves):
            assert rel_err(got, want.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    check_non_contiguous_inputs(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_is_token_major_so_merging_heads_is_a_view(backend, dtype):
    """out is (B, H, Nq, d) laid out as (B, Nq, H, d), like SDPA's: the usual merge of the heads
    back into tokens is a view, so a model saves one tensor, not two, for its projection."""
    q, k, v = (torch.randn(2, 3, n, 8, dtype=dtype) for n in (5, 7, 7))
    with lucidops.use_backend(backend):
        out = lucidops.ops.attention(q, k, v)
    assert lucidops.backends.last_used("attention") == backend
    assert out.stride() == (5 * 3 * 8, 8, 3 * 8, 1)
    merged = out.transpose(1, 2).reshape(2, 5, 3 * 8)
    assert merged.data_ptr() == out.data_ptr() and merged._base is not None
    torch.testing.assert_close(merged, ref.attention(q, k, v).transpose(1, 2).reshape(2, 5, 24),
                               rtol=TOL[dtype], atol=TOL[dtype])


def test_a_backends_output_is_copied_into_the_token_major_layout_only_when_its_memory_order_differs():
    """ATen's kernel returns a contiguous (B, H, Nq, d) output for a contiguous q. The op gives
    every backend's output the fake kernel's strides: with one head or one query that layout is
    already token-major in memory (only size-1 dims' strides differ), so it is restrided, not
    copied; otherwise copied, values unchanged."""
    token_major = importlib.import_module("lucidops.ops.attention")._token_major
    for shape, copied in (((2, 1, 5, 8), False), ((2, 3, 1, 8), False), ((1, 1, 1, 4), False),
                          ((2, 3, 5, 8), True), ((1, 3, 5, 8), True)):
        out = torch.randn(shape)
        b, h, nq, d = shape
        result = token_major(out)
        assert result.stride() == ref.empty_token_major(b, h, nq, d, like=out).stride(), shape
        assert (result.data_ptr() != out.data_ptr()) == copied, shape
        assert torch.equal(result, out), shape


def test_triton_packed_heads_give_every_warp_its_own_heads():
    """A batched tl.dot spreads the warps over the head dim first: with fewer heads per
    program than warps, several warps compute the same tile (the ahead-of-time listing
    showed it as 2x-4x the MMA instructions and spilled registers)."""
    tk = pytest.importorskip("lucidops.triton_kernels.attention")
    for table in (tk.FORWARD_CONFIGS, tk.BACKWARD_CONFIGS):
        for d_pad, (heads, _, _, warps) in table.items():
            assert heads == 1 or heads % warps == 0, (d_pad, heads, warps)
            assert tk._config(table, d_pad, heads - 1)[1] == 1  # too few heads: one head, 2-D dots


@pytest.mark.parametrize("with_lo", [False, True])
def test_triton_backward_delta_in_batch_slices_is_the_whole_one(monkeypatch, with_lo):
    """rowsum(dO * O) is formed slice by slice of the batch (whole, its float32 temporaries took
    12 bytes per element at once): bit for bit the whole computation, for any slicing."""
    tk = pytest.importorskip("lucidops.triton_kernels.attention")
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32):  # a float32 out must not be changed in place
        out, grad = (torch.randn(5, 3, 7, 12, generator=g).to(dtype) for _ in range(2))
        out_lo = (torch.randn(5, 3, 7, 12, generator=g) * 1e-3).to(dtype) if with_lo else out.new_empty(0)
        kept = (out.clone(), out_lo.clone(), grad.clone())
        whole = ((out.float() + out_lo.float()) if with_lo else out.float()) * grad.float()
        for elements in (1, 3 * 7 * 12 * 2, 1 << 26):  # one batch element per slice, two, all
            monkeypatch.setattr(tk, "DELTA_SLICE_ELEMENTS", elements)
            delta = tk._delta(grad, out, out_lo)
            assert delta.dtype == torch.float32 and torch.equal(delta, whole.sum(-1))
            assert all(torch.equal(a, b) for a, b in zip((out, out_lo, grad), kept))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b in ("cpp", "triton")])
def test_lucidops_kernels_store_token_major_themselves(backend):
    """The op copies any other layout into the token-major one; lucidops' own kernels write
    it directly (no copy). Their backward's reading of a token-major grad_out is checked,
    for correctness, by test_non_contiguous_inputs."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, 7, 7))
    forward = {"cpp": attention_module._attention_cpp.forward, "triton": attention_module._triton_forward}[backend]
    out = forward(q, k, v, None, False, 0.3)[0]
    assert out.stride() == attention_module._token_major_strides(*out.shape)
    torch.testing.assert_close(out, ref.attention(q, k, v, scale=0.3), rtol=1e-5, atol=1e-5)


def test_token_major_strides_match_the_allocation_for_every_size():
    """The op compares a backend's strides with this arithmetic instead of allocating."""
    for shape in itertools.product((0, 1, 2, 5), repeat=4):
        expected = attention_module.empty_token_major(*shape, like=torch.empty(0)).stride()
        assert attention_module._token_major_strides(*shape) == expected, shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_sizes(backend):
    for b, nq, nk in ((0, 5, 5), (2, 0, 5), (2, 5, 0)):
        q = torch.randn(b, 2, nq, 8, requires_grad=True)
        k = torch.randn(b, 2, nk, 8, requires_grad=True)
        v = torch.randn(b, 2, nk, 8, requires_grad=True)
        with lucidops.use_backend(backend):
            out, lse = lucidops.ops.attention(q, k, v, return_lse=True)
            out.sum().backward()
        assert out.shape == (b, 2, nq, 8) and lse.shape == (b, 2, nq)
        assert torch.equal(out, torch.zeros_like(out))  # no key at all: zeros
        assert torch.isneginf(lse).all()
        for t in (q, k, v):
            assert t.grad.shape == t.shape and torch.equal(t.grad, torch.zeros_like(t))
        # Permuted views of a (B, N, H, d) projection: the backward op still returns the
        # contiguous gradients its fake kernel promises (torch.compile checks the strides).
        qp, kp, vp = (t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
        with lucidops.use_backend(backend):
            out, lse, lo = torch.ops.lucidops.attention(qp, kp, vp, None, False, 0.3)
            torch.library.opcheck(torch.ops.lucidops.attention_backward.default,
                                  (torch.ones_like(out), None, qp, kp, vp, out, lo, lse, None, False, 0.3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scores_are_stable_and_many_heads(backend):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 64, 3, 4, generator=g) * 30  # scores in the thousands: exp would overflow
    k = torch.randn(1, 64, 5, 4, generator=g) * 30
    v = torch.randn(1, 64, 5, 4, generator=g)
    with lucidops.use_backend(backend):
        out = lucidops.ops.attention(q, k, v)
    expected = ref.forward(q.double(), k.double(), v.double(), None, False, 0.5)[0]
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_huge_scores_give_gradients_no_larger_than_a_softmax_allows(backend, dtype):
    """Scores of 1e8 (q, k entries of 1e4): Triton's backward recomputes each probability from a
    score and an lse rounded apart, and got 2^32 for some: dv off by 65534 (float32) or inf, dq
    and dk NaN (half). A probability is at most 1, so |dv[j]| <= sum_i |dout[i]| holds in every
    backend; the reference, cpp and aten match float64 exactly here (the softmax is one-hot)."""
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        big = 1e4 if dtype == torch.float32 else 6e4
        q, k = ((torch.rand(1, 2, 5, 8, generator=g) * 2 - 1) * big for _ in range(2))
        v = torch.randn(1, 2, 5, 8, generator=g)
        grad_out = torch.randn(1, 2, 5, 8, generator=g)
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        with lucidops.use_backend(backend):
            lucidops.ops.attention(*leaves).backward(grad_out.to(dtype))
        for t in leaves:
            assert torch.isfinite(t.grad).all(), (seed, t.grad)
        bound = grad_out.abs().sum(dim=2, keepdim=True) * 1.01
        assert (leaves[2].grad.float().abs() <= bound).all(), (seed, leaves[2].grad)
        if backend != "triton":
            exact = [t.detach().double().requires_grad_(True) for t in leaves]
            ref.attention(*exact).backward(grad_out.double())
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # one rounding of each half-precision result
            torch.testing.assert_close(leaves[2].grad.double(), exact[2].grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda t: str(t)[6:])
def test_cpp_few_query_rows_backward_recomputes_the_forwards_scores(dtype):
    """With at most 8 query rows the cpp kernel forms scores from the keys' rows, in another
    order than with K^T. Its backward must recompute the forward's scores bit for bit: with
    scores of 1e8, one ulp (8) apart made P = exp(s - lse) up to e^8 (dv past its bound). Key
    counts past one backward range and odd head dims (a last partial vector)."""
    big = 1e4 if dtype == torch.float32 else 6e4
    for nq, nk, d in itertools.product((1, 5, 8), (37, 300, 1100), (8, 12, 64, 100)):
        g = torch.Generator().manual_seed(nq * 10000 + nk * 10 + d)
        q, k = ((torch.rand(1, 2, n, d, generator=g) * 2 - 1) * big for n in (nq, nk))
        v = torch.randn(1, 2, nk, d, generator=g)
        grad_out = torch.randn(1, 2, nq, d, generator=g)
        leaves = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        with lucidops.use_backend("cpp"):
            lucidops.ops.attention(*leaves).backward(grad_out.to(dtype))
        for t in leaves:
            assert torch.isfinite(t.grad).all(), (nq, nk, d)
        bound = grad_out.abs().sum(dim=2, keepdim=True) * 1.01
        assert (leaves[2].grad.float().abs() <= bound).all(), (nq, nk, d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-1.0, 0.0])
def test_scale_of_zero_or_below_with_causal_mask(backend, scale):
    """Any finite scale is a score multiplier, 0 giving uniform attention over the visible keys.
    ATen's kernel gave NaN for causal calls with scale <= 0 (it scales its masked -inf scores
    too); the aten backend folds such a scale into q."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g, requires_grad=True) for n in (9, 11, 11))
    mask = torch.tensor([[True] * 8 + [False, True, True]])
    grad_out = torch.randn(1, 2, 9, 16, generator=g)
    with lucidops.use_backend(backend):
        out = lucidops.ops.attention(q, k, v, causal=True, key_padding_mask=mask, scale=scale)
        out.backward(grad_out)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    out_ref, lse_ref, lo = ref.forward(q64, k64, v64, mask, True, scale)
    grads_ref = ref.backward(grad_out.double(), None, q64, k64, v64, out_ref, lo, lse_ref, mask, True, scale)
    assert rel_err(out, out_ref) < 1e-5
    for t, expected in zip((q, k, v), grads_ref):
        assert within(t.grad, expected, 1e-5, 1e-6)


@pytest.mark.parametrize("backend", ["reference", "aten", "cpp"])
def test_gradcheck_float64(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 6, 6))
    mask = torch.tensor([[True, False, True, True, False, True]])

    def fn(q, k, v):
        out, lse = lucidops.ops.attention(q, k, v, causal=True, key_padding_mask=mask, return_lse=True)
        return out, lse

    with lucidops.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)
        assert lucidops.backends.last_used("attention_backward") == backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 3, n, 8, generator=g, requires_grad=True) for n in (5, 7, 7))
    mask = torch.tensor([[True, True, False, True, True, False, True]])
    with lucidops.use_backend(backend):
        torch.library.opcheck(torch.ops.lucidops.attention.default, (q, k, v, mask, True, 0.3))
        out, lse, lo = torch.ops.lucidops.attention(q.detach(), k.detach(), v.detach(), mask, True, 0.3)
        torch.library.opcheck(torch.ops.lucidops.attention_backward.default,
                              (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(), v.detach(),
                               out, lo, lse, mask, True, 0.3))


def test_torch_compile_fullgraph():
    q, k, v = (torch.randn(2, 3, 6, 8, requires_grad=True) for _ in range(3))
    fn = torch.compile(lambda q, k, v: lucidops.ops.attention(q, k, v, causal=True) * 2, fullgraph=True,
                       backend="aot_eager")
    out = fn(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, 2 * ref.attention(q.detach(), k.detach(), v.detach(), causal=True))
    assert q.grad is not None
    assert lucidops.backends.last_used("attention") == "cpp"  # the CPU default runs inside the graph


def test_torch_compile_inductor_with_mask_and_lse_matches_eager():
    """The CPU default (cpp) inside an inductor graph: masked, fully-masked rows, lse in the loss."""
    g = torch.Generator().manual_seed(6)
    mask = torch.tensor([[False, False, False, False, False], [True, False, True, True, False]])
    inputs = [torch.randn(2, 3, n, 12, generator=g) for n in (4, 5, 5)]

    def loss(q, k, v):
        out, lse = lucidops.ops.attention(q, k, v, key_padding_mask=mask, return_lse=True)
        return (out * out).sum() + lse.masked_fill(torch.isinf(lse), 0).sum()

    grads = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="inductor")):
        q, k, v = (t.clone().requires_grad_(True) for t in inputs)
        fn(q, k, v).backward()
        assert lucidops.backends.last_used("attention_backward") == "cpp"
        grads.append((q.grad, k.grad, v.grad))
    for eager, compiled in zip(*grads):
        assert torch.isfinite(compiled).all()
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    assert torch.equal(grads[1][0][0], torch.zeros_like(grads[1][0][0]))  # batch 0 sees no key


def test_flop_formulas():
    q, k, v = (torch.randn(2, 3, n, 8, requires_grad=True) for n in (5, 7, 7))
    counts = lucidops.profile.count_flops(lambda q, k, v: lucidops.ops.attention(q, k, v), (q, k, v), backward=True)
    assert counts["lucidops.attention"] == 4 * 2 * 3 * 5 * 7 * 8
    assert counts["lucidops.attention_backward"] == 10 * 2 * 3 * 5 * 7 * 8
    causal = lucidops.profile.count_flops(lambda q, k, v: lucidops.ops.attention(q, k, v, causal=True), (q, k, v))
    assert causal["lucidops.attention"] == 4 * 2 * 3 * (1 + 2 + 3 + 4 + 5) * 8  # rows see i + 1 keys
    assert attention_module.visible_pairs(7, 3, True) == 1 + 2 + 3 + 4 * 3
    assert attention_module.visible_pairs(3, 7, True) == 1 + 2 + 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("vector_bytes", [64, 32])
def test_cpu_default_follows_the_extensions_vector_width(dtype, vector_bytes, monkeypatch):
    """Built for AVX-512, cpp measured faster than aten in every dtype up to d = 128 (README,
    Measured results; before 2026-12-06 float64 and bfloat16 heads over 64 went to aten).
    Built for AVX2, aten measured faster for float32 heads from 64 on with 1024 keys or more
    (before the kernel's chunks of keys, 2026-12-07, at every length), cpp for fewer keys,
    smaller heads, float64 and the half types, and in a forward of at most 8 queries (scores
    from the keys' rows): the backward is decided by the keys and the head dim alone."""
    if lucidops.backends.backend_problem("cpp", "cpu") is not None:
        pytest.skip("no C++ extension")
    from lucidops.ops import _attention_cpp

    monkeypatch.setattr(_attention_cpp, "_vector_bytes", vector_bytes)
    few = _attention_cpp.direct_score_rows()
    assert few == 8  # the kernel's few-row path, which the README's measurements are of
    for d, nk, nq in itertools.product((4, 16, 63, 64, 65, 128), (3, 1023, 1024), (few, few + 1)):
        q = torch.randn(1, 1, nq, d, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 1, nk, d, dtype=dtype, requires_grad=True)
        lucidops.ops.attention(q, k, k).sum().backward()
        narrow_goes_to_aten = vector_bytes < 64 and dtype == torch.float32 and d >= 64 and nk >= 1024
        forward = "aten" if narrow_goes_to_aten and nq > few else "cpp"
        assert lucidops.backends.last_used("attention") == forward, (d, nk, nq)
        assert lucidops.backends.last_used("attention_backward") == ("aten" if narrow_goes_to_aten else "cpp"), (
            d, nk, nq)


def test_extension_reports_the_vector_width_it_was_built_for():
    if lucidops.backends.backend_problem("cpp", "cpu") is not None:
        pytest.skip("no C++ extension")
    from lucidops import _ext_sources
    from lucidops.ops import _attention_cpp

    width = _attention_cpp.vector_bytes()
    assert width in (16, 32, 64)
    flags = _ext_sources.spec("cpu").cflags
    if "-march=native" in flags and "avx512f" in _ext_sources.host_cpu_features():
        assert width == 64
    elif "-march=native" in flags and "avx2" in _ext_sources.host_cpu_features():
        assert width == 32


def test_forcing_aten_wins_and_triton_refuses_float64():
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
    with lucidops.use_backend("aten"):  # forcing wins over the default
        lucidops.ops.attention(q, q, q).sum().backward()
    assert lucidops.backends.last_used("attention") == "aten"
    assert lucidops.backends.last_used("attention_backward") == "aten"
    with lucidops.use_backend("aten"), pytest.raises(lucidops.BackendUnavailable, match="no aten implementation"):
        lucidops.ops.sinc(torch.randn(3))  # forcing a backend an op lacks never falls back
    if "triton" in BACKENDS:
        with lucidops.use_backend("triton"), pytest.raises(TypeError, match="float64"):
            lucidops.ops.attention(q.double(), q.double(), q.double())


def test_gpu_float64_calls_choose_the_reference(monkeypatch):
    """The triton kernels refuse float64, and automatic selection on a GPU put triton first
    for every dtype: a float64 CUDA call (or a routed SDPA call) raised a TypeError where the
    README promises the reference. Selection is checked with the GPU faked present."""
    monkeypatch.setattr(lucidops.backends, "backend_problem", lambda name, device_type: None)
    for dtype, chosen in [(torch.float64, "reference"), (torch.float32, "triton"), (torch.bfloat16, "triton")]:
        q = torch.zeros(1, 1, 2, 8, dtype=dtype)
        forward_args = (q, q, q, None, False, 0.5, 0.0, None)
        backward_args = (q, None, q, q, q, q, q, q[..., 0], None, False, 0.5, 0.0, None)
        assert lucidops.backends.select("attention", "cuda", forward_args) == chosen
        assert lucidops.backends.select("attention_backward", "cuda", backward_args) == chosen


def test_bad_input_names_the_argument():
    q = torch.randn(2, 3, 5, 8)
    k = torch.randn(2, 3, 7, 8)
    att = lucidops.ops.attention
    cases = [
        (lambda: att(q.numpy(), k, k), TypeError, "q must be a torch.Tensor"),
        (lambda: att(q.long(), k, k), TypeError, "q must be a floating-point"),
        (lambda: att(q[0], k, k), ValueError, "q must be 4-D"),
        (lambda: att(q, k.half(), k), TypeError, "k must have q's dtype"),
        (lambda: att(q, k, k.double()), TypeError, "v must have q's dtype"),
        (lambda: att(q, k[:1], k[:1]), ValueError, "k must be"),
        (lambda: att(q, k[:, :2], k[:, :2]), ValueError, "k must be"),
        (lambda: att(q, torch.randn(2, 3, 7, 6), torch.randn(2, 3, 7, 6)), ValueError, "k must be"),
        (lambda: att(q, k, k[:, :, :6]), ValueError, "v must have k's shape"),
        (lambda: att(torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3), torch.randn(1, 1, 2, 3)), ValueError,
         "head dim"),
        (lambda: att(torch.randn(1, 1, 2, 129), torch.randn(1, 1, 2, 129), torch.randn(1, 1, 2, 129)), ValueError,
         "head dim"),
        (lambda: att(q, k, k, key_padding_mask=torch.ones(2, 7)), TypeError, "key_padding_mask must be a bool"),
        (lambda: att(q, k, k, key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError,
         "key_padding_mask must have shape"),
        (lambda: att(q, k, k, key_padding_mask=torch.ones(7, dtype=torch.bool)), ValueError, "key_padding_mask"),
        (lambda: att(q, k, k, causal=1), TypeError, "causal must be a bool"),
        (lambda: att(q, k, k, return_lse="no"), TypeError, "return_lse must be a bool, got str"),  # returned a tuple
        (lambda: att(q, k, k, scale=float("nan")), ValueError, "scale must be finite"),
        (lambda: att(q, k, k, scale="1"), TypeError, "scale must be a real number, got str"),
        (lambda: att(q, k, k, scale=torch.tensor(1.0)), TypeError, "scale must be a Python number"),
    ]
    if torch.device("meta") != q.device:
        cases.append((lambda: att(q, k.to("meta"), k), ValueError, "k must be on the same device"))
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


# ---- the CPU fast paths (cpp: lucidops' kernel; aten: PyTorch's fused flash kernel) beyond the shared
# cases above ----

ATEN_CASES = [  # (B, H, Nq, Nk, d, causal, mask kind, dtype): odd d, Nq != Nk, N = 1, float64
    (2, 3, 9, 17, 5, True, "first_key_off", torch.float64),
    (1, 2, 17, 9, 33, False, "batch0_off", torch.float64),
    (2, 2, 1, 1, 4, True, "first_key_off", torch.float32),
    (2, 5, 17, 1, 33, False, "batch0_off", torch.float16),
    (1, 2, 40, 70, 128, True, "all_on", torch.bfloat16),
    (2, 3, 70, 40, 7, False, "random", torch.float32),
    # key buffers padded by a cache line (32 and 64 floats are an even number of lines);
    # d = 16 and 24 fill a float vector: the head-dim-in-lanes contraction
    (1, 2, 30, 32, 16, True, "random", torch.float32),
    (2, 2, 64, 64, 24, False, "first_key_off", torch.float32),
    # more query rows than one forward task takes (64), with a tail of single rows
    (1, 2, 130, 100, 16, True, "first_key_off", torch.float32),
]


@pytest.mark.parametrize("backend", ["aten", "cpp"])
@pytest.mark.parametrize("with_lse", [False, True], ids=["out-only", "out-and-lse"])
@pytest.mark.parametrize("case", ATEN_CASES, ids=case_id)
def test_cpu_fast_paths_match_float64_reference(case, with_lse, backend):
    b, h, nq, nk, d, causal, mask_kind, dtype = case
    g = torch.Generator().manual_seed(nq * 100 + nk + d)
    q = (torch.randn(b, h, nq, d, generator=g) * 1.5).to(dtype).requires_grad_(True)
    k = (torch.randn(b, h, nk, d, generator=g) * 1.5).to(dtype).requires_grad_(True)
    v = torch.randn(b, h, nk, d, generator=g).to(dtype).requires_grad_(True)
    mask = torch.ones(b, nk, dtype=torch.bool) if mask_kind == "all_on" else make_mask(mask_kind, b, nk, g)
    grad_out = torch.randn(b, h, nq, d, generator=g).to(dtype)
    grad_lse = torch.randn(b, h, nq, generator=g, dtype=torch.float64) if with_lse else None
    scale = 0.3
    with lucidops.use_backend(backend):
        out, lse = lucidops.ops.attention(q, k, v, causal=causal, key_padding_mask=mask, scale=scale,
                                          return_lse=True)
        loss = (out * grad_out).sum()
        if with_lse:
            loss = loss + (lse.masked_fill(torch.isinf(lse), 0) * grad_lse.to(lse.dtype)).sum()
        loss.backward()
    assert lucidops.backends.last_used("attention") == backend
    assert lucidops.backends.last_used("attention_backward") == backend

    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    out_ref, lse_ref, lo = ref.forward(q64, k64, v64, mask, causal, scale)
    gl = None if grad_lse is None else grad_lse.masked_fill(torch.isinf(lse_ref), 0)
    expected = ref.backward(grad_out.double(), gl, q64, k64, v64, out_ref, lo, lse_ref, mask, causal, scale)
    tol = TOL[dtype]
    assert out.dtype == dtype and out.transpose(1, 2).is_contiguous()  # the op's (B, Nq, H, d) memory order
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.is_contiguous()
    assert rel_err(out, out_ref) < tol
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    finite = torch.isfinite(lse_ref)
    assert rel_err(lse[finite], lse_ref[finite]) < tol
    for grad, exp in zip((q.grad, k.grad, v.grad), expected):
        assert grad.dtype == dtype and grad.is_contiguous()
        if exp.norm() > 0:
            assert rel_err(grad, exp) < tol
        else:  # one key: the softmax is constant, dq = dk = 0 up to rounding (measured against dv's size)
            assert grad.double().norm() <= tol * expected[2].norm()
    empty = torch.isneginf(lse_ref)
    if mask_kind == "batch0_off" or (mask_kind == "first_key_off" and causal):
        assert empty.any()
    assert torch.equal(out.detach()[empty], torch.zeros_like(out.detach()[empty]))
    assert torch.equal(q.grad[empty], torch.zeros_like(q.grad[empty]))


@pytest.mark.parametrize("backend", ["aten", "cpp"])
def test_cpu_fast_paths_strided_head_dim_and_grad_out(backend):
    """ATen's kernel misreads a head dim that is not unit-stride, and the cpp kernel reads dense
    tensors only: neither backend may pass one through."""
    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 3, 8, 9, generator=g).transpose(-1, -2).requires_grad_(True)  # (2, 3, 9, 8)
    k = torch.randn(2, 3, 8, 11, generator=g).transpose(-1, -2).requires_grad_(True)
    v = torch.randn(2, 3, 16, 11, generator=g)[:, :, ::2].transpose(-1, -2).requires_grad_(True)
    grad_out = torch.randn(2, 3, 8, 9, generator=g).transpose(-1, -2)
    mask = torch.rand(2, 11, generator=g) > 0.4
    mask[1] = False
    assert q.stride(-1) != 1 and v.stride(-1) != 1 and grad_out.stride(-1) != 1
    with lucidops.use_backend(backend):
        out = lucidops.ops.attention(q, k, v, causal=True, key_padding_mask=mask)
        out.backward(grad_out)
    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    out_ref, lse_ref, lo = ref.forward(q64, k64, v64, mask, True, 8 ** -0.5)
    expected = ref.backward(grad_out.double(), None, q64, k64, v64, out_ref, lo, lse_ref, mask, True, 8 ** -0.5)
    assert rel_err(out, out_ref) < 1e-5
    for grad, exp in zip((q.grad, k.grad, v.grad), expected):
        assert rel_err(grad, exp) < 1e-5


NAN_CASES = [  # (where the NaN is, causal, masked)
    ("query", False, False), ("query", True, True), ("every key of one head", True, False),
    ("every key of one head", False, True), ("a padding key", False, True), ("one visible key", True, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where, causal, masked", NAN_CASES, ids=[f"{w}-causal{c}-mask{m}" for w, c, m in NAN_CASES])
def test_nan_inputs_give_what_the_reference_gives(backend, dtype, where, causal, masked):
    """A row whose every score is NaN (a diverged query) is NaN, as in the reference: the cpp
    kernel and PyTorch's CPU kernel (aten) took the row max by comparisons that NaN loses and
    returned zeros with a finite or -inf lse, a diverged row passing for a healthy or empty one.
    A NaN in a padding key takes no part (aten added the -inf mask to NaN and spread it)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g).to(dtype) for n in (9, 7, 7))
    mask = None
    if masked:
        mask = torch.ones(2, 7, dtype=torch.bool)
        mask[0, :2] = False
        mask[1, 5:] = False
    if where == "query":
        q[0, 0, 3, 2] = float("nan")
    elif where == "every key of one head":
        k[1, 0] = float("nan")  # causal with Nq > Nk: the last rows see every key, the first only key 0
    elif where == "a padding key":
        k[0, 0, 0, 1] = float("nan")  # masked out in batch 0
    else:
        k[0, 1, 4, 0] = float("nan")
    with lucidops.use_backend(backend):
        out, lse = lucidops.ops.attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
    assert lucidops.backends.last_used("attention") == backend
    out_ref, lse_ref, _ = ref.forward(q.double(), k.double(), v.double(), mask, causal, 0.25)
    assert torch.equal(out.isnan(), out_ref.isnan()) and torch.equal(lse.isnan(), lse_ref.isnan())
    assert torch.equal(torch.isneginf(lse), torch.isneginf(lse_ref))
    if where != "a padding key":
        assert out_ref.isnan().any()
    rows = ~out_ref.isnan()
    assert rel_err(out[rows], out_ref[rows]) < TOL[dtype]


@pytest.mark.parametrize("backend", ["aten", "cpp"])
def test_nan_padding_key_leaves_the_key_and_value_gradients_finite(backend):
    """aten zeroed a NaN padding key for its forward only: its backward's -inf mask plus the
    NaN score made dk and dv NaN, where the reference and cpp give finite values."""
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (5, 7, 7))
    k[0, 0, 0, 1] = float("nan")
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    grads = {}
    for name in (backend, "reference"):
        q_, k_, v_ = (t.clone().requires_grad_(True) for t in (q, k, v))
        with lucidops.use_backend(name):
            lucidops.ops.attention(q_, k_, v_, key_padding_mask=mask).sum().backward()
        grads[name] = (k_.grad, v_.grad)
    for got, want in zip(grads[backend], grads["reference"]):
        assert torch.isfinite(want).all() and torch.isfinite(got).all()
        assert rel_err(got, want) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["value", "key"])
def test_a_non_finite_padding_key_or_value_takes_no_part(backend, bad, where):
    """A padding key is weighed by p = 0 (ds = 0 in the backward), and 0 * NaN is NaN: a NaN
    (or inf) in a padding key's value made every row of out and of dq NaN, one in the key
    itself every row of dq (reference, cpp and triton; aten's backward masks the scores).
    Now the result, and every gradient, is the one with that row zeroed."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for n in (5, 7, 7))
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :2] = False
    inputs = {"key": k, "value": v}
    clean = inputs[where].clone()
    inputs[where][0, 1, 1, 3] = bad  # masked out in batch 0
    results = []
    for keys, values in ((k, v), (clean, v) if where == "key" else (k, clean)):
        q_, k_, v_ = (t.clone().requires_grad_(True) for t in (q, keys, values))
        with lucidops.use_backend(backend):
            out = lucidops.ops.attention(q_, k_, v_, key_padding_mask=mask)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(6)))
        results.append((out, q_.grad, k_.grad, v_.grad))
    for got, want in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_aten_empty_rows_helper():
    mask = torch.tensor([[False, False, True, False], [False, False, False, False], [True, True, True, True]])
    empty = attention_module._attention_aten.empty_rows(mask, 6, 4, True)[:, 0]
    expected = torch.tensor([[True, True, False, False, False, False], [True] * 6, [False] * 6])
    assert torch.equal(empty, expected)
    empty = attention_module._attention_aten.empty_rows(mask, 3, 4, False)[:, 0]
    assert torch.equal(empty, torch.tensor([[False] * 3, [True] * 3, [False] * 3]))


def test_info_states_the_cpu_backends():
    from lucidops import cli

    text = cli.info()
    section = text.split("\nattention\n", 1)[1].split("\n\n", 1)[0]
    assert "cpu: default -> cpp" in section
    assert "cpp       available" in section
    assert "aten      available" in section
    assert "not a lucidops kernel" in section
    assert "aten      unavailable: the aten backend runs CPU tensors only" in section


@pytest.mark.parametrize("vector_bytes", [64, 32])
def test_info_states_the_vector_width_and_what_it_changes(vector_bytes, monkeypatch):
    if lucidops.backends.backend_problem("cpp", "cpu") is not None:
        pytest.skip("no C++ extension")
    from lucidops import cli
    from lucidops.ops import _attention_cpp

    monkeypatch.setattr(_attention_cpp, "_vector_bytes", vector_bytes)
    text = cli.info()
    assert f"C++ CPU kernels: built for {vector_bytes}-byte vectors" in text
    narrow = "attention's CPU default is aten for float32 heads of 64 and more with 1024 keys or more"
    assert (narrow in text) == (vector_bytes < 64)


def test_info_builds_nothing_to_learn_the_vector_width(monkeypatch):
    """Plain `lucidops info` reports what is there without spending a minute building the
    C++ extension: the width is read only from an extension already imported."""
    from lucidops import _ext, cli
    from lucidops.ops import _attention_cpp

    monkeypatch.setattr(_attention_cpp, "_vector_bytes", None)
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "status", lambda kind, build_if_needed=False: None)  # buildable, not built

    def no_load(kind):
        raise AssertionError(f"info loaded (and would build) the {kind} extension")

    monkeypatch.setattr(_ext, "load", no_load)
    assert "C++ CPU kernels: vector width not known until they are loaded (lucidops info --build)" in cli.info()


@pytest.mark.parametrize("heads, nk", [(3, 50), (1, 300)], ids=["whole-heads", "key-ranges"])
@pytest.mark.parametrize("d", [12, 20], ids=["keys-in-lanes", "head-dim-in-lanes"])
def test_cpp_is_bitwise_the_same_on_one_and_two_threads(d, heads, nk):
    """Tasks have fixed rows, and backward tasks fixed keys (one head each, or with few heads a
    range of a head's keys, whose partial dQs are added in range order): no order depends on
    threads.

    d = 12 contracts over keys in vector lanes, d = 20 (fills a float vector) with the head
    dim in lanes: both layouts of the kernel. Two heads of 300 keys split into ranges.
    """
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, heads, n, d, generator=g) for n in (150, nk, nk))  # 3 forward chunks per head
    mask = torch.rand(2, nk, generator=g) > 0.2
    grad_out = torch.randn(2, heads, 150, d, generator=g)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
            with lucidops.use_backend("cpp"):
                out = lucidops.ops.attention(*leaves, causal=True, key_padding_mask=mask)
                out.backward(grad_out)
            results.append([out.detach()] + [t.grad for t in leaves])
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def assert_cpp_half_is_the_float32_kernel_rounded(dtype, b, h, nq, nk, d, causal, mask_kind, dropout_p=0.0,
                                                   subnormal_head=False, seed=21):
    """The cpp backend on half q, k, v (strided views: q of a (B, Nq, H, d) projection, k and v
    of one (B, Nk, 2, H, d) projection), grad_out and an lse gradient gives exactly the
    kernel's float32 results on the inputs raised by torch: the same lse, out and dq, dk, dv
    rounded by torch's .to(dtype), and for bfloat16 out_lo = the float32 output minus its
    rounding. With ``subnormal_head`` head 0's values are scaled into the subnormal halves (and
    its out, dq and dk with them; no lse gradient then, which would make dq, dk O(1))."""
    from lucidops import _ext
    from lucidops.ops import _attention_cpp

    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, nq, h, d, generator=g) * 2).to(dtype).transpose(1, 2)
    kv = (torch.randn(b, nk, 2, h, d, generator=g) * 2).to(dtype)
    if subnormal_head:
        kv[:, :, 1, 0] *= torch.finfo(dtype).tiny / 4
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    grad_out = torch.randn(b, h, nq, d, generator=g).to(dtype)
    # A loss that uses the lse too; not with subnormal values, whose dq, dk it would make O(1).
    grad_lse = None if subnormal_head else torch.randn(b, h, nq, generator=g)
    mask = make_mask(mask_kind, b, nk, g)
    scale = d ** -0.5
    drop_seed = torch.tensor(seed) if dropout_p else None

    out, lse, out_lo = _attention_cpp.forward(q, k, v, mask, causal, scale, dropout_p, drop_seed)
    dq, dk, dv = _attention_cpp.backward(grad_out, grad_lse, q, k, v, out, out_lo, lse, mask, causal, scale,
                                         dropout_p, drop_seed)

    kernel = _ext.load("cpu")
    mask_arg = mask if mask is not None else torch.empty(0, dtype=torch.bool)
    drop = _attention_cpp._dropout_args(dropout_p, drop_seed)
    out32, lse32, empty = kernel.attention_forward(q.float(), k.float(), v.float(), mask_arg, causal, scale, *drop)
    assert empty.numel() == 0
    # The half backward's delta reads out + out_lo in float32: the float32 kernel gets that sum as its out.
    whole = out.float() + (out_lo.float() if out_lo.numel() else 0.0)
    grads32 = kernel.attention_backward(grad_out.float(), q.float(), k.float(), v.float(), whole, empty, lse32,
                                        torch.empty(0) if grad_lse is None else grad_lse, mask_arg, causal, scale,
                                        *drop)

    def assert_bitwise(actual, expected):
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        assert torch.equal(actual.view(torch.int16), expected.view(torch.int16))

    assert torch.equal(lse, lse32)
    assert_bitwise(out, out32.to(dtype))
    assert out.stride() == out32.stride()  # SDPA's (B, Nq, H, d) memory order
    if dtype == torch.bfloat16:
        assert_bitwise(out_lo, ref.low_part(out32, out32.to(dtype)))
    else:
        assert out_lo.numel() == 0
    for actual, expected in zip((dq, dk, dv), grads32):
        assert_bitwise(actual, expected.to(dtype))
    return out, dq, dk


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("d", [6, 64], ids=["keys-in-lanes", "head-dim-in-lanes"])
def test_cpp_half_inputs_give_the_float32_kernel_rounded_by_torch(dtype, d):
    """The cpp kernel reads half q, k, v and grad_out as they are and rounds its outputs itself,
    bit for bit as torch would (assert_cpp_half_is_the_float32_kernel_rounded). Truncating, or a
    conversion off by a shift, errs by about one unit in half the elements: within the
    half-precision tolerances of the tests above, not here. 70 rows: a forward chunk of 64 and a
    partial one, whole and partial register blocks; one head's values, and so its outputs and
    its dq, dk, subnormal."""
    if lucidops.backends.backend_problem("cpp", "cpu") is not None:
        pytest.skip("no C++ extension")
    out, dq, dk = assert_cpp_half_is_the_float32_kernel_rounded(dtype, 2, 3, 70, 70, d, True, "random",
                                                                subnormal_head=True)
    for t in (out, dq, dk):  # not vacuous: mostly nonzero, subnormal halves included
        subnormal = (t != 0) & (t.abs() < torch.finfo(dtype).tiny)
        assert (t == 0).float().mean() < 0.5 and subnormal.float().mean() > 0.05


def assert_forward_backward_match_float64(backend, q, k, v, grad_out, causal):
    """float32 leaves q, k, v through the op on ``backend``: output and gradients within 1e-5
    of the float64 reference."""
    with lucidops.use_backend(backend):
        out = lucidops.ops.attention(q, k, v, causal=causal)
        out.backward(grad_out)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    expected = ref.attention(*leaves, causal=causal)
    expected.backward(grad_out.double())
    assert rel_err(out, expected.detach()) < 1e-5
    for got, want in zip((q.grad, k.grad, v.grad), leaves):
        assert rel_err(got, want.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_row_max_in_a_later_key_block_rescales_the_earlier_ones(backend, causal):
    """Scores that grow with the key index put every row's max in its last visible key block
    (100 keys: 2 to 4 of the kernels' 32- or 64-key blocks), so the online softmax must rescale
    what the earlier blocks summed. CASES' random scores at 33 keys rarely move a max into the
    second block (a kernel that skipped the rescale passed them)."""
    g = torch.Generator().manual_seed(5)
    b, h, n, d = 1, 2, 100, 16
    q = (1 + 0.1 * torch.randn(b, h, n, d, generator=g)).requires_grad_(True)
    k = (torch.linspace(0, 2, n)[:, None] * (1 + 0.1 * torch.randn(b, h, n, d, generator=g))).requires_grad_(True)
    v = torch.randn(b, h, n, d, generator=g).requires_grad_(True)
    grad_out = torch.randn(b, h, n, d, generator=g)
    assert_forward_backward_match_float64(backend, q, k, v, grad_out, causal)


@pytest.mark.parametrize("backend", BACKENDS)
def test_key_and_value_of_different_layouts(backend):
    """k contiguous, v a token-major view (B, N, H, d).transpose(1, 2) with another d: the
    kernels must read each through its own strides. check_non_contiguous_inputs' q, k, v are
    views of one qkv tensor, so k and v always share strides there (a launcher passing k's
    strides for v passed every test)."""
    g = torch.Generator().manual_seed(6)
    b, h, nq, nk, d = 2, 3, 9, 11, 8
    q = torch.randn(b, h, nq, d, generator=g).requires_grad_(True)
    k = torch.randn(b, h, nk, d, generator=g).requires_grad_(True)
    v = torch.randn(b, nk, h, d, generator=g).transpose(1, 2).requires_grad_(True)
    grad_out = torch.randn(b, h, nq, d, generator=g)
    assert_forward_backward_match_float64(backend, q, k, v, grad_out, True)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_bfloat16_gradients_err_little_more_than_their_own_rounding(causal):
    """bfloat16: dS = P (dP - delta) is float32, and the backward multiplies it by k (dq) or q
    (dk) as a high and a low bfloat16 part (_dot_ds). As one bfloat16 part it loses 8 bits in
    every term: dq and dk then erred 1.55x as much as the float64 gradients rounded once to
    bfloat16 (at most 1.12x with both parts over 24 other draws), well inside the 1e-2
    relative tolerance of CASES, which passed it."""
    g = torch.Generator().manual_seed(13)
    b, h, n, d = 1, 4, 64, 16

    def bf16_leaf(t):
        return t.to(TRITON_DEVICE, torch.bfloat16).requires_grad_(True)

    q, k = (bf16_leaf(torch.randn(b, h, n, d, generator=g) * 1.5) for _ in range(2))
    v = bf16_leaf(torch.randn(b, h, n, d, generator=g))
    grad_out = torch.randn(b, h, n, d, generator=g).to(TRITON_DEVICE, torch.bfloat16)
    with lucidops.use_backend("triton"):
        lucidops.ops.attention(q, k, v, causal=causal).backward(grad_out)
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (q, k, v)]
    ref.attention(*leaves, causal=causal).backward(grad_out.double().cpu())
    for name, got, want in (("dq", q.grad.cpu(), leaves[0].grad), ("dk", k.grad.cpu(), leaves[1].grad)):
        ratio = rel_err(got, want) / rel_err(want.bfloat16(), want)
        assert ratio < 1.25, (name, ratio)


def test_a_key_padding_mask_on_another_device_is_named():
    """The mask's device is checked like k's and v's: a (B, Nk) mask elsewhere failed inside a
    backend (masked_fill), naming no argument."""
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool, device="meta")
    with pytest.raises(ValueError, match="key_padding_mask must be on the same device as q"):
        lucidops.ops.attention(q, k, k, key_padding_mask=mask)
