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


def test_gaussian_mixture_on_a_cloud_of_more_point_tiles_than_a_grid_axis_takes(monkeypatch):
    tk = pytest.importorskip("lucidops.triton_kernels.gaussian_mixture")
    recorder = record_launches(monkeypatch, tk)
    # One point tile more than the 65535 programs grid axes 1 and 2 take (65536 tiles of 64
    # float32 points: 4.2M points; 2.1M made 65625 tiles of the first version's 32).
    block_n = tk.FORWARD_CONFIGS[torch.float32][0]
    n, g, k = 65535 * block_n + 1, 3, 2
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


# --- 64-bit offsets ------------------------------------------------------------------------
# Products of a program id or a point index that can pass 2^31 must be formed in 64 bits: a
# 32-bit product wraps negative, still passes its mask, and reads or writes outside the tensor.
# The interpreter cannot show it (no 2^31-element tensors here), so these read the kernels'
# Triton IR compiled for sm_90.

def _ttir(kernel, **signature):
    """The Triton IR of gaussian_mixture's ``kernel`` (its float32 AOT configuration, with
    ``signature``'s argument types changed), compiled in a subprocess: this session interprets."""
    import json
    import os
    import subprocess
    import sys

    script = (
        "import json, sys, triton\n"
        "from triton.backends.compiler import GPUTarget\n"
        "from triton.compiler import ASTSource\n"
        "from lucidops.triton_kernels import gaussian_mixture as gm\n"
        "kernel, changes = sys.argv[1], json.loads(sys.argv[2])\n"
        "spec = next(s for s in gm.aot_specs() if s['fn'] is getattr(gm, kernel) and s['signature']['x_ptr'] == '*fp32')\n"
        "src = ASTSource(fn=spec['fn'], signature=dict(spec['signature'], **changes), constexprs=spec['constexprs'])\n"
        "print(triton.compile(src, target=GPUTarget('cuda', 90, 32), options={'num_warps': 4}).asm['ttir'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script, kernel, json.dumps(signature)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _ssa_ops(ttir):
    """(result, op, operand names, the text after the op) for each SSA line of a TTIR listing."""
    import re

    ops = []
    for line in ttir.splitlines():
        m = re.match(r"\s*(%[\w.]+) = ([\w.]+) (.*?)(?: loc\(.*)?$", line)
        if m:
            operands = re.findall(r"%[\w.]+", m.group(3).split(":")[0])
            ops.append((m.group(1), m.group(2), operands, m.group(3)))
    return ops


def _derived(ops, roots):
    """Every SSA value computed (transitively) from one of ``roots``."""
    seen = set(roots)
    for result, _, operands, _ in ops:
        if any(o in seen for o in operands):
            seen.add(result)
    return seen


def test_mixture_forward_reads_points_through_64_bit_offsets():
    # offs_n * 3 in 32 bits wrapped for a cloud of 715,827,884 points or more (N itself an i32)
    ops = _ssa_ops(_ttir("mixture_forward_kernel"))
    into_points = [(operands, text) for result, op, operands, text in ops
                   if op == "tt.addptr" and operands[0] in _derived(ops, {"%x_ptr"})]
    assert into_points, "found no pointer arithmetic on x_ptr: has the kernel changed its arguments?"
    constants = {result for result, op, _, _ in ops if op == "arith.constant"}  # "+ 1" is a small i32
    for operands, text in into_points:
        offset_type = text.rsplit(",", 1)[-1]
        assert "i32" not in offset_type or operands[1] in constants, f"a 32-bit point offset: tt.addptr {text}"


def test_phi_kernel_forms_row_offsets_in_64_bits():
    # pid * BLOCK_M in 32 bits wrapped once B * N passed 2^31 (M given as an i64)
    ops = _ssa_ops(_ttir("phi_kernel", M="i64"))
    pid = next(result for result, op, _, text in ops if op == "tt.get_program_id" and text.startswith("x"))
    from_pid = _derived(ops, {pid})
    narrow = [(result, operands) for result, op, operands, text in ops
              if op == "arith.muli" and result in from_pid and text.rsplit(":", 1)[-1].strip().endswith("i32")]
    assert not narrow, f"a product of the row-block id in 32 bits: {narrow}"
