"""Turn the LoRA layers of a peft model into sine or bounded ones (methods.md sections 3, 5).

    handle = lucidops.patch.peft_lora(peft_model, "bounded", omega=1.0, fn="sin", only_mlp=True)
    ...                     # train / unlearn: the fused op runs in every patched layer
    peft_model.save_pretrained(path)   # peft's own adapter files and state-dict keys, unchanged
    handle.revert()         # the original peft forward again (bit for bit)

Only the *forward* of each ``peft.tuners.lora.Linear`` is swapped (an instance attribute
bound to the layer), so the layer, its ``lora_A`` / ``lora_B`` parameters and every
state-dict key stay peft's: saving and loading the adapter through peft round-trips, and
the patch is re-applied after loading with the same arguments (``handle.settings``).

peft and transformers are imported inside the functions, never at module level.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Protocol, Sequence, Tuple, Type, Union, cast

import torch
from torch import Tensor, nn

from .. import _validate
from ..ops import lora as _ops
from .handle import PatchHandle, describe, name_list
from .instance_method import InstanceMethod, current_forward

VARIANTS = ("sine", "bounded")

# Module-name patterns (re.search on the qualified name) of feed-forward layers:
# GPT-2 (mlp.c_fc, mlp.c_proj), LLaMA/Mistral (mlp.gate_proj/up_proj/down_proj), OPT
# (fc1, fc2), GPT-NeoX (mlp.dense_h_to_4h), Falcon/T5-style feed_forward/ffn blocks, and
# BERT/ViT (intermediate.dense, layer.N.output.dense -- but not attention.output.dense).
DEFAULT_MLP_PATTERNS: Tuple[str, ...] = (
    r"(^|\.)(mlp|feed_forward|ffn|DenseReluDense)\.",
    r"(^|\.)(fc1|fc2|c_fc|gate_proj|up_proj|down_proj|dense_h_to_4h|dense_4h_to_h)$",
    r"(^|\.)intermediate\.dense$",
    r"(^|\.)\d+\.output\.dense$",
)


def check_mlp_patterns(patterns: Optional[Sequence[str]]) -> None:
    """None, or a sequence of valid regex strings: a bare string was read as one pattern per
    character ("fc2": "c" matched every "blocks" name)."""
    if patterns is None:
        return
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise TypeError("mlp_patterns must be a sequence of regex strings")
    for p in patterns:
        try:
            re.compile(p)
        except re.error as err:
            raise ValueError(f"mlp_patterns: invalid regex {p!r}: {err}") from None


def is_mlp_name(name: str, patterns: Optional[Sequence[str]] = None) -> bool:
    """Whether the qualified module name ``name`` is a feed-forward (MLP) layer."""
    pats = DEFAULT_MLP_PATTERNS if patterns is None else patterns
    return any(re.search(p, name) for p in pats)


class _LoraLinear(Protocol):
    """What is used here of a ``peft.tuners.lora.Linear`` (peft is imported lazily)."""

    lora_A: nn.ModuleDict
    lora_B: nn.ModuleDict
    lora_dropout: nn.ModuleDict
    fan_in_fan_out: bool
    merged: bool
    active_adapters: List[str]

    def get_base_layer(self) -> nn.Module: ...


class _LinearBase(Protocol):
    """An ``nn.Linear`` or transformers ``Conv1D`` base layer."""

    weight: Tensor
    bias: Optional[Tensor]


def _peft_linear_class() -> Type[nn.Module]:
    try:
        from peft.tuners.lora import Linear
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("lucidops.patch.peft_lora needs peft (pip install peft)") from err
    return Linear


def _conv1d_class() -> Optional[type]:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers absent: only nn.Linear bases then
        return None
    return Conv1D


def lora_layers(model: nn.Module, *, only_mlp: bool = False,
                mlp_patterns: Optional[Sequence[str]] = None) -> List[Tuple[str, nn.Module]]:
    """The (name, layer) pairs of ``model``'s ``peft.tuners.lora.Linear`` layers (only the
    feed-forward ones when ``only_mlp``)."""
    _validate.boolean(only_mlp, "only_mlp")
    check_mlp_patterns(mlp_patterns)
    cls = _peft_linear_class()
    out = []
    for name, module in model.named_modules():
        if isinstance(module, cls) and (not only_mlp or is_mlp_name(name, mlp_patterns)):
            out.append((name, module))
    return out


class PeftLoRAHandle(PatchHandle):
    """The :class:`~lucidops.patch.PatchHandle` :func:`peft_lora` returns. ``settings``
    holds the arguments to re-apply the patch (e.g. after loading the adapter with peft:
    ``peft_lora(loaded, **handle.settings)``); ``names`` the patched layers' names."""

    @property
    def names(self) -> List[str]:
        """Qualified names of the layers still patched."""
        return self.paths


