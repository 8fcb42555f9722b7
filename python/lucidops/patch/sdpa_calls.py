"""Route the ``scaled_dot_product_attention`` calls that chosen modules make to lucidops.

    handle = lucidops.patch.sdpa_calls(eva02)     # every module whose forward calls SDPA
    out = eva02(images)                           # their SDPA calls run lucidops.ops.attention
    handle.calls                                  # Counter: how many went where, and why
    handle.revert()                               # the original forwards

:func:`lucidops.patch.timm_vit` replaces timm's plain ViT ``Attention`` module by module.
Many attention modules differ from it only before the attention call: rotary embeddings
(timm's ``EvaAttention`` in EVA-02 and the rope ViTs, ``AttentionRope``), spatial reduction
of the keys (PVT v2), a single class-token query (CaiT's ``ClassAttn``). Their own forward
is kept here, and only its call to ``torch.nn.functional.scaled_dot_product_attention`` is
answered by lucidops: each patched module's forward runs inside a ``TorchFunctionMode``
(PyTorch's hook for intercepting torch functions, which torch.compile traces).

A call is routed when lucidops' op computes exactly what SDPA would: q, k, v of shape
(..., N, d) with the same leading sizes and head dim (4 to 128; leading sizes other than
(B, H) are folded into the batch), dropout_p in [0, 1), and no mask or, for 4-D inputs, a
boolean key-padding mask of shape (B or 1, 1, 1, Nk). Any other call (an additive float mask
such as a relative position bias, grouped-query heads) goes to PyTorch's SDPA as before, is
counted in ``handle.calls`` under its reason and warned about once per reason (not while
torch.compile traces): nothing is computed differently, and nothing is reported as lucidops'
that was not. Two differences remain: a query whose keys are all masked gets zeros
(lucidops' rule) where SDPA returns NaN; and attention dropout (a training step's
``dropout_p`` > 0) runs lucidops' fused dropout, which draws its mask with its own hash
(lucidops.reference.attention_dropout): the same distribution as SDPA's, other samples.

Cost: every torch call inside a patched forward passes through the mode, about 0.2 ms per
forward on a 2-core CPU; with few wide heads at batch 1 that can outweigh the kernel's gain
(README, "Other attention modules").
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from types import CodeType
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple, Type, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .. import _validate
from ..ops.attention import _DTYPES, MAX_HEAD_DIM, MIN_HEAD_DIM, attention
from .handle import PatchHandle, describe
from .instance_method import InstanceMethod, current_forward

__all__ = ["sdpa_calls", "SDPACallsHandle", "sdpa_modules"]

ROUTED = "lucidops"
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS: Dict[str, Any] = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                                  "enable_gqa": False}
_calls_sdpa_cache: Dict[Type[nn.Module], bool] = {}

ModuleSelector = Union[None, type, Tuple[type, ...], Iterable[str], Callable[[str, nn.Module], bool]]


def _names_used(code: CodeType) -> Set[str]:
    """The global and attribute names ``code`` and the functions nested in it look up."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= _names_used(const)
    return names


def _forward_calls_sdpa(cls: Type[nn.Module]) -> bool:
    """Whether ``cls.forward`` itself looks up scaled_dot_product_attention (``F.``, ``torch.nn.
    functional.`` or a bare name), read from its bytecode: no source file needed."""
    if cls not in _calls_sdpa_cache:
        code = getattr(cls.forward, "__code__", None)
        _calls_sdpa_cache[cls] = code is not None and "scaled_dot_product_attention" in _names_used(code)
    return _calls_sdpa_cache[cls]


def _calls_sdpa_itself(name: str, module: nn.Module) -> bool:
    """The default selection: the class's forward calls SDPA, and the module takes that path
    (timm's modules with ``fused_attn`` off, Swin's default, take their eager one), and it is not
    routed already (so patch.apply run twice finds nothing new, as for timm_vit)."""
    return (_forward_calls_sdpa(type(module)) and getattr(module, "fused_attn", True) is not False
            and "_lucidops_sdpa" not in module.__dict__)


