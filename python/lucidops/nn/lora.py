"""Sine and bounded LoRA modules wrapping an ``nn.Linear`` (methods.md sections 3, 4, 5).

    layer = lucidops.nn.SineLoRALinear(nn.Linear(1024, 1024), rank=16, omega=200.0, alpha=16)
    y = layer(x)            # fused op: the N_out x K_in update is never kept for backward
    layer.merge()           # fold the update into the weight: inference costs exactly a Linear
    layer.unmerge()         # restore the base weight (bit-exact by default)
    layer.quantize_(bits=4) # ship the adapter at 4 bits; sin applied after dequantization

The base weight and bias are frozen (requires_grad False) on construction; the adapter
A (r, K_in) starts like peft's (Kaiming-uniform) and B (N_out, r) at zero, so the update
starts at zero.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Union

import torch
from torch import Tensor, nn

from .. import _validate
from .._dtypes import opmath_dtype
from ..ops import lora as F
from ..quant.adapters import QuantizedAdapter, quantize_adapter
from ..reference import lora as _reference


class BoundedLoRALinear(nn.Module):
    """y = base(x) with a bounded adapter: placement "weight" adds scale fn(omega B A) to the
    weight, "output" adds scale fn(omega (x A^T) B^T) to the output; scale = alpha / rank / gain.

    Args:
        base: the ``nn.Linear`` to adapt (its parameters are frozen and shared, not copied).
        rank: adapter rank r >= 1.
        fn: "sin" or "tanh".
        omega: frequency (finite).
        alpha: LoRA alpha (default: rank, i.e. scale 1 / gain).
        placement: "weight" or "output".
        gain: divisor of the scale: a positive number, or "sqrt_in" for sqrt(K_in).
        dropout: probability of peft's ``lora_dropout``: in training the adapter reads
            dropout(x) while the base reads x (one more matmul of the base's size per call).
            A random operation: under ``torch.func.vmap`` (Opacus runs this layer so) it
            needs ``randomness="same"`` or ``"different"``.
        adapter_dtype: the dtype A and B are made in: the base's, or float32 over a
            float16/bfloat16 base. Default: float32 over a half base (as peft's
            ``autocast_adapter_dtype``: half factors round the phase omega B A, by a radian
            and more at omega in the hundreds, and every optimizer step on them), else the
            base's dtype. Set at construction: a later ``.to(dtype)`` or ``.half()`` of the
            layer (or its model) converts A and B too, as any module's parameters.
    """

    def __init__(self, base: nn.Linear, rank: int, fn: str = "sin", omega: float = 1.0,
                 alpha: Optional[float] = None, placement: str = "weight", gain: Union[float, str] = 1.0,
                 dropout: float = 0.0, adapter_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        rank = _validate.integer(rank, "rank", minimum=1)
        if fn not in F.FNS:
            raise ValueError(f"fn must be one of {F.FNS}, got {fn!r}")
        if placement not in F.PLACEMENTS:
            raise ValueError(f"placement must be one of {F.PLACEMENTS}, got {placement!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.fn, self.placement = rank, fn, placement
        # Zero would make the update fn(0) = 0 with zero gradients: an adapter that never trains.
        self.omega = _validate.real_number(omega, "omega", "!= 0", tensor_ok=True)
        self.alpha = _validate.real_number(rank if alpha is None else alpha, "alpha", "!= 0", tensor_ok=True)
        self.gain = F.resolve_gain(gain, base.in_features)
        drop_p = _validate.probability(dropout, "dropout")
        self.lora_dropout: nn.Module = nn.Dropout(drop_p) if drop_p > 0 else nn.Identity()  # peft's name
        w = base.weight
        dtype = _adapter_dtype(adapter_dtype, w.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=dtype, device=w.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.quantized: Optional[QuantizedAdapter] = None
        self.merged = False
        self._original_weight: Optional[Tensor] = None
        self.register_load_state_dict_post_hook(_quantized_follows_base)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank / self.gain

    def _adapter(self):
        if self.quantized is not None:
            return self.quantized, None
        return self.lora_A, self.lora_B

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base(x)
        a, b = self._adapter()
        return F.bounded_lora_linear(x, self.base.weight, a, b, self.base.bias, fn=self.fn, omega=self.omega,
                                     scale=self.scale, placement=self.placement,
                                     adapter_input=F.dropout_input(self.lora_dropout, x))

    def delta_weight(self) -> Tensor:
        """The update scale fn(omega B A) (N_out, K_in), in the weight's dtype."""
        return self._delta_weight_opmath().to(self.base.weight.dtype)

    def _delta_weight_opmath(self) -> Tensor:
        """The update in the weight's opmath dtype (float32 over a half weight), as forward
        forms it: a quantized adapter dequantized in that dtype (never in a half weight's,
        which would round the factors before the phase), without its exponents (they go
        into omega)."""
        if self.placement != "weight":
            raise RuntimeError("placement 'output' has no weight update: its bound acts on the adapter output")
        a, b = self._adapter()
        compute = opmath_dtype(self.base.weight.dtype)
        # The ops' float32 range checks: omega or scale past it made merge() write NaN into the
        # weight where forward raises.
        omega = F._within_float32(self.omega, "omega", self.base.weight)
        scale = F._within_float32(self.scale, "scale", self.base.weight)
        if isinstance(a, QuantizedAdapter):
            omega = F._folded_omega(omega, a)
            a, b = a.dequantize(compute, normalized=True)
        with torch.no_grad():
            return _reference.delta_weight(a, b, self.fn, omega, scale).to(compute)

    @torch.no_grad()
    def merge(self, keep_original: bool = True) -> "BoundedLoRALinear":
        """Fold the update into the base weight; forward is then exactly ``base(x)``.

        keep_original: keep a copy of the base weight so that unmerge() restores it
        bit-exactly (else unmerge subtracts the update, exact up to rounding)."""
        _validate.boolean(keep_original, "keep_original")  # "False" kept a copy
        if self.merged:
            return self
        if self.placement != "weight":
            raise RuntimeError("placement 'output' cannot be merged into the weight (fn acts on x A^T B^T)")
        w = self.base.weight
        self._original_weight = w.detach().clone() if keep_original else None
        compute = opmath_dtype(w.dtype)
        w.copy_((w.to(compute) + self._delta_weight_opmath()).to(w.dtype))  # one rounding
        self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self) -> "BoundedLoRALinear":
        """Undo merge(): restore the base weight."""
        if not self.merged:
            return self
        w = self.base.weight
        if self._original_weight is not None:
            w.copy_(self._original_weight)
        else:
            compute = opmath_dtype(w.dtype)
            w.copy_((w.to(compute) - self._delta_weight_opmath()).to(w.dtype))
        self._original_weight = None
        self.merged = False
        return self

    @torch.no_grad()
    def quantize_(self, bits: int = 4, group_size: int = 64, method: str = "uniform") -> QuantizedAdapter:
        """Replace A and B by a quantized adapter (frozen); the bound is applied after
        dequantization. Returns it (``.stats`` has its size and reconstruction error)."""
        if self.merged:
            raise RuntimeError("unmerge() before quantize_()")
        if self.quantized is not None:
            raise RuntimeError("the adapter is already quantized")
        self.quantized = quantize_adapter(self.lora_A, self.lora_B, bits, group_size, method,
                                          omega=self.omega if self.placement == "weight" else None, fn=self.fn)
        # The full-precision factors are dropped: the quantized adapter replaces them.
        del self.lora_A, self.lora_B
        self.register_parameter("lora_A", None)
        self.register_parameter("lora_B", None)
        return self.quantized

    # --- state: merged and quantized travel with the state dict and the module's device -------

    def get_extra_state(self) -> Dict[str, Tensor]:
        """Saved under ``_extra_state``: whether the update is merged into the base weight (a
        merged state loaded into an unmerged layer would add it twice), the settings that
        update was formed with, and the quantized adapter. Tensors only, in a flat dict:
        ``torch.load(weights_only=True)`` reads it and torch.jit's tracer (fvcore) takes it as
        module state."""
        state = {"merged": torch.tensor(self.merged), **self._settings()}
        if self.quantized is not None:
            state.update({f"quantized.{k}": v for k, v in self.quantized.state().items()})
        return state

    def _settings(self) -> Dict[str, Tensor]:
        return {"fn": torch.tensor(F.FNS.index(self.fn)), "placement": torch.tensor(F.PLACEMENTS.index(self.placement)),
                "omega": torch.tensor(float(self.omega), dtype=torch.float64),
                "scale": torch.tensor(float(self.scale), dtype=torch.float64)}

    def _check_loadable(self, state: Dict[str, Tensor], with_base: bool = True) -> Optional[QuantizedAdapter]:
        """Refuse an extra state this layer cannot take, before anything is loaded; return its
        quantized adapter (None if it has none). ``with_base``: the state dict holds the base
        weight (an adapter-only one leaves this layer's own, merged with its own settings)."""
        quantized = {k[len("quantized."):]: v for k, v in state.items() if k.startswith("quantized.")}
        if bool(quantized) != (self.quantized is not None):
            saved, mine = ("quantized", "is not") if quantized else ("not quantized", "is")
            raise RuntimeError(f"the state dict's adapter is {saved} but this layer's {mine}: "
                               "call quantize_() on the layer before loading a quantized state")
        if bool(state.get("merged", False)) and self.placement != "weight":
            # With or without the base weight: this layer cannot hold (or re-make) a merged update.
            raise RuntimeError("the state dict is of a merged layer, but this layer's placement 'output' cannot be "
                               "merged into the weight: load an unmerged state (or into a placement 'weight' layer)")
        if with_base and bool(state.get("merged", False)):
            # The saved weight holds scale fn(omega B A) formed with the saving layer's settings:
            # unmerge() here would take out another update (a merged omega-2 state loaded into
            # an omega-3 layer left the weight 1.0 off after unmerge). States saved before the
            # settings were recorded are taken as they are.
            here = self._settings()
            differ = [name for name, value in here.items() if name in state and state[name].device.type != "meta"
                      and not torch.equal(state[name].to("cpu", value.dtype), value)]
            if differ:
                decode = {"fn": lambda v: F.FNS[int(v)], "placement": lambda v: F.PLACEMENTS[int(v)]}
                shown = ", ".join(f"{name} {decode.get(name, float)(state[name])!r} (this layer: "
                                  f"{decode.get(name, float)(here[name])!r})" for name in differ)
                raise RuntimeError(f"the state dict's base weight holds a merged update formed with {shown}: "
                                   "load it into a layer built with the same settings (or save it unmerged)")
        if not quantized:
            return None
        adapter = QuantizedAdapter.from_state(quantized)
        # As for lora_A and lora_B unquantized: another rank or size is refused, not loaded
        # (a rank-4 adapter in a rank-8 layer ran with the rank-8 scale, silently).
        want_a, want_b = (self.rank, self.base.in_features), (self.base.out_features, self.rank)
        if (tuple(adapter.A.shape), tuple(adapter.B.shape)) != (want_a, want_b):
            raise RuntimeError(f"size mismatch for the quantized adapter: the state dict's A {tuple(adapter.A.shape)}"
                               f" and B {tuple(adapter.B.shape)}, this layer's A {want_a} and B {want_b}")
        return adapter

    def set_extra_state(self, state: Dict[str, Tensor]) -> None:
        # Through load_state_dict the state was checked before anything loaded, knowing whether
        # the base weight comes with it (_load_from_state_dict): its adapter is taken as checked.
        checked = self.__dict__.pop("_checked_extra_state", None)
        adapter = checked[1] if checked is not None and checked[0] is state else self._check_loadable(state)
        if adapter is not None:
            # Under load_state_dict(assign=True) the base may still be on the meta device here
            # (children load after their parent): the adapter then keeps the state's device and
            # follows the base once it has loaded (_quantized_follows_base).
            device = self.base.weight.device
            self.quantized = adapter if device.type == "meta" else adapter.to(device)
        self.merged = bool(state.get("merged", False))
        self._original_weight = None  # the loaded weight is the truth; unmerge() subtracts the update

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # An adapter-only state (no base weight: peft-style adapter loading with strict=False)
        # keeps this layer's own base weight, which is merged or not as this layer says: the
        # update is taken out before the new adapter loads and folded back after, instead of
        # the flag being overwritten while the old update stays in the weight (applied twice).
        # Only for a state that has this layer's adapter: a state that does not mention the
        # layer at all (a head-only checkpoint) leaves it untouched.
        own = [prefix + key for key in ("lora_A", "lora_B", "_extra_state")]
        adapter_only = prefix + "base.weight" not in state_dict and any(key in state_dict for key in own)
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):  # refused before lora_A and lora_B are overwritten
            self.__dict__["_checked_extra_state"] = (extra, self._check_loadable(extra, with_base=not adapter_only))
        was_merged = self.merged
        if adapter_only and was_merged:
            self.unmerge()
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
        except Exception:
            if adapter_only and was_merged:  # a refused state leaves the layer as it was
                self.merge()
            raise
        finally:
            self.__dict__.pop("_checked_extra_state", None)  # set_extra_state took it, or was not reached
        # State dicts saved before the extra state existed: an unmerged, unquantized layer. A
        # state that does not mention the layer at all says nothing about it (torch reports
        # the key missing even under strict=False, which it filters later).
        has_base = prefix + "base.weight" in state_dict
        if (prefix + "_extra_state" in missing_keys and self.quantized is None
                and (has_base or any(key in state_dict for key in own))):
            missing_keys.remove(prefix + "_extra_state")
            if has_base:
                self.merged, self._original_weight = False, None
        if adapter_only:
            saved_flag = prefix + "_extra_state" in state_dict
            wanted = self.merged if saved_flag else was_merged
            self.merged = False  # this layer's base weight holds no update at this point
            if wanted:
                self.merge()

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if self.quantized is not None:  # codes and tables take the conversion's device, never its dtype
            self.quantized = self.quantized.converted(fn)
        return module

    def extra_repr(self) -> str:
        return (f"in_features={self.base.in_features}, out_features={self.base.out_features}, rank={self.rank}, "
                f"fn={self.fn}, omega={self.omega:g}, scale={self.scale:g}, placement={self.placement}, "
                f"dropout={getattr(self.lora_dropout, 'p', 0.0):g}, "
                f"merged={self.merged}, quantized={self.quantized is not None}")


