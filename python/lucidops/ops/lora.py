"""Sine and bounded LoRA linear layers (methods.md sections 3, 4, 5) as custom ops.

    lucidops.ops.sine_lora_linear(x, weight, lora_A, lora_B, bias=None, *, omega, scale)
        = x (weight + scale sin(omega lora_B @ lora_A))^T + bias
    lucidops.ops.bounded_lora_linear(x, weight, lora_A, lora_B, bias=None, *, fn="sin",
                                     omega=1.0, scale, placement="weight")
        placement "weight": as above with fn in {"sin", "tanh"}
        placement "output": x weight^T + scale fn(omega (x lora_A^T) lora_B^T) + bias

Both are ``torch.ops.lucidops.bounded_lora_linear(x, weight, A, B, bias, fn, placement,
omega, scale)`` on 2-D x (the wrappers flatten leading dims), with the backward op
``torch.ops.lucidops.bounded_lora_linear_backward(grad, x, weight, A, B, fn, placement,
omega, scale, need_x, need_weight, need_bias, need_lora)`` returning (dx, dweight, dbias,
dA, dB), each an empty (0,) tensor when not needed: a frozen weight or bias costs nothing.

Only x, weight, A and B are saved for backward, by every backend: the N_out x K_in
update is rebuilt (cpp; triton above 128 rows, in column chunks) or regenerated tile by
tile (triton up to 128 rows) when needed, never kept.

``lora_A`` may be a :class:`lucidops.quant.QuantizedAdapter` (with ``lora_B=None``); the
bounded fn is applied after dequantization (methods.md 4), s fn(omega Q(B) Q(A)). With
placement "weight" the call goes to ``torch.ops.lucidops.bounded_lora_linear_quant(x,
weight, A_codes, A_t0, A_t1, B_codes, B_t0, B_t1, bias, method, group_A, group_B, fn,
omega, scale)`` (the adapter's :meth:`~lucidops.quant.QuantizedAdapter.kernel_tensors`,
whose tables decode the factors divided by powers of two; omega arrives multiplied by
:meth:`~lucidops.quant.QuantizedAdapter.phase_multiplier`, which undoes that exactly):
its triton backend dequantizes tiles of A and B in the kernel prologue, forward and dx
alike, so the dequantized factors never reach global memory (nor the update, up to 128
rows; above, its column chunks do, as for plain factors); its
reference and cpp backends dequantize in PyTorch (in float32, float64 for float64 x, as the
kernel does) and run the plain paths.
``backends.last_used("bounded_lora_linear_quant")`` names the one that ran. The adapter
is frozen: x, weight and bias get gradients, A and B none. Placement "output" dequantizes
in PyTorch on every backend, in float32 (float64 for float64 x), and calls the plain op.

The plain op takes A and B in x's dtype, or in float32 under a float16/bfloat16 x (peft's
float32 adapters over a half base; :func:`factor_dtypes`): the phase is then formed from
the factors unrounded, and dA, dB come back in float32.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple, Union, cast

import torch
from torch import Tensor

from .. import _autocast, _validate, backends
from .._dtypes import HALF_DTYPES, opmath_dtype
from ..profile import flops as _flops
from ..reference import lora as _reference
from . import _eager, _functorch, _vmap
from . import _lora_backends  # noqa: F401  (importing it registers the backends)

if TYPE_CHECKING:  # lucidops.quant imports this module
    from ..quant.adapters import QuantizedAdapter

FNS = _reference.FNS
PLACEMENTS = _reference.PLACEMENTS


def resolve_gain(gain: Union[float, str, Tensor], k_in: int) -> float:
    """The divisor of a LoRA scale: ``"sqrt_in"`` (sqrt(K_in), sine LoRA's) or a finite number > 0."""
    if gain == "sqrt_in":
        return math.sqrt(k_in)
    if isinstance(gain, str):
        raise ValueError(f"gain must be a positive number or 'sqrt_in', got {gain!r}")
    return _validate.real_number(gain, "gain", "> 0", tensor_ok=True)


def dropout_input(dropout: torch.nn.Module, x: Tensor) -> Optional[Tensor]:
    """``dropout(x)`` for ``adapter_input`` when ``dropout`` (peft's ``lora_dropout``) drops
    anything now, a training ``nn.Dropout`` with p > 0; else None (the adapter reads x)."""
    if isinstance(dropout, torch.nn.Dropout) and dropout.training and dropout.p > 0:
        return dropout(x)
    return None


# --------------------------------------------------------------------------- factor dtypes

def factor_dtypes(x_dtype: torch.dtype) -> Tuple[torch.dtype, ...]:
    """The dtypes the plain op takes for A and B (both the same): x's, and float32 under a
    half x, the way peft keeps adapters over a half base (``autocast_adapter_dtype``): the
    op forms the phase omega B A from them unrounded, as it promises."""
    return (x_dtype, torch.float32) if x_dtype in HALF_DTYPES else (x_dtype,)


def resolve_factor_dtype(x_dtype: torch.dtype, a_dtype: torch.dtype, b_dtype: torch.dtype) -> torch.dtype:
    """The dtype to give A and B for x of ``x_dtype`` when they may be cast (an autocast
    region, the peft patch): theirs when the op takes it, else x's opmath dtype (float32
    under a half x), which holds any half factor exactly. Never a cast down to x's half
    dtype, which would round the factors before the phase."""
    if a_dtype == b_dtype and a_dtype in factor_dtypes(x_dtype):
        return a_dtype
    return opmath_dtype(x_dtype)


def _factors_in_region(x: Tensor, lora_A, lora_B):
    """(A, B) inside an autocast region for x's device, x already in the region's dtype: cast
    by :func:`resolve_factor_dtype` (autocast's own rule, the region's dtype, would round
    float32 factors to it). Float64 factors, like autocast's, are left alone; outside a
    region nothing is cast."""
    in_region = _autocast.region_dtype(x.device.type) is not None and x.dtype in HALF_DTYPES
    if not in_region or not all(isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
                                for t in (lora_A, lora_B)):
        return lora_A, lora_B
    dtype = resolve_factor_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    return lora_A.to(dtype), lora_B.to(dtype)


# --------------------------------------------------------------------------- custom ops

def _check_fn_and_placement(fn: str, placement: str) -> None:
    """In the custom ops too, which are callable as torch.ops.lucidops.*: the cpp backend read
    any fn but "sin" as tanh and any placement but "weight" as "output"."""
    if fn not in FNS:
        raise ValueError(f"fn must be one of {FNS}, got {fn!r}")
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")


@_eager.custom_op("lucidops::bounded_lora_linear")
def _lora_op(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor], fn: str,
             placement: str, omega: float, scale: float) -> Tensor:
    _check_fn_and_placement(fn, placement)
    return backends.dispatch("bounded_lora_linear", x.device.type, x, weight, lora_A, lora_B, bias, fn, placement,
                             omega, scale)


