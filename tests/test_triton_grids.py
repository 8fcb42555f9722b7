"""The Triton launchers keep their grids within CUDA's limits at sizes users reach: axis 0
up to 2^31 - 1 programs, axes 1 and 2 at most 65535 each. The interpreter enforces neither,
so these tests record the grids the launchers ask for (the kernels are not run)."""

import pytest
import torch

from conftest import TRITON_DEVICE, needs_triton
from test_attention import check_against_float64_reference

pytestmark = needs_triton

AXIS_LIMITS = (2**31 - 1, 65535, 65535)


class GridRecorder:
    """Stands in for a module's ``*_kernel`` s: ``kernel[grid](...)`` records (kernel, grid)."""

    def __init__(self):
        self.launches = []

    def stand_in(self, name):
        recorder = self

        class Kernel:
            def __getitem__(self, grid):
                recorder.launches.append((name, tuple(grid)))
                return lambda *args, **kwargs: None

        return Kernel()

    def grids(self, name=None):
        return [grid for kernel, grid in self.launches if name in (None, kernel)]


def record_launches(monkeypatch, module) -> GridRecorder:
    recorder = GridRecorder()
    for name in dir(module):
        if name.endswith("_kernel"):
            monkeypatch.setattr(module, name, recorder.stand_in(name))
    return recorder


def assert_within_limits(grids):
    assert grids, "no launch recorded"
    for grid in grids:
        assert all(n <= limit for n, limit in zip(grid, AXIS_LIMITS)), f"grid {grid} passes CUDA's {AXIS_LIMITS}"


def test_attention_at_a_batch_of_70000_heads(monkeypatch):
    tk = pytest.importorskip("lucidops.triton_kernels.attention")
    recorder = record_launches(monkeypatch, tk)
    q, k, v = (torch.randn(70_000, 1, 1, 8) for _ in range(3))  # one head of one token each
    out, lse, out_lo = tk.forward(q, k, v, None, False, 8 ** -0.5)
    tk.backward(torch.randn_like(q), None, q, k, v, out, out_lo, lse, None, False, 8 ** -0.5)
    assert_within_limits(recorder.grids())
    for kernel in ("attention_forward_kernel", "attention_backward_dkdv_kernel", "attention_backward_dq_kernel"):
        # batch slices of (batch x head group) programs that together cover every batch element
        assert sum(grid[1] for grid in recorder.grids(kernel)) == 70_000, kernel


def test_attention_in_batch_slices_matches_the_reference(monkeypatch):
    """The batch-sliced launches compute what one launch does (slices of 2 and a last of 1)."""
    tk = pytest.importorskip("lucidops.triton_kernels.attention")
    monkeypatch.setattr(tk, "MAX_GRID_Y", 6)  # 3 head groups (d 8, H 3): 2 batch elements a launch
    calls = []
    real = tk._batch_slices

    def recorded_slices(*args):
        calls.append(real(*args))
        return calls[-1]

    monkeypatch.setattr(tk, "_batch_slices", recorded_slices)
    for mask, dropout_p in (("random", 0.0), (None, 0.0), ("random", 0.3)):
        # under dropout each slice hashes its absolute batch index: the reference's mask
        check_against_float64_reference("triton", (5, 3, 9, 7, 8, True, mask, torch.float32), TRITON_DEVICE,
                                        dropout_p=dropout_p)
    assert calls and all(len(slices) == 3 for slices in calls)  # forward and backward, both sliced


def test_gaussian_mixture_on_a_cloud_of_2_1_million_points(monkeypatch):
    tk = pytest.importorskip("lucidops.triton_kernels.gaussian_mixture")
    recorder = record_launches(monkeypatch, tk)
    n, g, k = 2_100_000, 3, 2  # 65625 tiles of 32 points
    points = torch.rand(1, n, 3)
    means, precisions, half = torch.rand(g, 3), torch.rand(g, 6), torch.ones(g, 3)
    weight, bias = torch.randn(k, g), torch.zeros(k)
    for reduce_max in (True, False):
        tk.forward(points, means, precisions, weight, bias, half, False, reduce_max)
    argmax = torch.zeros(1, k, dtype=torch.long)
    tk.backward_max(torch.ones(1, k), points, means, precisions, weight, argmax, half, False)
    flat = points[0]
    tk.phi(flat, means, precisions, half, False)
    tk.phi_backward(torch.ones(n, g), flat, means, precisions)
    assert len(recorder.grids()) == 6  # forward x2, max backward, its point scatter, phi, phi backward
    assert_within_limits(recorder.grids())
