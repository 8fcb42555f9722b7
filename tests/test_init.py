"""Skipless and impulse initialisation of timm ViTs, and the skipless patch."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lucidops.conditioning import condition_number
from lucidops.init import skipless_
from lucidops.patch import skipless, undo_skipless

timm = pytest.importorskip("timm")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_vit(depth=2, dim=32, heads=4, img=32, patch=8, classes=4, seed=0, **kw):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=patch,
                             embed_dim=dim, depth=depth, num_heads=heads, num_classes=classes, **kw)


def qk_products(attn):
    """Per head, W_Q^h W_K^h^T in the row convention (x @ W)."""
    hd, inner = attn.head_dim, attn.num_heads * attn.head_dim
    w = attn.qkv.weight.detach().double()
    return [w[h * hd:(h + 1) * hd].T @ w[inner + h * hd:inner + (h + 1) * hd] for h in range(attn.num_heads)]


def vo_product(attn):
    inner = attn.num_heads * attn.head_dim
    return attn.qkv.weight.detach().double()[2 * inner:].T @ attn.proj.weight.detach().double().T


def test_skipless_qk_is_the_rank_d_split_of_the_near_identity_matrix():
    model = tiny_vit()
    alpha, beta = 0.2, 1.0
    skipless_(model, alpha=alpha, beta=beta, generator=gen(7))
    attn = model.blocks[0].attn
    dim, hd = 32, attn.head_dim
    # The intended matrix of head 0 of layer 0: the first draw of the same generator.
    g = gen(7)
    a = alpha * (torch.rand(dim, dim, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(3 / dim) \
        + beta * torch.eye(dim, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a)
    best = (u[:, :hd] * s[:hd]) @ vh[:hd]
    products = qk_products(attn)
    torch.testing.assert_close(products[0], best, rtol=0, atol=1e-5)
    for block in model.blocks:
        for p in qk_products(block.attn):
            sv = torch.linalg.svdvals(p)
            assert sv[hd] < 1e-5 * sv[0]  # rank exactly d
            # Near identity on its range: singular values within beta +- alpha ||E|| (||E|| <~ 2.2).
            assert ((sv[:hd] > beta - 2.5 * alpha) & (sv[:hd] < beta + 2.5 * alpha)).all()
            # ... and positive definite there (a rotation would also have those singular values).
            _, _, vh_p = torch.linalg.svd(p)
            basis = vh_p[:hd].T
            quad = torch.linalg.eigvalsh((basis.T @ p @ basis + (basis.T @ p @ basis).T) / 2)
            assert (quad > 0.5 * beta).all()
    # Different heads get different random parts.
    assert not torch.allclose(products[0], products[1])


def test_skipless_qk_with_alpha_zero_is_a_scaled_projector():
    model = tiny_vit(depth=1)
    skipless_(model, alpha=0.0, beta=0.8, generator=gen())
    for p in qk_products(model.blocks[0].attn):
        torch.testing.assert_close(p, p.T, rtol=0, atol=1e-6)
        torch.testing.assert_close(p @ p, 0.8 * p, rtol=0, atol=1e-6)
        assert abs(torch.trace(p).item() - 0.8 * 8) < 1e-5


@pytest.mark.parametrize("vo_scale", [1.0, 0.5])
def test_skipless_vo_is_scaled_orthogonal(vo_scale):
    model = tiny_vit()
    default_kappa = condition_number(vo_product(model.blocks[0].attn)).item()
    skipless_(model, vo_scale=vo_scale, generator=gen())
    for block in model.blocks:
        m = vo_product(block.attn)
        assert condition_number(m).item() < 1 + 1e-5
        torch.testing.assert_close(m.T @ m, vo_scale ** 2 * torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-5)
        assert block.attn.qkv.bias.abs().max() == 0 and block.attn.proj.bias.abs().max() == 0
    assert default_kappa > 10  # the test can tell: timm's default init is far from orthogonal


def test_skipless_orthogonal_mlp_and_reproducibility():
    a, b = tiny_vit(), tiny_vit(seed=1)
    skipless_(a, orthogonal_mlp=True, generator=gen(3))
    skipless_(b, orthogonal_mlp=True, generator=gen(3))
    fc1 = a.blocks[0].mlp.fc1.weight.detach().double()  # (4 D, D): orthonormal columns
    torch.testing.assert_close(fc1.T @ fc1, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-5)
    fc2 = a.blocks[1].mlp.fc2.weight.detach().double()  # (D, 4 D): orthonormal rows
    torch.testing.assert_close(fc2 @ fc2.T, torch.eye(32, dtype=torch.float64), rtol=0, atol=1e-5)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        if "attn" in n or "mlp" in n:
            assert torch.equal(p, q), n


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_skipless_orthogonal_mlp_in_half_precision(dtype):
    """PyTorch's QR has no half kernels: a half model raised midway (attention already
    changed); its MLP gets the float32 orthogonal matrix, rounded, and the same one as float32."""
    half, single = tiny_vit().to(dtype), tiny_vit()
    skipless_(half, orthogonal_mlp=True, generator=gen(3))
    skipless_(single, orthogonal_mlp=True, generator=gen(3))
    fc1 = half.blocks[0].mlp.fc1.weight
    assert fc1.dtype == dtype
    torch.testing.assert_close(fc1, single.blocks[0].mlp.fc1.weight.to(dtype), rtol=0, atol=0)


def test_skipless_init_rejects_bad_input():
    with pytest.raises(ValueError, match="model has no timm-style attention"):
        skipless_(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(TypeError, match="model"):
        skipless_("vit")
    with pytest.raises(ValueError, match="alpha"):
        skipless_(tiny_vit(depth=1), alpha=float("nan"))
    with pytest.raises(TypeError, match="beta must be a real number, got str"):
        skipless_(tiny_vit(depth=1), beta="1")
    with pytest.raises(ValueError, match="vo_scale"):
        skipless_(tiny_vit(depth=1), vo_scale=0.0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        skipless_(tiny_vit(depth=1), generator=0)


def _wide_head_attention():
    """timm's attention with its one head (16) wider than the model (8)."""
    from timm.models.vision_transformer import Attention

    attn = Attention(8, num_heads=1)
    attn.head_dim, attn.qkv, attn.proj = 16, nn.Linear(8, 48), nn.Linear(16, 8)
    return attn


