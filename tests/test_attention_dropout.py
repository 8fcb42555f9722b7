"""Fused attention dropout: the hash rule, its statistics, every backend dropping exactly the
reference's probabilities (forward and backward), and the op contract under dropout."""

import pytest
import torch

import lucidops
from lucidops import backends
from lucidops.reference import attention as ref
from lucidops.reference import attention_dropout as dropout
from comparisons import rel_err
from test_attention import check_against_float64_reference

BACKENDS = ["reference", "cpp"] + (["triton"] if backends.triton_interpreting() else [])
MASK32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    """murmur3's finaliser in plain Python integers: the spec the tensors must follow."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def kept_by_spec(seed: int, bh: int, i: int, j: int, p: float) -> bool:
    head_key = fmix32(seed ^ fmix32((bh * 0x9E3779B9 + 0x7F4A7C15) & MASK32))
    row_key = fmix32(head_key ^ fmix32((i * 0x9E3779B9 + 0x2545F491) & MASK32))
    return fmix32(row_key ^ ((j * 0x85EBCA77) & MASK32)) >> 8 >= min(round(p * 2 ** 24), 2 ** 24 - 1)


def test_keep_mask_follows_the_documented_hash():
    for seed in (0, 1, 0xFFFFFFFF, 2_654_435_769):
        mask = dropout.keep_mask(torch.tensor(seed), 2, 3, 5, 7, 0.4)
        expected = torch.tensor([[[[kept_by_spec(seed, b * 3 + h, i, j, 0.4) for j in range(7)] for i in range(5)]
                                  for h in range(3)] for b in range(2)])
        assert torch.equal(mask, expected)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence(p):
    """The kept fraction is 1 - p within 5 standard errors; two seeds, two heads, neighbouring
    keys and neighbouring queries are uncorrelated (|correlation| below 5 standard errors)."""
    mask = dropout.keep_mask(torch.tensor(12345), 2, 4, 128, 128, p).double()
    n = mask.numel()
    assert abs(mask.mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5
    other_seed = dropout.keep_mask(torch.tensor(54321), 2, 4, 128, 128, p).double()

    def correlation(a, b):
        a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    pairs = [(mask, other_seed), (mask[:, 0], mask[:, 1]), (mask[..., :-1], mask[..., 1:]),
             (mask[..., :-1, :], mask[..., 1:, :]), (mask[0], mask[1])]
    for a, b in pairs:
        assert abs(correlation(a, b)) < 5 / a.numel() ** 0.5


def test_keep_scale_is_the_inverse_of_the_exact_keep_rate():
    for p in (0.0, 0.1, 1 / 3, 0.5):
        assert dropout.keep_scale(p) == 2 ** 24 / (2 ** 24 - dropout.threshold(p))
    # Within 2^-25 of 1 the cut keeps one level of 2^24 (it rounded to dropping everything: zeros,
    # an expectation of 0 instead of the output without dropout).
    assert dropout.threshold(1 - 1e-9) == 2 ** 24 - 1 and dropout.keep_scale(1 - 1e-9) == 2 ** 24


def test_heads_whose_keys_differ_by_a_multiple_of_the_row_step_do_not_share_rows():
    """Row keys are not affine in the query index: with row_key = fmix(head_key + i * GOLDEN),
    heads a, b with head_key[a] - head_key[b] = d * GOLDEN (mod 2^32) had row i of one equal to
    row i + d of the other, whole blocks of rows sharing their masks. Such pairs are searched for
    among 2^17 heads (about 128 are expected with d < 64) and their rows compared."""
    n, rows = 1 << 17, 64
    head_key = dropout.head_keys(torch.tensor(4), torch.arange(n))
    golden_inverse = pow(0x9E3779B9, -1, 1 << 32)
    offset = (head_key * golden_inverse) & MASK32  # head_key = offset * GOLDEN (mod 2^32)
    order = torch.argsort(offset)
    gaps = offset[order[1:]] - offset[order[:-1]]
    close = torch.nonzero(gaps < rows).flatten()
    assert len(close) > 20  # the adversarial pairs exist
    i = torch.arange(rows)
    for c in close[:20].tolist():
        a, b, d = order[c + 1].item(), order[c].item(), gaps[c].item()  # offset[a] = offset[b] + d
        keys_a = dropout.row_keys(head_key[a], i[: rows - d])
        keys_b = dropout.row_keys(head_key[b], i[d:])
        assert (keys_a == keys_b).sum().item() == 0, (a, b, d)


# (B, H, Nq, Nk, d, causal, mask kind, dtype): packed heads and a partial group (H 5, d 8),
# wide heads, causal with rows that see no key, half precision.
DROPOUT_CASES = [
    (2, 5, 33, 17, 8, False, "random", torch.float32),
    (1, 3, 9, 40, 40, True, "first_key_off", torch.float32),
    (2, 3, 17, 17, 16, True, "batch0_off", torch.bfloat16),
    (1, 2, 7, 33, 64, False, None, torch.float16),
    (1, 2, 12, 12, 12, True, None, torch.float64),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=str)
def test_every_backend_drops_the_references_probabilities(backend, case, poison_allocator):
    if backend == "triton" and case[-1] == torch.float64:
        pytest.skip("the triton kernels take no float64")
    check_against_float64_reference(backend, case, "cpu", poison_allocator, dropout_p=0.3)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_output_is_unbiased_and_lse_is_the_softmaxs(backend):
    """The mean over 400 seeds is the output without dropout (within 5 standard errors per
    element); the lse ignores dropout."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64) for n in (6, 10, 10))
    with lucidops.use_backend(backend):
        plain, plain_lse = lucidops.ops.attention(q, k, v, return_lse=True)
        torch.manual_seed(2)
        draws = torch.stack([lucidops.ops.attention(q, k, v, dropout_p=0.5) for _ in range(400)])
        _, lse = lucidops.ops.attention(q, k, v, dropout_p=0.5, return_lse=True)
    standard_error = draws.std(0) / 400 ** 0.5
    assert ((draws.mean(0) - plain).abs() < 5 * standard_error + 1e-12).all()
    torch.testing.assert_close(lse, plain_lse, rtol=1e-12, atol=0)


