"""Runs the CUDA kernels of csrc/cuda on the CPU, for machines without a GPU.

The .cu sources are compiled by the host C++ compiler against ``cuda_emulation/emulated_cuda.h``
(a fiber per CUDA thread, real barriers for ``__syncthreads`` and the warp collectives); the
only change to the source is that each ``kernel<<<grid, block, shared, stream>>>(args)`` becomes
a call of the emulator's launcher. The result is loaded with ctypes.

``build_bindings`` links the real tensor adapters of ``csrc/bindings.cpp`` against those kernels.
``EmulatedCudaExtension`` offers the same functions written in Python against the raw-pointer
launchers (the tests check that both give bitwise the same results), with checks the real
adapters cannot make: every buffer a kernel gets lies between guard bands that must be intact
after the launch (no write out of bounds), and inputs must be unchanged. Scratch and outputs
start as NaN instead of zeros or garbage, so an element a kernel was meant to write and did
not shows up.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from lucidops import _ext

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = ROOT / "csrc" / "cuda"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
# LUCIDOPS_EMULATION_CFLAGS adds flags, e.g. the sanitizers of tests/sanitize.sh.
FLAGS = ["-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wno-unknown-pragmas",
         *shlex.split(os.environ.get("LUCIDOPS_EMULATION_CFLAGS", ""))]

# kernel<T><<<grid, block, shared, stream>>>(  ->  lucidops_emulation::launcher(kernel<T>, grid, block, shared, stream)(
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>", re.S)

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # launch.h's DType
GUARD = 64  # elements of guard band on each side of every buffer
INT64_SENTINEL = -0x5A5A5A5A5A5A5A5B


def emulable_source(text: str) -> str:
    """The CUDA source with every launch rewritten for the emulator."""
    rewritten, count = LAUNCH.subn(r"lucidops_emulation::launcher(\1, \2)", text)
    if count == 0 or "<<<" in rewritten:
        raise ValueError(f"rewrote {count} launches and {rewritten.count('<<<')} remain")
    return rewritten


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def build(sources: List[Path], name: str) -> ctypes.CDLL:
    """Compiles ``sources`` (.cu ones rewritten) with the emulated runtime into a cached library
    that also exports ``emu_set_schedule_seed``."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) to build the CUDA emulation")
    sources = [*sources, EMULATION / "runtime.cpp"]
    texts = {s.name: (emulable_source(s.read_text()) if s.suffix == ".cu" else s.read_text()) for s in sources}
    digest = hashlib.sha256()
    for path in sorted([*CUDA_SOURCES.glob("*.h"), *EMULATION.rglob("*.h")]):
        digest.update(path.read_bytes())
    for file_name, text in sorted(texts.items()):
        digest.update(file_name.encode() + text.encode())
    digest.update(" ".join([cxx, *FLAGS]).encode())
    folder = _ext.cache_dir() / "cuda-emulation" / f"{name}-{digest.hexdigest()[:16]}"
    library = folder / f"{name}.so"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        files = []
        for file_name, text in texts.items():
            path = folder / (Path(file_name).stem + ".cpp")
            path.write_text(text)
            files.append(str(path))
        partial = folder / f"{name}.{os.getpid()}.so"  # renamed into place: safe with parallel builds
        cmd = [cxx, *FLAGS, f"-I{EMULATION / 'include'}", f"-I{CUDA_SOURCES}", *files, "-o", str(partial)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building the CUDA emulation failed:\n{' '.join(cmd)}\n{done.stderr[-6000:]}")
        os.replace(partial, library)
    return ctypes.CDLL(str(library))


def build_bindings():
    """The CUDA extension module of ``csrc/bindings.cpp`` (its real tensor adapters), built for
    CPU tensors and linked against the emulated kernels. ``cuda_emulation/bindings_on_cpu.h``
    and the c10/cuda stand-ins in ``cuda_emulation/include`` are all that changes."""
    from torch.utils import cpp_extension

    kernels = Path(build(sorted(CUDA_SOURCES.glob("*.cu")), "kernels")._name)
    digest = hashlib.sha256(str(kernels).encode())
    for path in sorted([ROOT / "csrc" / "bindings.cpp", ROOT / "csrc" / "lucidops.h", *CUDA_SOURCES.glob("*.h"),
                        *EMULATION.rglob("*.h")]):
        digest.update(path.read_bytes())
    name = f"lucidops_cuda_emulated_{digest.hexdigest()[:16]}"
    folder = _ext.cache_dir() / "cuda-emulation" / name
    folder.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name, sources=[str(ROOT / "csrc" / "bindings.cpp")], build_directory=str(folder),
        extra_cflags=["-O1", "-DLUCIDOPS_WITH_CUDA", f"-I{EMULATION / 'include'}", f"-I{ROOT / 'csrc'}",
                      "-include", str(EMULATION / "bindings_on_cpu.h")],
        extra_ldflags=[str(kernels), f"-Wl,-rpath,{kernels.parent}"])


