"""Make Triton's interpreter accumulate IEEE float ``tl.dot`` products in order, as GPUs do.

A GPU evaluates a float32 or float64 ``tl.dot(a, b, acc, input_precision="ieee")`` on its
CUDA cores: every output element is acc + a[m, 0] b[0, n] + a[m, 1] b[1, n] + ..., one
multiply-add per k, in k order, so two identical rows of ``a`` give identical rows of the
result. Triton 3.8's interpreter calls numpy's matmul (BLAS) and adds ``acc`` afterwards; BLAS
rounds a row differently by where it falls in its blocking, and identical rows came out
different in the last bit: the Gaussian mixture kernel's max then went to a later copy of a
repeated point (tests/test_gaussian_mixture.py::test_copies_of_a_point_give_the_max_to_the_first_copy),
where the GPU gives it to the first. This patch sums in k order with numpy's cumulative sum
(sequential by definition); each product is rounded before its add, where the GPU fuses them.

Only IEEE float32/float64 products change; TF32 and half-precision products (tensor cores on
a GPU, with their own order) keep the interpreter's matmul.
"""

import numpy as np


def ordered_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b for (..., M, K) x (..., K, N), accumulated one k at a time in acc's dtype."""
    products = a[..., :, :, None].astype(acc.dtype) * b[..., None, :, :].astype(acc.dtype)  # (..., M, K, N)
    terms = np.concatenate([acc[..., :, None, :], products], axis=-2)
    return np.cumsum(terms, axis=-2)[..., -1, :]


def patch_interpreter_ieee_dot() -> None:
    """Route the interpreter's IEEE float32/float64 dots through :func:`ordered_dot`."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    blas_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        ieee_float = (input_precision == ir.INPUT_PRECISION.IEEE and a.dtype.scalar in (tl.float32, tl.float64)
                      and b.dtype.scalar == a.dtype.scalar)
        if not ieee_float:
            return blas_dot(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle(ordered_dot(a.data, b.data, d.data), d.dtype.scalar)

    builder.create_dot = create_dot
