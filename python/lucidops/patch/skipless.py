"""Remove the residual connections of a timm ViT's blocks (methods.md section 6).

A patched block computes ``x = ls1(attn(norm1(x))); x = ls2(mlp(norm2(x)))``: LayerNorms
and layer scales kept, skips (and stochastic depth, which without a skip would zero the
whole sample) removed. Pair it with :func:`lucidops.init.skipless_`. Reversible with the
returned handle's ``revert()`` or with :func:`undo_skipless`. timm is imported only when called.
"""

from __future__ import annotations

from typing import List, Tuple

from torch import Tensor, nn

from .handle import PatchHandle, describe
from .instance_method import InstanceMethod

_MARK = "_lucidops_skipless"


def _skipless_forward(self, x: Tensor, attn_mask=None, **kwargs) -> Tensor:
    normed = self.norm1(x)
    if attn_mask is None and not kwargs:
        x = self.ls1(self.attn(normed))
    else:
        x = self.ls1(self.attn(normed, attn_mask=attn_mask, **kwargs))
    return self.ls2(self.mlp(self.norm2(x)))


def _pre_norm_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    try:
        from timm.models.vision_transformer import Block
    except ImportError as exc:  # pragma: no cover - timm is an optional dependency
        raise ImportError("lucidops.patch.skipless needs timm (pip install timm)") from exc
    # Only blocks that run timm's pre-norm residual forward: a subclass with its own
    # forward (post-norm, parallel, ...) would get different semantics.
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Block) and type(m).forward is Block.forward]


def skipless(model: nn.Module) -> PatchHandle:
    """Make every pre-norm timm ``Block`` in ``model`` skipless, in place (an instance
    ``forward`` per block; modules and parameters unchanged).

    Returns a :class:`~lucidops.patch.PatchHandle` (``handle.model`` is ``model``) whose
    ``revert()`` restores the residual forwards; :func:`undo_skipless` (model-wide) still
    works too. Raises ``ValueError`` if the model has no such block (or all are already
    patched).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    blocks = [(n, b) for n, b in _pre_norm_blocks(model) if not getattr(b, _MARK, False)]
    if not blocks:
        raise ValueError("model has no un-patched timm vision_transformer.Block to make skipless")
    handle = PatchHandle(model)
    for name, block in blocks:
        handle.set_instance_attrs(name, block, {"forward": InstanceMethod(_skipless_forward, block), _MARK: True},
                                  after=f"{describe(block)} (forward -> no residuals)")
    small = _small_layer_scales(blocks)
    if small:
        handle.warn("skipless", f"{len(small)} block(s) keep LayerScale gammas all below "
                    f"{max(g for _, g in small):.3g} (timm's init_values): without the residual each block "
                    "multiplies the signal by them, and a few blocks leave nothing of the input; set the gammas "
                    "to 1 or build the model without init_values")
    return handle


def _small_layer_scales(blocks: List[Tuple[str, nn.Module]], below: float = 0.1) -> List[Tuple[str, float]]:
    """(block name, largest |gamma|) of blocks with a LayerScale (ls1/ls2) whose every gamma
    is below ``below`` in magnitude: the whole branch scaled down (timm's init_values, 1e-5 to
    0.1), not a trained scale with some small channels."""
    out = []
    for name, block in blocks:
        gammas = [getattr(getattr(block, ls, None), "gamma", None) for ls in ("ls1", "ls2")]
        largest = [float(g.detach().abs().max()) for g in gammas
                   if isinstance(g, Tensor) and g.numel() and g.device.type != "meta"]
        small = [g for g in largest if g < below]
        if small:
            out.append((name, min(small)))
    return out


def undo_skipless(model: nn.Module) -> nn.Module:
    """Restore the residual forward of every block patched by :func:`skipless`; returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patched = [m for m in model.modules() if getattr(m, _MARK, False)]
    if not patched:
        raise ValueError("model has no block patched by lucidops.patch.skipless")
    for block in patched:
        del block.forward
        delattr(block, _MARK)
    return model