def test_manual_seed_repeats_a_draw_and_calls_differ():
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    torch.manual_seed(7)
    first = lucidops.ops.attention(q, k, v, dropout_p=0.2)
    second = lucidops.ops.attention(q, k, v, dropout_p=0.2)
    torch.manual_seed(7)
    assert torch.equal(lucidops.ops.attention(q, k, v, dropout_p=0.2), first)
    assert not torch.equal(first, second)
    assert torch.equal(lucidops.ops.attention(q, k, v, dropout_p=0.0), lucidops.ops.attention(q, k, v))


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_gradcheck_and_opcheck_with_a_fixed_seed(backend):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 5, generator=g, dtype=torch.float64, requires_grad=True) for n in (4, 6, 6))
    mask = torch.tensor([[True, False, True, True, False, True]])
    seed = torch.tensor(99)

    def fn(q, k, v):
        out, lse, _ = torch.ops.lucidops.attention(q, k, v, mask, True, 0.4, 0.3, seed)
        return out, lse

    with lucidops.use_backend(backend):
        assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)
        assert backends.last_used("attention_backward") == backend
        args = (q.detach(), k.detach(), v.detach(), mask, True, 0.4, 0.3, seed)
        torch.library.opcheck(torch.ops.lucidops.attention.default, args)
        out, lse, lo = torch.ops.lucidops.attention(*args)
        torch.library.opcheck(torch.ops.lucidops.attention_backward.default,
                              (torch.randn_like(out), torch.randn_like(lse), *args[:3], out, lo, lse, *args[3:]))


def test_cpu_under_dropout_never_falls_back_to_aten_and_aten_refuses(monkeypatch):
    """aten's kernel draws its own mask, which no backward can regenerate: without the C++
    extension, aten (the fallback) runs calls without dropout and the reference those with
    it, and forcing aten says why it cannot."""
    q, k, v = (torch.randn(1, 2, 5, 8, dtype=torch.float64) for _ in range(3))
    lucidops.ops.attention(q, k, v, dropout_p=0.1)
    assert backends.last_used("attention") == "cpp"
    problem = backends.backend_problem
    monkeypatch.setattr(backends, "backend_problem",
                        lambda name, device_type: "no C++ extension" if name == "cpp" else problem(name, device_type))
    lucidops.ops.attention(q, k, v)
    assert backends.last_used("attention") == "aten"
    lucidops.ops.attention(q, k, v, dropout_p=0.1)
    assert backends.last_used("attention") == "reference"
    with lucidops.use_backend("aten"), pytest.raises(backends.BackendUnavailable, match="dropout"):
        lucidops.ops.attention(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("bad,error", [(-0.1, ValueError), (1.0, ValueError), (float("nan"), ValueError),
                                       (True, TypeError), (torch.tensor(0.1), TypeError)])
def test_bad_dropout_p_names_it(bad, error):
    q = torch.randn(1, 1, 3, 8)
    with pytest.raises(error, match="dropout_p"):
        lucidops.ops.attention(q, q, q, dropout_p=bad)


def test_a_seed_is_required_under_dropout():
    q = torch.randn(1, 1, 3, 8)
    for backend in ("reference", "cpp"):
        with lucidops.use_backend(backend), pytest.raises(ValueError, match="seed"):
            torch.ops.lucidops.attention(q, q, q, None, False, 0.3, 0.2, None)


def test_torch_compile_fullgraph_with_dropout():
    """Traced without a graph break (the seed is drawn as a graph op); aot_eager draws it from the
    same generator as eager, so the same torch.manual_seed gives the same output and gradient."""
    inputs = [torch.randn(2, 3, 6, 8) for _ in range(3)]
    results = []
    for fn in (lucidops.ops.attention, torch.compile(lucidops.ops.attention, fullgraph=True, backend="aot_eager")):
        q, k, v = (t.clone().requires_grad_(True) for t in inputs)
        torch.manual_seed(11)
        out = fn(q, k, v, causal=True, dropout_p=0.25)
        out.sum().backward()
        results.append((out.detach(), q.grad, k.grad, v.grad))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)


