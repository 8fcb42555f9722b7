"""The interpreter's IEEE float dots accumulate in k order (tests/interpreter_dot.py)."""

import numpy as np
import pytest
import torch

from conftest import needs_triton, TRITON_DEVICE
from interpreter_dot import ordered_dot


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ieee_dot_sums_in_k_order_and_rounds_identical_rows_alike(dtype):
    import triton
    import triton.language as tl

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
        m, k, n = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
        a = tl.load(a_ptr + m[:, None] * K + k[None, :])
        b = tl.load(b_ptr + k[:, None] * N + n[None, :])
        acc = tl.load(c_ptr + m[:, None] * N + n[None, :])
        tl.store(c_ptr + m[:, None] * N + n[None, :], tl.dot(a, b, acc, input_precision="ieee"))

    a, b, acc = (torch.randn(64, 64, dtype=dtype) for _ in range(3))
    a[40:], acc[40:] = a[3], acc[3]  # rows 3 and 40..63 are one row
    expected = ordered_dot(a.numpy(), b.numpy(), acc.numpy())
    out = acc.clone().to(TRITON_DEVICE)
    dot_kernel[(1,)](a.to(TRITON_DEVICE), b.to(TRITON_DEVICE), out, M=64, K=64, N=64)
    out = out.cpu()
    assert torch.equal(out[40:], out[3].expand(24, -1))
    if TRITON_DEVICE == "cpu":  # a GPU fuses each multiply-add: the same order, one rounding fewer
        assert np.array_equal(out.numpy(), expected)
    torch.testing.assert_close(out, (acc.double() + a.double() @ b.double()).to(dtype))