@_lora_op.register_fake
def _(x, weight, lora_A, lora_B, bias, fn, placement, omega, scale):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _unaliased(out, inputs) -> Tuple[Tensor, ...]:
    """``out`` with no tensor aliasing one of ``inputs`` or another output: custom ops may
    not return aliases (a no-op ``.to()``, a shared empty tensor), so fresh empties, and
    clones where storage is shared."""
    taken = {t.untyped_storage().data_ptr() for t in inputs if t.numel() > 0}
    result = []
    for t in out:
        if t.numel() == 0:
            t = t.new_empty(t.shape)
        elif t._base is not None or t.untyped_storage().data_ptr() in taken:
            t = t.clone(memory_format=torch.contiguous_format)
        if t.numel() > 0:
            taken.add(t.untyped_storage().data_ptr())
        result.append(t)
    return tuple(result)


@_eager.custom_op("lucidops::bounded_lora_linear_backward")
def _lora_backward_op(grad: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, fn: str,
                      placement: str, omega: float, scale: float, need_x: bool, need_weight: bool, need_bias: bool,
                      need_lora: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_fn_and_placement(fn, placement)
    out = backends.dispatch("bounded_lora_linear_backward", x.device.type, grad, x, weight, lora_A, lora_B, fn,
                            placement, omega, scale, need_x, need_weight, need_bias, need_lora)
    # _unaliased keeps the length of the backend's 5-tuple
    return cast(Tuple[Tensor, Tensor, Tensor, Tensor, Tensor], _unaliased(out, (grad, x, weight, lora_A, lora_B)))


@_lora_backward_op.register_fake
def _(grad, x, weight, lora_A, lora_B, fn, placement, omega, scale, need_x, need_weight, need_bias, need_lora):
    def maybe(needed, like):
        return like.new_empty(like.shape) if needed else x.new_empty(0)

    return (maybe(need_x, x), maybe(need_weight, weight), weight.new_empty((weight.shape[0],)) if need_bias
            else x.new_empty(0), maybe(need_lora, lora_A), maybe(need_lora, lora_B))


# vmap: the rows of x are independent, so a batch of inputs (shared weights) folds into the
# rows; batched weights, or the weight, bias and adapter gradients (sums over each example's
# rows), run per example.
_lora_op.register_vmap(_vmap.fold_first_argument(_lora_op))


@_lora_backward_op.register_vmap
def _(info, in_dims, grad, x, weight, lora_A, lora_B, fn, placement, omega, scale, need_x, need_weight, need_bias,
      need_lora):
    args = (grad, x, weight, lora_A, lora_B, fn, placement, omega, scale, need_x, need_weight, need_bias, need_lora)
    if _vmap.batched_only(in_dims, [0, 1]) and not (need_weight or need_bias or need_lora):
        n = info.batch_size
        return _vmap.unfold_all(_lora_backward_op(_vmap.fold(grad, in_dims[0], n), _vmap.fold(x, in_dims[1], n),
                                                  *args[2:]), n)
    return _vmap.per_example(_lora_backward_op, info, in_dims, args)


def _setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, fn, placement, omega, scale = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B)
    ctx.args = (fn, placement, omega, scale)