def sdpa_modules(model: nn.Module, modules: ModuleSelector = None) -> List[Tuple[str, nn.Module]]:
    """The (qualified name, module) pairs :func:`sdpa_calls` would patch.

    ``modules``: None (every module whose class's forward calls scaled_dot_product_attention
    itself: timm's attention classes, except those whose ``fused_attn`` is off), a class or
    tuple of classes, an iterable of qualified names, or a predicate ``(name, module) ->
    bool``. A module inside one already chosen is left out (its calls are routed by the outer
    one)."""
    chosen: Callable[[str, nn.Module], bool]
    if modules is None:
        chosen = _calls_sdpa_itself
    elif isinstance(modules, type) or (isinstance(modules, tuple) and all(isinstance(c, type) for c in modules)):
        classes = modules
        chosen = lambda name, m: isinstance(m, classes)  # noqa: E731
    elif callable(modules):
        chosen = modules
    elif isinstance(modules, str):
        raise TypeError("modules must be an iterable of qualified names, not a single string (wrap it in a list)")
    else:
        names = list(modules)
        if not all(isinstance(n, str) for n in names):
            raise TypeError("modules must be None, a class, a tuple of classes, qualified names or a predicate")
        known = dict(model.named_modules())
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"modules: {missing} are not submodules of the model")
        wanted = set(names)
        chosen = lambda name, m: name in wanted  # noqa: E731
    found: List[Tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") or outer == "" for outer, _ in found):
            continue
        if chosen(name, module):
            found.append((name, module))
    return found


class SDPACallsHandle(PatchHandle):
    """The :class:`~lucidops.patch.PatchHandle` of :func:`sdpa_calls`. ``calls`` counts the
    patched modules' SDPA calls since patching: ``calls["lucidops"]`` those lucidops ran, the
    other keys the reasons the rest went to PyTorch's SDPA; ``calls_by_module`` the same per
    module path."""

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.calls_by_module: Dict[str, Counter] = {}
        self.warned: Set[str] = set()  # the reasons already warned about, once each

    @property
    def calls(self) -> Counter:
        total: Counter = Counter()
        for counts in self.calls_by_module.values():
            total.update(counts)
        return total


def _why_not_routed(q: Any, k: Any, v: Any, args: Dict[str, Any]) -> Optional[str]:
    """None when lucidops.ops.attention computes this SDPA call, else the reason it cannot."""
    if not all(isinstance(t, Tensor) for t in (q, k, v)):
        return "q, k or v is not a tensor"
    if q.dim() < 3 or k.dim() != q.dim() or v.dim() != q.dim():
        return f"q, k, v are not all (..., N, d) of 3 or more dims: {q.dim()}-D, {k.dim()}-D, {v.dim()}-D"
    if args["enable_gqa"] or k.shape[:-2] != q.shape[:-2] or v.shape[:-2] != q.shape[:-2]:
        return "k, v have other leading (batch, head) sizes than q (grouped-query or broadcast heads)"
    if k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1] or v.shape[-2] != k.shape[-2]:
        return "q, k, v head dims (or k, v lengths) differ"
    if not MIN_HEAD_DIM <= q.shape[-1] <= MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} outside {MIN_HEAD_DIM}..{MAX_HEAD_DIM}"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    dropout = args["dropout_p"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        return f"dropout_p {dropout!r} is not a number in [0, 1)"
    if not isinstance(args["is_causal"], bool):
        return "is_causal is not a bool"
    scale = args["scale"]
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        return f"scale {scale!r} is not a finite number"
    mask = args["attn_mask"]
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            return "attn_mask is not boolean (an additive mask, e.g. a position bias)"
        b, nk = q.shape[0], k.shape[-2]
        if q.dim() != 4 or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[0] not in (1, b) \
                or mask.shape[3] != nk:
            return f"attn_mask of shape {tuple(mask.shape)} is not a key-padding mask (B, 1, 1, Nk)"
        if args["is_causal"]:
            return "attn_mask together with is_causal"
    return None


