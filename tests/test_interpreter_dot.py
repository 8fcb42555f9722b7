"""The interpreter's IEEE float dots accumulate in k order (lucidops.triton_kernels.interpreter_dot)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import needs_triton, TRITON_DEVICE


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ieee_dot_sums_in_k_order_and_rounds_identical_rows_alike(dtype):
    import triton
    import triton.language as tl

    from lucidops.triton_kernels.interpreter_dot import ordered_dot

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


def test_the_package_patches_the_interpreter_itself(tmp_path):
    """Under TRITON_INTERPRET=1 without this test suite's conftest (a user's CPU run), the
    triton mixture still gives the max of 200 copies of a point to the first copy: importing
    lucidops' Triton kernels applies the in-order dot (BLAS gave 18 of 65 channels to copies
    6 and 60)."""
    script = textwrap.dedent("""
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, lucidops
        g = torch.Generator().manual_seed(3)
        points = torch.randn(1, 1, 3, generator=g).expand(1, 200, 3).contiguous()
        means = torch.randn(33, 3, generator=g)
        precisions = torch.tensor([1.0, 0.2, 0.0, 1.0, 0.1, 1.0]).repeat(33, 1)
        weight, bias = torch.randn(65, 33, generator=g), torch.randn(65, generator=g)
        with lucidops.use_backend("triton"):
            _, argmax = torch.ops.lucidops.gaussian_mixture(points, means, precisions, weight, bias, True, None)
        print("later copies:", int((argmax != 0).sum()))
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONSTARTUP")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "later copies: 0" in proc.stdout, proc.stdout