def test_vmap_randomness_same_and_different():
    """randomness="same": every example drops the same probabilities (equal inputs, equal
    outputs); "different": each draws its own. The default ("error") refuses, as for any
    random op."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    batch = q.expand(3, *q.shape)
    call = lambda q: lucidops.ops.attention(q, k, v, dropout_p=0.5)  # noqa: E731
    same = torch.func.vmap(call, randomness="same")(batch)
    assert torch.equal(same[0], same[1]) and torch.equal(same[0], same[2])
    different = torch.func.vmap(call, randomness="different")(batch)
    assert not torch.equal(different[0], different[1])
    with pytest.raises(RuntimeError, match="randomness"):
        torch.func.vmap(call)(batch)
    grads = torch.func.vmap(torch.func.grad(lambda q: call(q).sum()), randomness="same")(batch)
    assert torch.equal(grads[0], grads[2])
    # each example as one call with that example's seed
    torch.manual_seed(4)
    seed = dropout.draw_seed(torch.device("cpu"))
    torch.manual_seed(4)
    same = torch.func.vmap(call, randomness="same")(batch)
    expected = ref.attention(q.double(), k.double(), v.double(), dropout_p=0.5, seed=seed)
    assert rel_err(same[1], expected) < 1e-5


def test_dropout_p_is_checked_under_torch_compile_too():
    """A plain float is checkable while tracing: dropout_p = 1 or < 0 compiled used to run (all
    zeros, or a silent 2/3 rescaling on the reference backend)."""
    q = torch.randn(1, 1, 4, 8)
    for p in (1.0, -0.5):
        compiled = torch.compile(lambda q, p=p: lucidops.ops.attention(q, q, q, dropout_p=p), backend="aot_eager")
        with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
            compiled(q)
        strict = torch.compile(lambda q, p=p: lucidops.ops.attention(q, q, q, dropout_p=p), backend="aot_eager",
                               fullgraph=True)
        with pytest.raises(Exception, match=r"dropout_p must be in \[0, 1\)"):
            strict(q)


def hash_by_spec(seed: int, bh: int, i: int, j: int) -> int:
    """The 24-bit hash u of (seed, head, query, key) that kept_by_spec compares with the cut."""
    head_key = fmix32(seed ^ fmix32((bh * 0x9E3779B9 + 0x7F4A7C15) & MASK32))
    row_key = fmix32(head_key ^ fmix32((i * 0x9E3779B9 + 0x2545F491) & MASK32))
    return fmix32(row_key ^ ((j * 0x85EBCA77) & MASK32)) >> 8


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_hash_equal_to_the_cut_is_kept(backend, dtype):
    """kept = u >= threshold: with dropout_p = u / 2^24 for the hash u of one (head, query, key),
    that probability sits exactly on the cut and must be kept. A random p puts no hash there (one
    in 2^24 per probability), so a '>' passed every other test; here it drops a probability of
    the chosen row, an O(1) change of that row's output and gradients."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton kernels take no float64")
    g = torch.Generator().manual_seed(17)
    b, h, nq, nk, d = 1, 2, 5, 6, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for n in (nq, nk, nk))
    grad_out = torch.randn(b, h, nq, d, generator=g, dtype=dtype)
    seed = 1234
    for bh, i, j in [(0, 0, 0), (1, 3, 5), (0, 4, 2)]:
        u = hash_by_spec(seed, bh, i, j)
        p = u / 2 ** 24
        assert dropout.threshold(p) == u and dropout.keep_mask(torch.tensor(seed), b, h, nq, nk, p)[0, bh, i, j]
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        with lucidops.use_backend(backend):
            out, lse, lo = torch.ops.lucidops.attention(*leaves, None, False, 0.35, p, torch.tensor(seed))
            out.backward(grad_out)
            assert backends.last_used("attention") == backend
        q64, k64, v64 = (t.double() for t in (q, k, v))
        out_ref, lse_ref, lo_ref = ref.forward(q64, k64, v64, None, False, 0.35, p, torch.tensor(seed))
        expected = ref.backward(grad_out.double(), None, q64, k64, v64, out_ref, lo_ref, lse_ref, None, False, 0.35, p,
                                torch.tensor(seed))
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert rel_err(out, out_ref) < tol, (bh, i, j)
        for leaf, e in zip(leaves, expected):
            assert rel_err(leaf.grad, e) < tol, (bh, i, j)
