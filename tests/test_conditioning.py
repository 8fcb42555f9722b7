"""Conditioning toolkit: condition_number, condition_tokens, ConditionedEmbedding,
token_gray (svd, dct) and gd_shrinkage_mask, each against the property it promises."""

import copy
import math

import pytest
import torch
from torch import nn

from lucidops.conditioning import (condition_number, condition_tokens, dct_basis, gd_shrinkage_mask,
                                   token_gray)
from lucidops.nn import ConditionedEmbedding
from comparisons import rel_err


def ill_conditioned(*batch, n=12, d=9, decades=8, seed=0, dtype=torch.float64):
    """Random matrices with singular values spread over `decades` orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, d)
    u = torch.linalg.qr(torch.randn(*batch, n, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(*batch, d, k, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -decades, k, dtype=torch.float64) * (1 + torch.rand(*batch, k, generator=g, dtype=torch.float64))
    s = s.sort(dim=-1, descending=True).values
    return ((u * s.unsqueeze(-2)) @ v.transpose(-1, -2)).to(dtype)


# ---------------------------------------------------------------- condition_number

def test_condition_number_matches_definition():
    x = ill_conditioned(3, 2, n=7, d=5, decades=4)
    s = torch.linalg.svdvals(x)
    k = condition_number(x)
    assert k.shape == (3, 2)
    torch.testing.assert_close(k, s[..., 0] / s[..., -1], rtol=1e-12, atol=0)
    assert (k > 1e3).all()
    # Wide matrices use their min(m, n) singular values.
    wide = x.transpose(-1, -2)
    torch.testing.assert_close(condition_number(wide), k, rtol=1e-10, atol=0)


def test_condition_number_of_orthogonal_is_one_and_rank_deficient_is_inf():
    q = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    assert abs(condition_number(q).item() - 1) < 1e-12
    r1 = torch.randn(5, 1, dtype=torch.float64) @ torch.randn(1, 4, dtype=torch.float64)
    assert condition_number(r1).item() > 1e12  # exactly rank 1: inf or round-off huge
    assert condition_number(torch.zeros(2, 3, 3)).tolist() == [math.inf, math.inf]  # rank 0 (was NaN)
    for bad in (math.inf, math.nan):  # inf gave NaN silently, NaN LAPACK's error
        with pytest.raises(ValueError, match="x must be finite"):
            condition_number(torch.tensor([[1.0, 0.0], [0.0, bad]]))


def test_condition_number_low_precision_and_empty_batch():
    x = ill_conditioned(4, n=6, d=6, decades=2)
    ref = condition_number(x)
    out = condition_number(x.to(torch.bfloat16))
    assert out.dtype == torch.float32
    assert condition_number(torch.randn(0, 3, 3)).shape == (0,)
    assert rel_err(condition_number(x.float()), ref) < 1e-4


@pytest.mark.parametrize("fn", [condition_number, condition_tokens, token_gray])
def test_matrix_functions_reject_bad_x(fn):
    with pytest.raises(ValueError, match="x must have at least 2"):
        fn(torch.randn(5))
    with pytest.raises(TypeError, match="x must be a floating"):
        fn(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fn([[1.0, 2.0]])
    with pytest.raises(ValueError, match="x must have non-empty"):
        fn(torch.randn(2, 0, 3))
    # condition_tokens and token_gray (DCT) returned all NaN for an inf or a NaN, token_gray's
    # SVD mode raised LAPACK's error.
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="x must be finite"):
            fn(torch.tensor([[bad, 1.0], [1.0, 2.0]]))
    if fn is token_gray:
        with pytest.raises(ValueError, match="x must be finite"):
            fn(torch.tensor([[float("nan"), 1.0], [1.0, 2.0]]), mode="svd")


def test_dct_basis_refuses_an_integer_dtype():
    from lucidops.conditioning.graying import dct_basis

    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):  # was an all-zero matrix
        dct_basis(4, torch.int64)


# ---------------------------------------------------------------- condition_tokens

@pytest.mark.parametrize("shape", [(12, 9), (9, 12), (2, 3, 16, 16), (1, 5), (5, 1)])
def test_condition_tokens_bounds_kappa_by_two(shape):
    *batch, n, d = shape
    x = ill_conditioned(*batch, n=n, d=d, decades=10, seed=sum(shape))
    y = condition_tokens(x)
    s = torch.linalg.svdvals(x)
    # Same singular vectors, sigma_1 added to every singular value: kappa is exactly this.
    expected = 2 * s[..., 0] / (s[..., 0] + s[..., -1])
    kappa = condition_number(y)
    torch.testing.assert_close(kappa, expected, rtol=1e-9, atol=0)
    assert (kappa <= 2 + 1e-9).all()
    torch.testing.assert_close(torch.linalg.svdvals(y), s + s[..., :1], rtol=1e-9, atol=1e-12)


def test_condition_tokens_rank_deficient_gives_exactly_two():
    x = torch.randn(10, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)  # rank 3
    assert condition_number(x).item() > 1e10
    assert abs(condition_number(condition_tokens(x)).item() - 2) < 1e-6


def test_condition_tokens_strength():
    x = ill_conditioned(n=10, d=7, decades=9)
    for strength in (0.5, 3.0):
        bound = (1 + strength) / strength
        kappa = condition_number(condition_tokens(x, strength=strength)).item()
        assert kappa <= bound + 1e-9 and kappa > 0.99 * bound


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_condition_tokens_dtypes_match_float64(dtype, tol):
    x = torch.randn(3, 17, 11, dtype=torch.float64)
    x_low = x.to(dtype)
    out = condition_tokens(x_low)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, condition_tokens(x_low.double())) < tol


def test_condition_tokens_non_contiguous_and_empty_batch():
    x = torch.randn(2, 9, 13, dtype=torch.float64).transpose(-1, -2)  # (2, 13, 9), strided
    assert not x.is_contiguous()
    torch.testing.assert_close(condition_tokens(x), condition_tokens(x.contiguous()), rtol=1e-12, atol=1e-12)
    assert condition_tokens(torch.randn(0, 4, 3)).shape == (0, 4, 3)


@pytest.mark.parametrize("shape", [(2, 6, 4), (3, 4, 7), (5, 5), (1, 6, 1)])
def test_condition_tokens_is_differentiable(shape):
    """gradcheck, and the written-out gradient equals autograd through torch's SVD where X has
    full rank (tall, wide, square)."""
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: condition_tokens(x, 0.7), (x,))
    grad_out = torch.randn(shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    through_svd = x + 0.7 * s[..., :1].unsqueeze(-1) * (u @ vh)
    expected, = torch.autograd.grad((through_svd * grad_out).sum(), x)
    got, = torch.autograd.grad((condition_tokens(x, 0.7) * grad_out).sum(), x)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_condition_tokens_gradient_is_finite_for_identical_tokens():
    """A flat image region gives identical patch tokens, so X is rank-deficient and its zero
    singular values repeat: the SVD's autograd returns NaN there (it divides by
    s_i^2 - s_j^2). The written-out gradient stays finite, and it agrees with a central
    difference along a direction that keeps the rank (scaling the tokens)."""
    torch.manual_seed(0)
    embed = nn.Linear(12, 8, dtype=torch.float64)
    images = torch.randn(2, 16, 12, dtype=torch.float64)
    images[:, :12] = 0.0  # twelve identical tokens: rank 5 of 8
    tokens = embed(images)
    assert torch.linalg.matrix_rank(tokens[0]).item() < 8
    condition_tokens(tokens).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in embed.parameters())
    x = tokens.detach().requires_grad_(True)
    loss = lambda x: condition_tokens(x).square().sum()  # noqa: E731
    grad, = torch.autograd.grad(loss(x), x)
    step = 1e-6
    directional = (loss(x.detach() * (1 + step)) - loss(x.detach() * (1 - step))) / (2 * step)
    torch.testing.assert_close((grad * x).sum(), directional, rtol=1e-6, atol=1e-8)
    # Exactly zero features (dead or padded channels): exact zero singular values, where the
    # SVD's autograd gave NaN in float32 and float64 alike.
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(16, 8, dtype=dtype)
        x[:, 5:] = 0.0
        x.requires_grad_(True)
        condition_tokens(x).square().sum().backward()
        assert torch.isfinite(x.grad).all(), dtype


def test_condition_tokens_under_vmap_of_grad():
    x = torch.randn(3, 6, 4)
    per_example = torch.func.vmap(torch.func.grad(lambda x: condition_tokens(x).square().sum()))(x)
    for i in range(3):
        xi = x[i].clone().requires_grad_(True)
        condition_tokens(xi).square().sum().backward()
        torch.testing.assert_close(per_example[i], xi.grad)


def test_condition_tokens_rejects_bad_strength():
    with pytest.raises(ValueError, match="strength"):
        condition_tokens(torch.randn(3, 3), strength=0.0)
    with pytest.raises(TypeError, match="strength"):
        condition_tokens(torch.randn(3, 3), strength="1")


# ---------------------------------------------------------------- ConditionedEmbedding

def test_conditioned_embedding_wraps_an_embedding():
    torch.manual_seed(0)
    embed = torch.nn.Linear(12, 8).double()
    module = ConditionedEmbedding(embed)
    x = torch.randn(3, 20, 12, dtype=torch.float64)
    out = module(x)
    torch.testing.assert_close(out, condition_tokens(embed(x)), rtol=0, atol=0)
    assert (condition_number(out) <= 2 + 1e-9).all()
    out.square().sum().backward()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0
    assert module.in_features == 12  # attributes of the wrapped embedding pass through
    clone = copy.deepcopy(module)
    torch.testing.assert_close(clone(x), out.detach(), rtol=0, atol=0)
    with pytest.raises(AttributeError):
        module.no_such_attribute
    assert len(list(ConditionedEmbedding().parameters())) == 0
    with pytest.raises(TypeError, match="embed"):
        ConditionedEmbedding(embed="linear")
    with pytest.raises(ValueError, match="strength"):
        ConditionedEmbedding(strength=-1)


def test_conditioned_embedding_in_a_timm_vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2, num_classes=5)
    model.patch_embed = ConditionedEmbedding(model.patch_embed)
    seen = {}
    model.patch_embed.register_forward_hook(lambda m, i, o: seen.setdefault("tokens", o.detach()))
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert model.patch_embed.num_patches == 16
    assert (condition_number(seen["tokens"].double()) <= 2 + 1e-3).all()


def test_conditioned_embedding_keeps_the_checkpoint_keys():
    """Wrapping renamed patch_embed.proj.* to patch_embed.embed.proj.*: a pretrained checkpoint
    failed to load strictly (or, with strict=False, left the embedding random)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    kwargs = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    plain = timm.create_model("vit_tiny_patch16_224", **kwargs)
    wrapped = timm.create_model("vit_tiny_patch16_224", **kwargs)
    wrapped.patch_embed = ConditionedEmbedding(wrapped.patch_embed)
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    wrapped.load_state_dict(plain.state_dict())  # strict
    assert torch.equal(wrapped.patch_embed.embed.proj.weight, plain.patch_embed.proj.weight)
    fresh = timm.create_model("vit_tiny_patch16_224", **kwargs)
    fresh.load_state_dict(wrapped.state_dict())  # and back
    assert torch.equal(fresh.patch_embed.proj.weight, plain.patch_embed.proj.weight)
    # a state saved by the wrapped module before (keys under embed.) still loads
    old_keys = {k.replace("patch_embed.", "patch_embed.embed.", 1) if k.startswith("patch_embed.") else k: v
                for k, v in plain.state_dict().items()}
    again = timm.create_model("vit_tiny_patch16_224", **kwargs)
    again.patch_embed = ConditionedEmbedding(again.patch_embed)
    again.load_state_dict(old_keys)
    assert torch.equal(again.patch_embed.embed.proj.weight, plain.patch_embed.proj.weight)
    copied = copy.deepcopy(wrapped)
    assert list(copied.state_dict()) == list(plain.state_dict())
    # A key the checkpoint lacks is reported under the name state_dict() uses (it was reported
    # as patch_embed.embed.proj.bias, a name no checkpoint of this model has).
    partial = {k: v for k, v in plain.state_dict().items() if k != "patch_embed.proj.bias"}
    assert again.load_state_dict(partial, strict=False).missing_keys == ["patch_embed.proj.bias"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "patch_embed.proj.bias"'):
        again.load_state_dict(partial)
    nested = torch.nn.Sequential(copy.deepcopy(again))
    missing = nested.load_state_dict({"0." + k: v for k, v in partial.items()}, strict=False).missing_keys
    assert missing == ["0.patch_embed.proj.bias"]


def test_conditioned_embedding_of_a_module_with_a_child_called_embed_round_trips():
    """A token embedding often names its table ``embed``: its key ``embed.weight`` was taken
    for one already wrapped, so a model could not load its own state dict."""
    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, ids):
            return self.proj(self.embed(ids))

    torch.manual_seed(0)
    model = torch.nn.Sequential(ConditionedEmbedding(Tokens()))
    assert list(model.state_dict()) == ["0.embed.weight", "0.proj.weight", "0.proj.bias"]
    fresh = torch.nn.Sequential(ConditionedEmbedding(Tokens()))
    fresh.load_state_dict(model.state_dict())  # strict
    for name, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    legacy = {"0.embed." + k[2:]: v for k, v in model.state_dict().items()}  # saved under embed. before
    again = torch.nn.Sequential(ConditionedEmbedding(Tokens()))
    again.load_state_dict(legacy)
    assert torch.equal(again[0].embed.embed.weight, model[0].embed.embed.weight)


