"""``lucidops.patch.apply``: one call that swaps lucidops into a model, reversibly.

    handle = lucidops.patch.apply(vit)                       # timm Attention -> ManyHeadAttention
    handle = lucidops.patch.apply(peft_vit, lora={"variant": "sine", "omega": 200.0})
    print(handle)                                            # | path | before | after |
    handle.revert()                                          # bit for bit
    with lucidops.patch.apply(vit): ...                      # reverted on exit

Families and what they do to the function the model computes:

* ``attention`` -- kernel swap: same function (within dtype rounding), faster kernel. timm's
  ViT ``Attention`` becomes :class:`~lucidops.nn.ManyHeadAttention`; other modules whose
  forward calls ``scaled_dot_product_attention`` (EVA-02, rope ViTs, PVT v2, ...) keep their
  forward and get those calls answered by lucidops (:func:`lucidops.patch.sdpa_calls`).
* ``lora`` -- makes peft's LoRA adapters sine / bounded: a *different* function by design
  (methods.md sections 3 and 5); adapter parameters and state-dict keys stay peft's.
* ``activations`` -- replaces activation modules by Sinc / Gaussian (or anything a factory
  builds): a *different* function, for spectral-bias experiments.
* ``point_encoders`` -- delegated to :func:`lucidops.patch.point_encoders`.

Rule for options that find nothing: a family left at its default never raises (a model
without timm attention is simply not patched there); a family the caller asked for
explicitly that finds nothing to patch raises ``ValueError`` naming the option and what was
looked for (``strict=False`` turns that into a note on the handle instead).
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .. import _validate
from ..nn.activations import Gaussian, Sinc
from ..nn.attention import ManyHeadAttention
from .handle import PatchHandle, child_slots, describe
from .peft_lora import VARIANTS, lora_layers, peft_lora
from .sdpa_calls import sdpa_calls, sdpa_modules
from .timm_vit import attention_modules, timm_vit

__all__ = ["apply", "ACTIVATIONS"]


class _Default:
    """Marks an argument the caller did not pass (so defaults can be told from explicit values)."""

    def __repr__(self) -> str:
        return "<default>"

    def __bool__(self) -> bool:
        return True


_DEFAULT: Any = _Default()

# Names accepted as activation replacements (each built with its default sigma = 1).
ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {"sinc": Sinc, "gaussian": Gaussian}

ActivationSpec = Union[str, Callable[[], nn.Module]]


def _check_lora(lora: Any) -> Optional[Dict[str, Any]]:
    """The peft_lora keyword arguments ``lora`` stands for (None: no LoRA patch)."""
    if lora is None:
        return None
    if isinstance(lora, str):
        if lora not in VARIANTS:
            raise ValueError(f"lora must be None, one of {VARIANTS} or a dict of peft_lora arguments, got {lora!r}")
        raise ValueError(f"lora={lora!r}: the frequency omega has no default (a required hyperparameter of the "
                         f"method); pass lora={{'variant': {lora!r}, 'omega': ...}}")
    if not isinstance(lora, Mapping):
        raise TypeError(f"lora must be None, one of {VARIANTS} or a dict of peft_lora arguments, "
                        f"got {type(lora).__name__}")
    params = inspect.signature(peft_lora).parameters
    allowed = [k for k in params if k != "model"]
    unknown = [k for k in lora if k not in allowed]
    if unknown:
        raise TypeError(f"lora: unknown peft_lora argument(s) {unknown}; expected some of {allowed}")
    kwargs = dict(lora)
    variant = kwargs.get("variant", params["variant"].default)
    if variant not in VARIANTS:
        raise ValueError(f"lora: variant must be one of {VARIANTS}, got {variant!r}")
    if "omega" not in kwargs:
        raise ValueError("lora: 'omega' is required (the frequency; no default in the papers)")
    return kwargs


def _check_activations(activations: Any) -> List[Tuple[Union[type, str], ActivationSpec]]:
    if activations is None:
        return []
    if not isinstance(activations, Mapping):
        raise TypeError("activations must be None or a mapping {module class or class name: 'sinc' | 'gaussian' | "
                        f"factory}}, got {type(activations).__name__}")
    out = []
    for key, spec in activations.items():
        if isinstance(key, type):
            if not issubclass(key, nn.Module):
                raise TypeError(f"activations: key {key.__name__} is not an nn.Module class")
        elif not isinstance(key, str) or not key:
            raise TypeError(f"activations: keys must be nn.Module classes or class names, got {key!r}")
        if isinstance(spec, str):
            if spec not in ACTIVATIONS:
                raise ValueError(f"activations[{_key_name(key)}]: must be one of {sorted(ACTIVATIONS)} or a "
                                 f"callable returning an nn.Module, got {spec!r}")
        elif isinstance(spec, nn.Module) or not callable(spec):
            raise TypeError(f"activations[{_key_name(key)}]: pass 'sinc', 'gaussian' or a zero-argument callable "
                            f"returning a new module (e.g. functools.partial(lucidops.nn.Sinc, sigma=0.5)), "
                            f"not {type(spec).__name__}")
        out.append((key, spec))
    return out


def _key_name(key: Union[type, str]) -> str:
    return describe(key) if isinstance(key, type) else repr(key)


def _matches(key: Union[type, str], module: nn.Module) -> bool:
    # Exact types only: a subclass may compute something else and is left alone.
    cls = type(module)
    if isinstance(key, type):
        return cls is key
    return key in (cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}", describe(cls))


def _swap_activations(model: nn.Module, specs: List[Tuple[Union[type, str], ActivationSpec]], strict: bool,
                      handle: PatchHandle) -> None:
    plan: List[Tuple[str, nn.Module]] = []
    for key, spec in specs:
        def is_key(name: str, module: nn.Module, key: Union[type, str] = key) -> bool:
            return _matches(key, module)

        sites = child_slots(model, is_key)
        if not sites:
            msg = (f"activations[{_key_name(key)}]: the model has no module of exactly that type "
                   "(subclasses are not replaced)")
            if strict:
                raise ValueError(msg)
            handle.notes.append(msg + "; skipped")
        for name, old in sites:
            if any(name == p for p, _ in plan):
                raise ValueError(f"activations: module {name!r} ({describe(old)}) matches more than one key")
            factory = ACTIVATIONS[spec] if isinstance(spec, str) else spec
            new = factory()
            if not isinstance(new, nn.Module):
                raise TypeError(f"activations[{_key_name(key)}]: the factory returned {type(new).__name__}, "
                                "not an nn.Module")
            near = _tensor_near(model, name)
            if near is not None:  # learnable replacements (a sigma) go where the model lives, in its dtype
                new = new.to(device=near.device, dtype=near.dtype if near.is_floating_point() else None)
            plan.append((name, new))
    # Every replacement is built before any swap, so a failing factory leaves the model as it was.
    for name, new in plan:
        handle.swap_child(model, name, new)


def _tensor_near(model: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The first tensor (a floating one where there is one) of the module at ``name`` or, when
    it holds none (GELU), of its nearest ancestor that does; None for a model without tensors."""
    parts = name.split(".") if name else []
    for end in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:end]))
        tensors = list(itertools.chain(module.parameters(), module.buffers()))
        if tensors:
            return next((t for t in tensors if t.is_floating_point()), tensors[0])
    return None


