"""Triton's interpreter, made to accumulate IEEE float ``tl.dot`` products in order, as GPUs do.

A GPU evaluates a float32 or float64 ``tl.dot(a, b, acc, input_precision="ieee")`` on its
CUDA cores: every output element is acc + a[m, 0] b[0, n] + a[m, 1] b[1, n] + ..., one
multiply-add per k, in k order, so two identical rows of ``a`` give identical rows of the
result. Triton 3.8's interpreter calls numpy's matmul (BLAS) and adds ``acc`` afterwards; BLAS
rounds a row differently by where it falls in its blocking, and identical rows came out
different in the last bit: the Gaussian mixture kernel's max then went to a later copy of a
repeated point, breaking the op's rule (the lowest index attaining the max) where the GPU
keeps it. lucidops applies this patch when its kernels are interpreted (triton_kernels/
__init__.py), so the interpreter mode it supports on the CPU keeps the rule too: the sums run
in k order with numpy's cumulative sum (sequential by definition); each product is rounded
before its add, where the GPU fuses them.

Only IEEE float32/float64 products change; TF32 and half-precision products (tensor cores on
a GPU, with their own order) keep the interpreter's matmul. Other Triton kernels interpreted
in the same process get the same in-order sums.
"""

import numpy as np


def ordered_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b for (..., M, K) x (..., K, N), accumulated one k at a time in acc's dtype."""
    products = a[..., :, :, None].astype(acc.dtype) * b[..., None, :, :].astype(acc.dtype)  # (..., M, K, N)
    terms = np.concatenate([acc[..., :, None, :], products], axis=-2)
    return np.cumsum(terms, axis=-2)[..., -1, :]


def patch_interpreter_ieee_dot() -> bool:
    """Route the interpreter's IEEE float32/float64 dots through :func:`ordered_dot` (once).

    Returns whether the patch is in place; False, with a warning, where Triton's interpreter
    no longer has the method it replaces (then identical rows may round apart again)."""
    import warnings

    import triton.language as tl
    from triton._C.libtriton import ir

    try:
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        blas_dot = builder.create_dot
    except (ImportError, AttributeError) as error:
        warnings.warn(f"lucidops could not make Triton's interpreter sum IEEE dots in order ({error}): "
                      "ties in the Gaussian mixture's max may go to a later point under TRITON_INTERPRET",
                      RuntimeWarning, stacklevel=2)
        return False
    if getattr(blas_dot, "_lucidops_ordered", False):
        return True

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        ieee_float = (input_precision == ir.INPUT_PRECISION.IEEE and a.dtype.scalar in (tl.float32, tl.float64)
                      and b.dtype.scalar == a.dtype.scalar)
        if not ieee_float:
            return blas_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle(ordered_dot(a.data, b.data, d.data), d.dtype.scalar)

    create_dot._lucidops_ordered = True  # type: ignore[attr-defined]
    builder.create_dot = create_dot
    return True