def _backward(ctx, grad):
    x, weight, lora_A, lora_B = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    gx, gw, gbias, ga, gb = _lora_backward(grad.contiguous(), x, weight, lora_A, lora_B, *ctx.args, bool(need_x),
                                              bool(need_w), bool(need_bias), bool(need_a or need_b))
    return (gx if need_x else None, gw if need_w else None, ga if need_a else None, gb if need_b else None,
            gbias if need_bias else None, None, None, None, None)


_lora = _functorch.differentiable(_lora_op, _backward, _setup_context)
_lora_backward = _functorch.first_order_only(_lora_backward_op)


@_eager.custom_op("lucidops::bounded_lora_linear_quant")
def _quant_op(x: Tensor, weight: Tensor, a_codes: Tensor, a_t0: Tensor, a_t1: Tensor, b_codes: Tensor, b_t0: Tensor,
              b_t1: Tensor, bias: Optional[Tensor], method: str, group_a: int, group_b: int, fn: str, omega: float,
              scale: float) -> Tensor:
    _check_fn_and_placement(fn, "weight")
    return backends.dispatch("bounded_lora_linear_quant", x.device.type, x, weight, a_codes, a_t0, a_t1, b_codes,
                             b_t0, b_t1, bias, method, group_a, group_b, fn, omega, scale)


@_quant_op.register_fake
def _(x, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, bias, method, group_a, group_b, fn, omega, scale):
    return x.new_empty((x.shape[0], weight.shape[0]))


