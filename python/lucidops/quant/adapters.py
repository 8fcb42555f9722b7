"""Quantized LoRA adapters (methods.md section 4, "SineLoRA-Delta").

Parties that share a base model exchange adapters quantized to a few bits; the bounded
function is applied *after* dequantization, Delta W = s sin(omega Q(B) Q(A)), so the
sine's rank gain survives quantization. Two quantizers of each factor (A and B alike):

- ``"uniform"``: per-group asymmetric, groups of ``group_size`` consecutive elements of
  the row-major flattened factor; each group stores a scale and a minimum (float16),
  codes are integers in [0, 2^bits - 1].
- ``"kmeans"``: one codebook of 2^bits float16 centroids per factor, fitted by Lloyd's
  1-D k-means started from the uniform grid over the factor's range (deterministic).

Each factor is first divided by a power of two, 2^exponent, that brings its largest
magnitude into [0.5, 1): float16 side data then keeps its full precision whatever the
factor's scale (a B a few steps from its zero start is ~1e-6, where float16 steps are
subnormal; a factor above 65504 would overflow float16). The exponent is exact to undo:
dequantization multiplies by it, and the fused kernels fold 2^(exponent_A + exponent_B)
into omega, since omega B A = (omega 2^(e_A + e_B)) B' A'.

Sizes are reported for codes packed at ``bits`` bits (how the adapter is shipped); in
memory the codes are held one per uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from .. import _validate
from .._typing import DeviceLike

METHODS = ("uniform", "kmeans")
_FLOAT16_TINIEST = 2.0 ** -24  # the smallest positive (subnormal) float16
# The encodings of a factor's dtype and of the stats in QuantizedTensor.state / QuantizedAdapter.state.
_STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_EXPONENT_BYTES = 2  # shipped as an int16 (a float64 factor's exponent can exceed int8)
_STAT_KEYS = ("bytes", "full_precision_bytes", "compression", "rel_err_A", "rel_err_B", "rel_err_update")


@dataclass
class QuantizedTensor:
    """One quantized factor: codes plus either per-group (scale, minimum) or a codebook."""

    codes: Tensor                  # uint8, flattened (numel,)
    shape: torch.Size
    dtype: torch.dtype             # the original dtype
    bits: int
    method: str
    group_size: int = 0
    scales: Optional[Tensor] = None   # float16 (groups,), uniform only
    minimums: Optional[Tensor] = None  # float16 (groups,), uniform only
    codebook: Optional[Tensor] = None  # float16 (2^bits,), kmeans only
    exponent: int = 0                  # the factor is (what the tables decode) * 2^exponent
    _padded_book: Optional[tuple] = field(default=None, init=False, repr=False, compare=False)

    def dequantize(self, dtype: Optional[torch.dtype] = None, normalized: bool = False) -> Tensor:
        """The reconstructed factor, in ``dtype`` (default: the original dtype); with
        ``normalized``, divided by 2^exponent (what the tables decode, largest magnitude
        below 1)."""
        dtype = dtype or self.dtype
        codes = self.codes.long()
        if self.method == "uniform":
            assert self.scales is not None and self.minimums is not None  # set for "uniform"
            # Each code's group by index, nothing padded: a group_size past the factor's size
            # (one group) padded to group_size elements, 40 TB for 10^13.
            group = torch.arange(codes.numel(), device=codes.device) // self.group_size
            values = codes.float() * self.scales.float()[group] + self.minimums.float()[group]
        else:
            assert self.codebook is not None  # a kmeans factor has one
            values = self.codebook.float()[codes]
        if not normalized and self.exponent != 0:
            # In float64: 2^exponent itself may lie outside float32's range (a float32 factor
            # near 3e38 has exponent 128), and float64's own can overflow ldexp at once.
            values = times_power_of_two(values.double(), self.exponent)
        return values.reshape(self.shape).to(dtype)

    def kernel_tensors(self) -> Tuple[Tensor, Tensor, Tensor, int]:
        """What the fused Triton kernels read in place of the factor, nothing dequantized:
        ``(codes, table0, table1, group_size)``.

        codes: the uint8 codes viewed in the factor's 2-D shape (contiguous), so element
        (i, j) is flat index i * cols + j and, for "uniform", belongs to group
        flat // group_size (groups may straddle rows). The tables decode the factor divided
        by 2^exponent; the caller multiplies omega by it (see
        :meth:`QuantizedAdapter.phase_multiplier`). "uniform": table0 = scales,
        table1 = minimums (float16, one per group). "kmeans": table0 = table1 = the
        codebook zero-padded to 256 float16 entries, so every uint8 code indexes inside
        it (group_size is 0). Raises ValueError on an inconsistent layout.
        """
        if len(self.shape) != 2:
            raise ValueError(f"a quantized LoRA factor must be 2-D, got shape {tuple(self.shape)}")
        numel = self.shape[0] * self.shape[1]
        if self.codes.dtype != torch.uint8 or self.codes.numel() != numel:
            raise ValueError(f"codes must be {numel} uint8 values for shape {tuple(self.shape)}, got "
                             f"{self.codes.numel()} {self.codes.dtype}")
        codes = self.codes.contiguous().view(self.shape[0], self.shape[1])
        if self.method == "uniform":
            if self.group_size < 1:
                raise ValueError(f"uniform group_size must be >= 1, got {self.group_size}")
            groups = max(1, math.ceil(numel / self.group_size))
            for t, name in ((self.scales, "scales"), (self.minimums, "minimums")):
                if t is None or t.dtype != torch.float16 or t.numel() != groups or t.device != codes.device:
                    raise ValueError(f"uniform {name} must be {groups} float16 values (one per group of "
                                     f"{self.group_size}) on {codes.device}, got "
                                     f"{None if t is None else (t.numel(), t.dtype, str(t.device))}")
            assert self.scales is not None and self.minimums is not None  # checked just above
            return codes, self.scales.contiguous(), self.minimums.contiguous(), int(self.group_size)
        if self.method != "kmeans":
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        book = self.codebook
        if book is None or book.dtype != torch.float16 or not 1 <= book.numel() <= 256 or book.device != codes.device:
            raise ValueError(f"kmeans codebook must hold 1..256 float16 values on {codes.device}, got "
                             f"{None if book is None else (book.numel(), book.dtype, str(book.device))}")
        if _validate.is_compiling():  # traced: no Python-side cache keyed on storage
            padded = torch.nn.functional.pad(book.reshape(-1), (0, 256 - book.numel()))
            return codes, padded, padded, 0
        # Cached: the padding is a copy, and serving calls this on every forward.
        key = (book.data_ptr(), book._version, book.numel())
        if self._padded_book is None or self._padded_book[0] != key:
            padded = torch.zeros(256, dtype=torch.float16, device=book.device)
            padded[:book.numel()] = book.reshape(-1)
            self._padded_book = (key, padded)
        padded = self._padded_book[1]
        return codes, padded, padded, 0

    def state(self) -> Dict[str, Tensor]:
        """A flat dict of tensors (what ``torch.load(weights_only=True)`` reads and torch.jit's
        tracer, under fvcore, accepts as module state): the data, and the metadata as int64."""
        out = {"codes": self.codes, "shape": torch.tensor(list(self.shape), dtype=torch.int64),
               "dtype": torch.tensor(_STATE_DTYPES.index(self.dtype)), "bits": torch.tensor(self.bits),
               "method": torch.tensor(METHODS.index(self.method)), "group_size": torch.tensor(self.group_size),
               "exponent": torch.tensor(self.exponent)}
        for name in ("scales", "minimums", "codebook"):
            table = getattr(self, name)
            if table is not None:
                out[name] = table
        return out

    @classmethod
    def from_state(cls, state: Dict[str, Tensor]) -> "QuantizedTensor":
        return cls(codes=state["codes"], shape=torch.Size(state["shape"].tolist()),
                   dtype=_STATE_DTYPES[int(state["dtype"])], bits=int(state["bits"]),
                   method=METHODS[int(state["method"])], group_size=int(state["group_size"]),
                   scales=state.get("scales"), minimums=state.get("minimums"), codebook=state.get("codebook"),
                   exponent=int(state.get("exponent", 0)))  # states saved before the exponent: 0

    @property
    def packed_bytes(self) -> int:
        """Bytes when shipped: codes packed at ``bits`` bits plus float16 side data and the
        int16 exponent."""
        side = _EXPONENT_BYTES
        for t in (self.scales, self.minimums, self.codebook):
            if t is not None:
                side += t.numel() * t.element_size()
        return math.ceil(self.codes.numel() * self.bits / 8) + side


@dataclass
class QuantizedAdapter:
    """Quantized (A, B) pair accepted by the LoRA ops in place of ``lora_A, lora_B``.

    ``stats`` holds ``bytes`` (packed size), ``full_precision_bytes``, ``compression``,
    ``rel_err_A``, ``rel_err_B`` and ``rel_err_update`` (Frobenius relative error of the
    update: of B A, or of s fn(omega B A) when ``omega`` was given to quantize_adapter).
    """

    A: QuantizedTensor
    B: QuantizedTensor
    stats: Dict[str, float] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def nbytes(self) -> int:
        return self.A.packed_bytes + self.B.packed_bytes

    def device_tensor(self) -> Tensor:
        """One of the adapter's tensors (A's codes), for device checks: all its tables share that device."""
        return self.A.codes

    def phase_multiplier(self) -> float:
        """2^(exponent_A + exponent_B): what the kernels multiply omega by, since their tables
        decode A / 2^exponent_A and B / 2^exponent_B (inf past float64's range, which the ops
        refuse by name)."""
        try:
            return math.ldexp(1.0, self.A.exponent + self.B.exponent)
        except OverflowError:
            return math.inf

    def kernel_tensors(self) -> Tuple[Tensor, Tensor, Tensor, int, Tensor, Tensor, Tensor, int]:
        """A's then B's :meth:`QuantizedTensor.kernel_tensors`, after checking that they agree
        in rank and method (what the fused kernels take; nothing is dequantized)."""
        if self.A.method != self.B.method:
            raise ValueError(f"A and B must share a quantization method, got {self.A.method!r} and {self.B.method!r}")
        if len(self.A.shape) != 2 or len(self.B.shape) != 2 or self.B.shape[1] != self.A.shape[0]:
            raise ValueError(f"quantized A (r, K_in) and B (N_out, r) must agree in r, got {tuple(self.A.shape)} "
                             f"and {tuple(self.B.shape)}")
        return (*self.A.kernel_tensors(), *self.B.kernel_tensors())

    def dequantize(self, dtype: Optional[torch.dtype] = None, normalized: bool = False) -> Tuple[Tensor, Tensor]:
        """(A, B) reconstructed, in ``dtype`` (default: the original dtypes). With
        ``normalized``, each divided by its 2^exponent: B A is then the product divided by
        :meth:`phase_multiplier`, which the ops fold into omega."""
        return self.A.dequantize(dtype, normalized), self.B.dequantize(dtype, normalized)

    def state(self) -> Dict[str, Tensor]:
        """The adapter as a flat dict of tensors ("A.codes", ..., "stats"), for a module's state dict."""
        out = {f"{name}.{k}": v for name, q in (("A", self.A), ("B", self.B)) for k, v in q.state().items()}
        out["stats"] = torch.tensor([float(self.stats.get(k, math.nan)) for k in _STAT_KEYS], dtype=torch.float64)
        return out

    @classmethod
    def from_state(cls, state: Dict[str, Tensor]) -> "QuantizedAdapter":
        def part(name: str) -> QuantizedTensor:
            return QuantizedTensor.from_state({k[len(name) + 1:]: v for k, v in state.items()
                                               if k.startswith(name + ".")})

        stats = {k: float(v) for k, v in zip(_STAT_KEYS, state["stats"].tolist()) if not math.isnan(v)}
        return cls(part("A"), part("B"), stats)

    def to(self, device: DeviceLike) -> "QuantizedAdapter":
        """A copy with every tensor on ``device``."""
        return self.converted(lambda t: t.to(device))

    def converted(self, convert: Callable[[Tensor], Tensor]) -> "QuantizedAdapter":
        """A copy with ``convert`` applied to every tensor (codes and tables), as
        ``nn.Module._apply`` applies its function: ``to_empty``, ``share_memory`` or a device
        move. Only the device is taken from the result: the codes stay uint8 and the tables
        float16, whatever dtype ``convert`` gives (``.double()`` on a module)."""
        def one(t: Tensor) -> Tensor:
            out = convert(t)
            return out if out.dtype == t.dtype else t.to(out.device)

        def move(q: QuantizedTensor) -> QuantizedTensor:
            kw = {k: (one(getattr(q, k)) if getattr(q, k) is not None else None)
                  for k in ("scales", "minimums", "codebook")}
            return QuantizedTensor(codes=one(q.codes), shape=q.shape, dtype=q.dtype, bits=q.bits,
                                   method=q.method, group_size=q.group_size, exponent=q.exponent, **kw)

        return QuantizedAdapter(move(self.A), move(self.B), dict(self.stats))