def test_conditioned_embedding_of_a_dynamic_size_vit_conditions_each_image():
    """timm's dynamic_img_size embeddings return (B, H, W, C) grids: each image's H * W tokens
    are its matrix (before, each grid row was conditioned on its own, kappa up to 5.6)."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=1, num_heads=2, num_classes=5, dynamic_img_size=True)
    model.patch_embed = ConditionedEmbedding(model.patch_embed)
    seen = {}
    model.patch_embed.register_forward_hook(lambda m, i, o: seen.setdefault("grid", o.detach()))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    grid = seen["grid"]
    assert grid.shape == (2, 4, 4, 32)
    assert (condition_number(grid.reshape(2, 16, 32).double()) <= 2 + 1e-3).all()


# ---------------------------------------------------------------- token_gray

def fft_dct2(x):
    """Orthonormal 2D DCT-II through the FFT (Makhoul's reordering): an algorithm
    independent of the cached matrix bases that token_gray uses."""
    def along_last(v):
        n = v.shape[-1]
        w = torch.cat([v[..., ::2], v[..., 1::2].flip(-1)], dim=-1)
        k = torch.arange(n, dtype=torch.float64)
        c = (torch.fft.fft(w, dim=-1) * torch.exp(-1j * math.pi * k / (2 * n))).real * math.sqrt(2.0 / n)
        c[..., 0] /= math.sqrt(2.0)
        return c
    return along_last(along_last(x.double()).transpose(-1, -2)).transpose(-1, -2)


@pytest.mark.parametrize("n", [1, 2, 7, 16])
def test_dct_basis_is_orthonormal_dct(n):
    d = dct_basis(n, torch.float64)
    torch.testing.assert_close(d @ d.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)
    x = torch.randn(3, n, dtype=torch.float64)
    # fft_dct2 on (3, 1, n) transforms the length-1 axis (identity) and the rows.
    torch.testing.assert_close(x @ d.T, fft_dct2(x.unsqueeze(-2))[:, 0, :], rtol=0, atol=1e-12)
    assert dct_basis(n, torch.float64) is d  # cached


@pytest.mark.parametrize("eps", [0.3, 0.9, 1.0])
def test_token_gray_svd_powers_singular_values(eps):
    x = ill_conditioned(2, n=14, d=10, decades=5, seed=3)
    y = token_gray(x, eps=eps, mode="svd")
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    target = (s / s[..., :1]) ** eps
    torch.testing.assert_close(torch.linalg.svdvals(y), target, rtol=1e-9, atol=1e-12)
    # Same singular vectors: U^T Y V is diagonal with the new singular values.
    core = u.transpose(-1, -2) @ y @ vh.transpose(-1, -2)
    torch.testing.assert_close(core, torch.diag_embed(target), rtol=0, atol=1e-10)
    # Hence kappa(Y) = kappa(X)^eps.
    torch.testing.assert_close(condition_number(y), condition_number(x) ** eps, rtol=1e-8, atol=0)


@pytest.mark.parametrize("eps", [0.5, 0.9])
def test_token_gray_dct_keeps_signs_and_powers_magnitudes(eps):
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    c = fft_dct2(x)
    c_out = fft_dct2(token_gray(x, eps=eps, mode="dct"))
    peak = c.abs().amax(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(c_out, torch.sign(c) * (c.abs() / peak) ** eps, rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.sign(c_out), torch.sign(c))
    # Magnitudes are flattened: every coefficient moves towards the peak, relatively.
    assert (c_out.abs() >= (c.abs() / peak) - 1e-12).all()


def test_token_gray_eps_one_is_the_identity_up_to_the_normalisation():
    x = torch.randn(2, 9, 13, dtype=torch.float64)
    for mode in ("dct", "svd"):
        torch.testing.assert_close(token_gray(x, eps=1.0, mode=mode, keep_scale=True), x, rtol=0, atol=1e-12)
    peak_c = fft_dct2(x).abs().amax(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(token_gray(x, eps=1.0, mode="dct"), x / peak_c, rtol=0, atol=1e-12)
    peak_s = torch.linalg.svdvals(x)[..., :1, None]
    torch.testing.assert_close(token_gray(x, eps=1.0, mode="svd"), x / peak_s, rtol=0, atol=1e-12)


def test_token_gray_keep_scale_keeps_the_peak():
    x = ill_conditioned(n=8, d=12, decades=3)
    y = token_gray(x, eps=0.6, mode="svd", keep_scale=True)
    s, s_y = torch.linalg.svdvals(x), torch.linalg.svdvals(y)
    torch.testing.assert_close(s_y[0], s[0], rtol=1e-10, atol=0)
    y = token_gray(x, eps=0.6, mode="dct", keep_scale=True)
    torch.testing.assert_close(fft_dct2(y).abs().max(), fft_dct2(x).abs().max(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", ["dct", "svd"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
def test_token_gray_dtypes_match_float64(mode, dtype, tol):
    x = torch.randn(2, 13, 10, dtype=torch.float64).to(dtype)
    out = token_gray(x, eps=0.7, mode=mode)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, token_gray(x.double(), eps=0.7, mode=mode)) < tol


@pytest.mark.parametrize("mode", ["dct", "svd"])
@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1), (4, 5, 3), (0, 4, 6)])
def test_token_gray_awkward_shapes(mode, shape):
    x = torch.randn(*shape, dtype=torch.float64)
    y = token_gray(x, eps=0.8, mode=mode)
    assert y.shape == x.shape and torch.isfinite(y).all()
    if x.numel():
        # Round trip with eps = 1 and keep_scale is exact on every shape.
        torch.testing.assert_close(token_gray(x, 1.0, mode, keep_scale=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["dct", "svd"])
def test_token_gray_non_contiguous_and_zero_matrix(mode):
    x = torch.randn(3, 12, 9, dtype=torch.float64).transpose(-1, -2)
    torch.testing.assert_close(token_gray(x, 0.6, mode), token_gray(x.contiguous(), 0.6, mode), rtol=0, atol=1e-12)
    z = torch.zeros(2, 5, 4)
    z[1] = torch.randn(5, 4)
    out = token_gray(z, 0.6, mode)
    assert torch.isfinite(out).all() and torch.equal(out[0], torch.zeros(5, 4))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_token_gray_scipy_and_matmul_dct_paths_agree(dtype, tol):
    from lucidops.conditioning import graying

    x = torch.randn(3, 14, 20, dtype=dtype)
    for inverse in (False, True):
        torch.testing.assert_close(graying._dct2_scipy(x, inverse), graying._dct2_matmul(x, inverse), rtol=tol, atol=tol)
    # Both are the transform the property tests check against.
    torch.testing.assert_close(graying._dct2_scipy(x.double(), False), fft_dct2(x.double()), rtol=1e-12, atol=1e-12)


def test_token_gray_dct_is_differentiable_when_asked():
    # With a gradient required the DCT runs as matrix products, never through numpy.
    x = (torch.rand(2, 6, 5, dtype=torch.float64) + 0.5).requires_grad_()
    y = token_gray(x, eps=1.0, mode="dct", keep_scale=True)
    (grad,) = torch.autograd.grad((y * torch.arange(60.0, dtype=torch.float64).view(2, 6, 5)).sum(), x)
    # eps = 1 with keep_scale is the identity, so the gradient is the weights themselves.
    torch.testing.assert_close(grad, torch.arange(60.0, dtype=torch.float64).view(2, 6, 5), rtol=1e-9, atol=1e-9)


def test_token_gray_rejects_bad_arguments():
    x = torch.randn(4, 4)
    for eps in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError, match="eps must be in"):
            token_gray(x, eps=eps)
    with pytest.raises(TypeError, match="eps"):
        token_gray(x, eps=True)
    np = pytest.importorskip("numpy")
    torch.testing.assert_close(token_gray(x, eps=np.float32(0.5)), token_gray(x, eps=0.5))  # any real number
    with pytest.raises(ValueError, match="mode must be one of"):
        token_gray(x, mode="fft")
    with pytest.raises(TypeError, match="keep_scale"):
        token_gray(x, keep_scale=1)
    with pytest.raises(ValueError, match="n must be"):
        dct_basis(0)


# ---------------------------------------------------------------- gd_shrinkage_mask

def test_gd_shrinkage_mask_matches_formula_and_is_monotone():
    s = torch.rand(257, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    lr, iters = 0.1, 25
    m = gd_shrinkage_mask(s, lr, iters)
    # The direct formula itself loses ~iters ulps near m = 0, hence the absolute slack.
    torch.testing.assert_close(m, 1 - (1 - lr * s * s) ** iters, rtol=1e-12, atol=1e-13)
    order = s.argsort()
    assert (m[order].diff() >= 0).all()  # monotone in s inside the stable region lr s^2 < 1
    assert ((m >= 0) & (m <= 1)).all()
    # More iterations widen the band.
    assert (gd_shrinkage_mask(s, lr, 2 * iters) >= m).all()


def test_gd_shrinkage_mask_overshoots_between_one_and_two_as_documented():
    """The docstring said (0, 1] and monotone up to lr s^2 = 2; past 1 each step overshoots."""
    s = torch.tensor([1.2, 1.5, 1.9], dtype=torch.float64).sqrt()  # lr s^2 in (1, 2) at lr = 1
    odd, even = gd_shrinkage_mask(s, 1.0, 3), gd_shrinkage_mask(s, 1.0, 4)
    assert (odd > 1).all() and (even < 1).all()
    assert (gd_shrinkage_mask(s, 1.0, 200) - 1).abs().max() < 1e-6  # converges to 1 all the same
    assert (gd_shrinkage_mask(s, 1.0, 0) == 0).all()


def test_gd_shrinkage_mask_small_values_keep_relative_precision():
    s = torch.tensor([1e-9, 1e-6, 1e-4], dtype=torch.float32)
    lr, iters = 0.5, 7
    a = lr * s.double() ** 2
    series = iters * a - iters * (iters - 1) / 2 * a * a  # first two binomial terms
    assert rel_err(gd_shrinkage_mask(s, lr, iters), series) < 1e-6
    assert gd_shrinkage_mask(s, lr, iters).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gd_shrinkage_mask_half_precision_matches_float64(dtype):
    """fp16 once underflowed lr s^2 to a mask of exactly 0, and iters > 65504 could not be a Half."""
    s = torch.tensor([1e-2, 0.5, 1.0, 2.0], dtype=dtype)
    for lr, iters in [(1e-8, 1000), (1e-3, 70000), (0.1, 25)]:
        expected = gd_shrinkage_mask(s.double(), lr, iters)
        got = gd_shrinkage_mask(s, lr, iters)
        assert got.dtype == dtype
        # The float64 mask rounded to the dtype (values below its range become 0), to an ulp.
        ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
        torch.testing.assert_close(got.double(), expected.to(dtype).double(), rtol=ulp, atol=0)


def test_dct_basis_built_in_inference_mode_serves_a_later_gradient():
    """The cache kept the first caller's tensor: built under inference_mode, it could not be
    saved for backward by a later differentiable token_gray."""
    with torch.inference_mode():
        dct_basis(11, torch.float64, "cpu")
        dct_basis(7, torch.float64, torch.device("cpu"))
    x = (torch.rand(2, 11, 7, dtype=torch.float64) + 0.5).requires_grad_()
    (grad,) = torch.autograd.grad(token_gray(x, eps=1.0, mode="dct", keep_scale=True).sum(), x)
    torch.testing.assert_close(grad, torch.ones_like(x), rtol=1e-9, atol=1e-9)


def test_gd_shrinkage_mask_edges():
    s = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.equal(gd_shrinkage_mask(s, 0.3, 0), torch.zeros(4, dtype=torch.float64))
    m = gd_shrinkage_mask(s, 1.0, 5)  # lr s^2 = 0, 1, 4, 9
    torch.testing.assert_close(m, torch.tensor([0.0, 1.0, 1 - (-3.0) ** 5, 1 - (-8.0) ** 5], dtype=torch.float64))
    assert gd_shrinkage_mask(torch.empty(0), 0.1, 3).shape == (0,)


def test_gd_shrinkage_mask_rejects_bad_arguments():
    s = torch.rand(4)
    with pytest.raises(ValueError, match="lr"):
        gd_shrinkage_mask(s, 0.0, 3)
    with pytest.raises(TypeError, match="iters"):
        gd_shrinkage_mask(s, 0.1, 2.5)
    with pytest.raises(ValueError, match="iters"):
        gd_shrinkage_mask(s, 0.1, -1)
    with pytest.raises(ValueError, match="singular_values must be >= 0"):
        gd_shrinkage_mask(-s - 1, 0.1, 3)
    with pytest.raises(ValueError, match="singular_values must be finite"):
        gd_shrinkage_mask(torch.tensor([float("inf")]), 0.1, 3)
    with pytest.raises(TypeError, match="singular_values"):
        gd_shrinkage_mask(torch.ones(3, dtype=torch.int32), 0.1, 3)


def test_gd_shrinkage_mask_checks_values_under_vmap_and_skips_them_on_meta():
    """Its data-dependent checks follow the shared rule (_validate.readable_values): under vmap
    they read every example, on the meta device (shape-only runs) they stand aside."""
    s = torch.rand(3, 4)
    torch.testing.assert_close(torch.vmap(lambda t: gd_shrinkage_mask(t, 0.1, 5))(s), gd_shrinkage_mask(s, 0.1, 5))
    assert gd_shrinkage_mask(s.to("meta"), 0.1, 5).shape == (3, 4)
    s[1, 2] = float("nan")
    with pytest.raises(ValueError, match="singular_values must be finite"):
        torch.vmap(lambda t: gd_shrinkage_mask(t, 0.1, 5))(s)


def test_condition_tokens_second_derivative_raises_instead_of_being_wrong():
    """The written-out gradient holds U, S, V fixed, so differentiating it again (a gradient
    penalty) would be silently wrong (1.09 relative error against finite differences): it raises."""
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    grad, = torch.autograd.grad(condition_tokens(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivatives only"):
        grad.square().sum().backward()


def test_dct_graying_runs_under_vmap():
    # the scipy path read the storage a vmapped tensor lacks: "Cannot access data pointer"
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    mapped = torch.func.vmap(lambda t: token_gray(t, 0.7))(x)
    torch.testing.assert_close(mapped, token_gray(x, 0.7), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [lambda x: token_gray(x, 0.7, "dct"), lambda x: token_gray(x, 0.7, "svd"),
                                lambda x: condition_tokens(x)], ids=["dct", "svd", "condition_tokens"])
def test_transforms_run_in_float32_inside_a_bfloat16_autocast_region(fn, request):
    """Their matmuls ran in bfloat16 there (0.6% off for graying with a gradient, 2e-2 for
    condition_tokens) while the SVD and scipy's DCT did not: the result depended on the path."""
    torch.manual_seed(0)
    x = torch.randn(2, 49, 16)
    want = fn(x)
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_grad_path = fn(x), fn(xg)
    for out in (got, got_grad_path):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if "condition_tokens" not in request.node.name:  # graying's power law has no useful gradient near 0
        return
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fn(xg).sum().backward()
    grad = xg.grad.clone()
    xg.grad = None
    fn(xg).sum().backward()
    torch.testing.assert_close(grad, xg.grad, rtol=1e-4, atol=1e-4)