def _quantized_follows_base(layer: nn.Module, incompatible_keys) -> None:
    """After a load (the base's included): a loaded quantized adapter on the base's device."""
    assert isinstance(layer, BoundedLoRALinear)  # registered by its __init__
    quantized, device = layer.quantized, layer.base.weight.device
    if quantized is not None and quantized.device_tensor().device != device:
        layer.quantized = quantized.to(device)


class SineLoRALinear(BoundedLoRALinear):
    """Sine LoRA (Ji et al., ICLR 2025): W = W0 + alpha / rank / g * sin(omega B A), with
    g = sqrt(K_in) by default (``gain="sqrt_in"``, as in the authors' code)."""

    def __init__(self, base: nn.Linear, rank: int, omega: float, alpha: Optional[float] = None,
                 gain: Union[float, str] = "sqrt_in", dropout: float = 0.0,
                 adapter_dtype: Optional[torch.dtype] = None):
        super().__init__(base, rank, fn="sin", omega=omega, alpha=alpha, placement="weight", gain=gain,
                         dropout=dropout, adapter_dtype=adapter_dtype)


def _adapter_dtype(requested: Optional[torch.dtype], base_dtype: torch.dtype) -> torch.dtype:
    """The adapter's dtype: ``requested`` when the op takes it over ``base_dtype``; by default
    the base's opmath dtype (float32 over a half base, else the base's own)."""
    if requested is None:
        return opmath_dtype(base_dtype)
    allowed = F.factor_dtypes(base_dtype)
    if not isinstance(requested, torch.dtype) or requested not in allowed:
        names = " or ".join(str(d) for d in allowed)
        raise TypeError(f"adapter_dtype must be {names} over a {base_dtype} base, got {requested!r}")
    return requested