def test_attention_look_alikes_are_refused_before_any_change():
    """EVA-02's attention was taken by its qkv/proj shape: its separate q/v biases stayed as
    they were (the docstrings say biases are zeroed) and its rotary embedding moved impulse_'s
    head offsets (peaks on the offset for 11% of queries in one head), silently."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("eva02_tiny_patch14_224", pretrained=False, img_size=28, depth=1)
    with torch.no_grad():
        model.blocks[0].attn.q_bias.fill_(0.5)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for init in (skipless_, impulse_):
        with pytest.raises(ValueError, match="'blocks.0.attn' \\(EvaAttention\\) only look like them"):
            init(model)
        assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_skipless_init_refuses_a_bad_layer_before_changing_any():
    """The head_dim check ran layer by layer: the layers before a bad one were already rewritten."""
    model = nn.Sequential(tiny_vit(depth=1), _wide_head_attention())
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="head_dim \\(16\\) of '1' must be <= the model width \\(8\\)"):
        skipless_(model)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_skipless_and_impulse_init_a_cuda_model_like_a_cpu_one():
    """The draws happen on the CPU: a CPU generator serves a CUDA model (orthogonal_ drew on the
    model's device, and impulse_ mixed CUDA positions with CPU shift matrices)."""
    from lucidops.init import impulse_

    for init, kwargs in ((skipless_, dict(orthogonal_mlp=True)), (impulse_, {})):
        on_cpu, on_gpu = tiny_vit(), tiny_vit().cuda()
        init(on_cpu, generator=gen(3), **kwargs)
        init(on_gpu, generator=gen(3), **kwargs)
        for (name, a), b in zip(on_cpu.named_parameters(), on_gpu.parameters()):
            torch.testing.assert_close(b.cpu(), a, rtol=1e-6, atol=1e-6, msg=name)
        with pytest.raises(ValueError, match="generator must be a CPU"):
            init(on_gpu, generator=torch.Generator(device="cuda"))


def test_skipless_patch_removes_the_residuals_and_undoes():
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    block = model.blocks[0]
    tokens = torch.randn(2, 17, 32)
    with_skip = block(tokens)
    handle = skipless(model)
    assert handle.model is model and handle.paths == ["blocks.0", "blocks.1"]
    assert "forward -> no residuals" in handle.table()
    expected = block.mlp(block.norm2(block.attn(block.norm1(tokens))))
    torch.testing.assert_close(block(tokens), expected, rtol=0, atol=0)
    assert not torch.allclose(block(tokens), with_skip)
    out = model(x)
    assert torch.isfinite(out).all() and not torch.allclose(out, ref)
    out.sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    with pytest.raises(ValueError, match="un-patched"):
        skipless(model)
    undo_skipless(model)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no block patched"):
        undo_skipless(model)
    handle.revert()  # after undo_skipless: leaves the restored blocks alone
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    with skipless(model):  # the handle reverts on exit, bit for bit
        assert not torch.allclose(model(x), ref)
    assert all("forward" not in b.__dict__ for b in model.blocks)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no un-patched timm"):
        skipless(nn.Sequential(nn.Linear(3, 3)))


# ---------------------------------------------------------------- impulse

from lucidops.init import impulse_, kernel_offsets  # noqa: E402
from lucidops.init.impulse import shift_matrix  # noqa: E402


def test_skipless_patch_warns_about_small_layer_scales():
    """With timm's init_values=1e-5 and no residual, each block multiplies the signal by 1e-5:
    four blocks left the logits' input gradient at 1.7e-22, with nothing said."""
    import warnings

    with pytest.warns(RuntimeWarning, match=r"2 block\(s\) keep LayerScale gammas all below 1e-05") as caught:
        handle = skipless(tiny_vit(init_values=1e-5))
    assert caught[0].filename == __file__  # attributed to the caller, not to lucidops
    assert "LayerScale" in handle.notes[0]
    trained = tiny_vit(init_values=1.0)
    with torch.no_grad():
        trained.blocks[0].ls1.gamma[:5] = 1e-4  # a trained scale with a few small channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        skipless(trained)  # nothing to say
        skipless(tiny_vit())


def test_kernel_offsets_order():
    assert kernel_offsets(1) == [(0, 0)]
    offs = kernel_offsets(3)
    assert offs[0] == (0, 0)
    assert set(offs[1:5]) == {(-1, 0), (1, 0), (0, -1), (0, 1)}          # cross
    assert set(offs[5:9]) == {(-1, -1), (-1, 1), (1, -1), (1, 1)}       # corners
    offs5 = kernel_offsets(5)
    assert offs5[:9] == offs and len(offs5) == 25 and len(set(offs5)) == 25
    assert set(offs5[9:13]) == {(-2, 0), (2, 0), (0, -2), (0, 2)}
    for bad in (0, 2):
        with pytest.raises(ValueError, match="kernel_size"):
            kernel_offsets(bad)
    for bad in (3.0, True, "3"):  # the wrong type is a TypeError, as for every number setting (README)
        with pytest.raises(TypeError, match="kernel_size must be an int"):
            kernel_offsets(bad)


def test_shift_matrix():
    t = shift_matrix((3, 4), (1, -1))
    for p in range(12):
        y, x = divmod(p, 4)
        row = torch.zeros(12, dtype=torch.float64)
        if 0 <= y + 1 < 3 and 0 <= x - 1 < 4:
            row[(y + 1) * 4 + x - 1] = 1
        assert torch.equal(t[p], row)


def head_attention(block, tokens):
    """Softmax attention maps (H, N, N) of a timm block for a (1, N, D) token matrix."""
    attn = block.attn
    x = block.norm1(tokens)
    qkv = attn.qkv(x).reshape(1, x.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[0]


def peak_accuracy(maps, grid, offsets):
    """Per head: the fraction of interior queries whose attention peaks at the head's offset."""
    gh, gw = grid
    out = []
    for h in range(maps.shape[0]):
        dy, dx = offsets[h % len(offsets)]
        hits = [int(maps[h, y * gw + x].argmax()) == (y + dy) * gw + x + dx
                for y in range(1, gh - 1) for x in range(1, gw - 1)]
        out.append(sum(hits) / len(hits))
    return out


@pytest.mark.parametrize("heads,floor", [(9, 0.9), (12, 0.8)])  # head dim 16 / 12 on 64 patches
def test_impulse_attention_peaks_at_each_heads_offset(heads, floor):
    model = tiny_vit(depth=2, dim=144, heads=heads, img=32, patch=4)  # 8 x 8 patch grid
    grid = model.patch_embed.grid_size
    pos = model.pos_embed[:, 1:].detach()
    before = peak_accuracy(head_attention(model.blocks[0], pos).detach(), grid, kernel_offsets(3))
    impulse_(model, generator=gen())
    offsets = kernel_offsets(3)
    for block in model.blocks:
        maps = head_attention(block, pos).detach()
        acc = peak_accuracy(maps, grid, offsets)
        assert min(acc) >= floor, acc
        # Heads beyond the 9 taps repeat the order.
        if heads > 9:
            assert torch.allclose(maps[9], maps[0], atol=1e-5)
    assert max(before) < 0.5  # timm's default init has no such structure


def test_impulse_with_scaled_positions_peaks_on_real_images():
    model = tiny_vit(depth=1, dim=144, heads=9, img=32, patch=4).eval()
    impulse_(model, pos_scale=500.0, generator=gen())
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(img))[:, 1:]
        acc = peak_accuracy(head_attention(model.blocks[0], tokens), model.patch_embed.grid_size, kernel_offsets(3))
    assert min(acc) >= 0.8, acc


def test_impulse_value_projection_is_the_split_of_the_intended_matrix():
    model = tiny_vit(depth=1, dim=144, heads=9, img=32, patch=4)
    impulse_(model, v_alpha=0.4, v_beta=0.4, generator=gen(5))
    g = gen(5)
    a = 0.4 * (torch.rand(144, 144, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(3 / 144) \
        - 0.4 * torch.eye(144, dtype=torch.float64)
    torch.testing.assert_close(vo_product(model.blocks[0].attn), a, rtol=0, atol=1e-5)
    attn = model.blocks[0].attn
    for w in (attn.qkv.weight[:144].view(9, 16, 144), attn.qkv.weight[144:288].view(9, 16, 144)):
        torch.testing.assert_close(w.detach().double().flatten(1).norm(dim=1), torch.full((9,), 7.0, dtype=torch.float64))


def test_impulse_rejects_bad_input():
    with pytest.raises(ValueError, match="model has no timm-style attention"):
        impulse_(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="pos_embed"):
        impulse_(tiny_vit(depth=1, pos_embed="none"))
    with pytest.raises(ValueError, match="kernel_size"):
        impulse_(tiny_vit(depth=1), kernel_size=4)
    with pytest.raises(ValueError, match="qk_scale"):
        impulse_(tiny_vit(depth=1), qk_scale=-7)
    with pytest.raises(ValueError, match="pinv_rank"):
        impulse_(tiny_vit(depth=1), pinv_rank=0)
    # A model refused with pos_scale given is left as it was (pos_embed was scaled first).
    model = tiny_vit(depth=1)
    model.pos_embed = nn.Parameter(model.pos_embed[:, :5].detach().clone())
    before = model.pos_embed.detach().clone()
    with pytest.raises(ValueError, match="pos_embed"):
        impulse_(model, pos_scale=2.0)
    assert torch.equal(model.pos_embed, before)
    # An attention of another width further down: refused before pos_embed or the first block
    # is changed (both were, before).
    model = tiny_vit(depth=2)
    model.blocks[1].attn = timm.layers.Attention(16, num_heads=2)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="width 32 differs from the attention width 16 of 'blocks.1.attn'"):
        impulse_(model, pos_scale=2.0)
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="meta device"):
        impulse_(tiny_vit(depth=1).to("meta"))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        impulse_(tiny_vit(depth=1), generator=3)


# ---------------------------------------------------------------- skipless training (seeded, short)

def quadrant_task(n, seed):
    """4 classes: the quadrant of a bright 4 x 4 square in a noisy 16 x 16 image."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    y = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        qy, qx = divmod(int(y[i]), 2)
        x[i, :, qy * 8 + 2:qy * 8 + 6, qx * 8 + 2:qx * 8 + 6] += 2.0
    return x, y


def train_skipless_vit(init: bool, steps=150):
    model = tiny_vit(depth=6, dim=32, heads=4, img=16, patch=4)
    if init:
        skipless_(model, orthogonal_mlp=True, generator=gen())
    skipless(model)
    x, y = quadrant_task(512, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = gen(1)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, 512, (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses[-20:]) / 20


def test_skipless_init_trains_where_default_init_does_not():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # reproducible reductions, and faster for these tiny shapes
    try:
        ours, default = train_skipless_vit(True), train_skipless_vit(False)
    finally:
        torch.set_num_threads(threads)
    chance = math.log(4)
    assert default > 0.95 * chance, default  # default init, no skips: stuck at chance
    assert ours < 0.6 * chance, ours          # skipless_ init: learns the task


def test_impulse_refuses_before_changing_anything():
    """A head_dim past the width failed in rank_split after pos_embed had been scaled; an
    all-zero pos_embed gave every W_Q and W_K zero (uniform attention), silently."""
    from lucidops.init import impulse_

    model = tiny_vit(depth=1, dim=16, heads=1)
    attn = model.blocks[0].attn
    attn.head_dim, attn.qkv, attn.proj = 32, nn.Linear(16, 96), nn.Linear(32, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"head_dim \(32\) of 'blocks.0.attn' must be <= the model width \(16\)"):
        impulse_(model, pos_scale=5.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    model = tiny_vit()
    nn.init.zeros_(model.pos_embed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="pos_embed holds .* the same position for every patch"):
        impulse_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    impulse_(tiny_vit())  # a trained or randomly initialised pos_embed is fine
