"""ConditionedEmbedding: condition the embedded token matrix (methods.md section 8)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import _validate
from ..conditioning.tokens import condition_tokens


class ConditionedEmbedding(nn.Module):
    """Apply :func:`lucidops.conditioning.condition_tokens` to (B, N, d) token matrices.

    ``ConditionedEmbedding()`` conditions its input; ``ConditionedEmbedding(embed)``
    runs ``embed`` first, so it can replace a timm ViT's ``patch_embed`` in place::

        model.patch_embed = ConditionedEmbedding(model.patch_embed)

    Attributes the wrapped embedding has (``num_patches``, ``grid_size``, ...) stay
    readable through the wrapper. No parameters of its own, and the wrapped embedding's
    state-dict keys stay its own (``patch_embed.proj.weight``, not
    ``patch_embed.embed.proj.weight``): a checkpoint of the plain model loads into the
    wrapped one and back (keys with ``embed.`` are read too).
    """

    def __init__(self, embed: Optional[nn.Module] = None, strength: float = 1.0):
        super().__init__()
        if embed is not None and not isinstance(embed, nn.Module):
            raise TypeError(f"embed must be an nn.Module or None, got {type(embed).__name__}")
        self.strength = _validate.real_number(strength, "strength", "> 0")
        self.embed = embed
        self.register_state_dict_post_hook(_drop_embed_prefix)
        self.register_load_state_dict_pre_hook(_add_embed_prefix)
        self.register_load_state_dict_post_hook(_report_unwrapped_keys)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.embed is not None:
            x = self.embed(x, *args, **kwargs)
        if x.dim() < 2:
            raise ValueError(f"ConditionedEmbedding expects token matrices (..., N, d), got shape {tuple(x.shape)}")
        layout = self._grid_layout(x)
        if layout == "NHWC":  # timm's dynamic_img_size embeddings: an image's tokens are its H x W grid
            b, h, w, c = x.shape
            return condition_tokens(x.reshape(b, h * w, c), self.strength).reshape(b, h, w, c)
        if layout is not None:
            raise ValueError(f"ConditionedEmbedding conditions token matrices; the wrapped embedding returns "
                             f"{layout} feature maps (set its output_fmt to 'NHWC' or 'NLC', or flatten it)")
        return condition_tokens(x, self.strength)

    def _grid_layout(self, x: Tensor) -> Optional[str]:
        """The layout of a 4-D patch grid that the wrapped (timm) embedding returns unflattened,
        else None: the last two dims are then an image's (N, d) token matrix."""
        if self.embed is None or x.dim() != 4 or getattr(self.embed, "flatten", True):
            return None
        fmt = getattr(self.embed, "output_fmt", None)
        return str(getattr(fmt, "value", fmt)) if fmt is not None else None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Through __dict__: self._modules may not exist yet (unpickling, deepcopy).
            embed = self.__dict__.get("_modules", {}).get("embed")
            if embed is None:
                raise
            return getattr(embed, name)

    def extra_repr(self) -> str:
        return f"strength={self.strength:g}"


def _drop_embed_prefix(module: ConditionedEmbedding, state_dict, prefix: str, local_metadata) -> None:
    """Save the wrapped embedding's entries under the keys it has unwrapped (in order)."""
    inner = prefix + "embed."
    keys = [k for k in state_dict if k.startswith(inner)]
    for key in keys:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _add_embed_prefix(module: ConditionedEmbedding, state_dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """Read the unwrapped keys into the wrapped embedding (and keys already under ``embed.``).

    Which keys are the embedding's is decided from its own key names, not from an ``embed.``
    prefix: a wrapped module may have a child called ``embed`` itself."""
    if module.embed is None:
        return
    inner = prefix + "embed."
    own = set(module.embed.state_dict().keys())
    module.__dict__["_loading_keys"] = (prefix, own)  # for _report_unwrapped_keys, which torch calls without them
    for key in [k for k in state_dict if k.startswith(prefix)]:
        relative = key[len(prefix):]
        if relative in own:
            state_dict[inner + relative] = state_dict.pop(key)


def _report_unwrapped_keys(module: ConditionedEmbedding, incompatible_keys) -> None:
    """Missing keys under the names ``state_dict()`` gives them (without ``embed.``): torch
    reports them under the wrapped names, which no checkpoint of this module has."""
    loading = module.__dict__.pop("_loading_keys", None)
    if loading is None:  # no embedding to read into: nothing was renamed
        return
    prefix, own = loading
    inner = prefix + "embed."
    missing = incompatible_keys.missing_keys
    for i, key in enumerate(missing):
        if key.startswith(inner) and key[len(inner):] in own:
            missing[i] = prefix + key[len(inner):]
