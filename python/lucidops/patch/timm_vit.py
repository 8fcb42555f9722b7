"""Swap lucidops attention into timm ViTs / DeiTs, and the "more heads, fewer layers"
configuration transform (methods.md section 2). timm is imported inside the functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, cast

import torch
from torch import nn

from .. import _validate
from ..nn.attention import ManyHeadAttention
from ..ops.attention import MAX_HEAD_DIM, MIN_HEAD_DIM
from .handle import PatchHandle, child_slots

__all__ = ["timm_vit", "attention_modules", "leaner", "LeanerReport", "PatchHandle"]


def _timm_attention_classes() -> Tuple[type, ...]:
    import timm.models.vision_transformer as vit

    classes = {vit.Attention}
    try:
        from timm.layers.attention import Attention

        classes.add(Attention)
    except ImportError:  # older timm defines it in vision_transformer only
        pass
    return tuple(classes)


def is_timm_vit_attention(module: nn.Module) -> bool:
    """Whether ``module``'s type is exactly timm's ViT ``Attention`` (subclasses have other
    forwards); False when timm is not installed (then no module can be one)."""
    try:
        return type(module) in _timm_attention_classes()
    except ImportError:
        return False


def is_vit_attention(module: nn.Module) -> bool:
    """timm's ViT ``Attention`` (exactly) or lucidops' ``ManyHeadAttention``: the attention
    whose every parameter lucidops knows. ``ManyHeadAttention.from_timm``, the attention
    condition numbers and the initialisers take only these: look-alikes such as EVA-02's
    ``EvaAttention`` add separate biases or rotary embeddings they would miss."""
    return isinstance(module, ManyHeadAttention) or is_timm_vit_attention(module)


def attention_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The (qualified name, module) pairs :func:`timm_vit` would replace: the submodules for
    which :func:`is_timm_vit_attention` holds and whose head dim the kernel takes (4..128)."""
    return child_slots(model, lambda name, m: is_timm_vit_attention(m) and _kernel_takes(m))


def _kernel_takes(module: nn.Module) -> bool:
    return MIN_HEAD_DIM <= int(getattr(module, "head_dim")) <= MAX_HEAD_DIM


