"""ManyHeadAttention: timm's ViT ``Attention`` on the lucidops attention kernel.

Same constructor arguments and parameter names as
``timm.layers.attention.Attention`` (qkv, q_norm, k_norm, norm, gate, proj), so a timm
state dict loads as is; the attention itself runs ``lucidops.ops.attention``, which
handles any head count and head dims 4..128 (methods.md section 2).
"""

from __future__ import annotations

import warnings
from typing import Optional, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validate
from .._typing import DeviceLike
from ..ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM, attention
from ..reference import attention as _reference


def _pytorch_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool, key_padding_mask: Optional[Tensor],
                       attn_mask: Optional[Tensor], scale: float, dropout_p: float, why: str) -> Tensor:
    """PyTorch's SDPA, exactly timm's call, for what lucidops' kernel does not take: a mask
    other than key padding (``attn_mask``: additive, or per query), attn_drop = 1, or a head
    dim outside MIN_HEAD_DIM..MAX_HEAD_DIM. With a
    key padding mask, queries that see no key get zeros and zero gradient, as in
    lucidops.ops.attention (SDPA alone would give NaN)."""
    if not _validate.is_compiling():
        warnings.warn(f"lucidops ManyHeadAttention: {why}, so this call runs PyTorch's scaled_dot_product_attention "
                      f"(lucidops' kernel takes key padding masks, dropout below 1 and head dims {MIN_HEAD_DIM}.."
                      f"{MAX_HEAD_DIM})", RuntimeWarning, stacklevel=4)
    if attn_mask is not None:  # timm's own call
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=causal,
                                              scale=scale)
    nq, nk = q.shape[-2], k.shape[-2]
    visible = _reference.visible(nq, nk, causal, key_padding_mask, q.device)
    if visible is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    sees_a_key = visible.any(dim=-1, keepdim=True)
    # Rows without a visible key attend to every key (finite), then are zeroed: zero gradient too.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible | ~sees_a_key, dropout_p=dropout_p, scale=scale)
    return out * sees_a_key


def _attend(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool, scale: float,
            dropout_p: float) -> Tensor:
    """ManyHeadAttention's attention on q, k, v (B, H, N, head_dim): lucidops' kernel with a
    bool key padding mask, PyTorch's SDPA (with a warning) for what the kernel does not take.
    A leaf of torch.fx graphs (torch.fx.wrap below): its checks and branches read values."""
    _validate.boolean(is_causal, "is_causal")  # "False" ran causal attention; timm's raises too
    b, n, head_dim = q.shape[0], q.shape[2], q.shape[3]
    key_padding_mask, other_mask = None, None
    if attn_mask is not None:
        # By shape, not size: a (N, N) mask has B * N elements when B == N. B != N is asked
        # of a 2-D mask only: under symbolic shapes it is a guard, and for timm's 4-D mask it
        # made an exported program refuse batch == tokens (an exported ViT, batch 17).
        four_d = attn_mask.dim() == 4 and tuple(attn_mask.shape) == (b, 1, 1, n)
        two_d = attn_mask.dim() == 2 and tuple(attn_mask.shape) == (b, n) and b != n
        if attn_mask.dtype == torch.bool and (four_d or two_d):
            key_padding_mask = attn_mask.reshape(b, n)
        else:
            other_mask = attn_mask
    head_dim_outside = not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM
    if other_mask is not None or dropout_p >= 1 or head_dim_outside:
        # dtype and rank only: one warning per kind of mask, not per batch shape
        why = (f"a {other_mask.dim()}-D {other_mask.dtype} attn_mask is not a bool key padding mask"
               if other_mask is not None else
               f"head_dim = {head_dim} is outside the kernel's {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
               if head_dim_outside else "attn_drop = 1 drops every probability")
        return _pytorch_attention(q, k, v, is_causal, key_padding_mask, other_mask, scale, dropout_p, why)
    return attention(q, k, v, causal=is_causal, key_padding_mask=key_padding_mask, scale=scale, dropout_p=dropout_p)


torch.fx.wrap("_attend")