class _RouteSDPA(TorchFunctionMode):
    """Answers scaled_dot_product_attention with lucidops.ops.attention where it is exact."""

    def __init__(self, path: str, counts: Counter, warned: Set[str]):
        super().__init__()
        self.path, self.counts, self.warned = path, counts, warned

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        bound = dict(_SDPA_DEFAULTS, **dict(zip(_SDPA_ARGS, args)), **kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        reason = _why_not_routed(q, k, v, bound)
        if reason is not None:
            self.counts[reason] += 1
            if reason not in self.warned and not _validate.is_compiling():  # Dynamo cannot trace warn
                self.warned.add(reason)
                warnings.warn(f"lucidops.patch.sdpa_calls: SDPA calls left to PyTorch (first in {self.path!r}): "
                              f"{reason}; the sdpa_calls handle's .calls counts them (handle.parts['sdpa_calls'] "
                              "of patch.apply's)", RuntimeWarning, stacklevel=2)
            return func(*args, **kwargs)
        self.counts[ROUTED] += 1
        mask = bound["attn_mask"]
        # Sizes spelled out rather than -1: with a zero-size dim (no queries or no keys) the -1
        # cannot be inferred and reshape raised where SDPA returns an empty or zero result.
        padding = None if mask is None else mask.reshape(mask.shape[0], mask.shape[-1]).expand(q.shape[0], -1)
        lead = q.shape[:-2]
        if q.dim() != 4:  # SDPA's (..., N, d): leading dims as the batch, one head (or (B, 1) for 3-D)
            q, k, v = (t.reshape(math.prod(lead), 1, *t.shape[-2:]) for t in (q, k, v))
        out = attention(q, k, v, causal=bound["is_causal"], key_padding_mask=padding, scale=bound["scale"],
                        dropout_p=bound["dropout_p"])
        return out.reshape(*lead, *out.shape[-2:])


def _forward_routing_sdpa(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The patched module's forward: its own, inside the routing mode. Bound as an
    InstanceMethod and reading both from the instance, so a deepcopy of the patched model
    (timm's EMA, say) runs the copy's own forward and parameters, not the original's, and
    ``torch.save(model)`` works."""
    mode, forward = cast(Tuple[_RouteSDPA, Callable], self.__dict__["_lucidops_sdpa"])
    with mode:
        return forward(*args, **kwargs)


def sdpa_calls(model: nn.Module, modules: ModuleSelector = None) -> SDPACallsHandle:
    """Make the SDPA calls of ``model``'s attention modules run lucidops' attention kernel.

    Args:
        model: any ``nn.Module`` (a timm EVA-02, rope ViT, PVT v2, CaiT, ...).
        modules: which modules' forwards to patch (see :func:`sdpa_modules`); by default
            every module whose class's forward calls ``scaled_dot_product_attention``. Pass
            classes, names or a predicate for modules that call it through a helper (e.g.
            transformers' attention classes).
    Returns:
        An :class:`SDPACallsHandle`: ``revert()`` restores the forwards; ``calls`` counts
        the calls lucidops ran and, by reason, those it left to PyTorch.
    Raises:
        ValueError when no module is found (nothing would change).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    found = sdpa_modules(model, modules)
    if not found:
        if any("_lucidops_sdpa" in m.__dict__ for m in model.modules()):
            raise ValueError("no module to patch: the model's SDPA-calling modules are routed already (patched "
                             "by sdpa_calls before? revert() that handle first)")
        raise ValueError("no module to patch: none calls scaled_dot_product_attention in its own forward "
                         "(pass modules= for those that call it through a helper)")
    handle = SDPACallsHandle(model)
    for path, module in found:
        if "_lucidops_sdpa" in module.__dict__:
            raise RuntimeError(f"{path!r} is already patched by lucidops.patch.sdpa_calls; revert() it first")
    for path, module in found:
        counts = handle.calls_by_module.setdefault(path, Counter())
        mode = _RouteSDPA(path or type(module).__name__, counts, handle.warned)
        handle.set_instance_attrs(path, module, {"_lucidops_sdpa": (mode, current_forward(module)),
                                                "forward": InstanceMethod(_forward_routing_sdpa, module)},
                                  after=f"{describe(module)} (SDPA calls -> lucidops attention)")
    return handle