def _base_weight(layer: _LoraLinear) -> Tuple[Tensor, Optional[Tensor]]:
    """(N_out, K_in) weight view and bias of the layer's base (Conv1D stores W^T)."""
    base = cast(_LinearBase, layer.get_base_layer())  # checked by _check_layer
    w = base.weight
    if layer.fan_in_fan_out:
        w = w.t()
    return w, base.bias


def _fused_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    """Replacement forward of a patched peft LoRA Linear: the patched adapter runs through
    lucidops' fused bounded/sine op, in a plain call and in peft's mixed batches
    (``adapter_names=``, one name per row: its rows); every other state (adapters disabled,
    merged, another adapter active, other rows of a mixed batch) is handed to peft's forward."""
    cfg = self._lucidops_lora
    adapter = cfg["adapter"]
    if self.disable_adapters or self.merged:
        return cfg["original"](x, *args, **kwargs)
    names = kwargs.get("adapter_names")
    if names is not None:
        return _mixed_batch_forward(self, x, args, kwargs)
    active = [a for a in self.active_adapters if a in self.lora_A]
    if adapter not in active:
        return cfg["original"](x, *args, **kwargs)
    if len(active) > 1:
        raise RuntimeError(f"lucidops' fused adapter runs one adapter per layer, but {active} are active; "
                           f"activate only {adapter!r} (or revert the patch)")
    if args or kwargs:
        raise TypeError(f"patched LoRA layer takes only the input tensor, got extra arguments {args} {kwargs}")
    return _fused(self, x)