class ManyHeadAttention(nn.Module):
    """Multi-head self-attention with a fused kernel for many small heads.

    Args mirror timm's ``Attention``: dim, num_heads, attn_head_dim (default
    dim // num_heads), dim_out, qkv_bias, qk_norm, scale_norm, proj_bias, gated,
    attn_drop, proj_drop, norm_layer (required for qk_norm / scale_norm), device, dtype.

    Attention dropout (``attn_drop``, in training mode) is fused into lucidops' kernel: the
    mask is regenerated from a seed in the backward, never stored (lucidops.ops.attention's
    ``dropout_p``). The same distribution as timm's SDPA dropout, other samples. A mask that is
    not a key padding mask runs PyTorch's SDPA instead, with a warning (see ``forward``).
    """

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer: Optional[Type[nn.Module]] = None,
                 device: Optional[DeviceLike] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        _validate.integer(dim, "dim", minimum=1)
        _validate.integer(num_heads, "num_heads", minimum=1)
        if attn_head_dim is not None:
            _validate.integer(attn_head_dim, "attn_head_dim", minimum=1)
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}) when attn_head_dim is None")
            head_dim = dim // num_heads
        # A head dim outside the kernel's range runs, with a warning, on PyTorch's SDPA (forward
        # hands it the call, as for an additive mask or attn_drop = 1): the kernel refuses it.
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        # (norm_layer is not None whenever qk_norm or scale_norm: checked above)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm and norm_layer is not None else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm and norm_layer is not None else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm and norm_layer is not None else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out or dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module: nn.Module) -> "ManyHeadAttention":
        """A ManyHeadAttention sharing ``module``'s submodules (the same parameter objects,
        so optimizers and tied references keep working). ``module`` is timm's ViT
        ``Attention`` (exactly: a subclass has its own forward) or a ManyHeadAttention."""
        from ..patch.timm_vit import is_vit_attention

        # Any module with num_heads and head_dim was taken: EVA's attention lost its q/v biases
        # (outputs 5.9 off, silently), a rope one its rope argument.
        if not is_vit_attention(module):
            raise TypeError(f"module must be timm's ViT Attention (or a ManyHeadAttention), got "
                            f"{type(module).__module__}.{type(module).__qualname__}: for other attention modules "
                            "use lucidops.patch.sdpa_calls, which keeps their forward")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        # timm's Attention: attributes a plain nn.Module is not typed with
        new.num_heads, new.head_dim = int(getattr(module, "num_heads")), int(getattr(module, "head_dim"))
        new.attn_dim = getattr(module, "attn_dim", new.num_heads * new.head_dim)
        new.scale = float(getattr(module, "scale", new.head_dim ** -0.5))
        # In the timm module's registration order: parameters and state-dict keys keep their
        # order, which optimizer states and DDP buckets index by (timm registers gate before proj).
        wanted = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")
        children = module._modules
        for name in [n for n in children if n in wanted] + [n for n in wanted if n not in children]:
            sub = children.get(name)
            setattr(new, name, sub if sub is not None else None if name == "gate" else nn.Identity())
        # nn.Module.__init__ made it training (an eval model would get dropout); its own flag
        # only: the submodules are the timm module's, in the modes their owner gave them.
        new.training = module.training
        return new

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}"

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """x (B, N, C) -> (B, N, dim_out). ``attn_mask`` as timm's: lucidops' kernel runs a bool key
        padding mask, True for tokens that take part, (B, 1, 1, N) (what timm passes) or (B, N)
        when B != N; any other mask (additive, per query, or 2-D when B == N, which timm reads as
        (N_query, N_key)) runs PyTorch's SDPA as timm's module does, with a warning."""
        dim = self.qkv.in_features
        # Under torch.fx symbolic tracing (timm's create_feature_extractor) x is a Proxy: its
        # shape cannot be checked here, and _attend, a leaf of the traced graph, checks the rest.
        if not isinstance(x, torch.fx.Proxy) and (x.dim() != 3 or x.shape[-1] != dim):
            raise ValueError(f"ManyHeadAttention: x must be (B, N, dim={dim}), got shape {tuple(x.shape)}")
        b, n = x.shape[0], x.shape[1]
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # strided views: the kernel reads them in place
        q, k = self.q_norm(q), self.k_norm(k)
        dropout_p = float(self.attn_drop.p) if self.training else 0.0
        x = _attend(q, k, v, attn_mask, is_causal, self.scale, dropout_p)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