def times_power_of_two(t: Tensor, exponent: int) -> Tensor:
    """``t`` (float64) times 2^exponent, in two exact steps: 2^exponent alone overflows or
    underflows float64 for the exponents of its largest and subnormal values (|e| > 1022)."""
    first = exponent // 2
    return t * math.ldexp(1.0, first) * math.ldexp(1.0, exponent - first)


def _normalized(t: Tensor) -> Tuple[Tensor, int]:
    """The flattened factor divided by 2^exponent, largest magnitude in [0.5, 1) (float32),
    and the exponent (0 for an all-zero factor). Dividing by a power of two is exact; it is
    done in float64, where 2^-exponent of any float32 factor is a normal number (a float32
    2^129, for a subnormal peak, was inf, and every table inf or NaN)."""
    flat = t.detach().reshape(-1)
    peak = float(flat.abs().max()) if flat.numel() else 0.0
    exponent = math.frexp(peak)[1] if peak > 0 else 0
    return times_power_of_two(flat.double(), -exponent).float(), exponent


def _quantize_uniform(t: Tensor, bits: int, group_size: int) -> QuantizedTensor:
    flat, exponent = _normalized(t)
    n = flat.numel()
    groups = max(1, math.ceil(n / group_size))
    width = min(group_size, max(n, 1))  # a group_size past the factor's size: one group of n, not padding
    # Pad with the group's own last value so padding never widens a group's range.
    padded = torch.empty(groups * width, dtype=torch.float32, device=flat.device)
    padded[:n] = flat
    padded[n:] = flat[-1] if n else 0.0
    g = padded.view(groups, width)
    lo, hi = g.min(dim=1).values, g.max(dim=1).values
    levels = (1 << bits) - 1
    # Round the side data to float16 first, so the codes are chosen for the stored values.
    lo16 = lo.half()
    scale16 = ((hi - lo16.float()) / levels).half()
    # A step below float16's smallest subnormal rounds to 0: take that subnormal instead (the
    # codes still span the group); only a constant group gets scale 1 (every code 0).
    scale16 = torch.where(hi > lo, scale16.clamp_min(_FLOAT16_TINIEST), torch.ones_like(scale16))
    codes = torch.round((g - lo16.float()[:, None]) / scale16.float()[:, None]).clamp_(0, levels)
    return QuantizedTensor(codes=codes.reshape(-1)[:n].to(torch.uint8), shape=t.shape, dtype=t.dtype, bits=bits,
                           method="uniform", group_size=group_size, scales=scale16, minimums=lo16, exponent=exponent)