def _mixed_batch_forward(self, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """peft's mixed batch: row i of x uses adapter ``adapter_names[i]``. The rows naming the
    patched adapter run the fused op (before: peft's plain LoRA ran them, silently); the
    others, with their names, go to peft's forward, which also checks the call."""
    cfg = self._lucidops_lora
    names = list(kwargs["adapter_names"])
    ours = [i for i, name in enumerate(names) if name == cfg["adapter"]]
    if not ours or len(names) != x.shape[0]:  # peft runs (or refuses) it as it would unpatched
        return cfg["original"](x, *args, **kwargs)
    rest = {k: v for k, v in kwargs.items() if k != "adapter_names"}
    if args or rest:
        raise TypeError(f"patched LoRA layer takes only the input tensor and adapter_names, got extra arguments "
                        f"{args} {rest}")
    others = [i for i, name in enumerate(names) if name != cfg["adapter"]]
    parts = [_fused(self, x[ours])]
    if others:
        parts.append(cfg["original"](x[others], adapter_names=[names[i] for i in others]))
    order = torch.tensor(ours + others, device=x.device)
    return torch.cat(parts).index_select(0, torch.argsort(order))


def _fused(self, x: Tensor) -> Tensor:
    """The layer with the patched adapter, through the fused op."""
    cfg = self._lucidops_lora
    adapter = cfg["adapter"]
    _check_adapter(cfg["name"], self, adapter)
    weight, bias = _base_weight(self)
    a = self.lora_A[adapter].weight
    b = self.lora_B[adapter].weight
    # Run the op in the base's dtype. peft keeps adapters in float32 over a half base
    # (autocast_adapter_dtype), which the op takes as they are; adapters of another dtype are
    # cast (differentiably) by the op's rule, never down to a half base's dtype.
    dtype = weight.dtype
    factor_dtype = _ops.resolve_factor_dtype(dtype, a.dtype, b.dtype)
    # As in peft, the adapter reads lora_dropout(x) and the base x.
    dropped = _ops.dropout_input(self.lora_dropout[adapter], x)
    y = _ops.bounded_lora_linear(x.to(dtype), weight, a.to(factor_dtype), b.to(factor_dtype), bias, fn=cfg["fn"],
                                 omega=cfg["omega"], scale=self.scaling[adapter] / cfg["gain"],
                                 placement=cfg["placement"],
                                 adapter_input=None if dropped is None else dropped.to(dtype))
    # peft returns its base layer's dtype: under autocast the autocast dtype, else x's.
    return y if torch.is_autocast_enabled(x.device.type) else y.to(x.dtype)


def _no_merge(self, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError("this peft LoRA layer is patched by lucidops.patch.peft_lora: peft's merge would fold the "
                       "plain update B A, not the bounded one; call handle.revert() first")


def _install_merge_guard() -> None:
    """Make peft's model-wide merges (merge_and_unload, merge_adapter) refuse, before any layer
    merges, while a layer under the tuner is patched here. Both check ``_check_merge_allowed``
    first and then merge layer by layer, so a patched layer's own refusal came after the
    unpatched layers before it had merged (under only_mlp, the attention adapters: folded in
    and gone from a later save). Installed once on peft's BaseTuner (LoraModel's check calls
    it first): it looks at the tuner's layers at call time, so it holds whichever handles are
    reverted, in any order, and for a patch applied to a submodule; with no patched layer it is
    peft's own check."""
    from peft.tuners.tuners_utils import BaseTuner

    peft_check = BaseTuner.__dict__.get("_check_merge_allowed")
    if peft_check is None or getattr(peft_check, "_lucidops_guard", False):
        return  # a peft without the check (each patched layer still refuses its own merge), or installed

    def _check_merge_allowed(self: Any) -> None:
        patched = [name for name, m in self.model.named_modules() if "_lucidops_lora" in m.__dict__]
        if patched:
            raise RuntimeError(f"this peft model has LoRA layers patched by lucidops.patch.peft_lora "
                               f"({name_list(patched)}): peft's merge would fold the plain update B A into them, "
                               "not the bounded one; call handle.revert() first (nothing was merged; a copy of a "
                               "patched model has no handle: lucidops.patch.undo_peft_lora(model))")
        peft_check(self)

    setattr(_check_merge_allowed, "_lucidops_guard", True)
    setattr(BaseTuner, "_check_merge_allowed", _check_merge_allowed)


def _check_adapter(name: str, layer: _LoraLinear, adapter: str) -> None:
    """What the fused op cannot compute, checked when patching and again on every call (an
    adapter deleted and re-added under the patched name with DoRA ran without its magnitude)."""
    if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
        raise ValueError(f"layer {name!r}: adapter {adapter!r} uses a peft LoRA variant (e.g. DoRA); only plain "
                         "LoRA adapters can be made sine/bounded")
    if getattr(layer, "lora_bias", {}).get(adapter, False):
        raise ValueError(f"layer {name!r}: lora_bias=True is not supported by the fused op")
    dropout = layer.lora_dropout[adapter]
    if not isinstance(dropout, (nn.Identity, nn.Dropout)):
        raise TypeError(f"layer {name!r}: lora_dropout of adapter {adapter!r} is a {type(dropout).__name__}; the "
                        "fused op takes peft's nn.Dropout or nn.Identity")
    for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
        if part._forward_hooks or part._forward_pre_hooks or part._backward_hooks:
            # The fused op reads their weights without calling them: Opacus' per-sample hooks
            # (grad_sample stayed None) or any other hook would never fire.
            raise RuntimeError(f"layer {name!r}: adapter {adapter!r}'s lora_A/lora_B modules have hooks (Opacus' "
                               "per-sample gradient hooks, say), which the fused op would never run: it reads their "
                               "weights without calling them; revert the lucidops patch for such training")


def _check_layer(name: str, layer: _LoraLinear, adapter: str) -> None:
    if adapter not in layer.lora_A:
        raise ValueError(f"layer {name!r} has no adapter {adapter!r} (it has {sorted(layer.lora_A.keys())})")
    base = layer.get_base_layer()
    conv1d = _conv1d_class()
    kinds = (nn.Linear,) + ((conv1d,) if conv1d is not None else ())
    if type(base) not in kinds:
        raise TypeError(f"layer {name!r}: the fused op needs a plain nn.Linear or transformers Conv1D base, got "
                        f"{type(base).__name__} (quantized bases are not supported)")
    _check_adapter(name, layer, adapter)
    if layer.merged:
        raise RuntimeError(f"layer {name!r} has merged adapters; call model.unmerge_adapter() before patching")
    if "_lucidops_lora" in layer.__dict__:
        raise RuntimeError(f"layer {name!r} is already patched by lucidops.patch.peft_lora; revert() it first (a "
                           "copy of a patched model has no handle: lucidops.patch.undo_peft_lora(model))")


def peft_lora(model: nn.Module, variant: str = "sine", *, omega: float, fn: str = "sin", placement: str = "weight",
              only_mlp: bool = False, mlp_patterns: Optional[Sequence[str]] = None,
              gain: Optional[Union[float, str]] = None, adapter_name: Optional[str] = None) -> PeftLoRAHandle:
    """Make the LoRA layers of a peft model sine or bounded, with lucidops' fused kernels.

    Each patched ``peft.tuners.lora.Linear`` computes, for its adapter with A (r, K_in),
    B (N_out, r) and peft's scaling s = alpha / r:

    * placement "weight": y = x (W0 + s / g * fn(omega B A))^T + bias
    * placement "output": y = x W0^T + s / g * fn(omega (x A^T) B^T) + bias

    As in peft, in training the adapter reads ``lora_dropout(x)`` where the base reads x.

    Args:
        model: a peft model (or any module containing peft LoRA Linear layers).
        variant: "sine" (sine LoRA, Ji et al.: fn "sin" on the weight product, gain
            sqrt(K_in)) or "bounded" (bounded unlearning: ``fn`` and ``placement`` as given,
            gain 1).
        omega: finite frequency (required; no default in the papers' code).
        fn: "sin" or "tanh" (variant "bounded"; variant "sine" needs "sin").
        placement: "weight" or "output" (variant "bounded"; variant "sine" needs "weight").
        only_mlp: patch only feed-forward layers, leaving attention adapters plain LoRA.
        mlp_patterns: regexes (re.search on module names) marking MLP layers; defaults
            cover GPT-2, LLaMA, OPT, GPT-NeoX and BERT/ViT names (:data:`DEFAULT_MLP_PATTERNS`).
        gain: divisor of peft's scaling: a positive number or "sqrt_in" (default:
            "sqrt_in" for "sine", 1 for "bounded").
        adapter_name: which adapter to make bounded (default: the model's active one).
    Returns:
        A :class:`PeftLoRAHandle`; ``revert()`` (or leaving its ``with`` block) restores
        peft's forward. The adapter parameters are the same objects throughout.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    # Zero, as for the modules: an update fn(0) = 0 with zero gradients, adapters that never train.
    omega = _validate.real_number(omega, "omega", "!= 0", tensor_ok=True)
    if fn not in _ops.FNS:
        raise ValueError(f"fn must be one of {_ops.FNS}, got {fn!r}")
    if placement not in _ops.PLACEMENTS:
        raise ValueError(f"placement must be one of {_ops.PLACEMENTS}, got {placement!r}")
    if variant == "sine" and (fn != "sin" or placement != "weight"):
        raise ValueError(f"variant 'sine' is fn='sin', placement='weight'; got fn={fn!r}, placement={placement!r} "
                         "(use variant='bounded')")
    if gain is None:
        gain = "sqrt_in" if variant == "sine" else 1.0
    _validate.boolean(only_mlp, "only_mlp")  # a truthy string ("no") would have read as True
    check_mlp_patterns(mlp_patterns)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")

    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no peft LoRA Linear layer to patch (wrap it with peft.get_peft_model and a "
                         "LoraConfig first)")
    if only_mlp:
        layers = [(n, m) for n, m in layers if is_mlp_name(n, mlp_patterns)]
        if not layers:
            raise ValueError("only_mlp=True but no LoRA layer name matches the MLP patterns; pass mlp_patterns")
    if adapter_name is None:
        active = cast(_LoraLinear, layers[0][1]).active_adapters  # lora_layers found peft LoRA Linears
        if len(active) != 1:
            raise ValueError(f"the model has several active adapters {active}; pass adapter_name")
        adapter_name = active[0]
    # An adapter need not sit on every LoRA layer (peft runs the plain base where it is absent).
    holding = [(n, m) for n, m in layers if adapter_name in cast(_LoraLinear, m).lora_A]
    if not holding:
        raise ValueError(f"no LoRA layer has adapter {adapter_name!r}"
                         + (" among the MLP layers" if only_mlp else ""))
    layers = holding

    # Check every layer before touching any, so a bad layer leaves the model unpatched.
    gains = []
    for name, layer in layers:
        lora = cast(_LoraLinear, layer)
        _check_layer(name, lora, adapter_name)
        gains.append(_ops.resolve_gain(gain, _base_weight(lora)[0].shape[1]))

    skipped = _plain_lora_layers(model, adapter_name, only_mlp, mlp_patterns)
    settings = dict(variant=variant, omega=omega, fn=fn, placement=placement, only_mlp=only_mlp,
                    mlp_patterns=None if mlp_patterns is None else tuple(mlp_patterns), gain=gain,
                    adapter_name=adapter_name)
    handle = PeftLoRAHandle(model, settings=settings)
    what = f"{variant} LoRA" if variant == "sine" else f"bounded LoRA ({fn}, {placement})"
    _install_merge_guard()
    for (name, layer), g in zip(layers, gains):
        # original / merge_before: what undo_peft_lora puts back where no handle is (a copy).
        config = dict(adapter=adapter_name, fn=fn, placement=placement, omega=omega, gain=g,
                      original=current_forward(layer), merge_before=layer.__dict__.get("merge"), name=name)
        handle.set_instance_attrs(name, layer, {"_lucidops_lora": config,
                                                "forward": InstanceMethod(_fused_forward, layer),
                                                "merge": InstanceMethod(_no_merge, layer)},
                                  after=f"{describe(layer)} (forward -> lucidops {what})")
    if skipped:
        handle.warn("peft_lora", f"adapter {adapter_name!r} stays plain LoRA on {len(skipped)} layer(s) that are "
                    f"not LoRA Linear layers (the fused op is a linear layer): {name_list(skipped)}")
    return handle


def undo_peft_lora(model: nn.Module) -> nn.Module:
    """Restore peft's forward (and merge) on every layer of ``model`` patched by
    :func:`peft_lora`, without its handle: a ``copy.deepcopy`` or ``torch.load`` of a patched
    model runs the patch but has no handle to revert it. Returns ``model``; a handle of the
    same layers then has nothing left to do."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    patched = [m for m in model.modules() if "_lucidops_lora" in m.__dict__]
    if not patched:
        raise ValueError("model has no LoRA layer patched by lucidops.patch.peft_lora")
    # Every layer checked before any changes, so a refusal leaves the model as it was.
    broken = [type(m).__name__ for m in patched if "original" not in m.__dict__["_lucidops_lora"]]
    if broken:
        raise RuntimeError(f"{len(broken)} patched layer(s) lack the original forward; nothing was changed")
    for layer in patched:
        config = layer.__dict__.pop("_lucidops_lora")
        original = config["original"]
        if isinstance(original, InstanceMethod) and original.__func__ is type(layer).forward:
            layer.__dict__.pop("forward", None)  # the class's forward, as before patching
        else:
            layer.__dict__["forward"] = original  # an instance forward an earlier patch had set
        if config.get("merge_before") is None:  # absent from models patched before it was recorded
            layer.__dict__.pop("merge", None)
        else:
            layer.__dict__["merge"] = config["merge_before"]
    return model


def _plain_lora_layers(model: nn.Module, adapter: str, only_mlp: bool,
                       mlp_patterns: Optional[Sequence[str]]) -> List[str]:
    """Names of peft LoRA layers other than Linear (Embedding, Conv) that hold ``adapter``
    and that the patch would take if it could: their adapters stay plain LoRA."""
    from peft.tuners.lora import LoraLayer

    linear = _peft_linear_class()
    return [name for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and not isinstance(module, linear)
            and any(adapter in getattr(module, table, {}) for table in ("lora_A", "lora_embedding_A"))
            and (not only_mlp or is_mlp_name(name, mlp_patterns))]