# ---------------------------------------------------------------- guarded buffers


class GuardedLaunch:
    """The buffers of one kernel launch, each between guard bands checked afterwards."""

    def __init__(self, what: str):
        self.what = what
        self._buffers: List[Tuple[str, Tensor, Tensor, Optional[Tensor]]] = []  # name, padded, view, original

    @staticmethod
    def _sentinel(dtype: torch.dtype):
        return INT64_SENTINEL if dtype == torch.int64 else float("nan")

    def _padded(self, name: str, numel: int, dtype: torch.dtype, shape, original: Optional[Tensor]) -> Tensor:
        padded = torch.full((numel + 2 * GUARD,), self._sentinel(dtype), dtype=dtype)
        view = padded[GUARD:GUARD + numel].view(shape)
        self._buffers.append((name, padded, view, original))
        return view

    def input(self, name: str, tensor: Tensor) -> int:
        """A pointer to a guarded copy of ``tensor`` (contiguous, as the adapters make it)."""
        view = self._padded(name, tensor.numel(), tensor.dtype, tensor.shape, tensor.detach().clone())
        view.copy_(tensor)
        return view.data_ptr()

    def output(self, name: str, shape, dtype: torch.dtype) -> Tuple[Tensor, int]:
        """A guarded buffer filled with NaN (int64: a sentinel) and a pointer to it."""
        shape = tuple(int(s) for s in shape)
        view = self._padded(name, math.prod(shape), dtype, shape, None)
        return view, view.data_ptr()

    def check(self, error_code: int) -> None:
        if error_code != 0:
            raise RuntimeError(f"{self.what}: the launcher returned cuda error {error_code}")
        for name, padded, view, original in self._buffers:
            bands = torch.cat([padded[:GUARD], padded[-GUARD:]])
            sentinel = torch.full_like(bands, self._sentinel(bands.dtype))
            as_bits = torch.int64 if bands.element_size() == 8 else (torch.int32 if bands.element_size() == 4
                                                                       else torch.int16)
            if not torch.equal(bands.view(as_bits), sentinel.view(as_bits)):
                raise AssertionError(f"{self.what} wrote outside {name}")
            if original is not None and not torch.equal(view.view(as_bits), original.contiguous().view(as_bits)):
                raise AssertionError(f"{self.what} changed its input {name}")


# ---------------------------------------------------------------- the extension's functions


def _bind(lib: ctypes.CDLL, name: str, argtypes) -> None:
    fn = getattr(lib, name)
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int


_P, _I64, _B, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_bool, ctypes.c_int