@_eager.custom_op("lucidops::bounded_lora_linear_quant_backward")
def _quant_backward_op(grad: Tensor, x: Tensor, weight: Tensor, a_codes: Tensor, a_t0: Tensor, a_t1: Tensor,
                       b_codes: Tensor, b_t0: Tensor, b_t1: Tensor, method: str, group_a: int, group_b: int, fn: str,
                       omega: float, scale: float, need_x: bool, need_weight: bool,
                       need_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    _check_fn_and_placement(fn, "weight")
    out = backends.dispatch("bounded_lora_linear_quant_backward", x.device.type, grad, x, weight, a_codes, a_t0,
                            a_t1, b_codes, b_t0, b_t1, method, group_a, group_b, fn, omega, scale, need_x,
                            need_weight, need_bias)
    # _unaliased keeps the length of the backend's 3-tuple
    return cast(Tuple[Tensor, Tensor, Tensor], _unaliased(out, (grad, x, weight)))


@_quant_backward_op.register_fake
def _(grad, x, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, method, group_a, group_b, fn, omega, scale, need_x,
      need_weight, need_bias):
    return (x.new_empty(x.shape) if need_x else x.new_empty(0),
            weight.new_empty(weight.shape) if need_weight else x.new_empty(0),
            weight.new_empty((weight.shape[0],)) if need_bias else x.new_empty(0))


_quant_op.register_vmap(_vmap.fold_first_argument(_quant_op))


@_quant_backward_op.register_vmap
def _(info, in_dims, grad, x, *rest):
    need_weight, need_bias = rest[-2:]
    if _vmap.batched_only(in_dims, [0, 1]) and not (need_weight or need_bias):
        n = info.batch_size
        return _vmap.unfold_all(_quant_backward_op(_vmap.fold(grad, in_dims[0], n), _vmap.fold(x, in_dims[1], n),
                                                   *rest), n)
    return _vmap.per_example(_quant_backward_op, info, in_dims, (grad, x, *rest))


def _quant_setup_context(ctx, inputs, output):
    x, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, bias, method, group_a, group_b, fn, omega, scale = inputs
    ctx.save_for_backward(x, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1)
    ctx.args = (method, group_a, group_b, fn, omega, scale)


def _backward_quant(ctx, grad):
    x, weight, *adapter = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[:2]
    need_bias = ctx.needs_input_grad[8]
    gx, gw, gbias = _quant_backward(grad.contiguous(), x, weight, *adapter, *ctx.args, bool(need_x), bool(need_w),
                                       bool(need_bias))
    # The quantized adapter is frozen: no gradient for its codes or side data.
    return (gx if need_x else None, gw if need_w else None, None, None, None, None, None, None,
            gbias if need_bias else None, None, None, None, None, None, None)


_quant = _functorch.differentiable(_quant_op, _backward_quant, _quant_setup_context)
_quant_backward = _functorch.first_order_only(_quant_backward_op)


# --------------------------------------------------------------------------- FLOP formulas

def _dims(x_shape, weight_shape, a_shape):
    m, k = int(x_shape[0]), int(x_shape[1])
    return m, k, int(weight_shape[0]), int(a_shape[0])


def forward_flops(x_shape, weight_shape, a_shape, b_shape, bias_shape, fn, placement, *_, **__) -> int:
    """Multiplies and adds counted separately, each fn/fn' evaluation as one FLOP."""
    m, k, n, r = _dims(x_shape, weight_shape, a_shape)
    bias = m * n if bias_shape is not None else 0
    if placement == "weight":  # B A, then omega*, fn, scale* and W + per element, then the matmul
        return 2 * n * r * k + 4 * n * k + 2 * m * n * k + bias
    return 2 * m * n * k + 2 * m * k * r + 2 * m * r * n + 4 * m * n + bias


def backward_flops(g_shape, x_shape, weight_shape, a_shape, b_shape, fn, placement, omega, scale, need_x,
                   need_weight, need_bias, need_lora, *_, **__) -> int:
    m, k, n, r = _dims(x_shape, weight_shape, a_shape)
    total = m * n if need_bias else 0
    if placement == "weight":
        if need_lora or need_weight:
            total += 2 * m * n * k                       # G = dY^T X
        if need_lora:
            total += 2 * n * r * k + 4 * n * k + 4 * n * r * k  # phase, H = G fn' s omega, dA and dB
        if need_x:
            total += 2 * n * r * k + 4 * n * k + 2 * m * n * k  # W' rebuilt, dX = dY W'
    else:
        if need_lora or need_x:
            total += 2 * m * k * r + 2 * m * r * n + 4 * m * n + 2 * m * n * r  # U, Z, Gz, dU
        if need_lora:
            total += 2 * m * n * r + 2 * m * r * k
        if need_x:
            total += 2 * m * n * k + 2 * m * r * k
        if need_weight:
            total += 2 * m * n * k
    return total


def forward_macs(x_shape, weight_shape, a_shape, b_shape, bias_shape, fn, placement, *_, **__) -> int:
    """The multiply-adds of the forward's matrix products (fvcore counts each once)."""
    m, k, n, r = _dims(x_shape, weight_shape, a_shape)
    if placement == "weight":  # B A, then x W'^T
        return n * r * k + m * n * k
    return m * n * k + m * k * r + m * r * n  # x W^T, x A^T, (x A^T) B^T


def quant_forward_flops(x_shape, weight_shape, a_shape, a_t0_shape, a_t1_shape, b_shape, b_t0_shape, b_t1_shape,
                        bias_shape, method, *_, **__) -> int:
    """The weight placement's count plus the dequantization (code * scale + minimum per
    element for "uniform"; a table lookup, no FLOP, for "kmeans")."""
    m, k, n, r = _dims(x_shape, weight_shape, a_shape)
    dequant = 2 * (r * k + n * r) if method == "uniform" else 0
    return forward_flops(x_shape, weight_shape, a_shape, b_shape, bias_shape, "sin", "weight") + dequant


def quant_forward_macs(x_shape, weight_shape, a_shape, *_, **__) -> int:
    m, k, n, r = _dims(x_shape, weight_shape, a_shape)
    return n * r * k + m * n * k


def quant_backward_flops(g_shape, x_shape, weight_shape, a_shape, a_t0_shape, a_t1_shape, b_shape, b_t0_shape,
                         b_t1_shape, method, group_a, group_b, fn, omega, scale, need_x, need_weight, need_bias,
                         *_, **__) -> int:
    m, k, n, r = _dims(x_shape, weight_shape, a_shape)
    total = m * n if need_bias else 0
    if need_weight:
        total += 2 * m * n * k
    if need_x:
        total += 2 * n * r * k + 4 * n * k + 2 * m * n * k + (2 * (r * k + n * r) if method == "uniform" else 0)
    return total


_flops.register(torch.ops.lucidops.bounded_lora_linear, forward_flops, macs=forward_macs)
_flops.register(torch.ops.lucidops.bounded_lora_linear_backward, backward_flops)
_flops.register(torch.ops.lucidops.bounded_lora_linear_quant, quant_forward_flops, macs=quant_forward_macs)
_flops.register(torch.ops.lucidops.bounded_lora_linear_quant_backward, quant_backward_flops)


# --------------------------------------------------------------------------- wrappers

Number = Union[float, int, Tensor]


def _validate_base(x, weight, bias, fn, placement):
    """x, weight, bias, fn and placement (everything but the adapter)."""
    _validate.floating_tensor(x, "x")
    _validate.floating_tensor(weight, "weight")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension (..., K_in), got a 0-d tensor")
    n_out, k_in = weight.shape
    if x.shape[-1] != k_in:
        raise ValueError(f"x's last dimension ({x.shape[-1]}) must equal weight's K_in ({k_in})")
    if k_in == 0:  # an adapter over no input features: nothing to adapt (and rows of x cannot be counted)
        raise ValueError(f"weight's K_in (its second size) must be >= 1, got shape {tuple(weight.shape)}")
    if bias is not None:
        _validate.floating_tensor(bias, "bias")
        if tuple(bias.shape) != (n_out,):
            raise ValueError(f"bias must have shape (N_out={n_out},), got {tuple(bias.shape)}")
    for value, name in ((weight, "weight"), (bias, "bias")):
        if value is None:
            continue
        _validate.same_device(value, x, name, "x")
        if value.dtype != x.dtype:
            raise TypeError(f"{name} must have x's dtype ({x.dtype}), got {value.dtype}")
    _check_fn_and_placement(fn, placement)


def _validate_args(x, weight, lora_A, lora_B, bias, fn, placement):
    """Everything _validate_base checks, then plain (unquantized) factors A and B."""
    _validate_base(x, weight, bias, fn, placement)
    n_out, k_in = weight.shape
    for value, name in ((lora_A, "lora_A"), (lora_B, "lora_B")):
        _validate.floating_tensor(value, name)
        if value.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(value.shape)}")
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A must have rank r >= 1 rows, got shape {tuple(lora_A.shape)}")
    if lora_A.shape[1] != k_in:
        raise ValueError(f"lora_A must have shape (r, K_in={k_in}), got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (n_out, r):
        raise ValueError(f"lora_B must have shape (N_out={n_out}, r={r}), got {tuple(lora_B.shape)}")
    for value, name in ((lora_A, "lora_A"), (lora_B, "lora_B")):
        _validate.same_device(value, x, name, "x")
        if value.dtype not in factor_dtypes(x.dtype):
            also = " or float32" if x.dtype in HALF_DTYPES else ""
            raise TypeError(f"{name} must have x's dtype ({x.dtype}){also}, got {value.dtype}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share one dtype, got {lora_A.dtype} and {lora_B.dtype}")


def _resolve_adapter(x: Tensor, lora_A, lora_B, omega):
    """(A, B, omega) for the plain op: a QuantizedAdapter's factors are dequantized in
    float32 (float64 for float64 x), the phase's precision, without their power-of-two
    exponents, which move into omega (omega B A = omega 2^(e_A + e_B) B' A')."""
    from ..quant.adapters import QuantizedAdapter

    if isinstance(lora_A, QuantizedAdapter):
        if lora_B is not None and lora_B is not lora_A:
            raise ValueError("lora_B must be None when lora_A is a QuantizedAdapter (it holds both factors)")
        if isinstance(x, Tensor):
            _validate.same_device(lora_A.device_tensor(), x, "lora_A", "x")
        dtype = opmath_dtype(x.dtype) if isinstance(x, Tensor) else None
        a, b = lora_A.dequantize(dtype=dtype, normalized=True)
        return a, b, _folded_omega(omega, lora_A)
    if isinstance(lora_B, QuantizedAdapter):
        raise TypeError("pass a QuantizedAdapter as lora_A (with lora_B=None), not as lora_B")
    return lora_A, lora_B, omega


def _folded_omega(omega, adapter) -> float:
    """omega times the adapter's phase multiplier 2^(e_A + e_B), checked to stay a float32."""
    omega = _validate.real_number(omega, "omega", tensor_ok=True) * adapter.phase_multiplier()
    if not abs(omega) <= torch.finfo(torch.float32).max:
        raise ValueError(f"lora_A (QuantizedAdapter): omega times the factors' power-of-two exponents, {omega!r}, "
                         "overflows float32 (the factors are too large for the phase omega B A)")
    return omega


def _within_float32(value: float, name: str, x) -> float:
    """A finite omega or scale that also fits the float32 the kernels form the phase and the
    update in for inputs other than float64: omega = 1e39 became inf there, and sin(inf) or
    inf * 0 NaN, silently (float64 inputs keep it)."""
    if isinstance(x, Tensor) and x.dtype != torch.float64 and not abs(value) <= torch.finfo(torch.float32).max:
        raise ValueError(f"{name} = {value!r} overflows float32, in which the update is formed for {x.dtype} "
                         "inputs: pass float64 tensors, or a smaller value")
    return value


def _quantized_weight_linear(x: Tensor, weight: Tensor, adapter, lora_B, bias: Optional[Tensor], fn: str,
                             omega, scale) -> Tensor:
    """Placement "weight" with a QuantizedAdapter: the codes go to the kernels as they are."""
    if lora_B is not None and lora_B is not adapter:
        raise ValueError("lora_B must be None when lora_A is a QuantizedAdapter (it holds both factors)")
    _validate_base(x, weight, bias, fn, "weight")
    omega = _folded_omega(omega, adapter)  # the tables decode A and B divided by powers of two
    scale = _within_float32(_validate.real_number(scale, "scale", tensor_ok=True), "scale", x)
    try:
        a_codes, a_t0, a_t1, group_a, b_codes, b_t0, b_t1, group_b = adapter.kernel_tensors()
    except ValueError as err:
        raise ValueError(f"lora_A (QuantizedAdapter): {err}") from err
    _validate.same_device(a_codes, x, "lora_A", "x")
    n_out, k_in = weight.shape
    r = a_codes.shape[0]
    if r < 1 or a_codes.shape[1] != k_in:
        raise ValueError(f"lora_A (QuantizedAdapter) must quantize an (r >= 1, K_in={k_in}) factor A, got "
                         f"{tuple(a_codes.shape)}")
    if tuple(b_codes.shape) != (n_out, r):
        raise ValueError(f"lora_A (QuantizedAdapter) must quantize an (N_out={n_out}, r={r}) factor B, got "
                         f"{tuple(b_codes.shape)}")
    x2 = x.reshape(-1, k_in)
    y = _quant(x2, weight, a_codes, a_t0, a_t1, b_codes, b_t0, b_t1, bias, adapter.A.method, group_a, group_b,
                  fn, omega, scale)
    return y.reshape(*x.shape[:-1], n_out)


def bounded_lora_linear(x: Tensor, weight: Tensor, lora_A: Union[Tensor, QuantizedAdapter],
                        lora_B: Optional[Tensor] = None, bias: Optional[Tensor] = None, *, fn: str = "sin",
                        omega: Number = 1.0, scale: Number,
                        placement: str = "weight", adapter_input: Optional[Tensor] = None) -> Tensor:
    """Linear layer with a bounded low-rank adapter, without materialising the update for backward.

    Args:
        x: (..., K_in) input, float16/bfloat16/float32/float64.
        weight: (N_out, K_in) base weight (usually frozen: then it gets no gradient work).
        lora_A: (r, K_in) adapter factor (x's dtype, or float32 under a half x), or a
            :class:`lucidops.quant.QuantizedAdapter`
            (then ``lora_B`` is None, the adapter is frozen, and with placement "weight"
            the triton backend dequantizes it inside the kernels; see the module docs).
        lora_B: (N_out, r) adapter factor.
        bias: optional (N_out,).
        fn: "sin" or "tanh", the bounded function.
        omega: finite frequency, a number or a one-element tensor without grad (the op has
            no gradient for it); the phase omega B A is formed in float32 (float64 for
            float64 inputs) whatever the input dtype.
        scale: finite multiplier of the update (the module passes alpha / r / gain); a
            number or a one-element tensor without grad, like omega.
        placement: "weight" bounds the weight product, scale fn(omega B A); "output"
            bounds the adapter output, scale fn(omega (x A^T) B^T).
        adapter_input: what the adapter reads instead of x, e.g. ``dropout(x)`` as peft's
            ``lora_dropout`` gives it (x's shape, dtype and device); the base still reads x.
            It costs one more matmul of the base's size (see :func:`_with_adapter_input`).
    Returns:
        (..., N_out) tensor in x's dtype. All tensors must share x's device and dtype, except
        that lora_A and lora_B may both be float32 under a float16/bfloat16 x (their
        gradients are then float32). Inside ``torch.autocast`` x, weight and bias take the
        region's dtype and the factors :func:`resolve_factor_dtype`'s (float32 ones stay).
    """
    from ..quant.adapters import QuantizedAdapter

    x, weight, bias = _autocast.lower_precision(x, weight, bias)  # as for linear
    if isinstance(x, Tensor):
        lora_A, lora_B = _factors_in_region(x, lora_A, lora_B)
    if adapter_input is not None:
        return _with_adapter_input(x, adapter_input, weight, lora_A, lora_B, bias, fn, omega, scale, placement)
    if isinstance(lora_A, QuantizedAdapter) and placement == "weight":
        return _quantized_weight_linear(x, weight, lora_A, lora_B, bias, fn, omega, scale)
    lora_A, lora_B, omega = _resolve_adapter(x, lora_A, lora_B, omega)
    _validate_args(x, weight, lora_A, lora_B, bias, fn, placement)
    omega = _within_float32(_validate.real_number(omega, "omega", tensor_ok=True), "omega", x)
    scale = _within_float32(_validate.real_number(scale, "scale", tensor_ok=True), "scale", x)
    x2 = x.reshape(-1, x.shape[-1])
    y = _lora(x2, weight, lora_A, lora_B, bias, fn, placement, omega, scale)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def sine_lora_linear(x: Tensor, weight: Tensor, lora_A: Union[Tensor, QuantizedAdapter],
                     lora_B: Optional[Tensor] = None, bias: Optional[Tensor] = None, *, omega: Number, scale: Number,
                     adapter_input: Optional[Tensor] = None) -> Tensor:
    """Sine LoRA (Ji et al., ICLR 2025): x (weight + scale sin(omega lora_B @ lora_A))^T + bias.

    ``scale`` is the whole multiplier (alpha / r / g with g = sqrt(K_in) in the authors'
    code). Arguments as for :func:`bounded_lora_linear`.
    """
    return bounded_lora_linear(x, weight, lora_A, lora_B, bias, fn="sin", omega=omega, scale=scale,
                               placement="weight", adapter_input=adapter_input)


def _with_adapter_input(x: Tensor, adapter_input: Tensor, weight: Tensor, lora_A, lora_B, bias, fn: str, omega,
                        scale, placement: str) -> Tensor:
    """The layer with the adapter reading ``adapter_input`` (u) and the base reading x:

        x W^T + bias + adapter(u)  =  op(u) + (x - u) W^T,

    since op(u) = u W^T + bias + adapter(u) in both placements. The op itself stays one fused
    call (its contract and kernels unchanged), and the second term is one plain matmul: for
    placement "weight" the naive formulation's x W^T + u (scale fn(omega B A))^T also makes two
    of that size."""
    _validate.floating_tensor(x, "x")
    _validate.floating_tensor(adapter_input, "adapter_input")
    (adapter_input,) = _autocast.lower_precision(adapter_input)
    if adapter_input.shape != x.shape:
        raise ValueError(f"adapter_input must have x's shape {tuple(x.shape)}, got {tuple(adapter_input.shape)}")
    if adapter_input.dtype != x.dtype:
        raise TypeError(f"adapter_input must have x's dtype ({x.dtype}), got {adapter_input.dtype}")
    _validate.same_device(adapter_input, x, "adapter_input", "x")
    y = bounded_lora_linear(adapter_input, weight, lora_A, lora_B, bias, fn=fn, omega=omega, scale=scale,
                            placement=placement)
    return y + torch.nn.functional.linear(x - adapter_input, weight)