def _quantize_kmeans(t: Tensor, bits: int, iterations: int = 25) -> QuantizedTensor:
    flat, exponent = _normalized(t)
    k = 1 << bits
    # Start from the uniform grid over [min, max]: Lloyd's steps never raise the squared
    # error, so the result is never worse than a per-factor uniform quantizer (quantile
    # starts crowd the centre and leave the tails to one centroid).
    if flat.numel() > 0:
        centroids = torch.linspace(float(flat.min()), float(flat.max()), k, device=flat.device)
    else:
        centroids = torch.zeros(k, device=flat.device)
    # Cluster sums from prefix sums over the sorted values: deterministic on every device
    # (index_add_ on CUDA adds with atomics, in a different order each run) and in float64.
    ordered = torch.sort(flat).values
    prefix = torch.cat([ordered.new_zeros(1, dtype=torch.float64), ordered.double().cumsum(0)])
    ends = torch.tensor([flat.numel()], device=flat.device)
    for _ in range(iterations):
        centroids, _ = torch.sort(centroids)
        # The values up to each midpoint, as bucketize assigns them (x <= midpoint: lower cluster).
        edges = torch.cat([ends.new_zeros(1), torch.searchsorted(ordered, (centroids[1:] + centroids[:-1]) / 2,
                                                                   right=True), ends])
        counts = edges.diff()
        sums = (prefix[edges[1:]] - prefix[edges[:-1]]).float()
        # An empty cluster keeps its centroid.
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    book = torch.sort(centroids).values.half()
    codes = torch.bucketize(flat, (book[1:].float() + book[:-1].float()) / 2)
    return QuantizedTensor(codes=codes.to(torch.uint8), shape=t.shape, dtype=t.dtype, bits=bits, method="kmeans",
                           codebook=book, exponent=exponent)