class EmulatedCudaExtension:
    """The functions of ``lucidops._C_cuda``, on CPU tensors, through the emulated kernels."""

    DEVICE = "cuda (emulated on the CPU)"

    def __init__(self):
        self.lib = build([*sorted(CUDA_SOURCES.glob("*.cu")), EMULATION / "c_api.cpp"], "lucidops_cuda")
        _bind(self.lib, "emu_activation_backward_num_blocks", [_I64])
        _bind(self.lib, "emu_activation_forward", [_INT, _INT, _P, _P, _P, _I64])
        _bind(self.lib, "emu_activation_backward", [_INT, _INT, _P, _P, _P, _P, _P, _B, _I64])
        for name in ("forward_chunks", "backward_splits", "backward_channel_blocks", "gauss_tiles",
                     "phi_backward_blocks"):
            _bind(self.lib, f"emu_gaussian_{name}", [_I64])
        _bind(self.lib, "emu_gaussian_mixture_forward",
              [_INT, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _B, _B, _P, _P, _P, _P, _P])
        _bind(self.lib, "emu_gaussian_mixture_backward_max",
              [_INT, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _B, _P, _P, _P])
        _bind(self.lib, "emu_gaussian_scatter_point_grads", [_INT, _P, _P, _I64, _I64, _I64, _P])
        _bind(self.lib, "emu_gaussian_phi", [_INT, _P, _P, _P, _P, _I64, _I64, _B, _P])
        _bind(self.lib, "emu_gaussian_phi_backward", [_INT, _P, _P, _P, _P, _I64, _I64, _P, _P])
        self.lib.emu_set_schedule_seed.argtypes = [ctypes.c_uint64]
        self.lib.emu_set_schedule_seed.restype = None

    def set_schedule_seed(self, seed: int) -> None:
        """The order of the threads between barriers: 0 runs them in thread order, others shuffle."""
        self.lib.emu_set_schedule_seed(seed)

    # ---- sinc / gaussian activations (csrc/cuda/activations.cu)

    @staticmethod
    def _opmath_sigma(sigma: Tensor, x: Tensor) -> Tensor:
        assert sigma.numel() == 1
        return sigma.reshape(()).to(torch.float64 if x.dtype == torch.float64 else torch.float32)

    def activation_forward(self, x: Tensor, sigma: Tensor, kind: int) -> Tensor:
        run = GuardedLaunch("activation_forward")
        x_ptr = run.input("x", x.contiguous())
        sigma_ptr = run.input("sigma", self._opmath_sigma(sigma, x))
        y, y_ptr = run.output("y", x.shape, x.dtype)
        run.check(self.lib.emu_activation_forward(kind, DTYPE_CODES[x.dtype], x_ptr, sigma_ptr, y_ptr, x.numel()))
        return y.clone()

    def activation_backward(self, grad: Tensor, x: Tensor, sigma: Tensor, kind: int, need_sigma_grad: bool):
        opmath_sigma = self._opmath_sigma(sigma, x)
        blocks = self.lib.emu_activation_backward_num_blocks(x.numel()) if need_sigma_grad else 1
        run = GuardedLaunch("activation_backward")
        ins = [run.input(n, t) for n, t in (("grad", grad.contiguous()), ("x", x.contiguous()),
                                            ("sigma", opmath_sigma))]
        grad_x, grad_x_ptr = run.output("grad_x", x.shape, x.dtype)
        partials, partials_ptr = run.output("sigma_partials", (blocks,), torch.float64)
        if not need_sigma_grad:
            partials.zero_()  # bindings.cpp starts them at zero; the kernel writes them only when asked
        run.check(self.lib.emu_activation_backward(kind, DTYPE_CODES[x.dtype], *ins, grad_x_ptr, partials_ptr,
                                                   need_sigma_grad, x.numel()))
        return grad_x.clone(), partials.sum().to(sigma.dtype)

    # ---- Gaussian point encoder mixture (csrc/cuda/gaussian_mixture.cu)

    @staticmethod
    def _check_params(points: Tensor, means: Tensor, precisions: Tensor, half_widths: Tensor) -> None:
        if points.dtype not in (torch.float32, torch.float64):
            raise RuntimeError("lucidops cuda gaussian kernel: float32 or float64 only")
        G = means.shape[0]
        assert means.shape == (G, 3) and precisions.shape == (G, 6) and half_widths.shape == (G, 3)
        for t in (means, precisions, half_widths):
            assert t.dtype == points.dtype

    def gaussian_mixture_forward(self, points, means, precisions, weight, bias, half_widths, cull, reduce_max):
        self._check_params(points, means, precisions, half_widths)
        B, N, _ = points.shape
        G, K = means.shape[0], weight.shape[0]
        assert N > 0 and weight.shape == (K, G) and bias.shape == (K,)
        dtype = points.dtype
        run = GuardedLaunch("gaussian_mixture_forward")
        ins = [run.input(n, t) for n, t in (("points", points), ("means", means), ("precisions", precisions),
                                            ("half_widths", half_widths), ("weight_t", weight.t().contiguous()),
                                            ("bias", bias))]
        chunks = self.lib.emu_gaussian_forward_chunks(N)
        if reduce_max:
            out, out_ptr = run.output("out", (B, K), dtype)
            argmax, arg_ptr = run.output("argmax", (B, K), torch.int64)
            rows_ptr = None
            part_max_ptr = part_idx_ptr = None
            if chunks > 1:
                _, part_max_ptr = run.output("part_max", (B, chunks, K), dtype)
                _, part_idx_ptr = run.output("part_idx", (B, chunks, K), torch.int64)
        else:
            out, rows_ptr = run.output("rows", (B, N, K), dtype)
            argmax, out_ptr, arg_ptr, part_max_ptr, part_idx_ptr = torch.empty(0, dtype=torch.int64), None, None, None, None
        run.check(self.lib.emu_gaussian_mixture_forward(DTYPE_CODES[dtype], *ins, B, N, G, K, cull, reduce_max,
                                                        rows_ptr, out_ptr, arg_ptr, part_max_ptr, part_idx_ptr))
        return out.clone(), argmax.clone()

    def gaussian_mixture_backward_max(self, grad, points, means, precisions, weight, argmax, half_widths, cull):
        self._check_params(points, means, precisions, half_widths)
        B, N, _ = points.shape
        G, K = means.shape[0], weight.shape[0]
        assert grad.shape == (B, K) and argmax.shape == (B, K) and weight.shape == (K, G)
        if argmax.numel() > 0:
            assert 0 <= int(argmax.min()) and int(argmax.max()) < N, "argmax out of range"
        dtype = points.dtype
        splits = self.lib.emu_gaussian_backward_splits(B)
        kblocks = self.lib.emu_gaussian_backward_channel_blocks(K)
        tiles = self.lib.emu_gaussian_gauss_tiles(G)
        run = GuardedLaunch("gaussian_mixture_backward_max")
        ins = [run.input(n, t) for n, t in (("grad", grad), ("points", points), ("argmax", argmax), ("means", means),
                                            ("precisions", precisions), ("half_widths", half_widths),
                                            ("weight", weight))]
        gw_part, gw_ptr = run.output("gw_part", (splits, K, G), dtype)
        gmp_part, gmp_ptr = run.output("gmp_part", (splits, kblocks, G, 9), dtype)
        gx_part, gx_ptr = run.output("gx_part", (tiles, B, K, 3), dtype)
        run.check(self.lib.emu_gaussian_mixture_backward_max(DTYPE_CODES[dtype], *ins, B, N, G, K, cull,
                                                             gw_ptr, gmp_ptr, gx_ptr))
        scatter = GuardedLaunch("gaussian_scatter_point_grads")
        gx_bk = scatter.input("gx_bk", gx_part.sum(0))
        arg_ptr = scatter.input("argmax", argmax)
        # bindings.cpp starts the point gradients at zero: points no channel picked keep it.
        g_pts, g_pts_ptr = scatter.output("gx", points.shape, dtype)
        g_pts.zero_()
        scatter.check(self.lib.emu_gaussian_scatter_point_grads(DTYPE_CODES[dtype], gx_bk, arg_ptr, B, N, K,
                                                                g_pts_ptr))
        gmp = gmp_part.sum((0, 1))
        return g_pts.clone(), gmp[:, :3].contiguous(), gmp[:, 3:].contiguous(), gw_part.sum(0), grad.sum(0)

    def gaussian_phi(self, points, means, precisions, half_widths, cull):
        self._check_params(points, means, precisions, half_widths)
        M, G = points.shape[0], means.shape[0]
        run = GuardedLaunch("gaussian_phi")
        ins = [run.input(n, t) for n, t in (("points", points), ("means", means), ("precisions", precisions),
                                            ("half_widths", half_widths))]
        out, out_ptr = run.output("phi", (M, G), points.dtype)
        run.check(self.lib.emu_gaussian_phi(DTYPE_CODES[points.dtype], *ins, M, G, cull, out_ptr))
        return out.clone()

    def gaussian_phi_backward(self, coef, points, means, precisions):
        M, G = points.shape[0], means.shape[0]
        self._check_params(points, means, precisions, torch.empty(G, 3, dtype=points.dtype))
        assert coef.shape == (M, G)
        tiles = self.lib.emu_gaussian_gauss_tiles(G)
        blocks = self.lib.emu_gaussian_phi_backward_blocks(M)
        run = GuardedLaunch("gaussian_phi_backward")
        ins = [run.input(n, t) for n, t in (("coef", coef), ("points", points), ("means", means),
                                            ("precisions", precisions))]
        gx_part, gx_ptr = run.output("gx_part", (tiles, M, 3), points.dtype)
        gmp_part, gmp_ptr = run.output("gmp_part", (blocks, G, 9), points.dtype)
        run.check(self.lib.emu_gaussian_phi_backward(DTYPE_CODES[points.dtype], *ins, M, G, gx_ptr, gmp_ptr))
        gmp = gmp_part.sum(0)
        return gx_part.sum(0), gmp[:, :3].contiguous(), gmp[:, 3:].contiguous()