def timm_vit(model: nn.Module) -> PatchHandle:
    """Replace every timm ViT ``Attention`` in ``model`` by a :class:`ManyHeadAttention`
    sharing its parameters (outputs equal within dtype tolerance). Returns a
    :class:`~lucidops.patch.PatchHandle` whose ``revert()`` puts the original module
    objects back. Subclasses of timm's Attention (other forward methods) and modules whose
    head dim is outside 4..128 are left alone. Raises ``ValueError`` when the model has none."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    sites = attention_modules(model)
    if not sites:
        timm_modules = child_slots(model, lambda n, m: is_timm_vit_attention(m))
        others = sorted({int(getattr(m, "head_dim")) for _, m in timm_modules})
        if others:
            raise ValueError(f"model's timm ViT Attention modules have head dim {others}, outside lucidops' "
                             f"{MIN_HEAD_DIM}..{MAX_HEAD_DIM}")
        if any(isinstance(m, ManyHeadAttention) for m in model.modules()):
            raise ValueError("model has no timm ViT Attention module to patch: its attention is already "
                             "lucidops' ManyHeadAttention (patched before? revert() that handle first)")
        raise ValueError("model has no timm ViT Attention module to patch")
    # Build every replacement before swapping any, so a failure leaves the model as it was.
    built = [(name, ManyHeadAttention.from_timm(module)) for name, module in sites]
    handle = PatchHandle(model)
    for name, new in built:
        handle.swap_child(model, name, new)
    return handle


def _vit_config(model: nn.Module, model_name: str) -> Dict[str, Any]:
    vit = cast(Any, model)  # a timm VisionTransformer, read through its submodule attributes
    blocks = getattr(vit, "blocks", None)
    block = blocks[0] if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) else None
    attn, mlp = getattr(block, "attn", None), getattr(block, "mlp", None)
    if (not isinstance(getattr(vit, "embed_dim", None), int) or not hasattr(attn, "num_heads")
            or not hasattr(attn, "head_dim") or not isinstance(getattr(mlp, "fc2", None), nn.Linear)):
        raise ValueError(f"model_name {model_name!r} is not a timm vision transformer (blocks of attn with num_heads "
                         f"and head_dim and an mlp with fc2): leaner() rebuilds ViT/DeiT/EVA configurations")
    dim = int(vit.embed_dim)
    hidden = cast(nn.Linear, cast(Any, mlp).fc2).in_features  # fc1 of a gated MLP (EVA-02's SwiGLU): 2x
    return {"embed_dim": dim, "depth": len(vit.blocks), "num_heads": int(cast(Any, attn).num_heads),
            "head_dim": int(cast(Any, attn).head_dim), "mlp_ratio": hidden / dim}


def _mlp_ratio(model_name: str, base: nn.Module, size_kwargs: Dict[str, Any], dim: int) -> float:
    """The ``mlp_ratio`` that rebuilds ``base``'s MLPs. What the MLP's shapes mean depends on the
    model class: a packed gated MLP (timm's SwiGLUPacked, GluMlp) built by VisionTransformer
    from dim * mlp_ratio has fc2 half as wide as that, while EVA passes it twice the width
    (fc2 at dim * mlp_ratio), so each reading is tried by rebuilding the model on the meta
    device (no memory) until one gives the same shapes. fc2's alone halved the MLP of
    vit_giant_patch14_dinov2 and every leaner variant of it."""
    import timm

    mlp = cast(Any, base).blocks[0].mlp
    want = [tuple(t.shape) for t in mlp.parameters()]
    readings = [mlp.fc2.in_features / dim]
    if isinstance(getattr(mlp, "fc1", None), nn.Linear):
        readings.append(mlp.fc1.out_features / dim)
    for ratio in readings:
        with torch.device("meta"):
            rebuilt = timm.create_model(model_name, pretrained=False, mlp_ratio=ratio, **size_kwargs)
        if [tuple(t.shape) for t in cast(Any, rebuilt).blocks[0].mlp.parameters()] == want:
            return ratio
    raise ValueError(f"model_name {model_name!r}: no mlp_ratio rebuilds its MLP ({type(mlp).__name__}, parameter "
                     f"shapes {want}); leaner() rebuilds ViT/DeiT/EVA configurations")


def _cost(model: nn.Module, img_size: int) -> Tuple[int, int]:
    from ..profile import count_flops

    params = sum(p.numel() for p in model.parameters())
    model.eval()
    flops = count_flops(model, torch.randn(1, 3, img_size, img_size))["total"]
    return params, flops


@dataclass
class LeanerReport:
    """Original and "more heads, fewer layers" configurations with their costs
    (parameters, forward FLOPs of one image by torch's FlopCounterMode: 2 per multiply-add)."""

    model_name: str
    original: Dict[str, Any]
    leaner: Dict[str, Any]
    params: Tuple[int, int]
    flops: Tuple[int, int]
    img_size: int

    def build(self, **kwargs) -> nn.Module:
        """The leaner timm model (random init; never downloads weights)."""
        import timm

        cfg = {k: v for k, v in self.leaner.items() if k != "head_dim"}
        return timm.create_model(self.model_name, pretrained=False, **{"img_size": self.img_size, **cfg, **kwargs})

    def table(self) -> str:
        """A Markdown table of the original and leaner configurations side by side: width,
        depth, heads, head dim, MLP ratio, parameters and GFLOPs."""
        o, n = self.original, self.leaner
        rows = [("embed_dim", o["embed_dim"], n["embed_dim"]), ("depth", o["depth"], n["depth"]),
                ("num_heads", o["num_heads"], n["num_heads"]), ("head_dim", o["head_dim"], n["head_dim"]),
                ("mlp_ratio", f"{o['mlp_ratio']:g}", f"{n['mlp_ratio']:g}"),
                ("params (M)", f"{self.params[0] / 1e6:.2f}", f"{self.params[1] / 1e6:.2f}"),
                (f"GFLOPs ({self.img_size}px)", f"{self.flops[0] / 1e9:.3f}", f"{self.flops[1] / 1e9:.3f}")]
        lines = [f"| {self.model_name} | original | leaner |", "|---|---:|---:|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        return "\n".join(lines)


def leaner(model_name: str, heads_factor: int = 2, depth_divisor: float = 2, mlp_ratio: Optional[float] = None,
           keep: str = "width", img_size: Optional[int] = None) -> LeanerReport:
    """The "more heads, fewer layers" variant of a timm ViT configuration (arXiv:2505.20802).

    Args:
        model_name: a timm ViT/DeiT name (built with pretrained=False, never downloaded).
        heads_factor: heads are multiplied by this integer.
        depth_divisor: depth becomes round(depth / depth_divisor) (at least 1).
        mlp_ratio: a new MLP ratio, or None to keep it.
        keep: "width" keeps embed_dim (head_dim shrinks by heads_factor: the design space
            lucidops' small-head kernel serves); "head_dim" keeps the head dim and grows
            embed_dim by heads_factor, so the whole model widens (vit_small, heads x2, depth
            /2: 22M -> 44M parameters). The paper's reported variants keep head_dim 64 with
            30-50% fewer parameters, so they widen the attention alone, which timm's ViT
            config cannot express.
        img_size: image side for the FLOP count (default: the model's).
    """
    import timm

    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a timm model name (str), got {type(model_name).__name__}")
    _validate.integer(heads_factor, "heads_factor", minimum=1)
    depth_divisor = _validate.real_number(depth_divisor, "depth_divisor", "> 0")
    if keep not in ("width", "head_dim"):
        raise ValueError(f"keep must be 'width' or 'head_dim', got {keep!r}")
    if mlp_ratio is not None:
        mlp_ratio = _validate.real_number(mlp_ratio, "mlp_ratio", "> 0")
    if img_size is not None:
        _validate.integer(img_size, "img_size", minimum=1)
    size_kwargs: Dict[str, Any] = {"img_size": img_size} if img_size else {}
    try:
        base = timm.create_model(model_name, pretrained=False, **size_kwargs)
    except TypeError as err:  # a ConvNeXt or PVT takes no img_size: timm's own message named no lucidops rule
        raise ValueError(f"model_name {model_name!r} is not a timm vision transformer ({err})") from None
    original = _vit_config(base, model_name)
    original["mlp_ratio"] = _mlp_ratio(model_name, base, size_kwargs, original["embed_dim"])
    heads = original["num_heads"] * heads_factor
    if keep == "width":
        dim = original["embed_dim"]
        if dim % heads:
            raise ValueError(f"embed_dim {dim} is not divisible by {heads} heads (heads_factor={heads_factor})")
        head_dim = dim // heads
    else:
        head_dim = original["head_dim"]
        dim = heads * head_dim
    if not 4 <= head_dim <= 128:
        raise ValueError(f"the leaner head_dim {head_dim} is outside lucidops' 4..128")
    new = {"embed_dim": dim, "depth": max(1, int(round(original["depth"] / depth_divisor))), "num_heads": heads,
           "head_dim": head_dim, "mlp_ratio": original["mlp_ratio"] if mlp_ratio is None else float(mlp_ratio)}
    size = int(img_size or cast(Any, base).patch_embed.img_size[0])  # a timm ViT's PatchEmbed
    report = LeanerReport(model_name, original, new, (0, 0), (0, 0), size)
    lean_model = report.build()
    p0, f0 = _cost(base, size)
    p1, f1 = _cost(lean_model, size)
    report.params, report.flops = (p0, p1), (f0, f1)
    return report
