"""Initialisation for transformers without residual connections (methods.md section 6).

Without skips the signal must pass through every attention layer, so each layer is
started well conditioned (authors' recipe):

- Q/K, per head h: A_h = alpha U(-sqrt(3/D), sqrt(3/D))^{D x D} + beta I; with the SVD
  A_h = U S V^T, W_Q^h = U_d sqrt(S_d) and W_K^h = V_d sqrt(S_d) (d = head dim, top d
  singular triplets), so W_Q^h W_K^h^T is the best rank-d approximation of the
  near-identity A_h.
- V/O: U and V^T of the SVD of a Gaussian D x D matrix, so W_V W_O = vo_scale U V^T is a
  scaled orthogonal matrix (condition number 1).
- optionally orthogonal MLP weights.

Matrices are in the row convention ``x @ W`` (timm's ``Linear.weight`` is ``W.T``).
Use with :func:`lucidops.patch.skipless`, which removes the residual connections.
The defaults for alpha and beta are this package's choice (the public record does not
settle them); pass the paper's values if you have them.
"""

from __future__ import annotations

import math
from typing import Optional, cast

import torch
from torch import nn

from .. import _validate
from ._common import cpu_generator, rank_split, require_attention, uniform


@torch.no_grad()
def skipless_(model: nn.Module, alpha: float = 0.2, beta: float = 1.0, vo_scale: float = 1.0,
              orthogonal_mlp: bool = False, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Initialise every attention layer of ``model`` in place.

    Args:
        model: a timm ViT or any module whose attention layers are timm's ViT ``Attention``
            or lucidops' ``ManyHeadAttention`` (fused ``qkv`` + ``proj``); a look-alike of
            another class (EVA-02's) is refused, before any change.
        alpha: weight of the random part of A_h.
        beta: weight of the identity part of A_h.
        vo_scale: W_V W_O = vo_scale * (orthogonal); each factor gets sqrt(vo_scale).
        orthogonal_mlp: also give the MLP Linear layers (``mlp`` sibling of ``attn``)
            orthogonal weights and zero biases.
        generator: optional CPU ``torch.Generator`` for reproducibility (the weights are drawn
            on the CPU in float64 and copied to the model's device and dtype).

    Biases of qkv and proj are zeroed. Returns ``model``.
    """
    layers = require_attention(model, "skipless_")
    alpha = _validate.real_number(alpha, "alpha")
    beta = _validate.real_number(beta, "beta")
    vo_scale = _validate.real_number(vo_scale, "vo_scale", "> 0")
    _validate.boolean(orthogonal_mlp, "orthogonal_mlp")
    cpu_generator(generator)
    for name, attn in layers:  # every layer checked before the first is changed
        hd, dim = cast(int, attn.head_dim), cast(nn.Linear, attn.qkv).in_features
        if hd > dim:
            raise ValueError(f"head_dim ({hd}) of {name!r} must be <= the model width ({dim}) for a rank-head_dim "
                             "split")
    for _, attn in layers:
        # attention_layers only returns modules whose qkv/proj are Linear and heads/head_dim ints
        qkv, proj = cast(nn.Linear, attn.qkv), cast(nn.Linear, attn.proj)
        dim, heads, hd = qkv.in_features, cast(int, attn.num_heads), cast(int, attn.head_dim)
        inner = heads * hd
        bound = math.sqrt(3.0 / dim)
        wq = torch.empty(inner, dim, dtype=torch.float64)
        wk = torch.empty(inner, dim, dtype=torch.float64)
        eye = torch.eye(dim, dtype=torch.float64)
        for h in range(heads):
            a = alpha * uniform((dim, dim), bound, generator) + beta * eye
            left, right = rank_split(a, hd)
            wq[h * hd:(h + 1) * hd] = left.T
            wk[h * hd:(h + 1) * hd] = right.T
        g = torch.randn(dim, max(dim, inner), generator=generator, dtype=torch.float64)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        root = math.sqrt(vo_scale)
        if inner <= dim:
            w_v, w_o = u[:, :inner] * root, vh[:inner] * root  # (D, inner), (inner, D)
        else:  # wider attention than the model: orthonormal rows instead of columns
            w_v, w_o = (u @ vh) * root, (u @ vh).T * root
        weight = torch.cat([wq, wk, w_v.T], dim=0)
        qkv.weight.copy_(weight.to(qkv.weight))
        proj.weight.copy_(w_o.T.to(proj.weight))
        if qkv.bias is not None:
            qkv.bias.zero_()
        if proj.bias is not None:
            proj.bias.zero_()
    if orthogonal_mlp:
        for m in model.modules():
            mlp = getattr(m, "mlp", None)
            if getattr(m, "attn", None) is None or not isinstance(mlp, nn.Module):
                continue
            for lin in mlp.modules():
                if isinstance(lin, nn.Linear):
                    # PyTorch's QR has no half kernels: half weights get a float32 matrix, rounded
                    # (before, fp16/bf16 models raised midway, their attention already changed).
                    # Drawn on the CPU, where the generator is, whatever the model's device.
                    compute = torch.promote_types(lin.weight.dtype, torch.float32)
                    ortho = torch.empty(lin.weight.shape, dtype=compute)
                    nn.init.orthogonal_(ortho, generator=generator)
                    lin.weight.copy_(ortho)
                    if lin.bias is not None:
                        lin.bias.zero_()
    return model