def _rel(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| (||a - b|| when b is 0), with both scaled by their largest magnitude
    first: the squares of a float64 factor near 1e200 overflow."""
    a, b = a.double(), b.double()
    diff = a - b
    peak = float(torch.maximum(diff.abs().max(), b.abs().max())) if b.numel() else 0.0
    if not 0 < peak < math.inf:
        return float(diff.norm())
    denom = (b / peak).norm()
    return float((diff / peak).norm() / denom) if denom > 0 else float(diff.norm())


def quantize_adapter(lora_A: Tensor, lora_B: Tensor, bits: int = 4, group_size: int = 64, method: str = "uniform",
                     *, omega: Optional[float] = None, fn: str = "sin") -> QuantizedAdapter:
    """Quantize a LoRA adapter (A (r, K_in), B (N_out, r)) to ``bits`` bits.

    Args:
        bits: 2 to 8.
        group_size: elements per group for "uniform" (ignored by "kmeans"), >= 1.
        method: "uniform" (per-group asymmetric) or "kmeans" (codebook per factor).
        omega, fn: when omega is given, ``stats["rel_err_update"]`` measures the bounded
            update fn(omega B A) (the scale cancels in a relative error); else B A.
    Returns:
        a :class:`QuantizedAdapter`; pass it as ``lora_A`` (with ``lora_B=None``) to the ops.
    """
    _validate.floating_tensor(lora_A, "lora_A")
    _validate.floating_tensor(lora_B, "lora_B")
    if lora_A.dim() != 2 or lora_B.dim() != 2 or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_A (r, K_in) and lora_B (N_out, r) must agree in r, got {tuple(lora_A.shape)} "
                         f"and {tuple(lora_B.shape)}")
    _validate.same_device(lora_B, lora_A, "lora_B", "lora_A")
    if lora_A.device.type == "meta":  # the codes and exponents depend on the values
        raise ValueError("lora_A and lora_B are on the meta device: quantize an adapter with values (load "
                         "them first, or load a quantized state into a layer quantized on a real device)")
    for factor, name in ((lora_A, "lora_A"), (lora_B, "lora_B")):
        if not bool(torch.isfinite(factor.detach()).all()):  # a NaN would spread through its group silently
            raise ValueError(f"{name} must be finite to be quantized, got non-finite values")
    # Python ints from here on: an np.int8(5) kept as given overflowed 1 << bits and the byte count.
    bits = _validate.integer(bits, "bits", minimum=2, maximum=8)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    group_size = _validate.integer(group_size, "group_size", minimum=1)
    if omega is not None:
        omega = _validate.real_number(omega, "omega", tensor_ok=True)
    from ..reference.lora import FNS, bounded

    if fn not in FNS:  # checked with or without omega: a typo is never ignored silently
        raise ValueError(f"fn must be one of {FNS}, got {fn!r}")
    if method == "uniform":
        qa, qb = _quantize_uniform(lora_A, bits, group_size), _quantize_uniform(lora_B, bits, group_size)
    else:
        qa, qb = _quantize_kmeans(lora_A, bits), _quantize_kmeans(lora_B, bits)
    adapter = QuantizedAdapter(qa, qb)
    a_hat, b_hat = adapter.dequantize(torch.float64)
    a64, b64 = lora_A.detach().double(), lora_B.detach().double()
    if omega is None:
        update, update_hat = b64 @ a64, b_hat @ a_hat
    else:
        update, update_hat = bounded(fn, omega * (b64 @ a64)), bounded(fn, omega * (b_hat @ a_hat))
    full = lora_A.numel() * lora_A.element_size() + lora_B.numel() * lora_B.element_size()
    adapter.stats = dict(bytes=adapter.nbytes, full_precision_bytes=full, compression=full / max(adapter.nbytes, 1),
                         rel_err_A=_rel(a_hat, a64), rel_err_B=_rel(b_hat, b64),
                         rel_err_update=_rel(update_hat, update))
    return adapter