def _point_encoder_patch() -> Callable[..., PatchHandle]:
    # Imported when asked for: it pulls in the distillation code.
    from .point_encoders import point_encoders

    return point_encoders


def apply(model: nn.Module, *, attention: bool = _DEFAULT, lora: Union[None, str, Mapping[str, Any]] = None,
          point_encoders: Union[bool, Mapping[str, Any]] = False,
          activations: Optional[Mapping[Union[type, str], ActivationSpec]] = None,
          strict: bool = True) -> PatchHandle:
    """Swap lucidops modules / kernels into ``model`` in place; returns one :class:`PatchHandle`.

    Args:
        model: any ``nn.Module`` (timm ViT/DeiT, a peft model, a point encoder, ...).
        attention: replace every timm ViT ``Attention`` by :class:`lucidops.nn.ManyHeadAttention`
            (same parameters, same function within dtype rounding), and route the SDPA calls
            of the other attention modules (:func:`lucidops.patch.sdpa_calls`, part
            "sdpa_calls"). On by default; when left at the default, a model without either is
            simply not patched there.
        lora: None, ``"sine"`` / ``"bounded"`` (rejected with a hint: the frequency omega has
            no default), or a dict of :func:`lucidops.patch.peft_lora` keyword arguments, e.g.
            ``{"variant": "sine", "omega": 200.0, "only_mlp": True}``. Changes the function by
            design (sine / bounded adapters).
        point_encoders: False, True, or a dict of keyword arguments for
            :func:`lucidops.patch.point_encoders` (raises ``NotImplementedError`` if that
            module is not available).
        activations: None or ``{module class or class name: "sinc" | "gaussian" | factory}``:
            every module of exactly that type becomes :class:`lucidops.nn.Sinc` /
            :class:`lucidops.nn.Gaussian` (sigma 1) or ``factory()``. This CHANGES the function
            the model computes (for spectral-bias experiments), unlike the kernel swaps. An
            empty mapping is an explicit request that finds nothing (see ``strict``).
        strict: when True (default) a family requested explicitly that finds nothing to patch
            raises ``ValueError``; when False it is skipped and noted in ``handle.notes``.

    Returns:
        A :class:`PatchHandle` merging every family's replacements (``handle.parts`` maps
        "activations", "attention", "sdpa_calls", "lora", "point_encoders" to the family handles that
        patched something); ``handle.settings`` holds the explicitly passed arguments, so
        ``apply(other_model, **handle.settings)`` re-applies the same patch.
        ``handle.nothing_patched`` is True (and the model untouched) when nothing applied.
        If any family fails, what the others already patched is reverted before raising.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    explicit_attention = attention is not _DEFAULT
    if not isinstance(attention, (bool, _Default)):
        raise TypeError(f"attention must be True or False, got {attention!r}")
    _validate.boolean(strict, "strict")
    if not isinstance(point_encoders, (bool, Mapping)):
        raise TypeError(f"point_encoders must be True, False or a dict of keyword arguments, got "
                        f"{type(point_encoders).__name__}")
    lora_kwargs = _check_lora(lora)
    activation_specs = _check_activations(activations)
    pe_fn = _point_encoder_patch() if point_encoders is not False else None

    settings: Dict[str, Any] = {}
    if explicit_attention:
        settings["attention"] = attention
    for key, value, default in (("lora", lora, None), ("point_encoders", point_encoders, False),
                                ("activations", activations, None)):
        if value is not default:
            settings[key] = value
    if not strict:
        settings["strict"] = strict
    handle = PatchHandle(model, settings=settings)

    def nothing(option: str, looked_for: str) -> None:
        msg = f"{option} was requested but the model has no {looked_for}"
        if strict:
            raise ValueError(msg)
        handle.notes.append(msg + "; skipped")

    try:
        # Activations first: they define the function; the kernel swaps then see the result.
        if activations is not None and not activation_specs:
            # An explicit empty mapping asks for a family and names nothing to find in it.
            msg = ("activations={} was requested but names no module class to replace; pass {module class or "
                   "class name: 'sinc' | 'gaussian' | factory}, or None to leave the activations alone")
            if strict:
                raise ValueError(msg)
            handle.notes.append(msg + "; skipped")
        if activation_specs:
            part = PatchHandle(model)
            _swap_activations(model, activation_specs, strict, part)
            if part.replaced:
                handle.merge(part, "activations")
            else:
                handle.notes.extend(part.notes)

        if attention:
            if attention_modules(model):
                handle.merge(timm_vit(model), "attention")
            # Attention modules timm_vit does not replace (rotary, windowed, ...) keep their
            # forward, and lucidops answers their SDPA calls where it computes the same.
            if sdpa_modules(model):
                handle.merge(sdpa_calls(model), "sdpa_calls")
            if explicit_attention and not ({"attention", "sdpa_calls"} & set(handle.parts)):
                patched_before = any(isinstance(m, ManyHeadAttention) or "_lucidops_sdpa" in m.__dict__
                                     for m in model.modules())
                nothing("attention=True", "timm ViT/DeiT Attention module (timm.layers.Attention, exact type) nor "
                        "module whose forward calls scaled_dot_product_attention" +
                        (": its attention already runs on lucidops (patched before? revert() that handle first)"
                         if patched_before else ""))

        if lora_kwargs is not None:
            try:
                found = bool(lora_layers(model))
            except ImportError:  # peft not installed: the model cannot hold peft layers
                found = False
            if found:
                handle.merge(peft_lora(model, **lora_kwargs), "lora")
            else:
                nothing(f"lora={lora!r}", "peft LoRA Linear layer (peft.tuners.lora.Linear)")

        if pe_fn is not None:
            kwargs = dict(point_encoders) if isinstance(point_encoders, Mapping) else {}
            part = pe_fn(model, **{"allow_none": True, **kwargs})  # "found nothing" is judged here
            if not isinstance(part, PatchHandle):
                raise TypeError(f"lucidops.patch.point_encoders returned {type(part).__name__}, not a PatchHandle")
            if part.replaced:
                handle.merge(part, "point_encoders")
            else:
                nothing(f"point_encoders={point_encoders!r}", "point encoder that lucidops.patch.point_encoders "
                        "can replace")
    except BaseException:
        handle.revert()
        raise
    return handle
