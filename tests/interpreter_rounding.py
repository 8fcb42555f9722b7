"""Make Triton's interpreter round float32 -> bfloat16 to nearest even, as GPUs do.

Triton 3.8's interpreter converts float32 to bfloat16 by dropping the low 16 bits (round
toward zero). Every bf16 rounding then errs by up to a whole ulp, always toward zero, so
errors add up instead of cancelling: a kernel that rounds its effective weight and then its
output to bf16 came out 2-4x less accurate under the interpreter than the same arithmetic
rounded to nearest (measured on the lora dx kernel), and its bf16 tests failed now and then
on tolerance alone. A GPU converts with cvt.rn.bf16.f32 (round to nearest even); so does
torch's .to(torch.bfloat16), which this patch uses.

The tests apply it only while the interpreter is found to truncate, so a Triton that fixes
the conversion upstream is left alone.
"""

import numpy as np
import torch


def _interpreter_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values through the interpreter's fp32 -> bf16 -> fp32 cast."""
    import triton
    import triton.language as tl

    @triton.jit
    def round_trip(src, dst, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        v = tl.load(src + offs, mask=offs < n, other=0.0)
        tl.store(dst + offs, v.to(tl.bfloat16).to(tl.float32), mask=offs < n)

    src = torch.from_numpy(values.astype(np.float32))
    dst = torch.empty_like(src)
    round_trip[(1,)](src, dst, src.numel(), BLOCK=triton.next_power_of_2(src.numel()))
    return dst.numpy()


# 1 + 0.75 ulp of bf16 rounds up to 1 + 1 ulp; truncation gives 1. Negative and tie cases too.
_PROBE = np.array([1.0 + 0.75 * 2.0**-7, -(1.0 + 0.75 * 2.0**-7), 1.0 + 1.5 * 2.0**-7, 3.0], dtype=np.float32)


def interpreter_rounds_bf16_to_nearest(values: np.ndarray = _PROBE) -> bool:
    """Whether the interpreter's fp32 -> bf16 cast of ``values`` equals torch's (round to nearest even)."""
    values = values.astype(np.float32)
    expected = torch.from_numpy(values).to(torch.bfloat16).float().numpy()
    return bool(np.array_equal(_interpreter_bf16(values), expected))


def _to_bf16_bits(data: np.ndarray) -> np.ndarray:
    """float32 array -> bfloat16 bit patterns (uint16, the interpreter's storage), round to nearest even."""
    values = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def patch_interpreter_bf16_rounding() -> bool:
    """Route the interpreter's float32 -> bfloat16 casts through torch (round to nearest even).

    Returns True when it patched, False when the interpreter already rounds to nearest.
    Raises if the patch does not take (Triton's internals moved): the bf16 tests would
    otherwise measure the interpreter's rounding instead of the kernels."""
    if interpreter_rounds_bf16_to_nearest():
        return False
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    truncating_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            return interpreter.TensorHandle(_to_bf16_bits(src.data), dst_type.scalar)
        return truncating_cast(self, src, dst_type)

    builder.cast_impl = cast_impl
    # create_fp_trunc (and friends) are lambdas that look cast_impl up on self: patched too.
    if not interpreter_rounds_bf16_to_nearest():
        raise RuntimeError("could not make Triton's interpreter round float32 -> bfloat16 to nearest even")
    return True
