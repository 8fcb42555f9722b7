"""Every Triton kernel configuration compiles for sm_80 and sm_90 (no GPU needed).

Runs in subprocesses without TRITON_INTERPRET (the test session itself interprets) and
with an empty Triton cache, so that each configuration is really compiled.
"""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return env


def test_all_kernel_configurations_compile_for_sm80_and_sm90(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lucidops.triton_kernels.aot", "--arch", "80", "90"],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=2700)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAILED" not in proc.stdout
    assert "compiled" in proc.stdout


def test_aot_check_rejects_a_kernel_a_gpu_would_reject(tmp_path):
    # A 16x8 tl.dot runs under the interpreter but is not a valid GPU dot: the check must fail.
    script = textwrap.dedent(
        """
        import triton, triton.language as tl
        from lucidops.triton_kernels.aot import compile_spec

        @triton.jit
        def bad_dot(a_ptr, b_ptr, c_ptr):
            i = tl.arange(0, 16)
            j = tl.arange(0, 8)
            a = tl.load(a_ptr + i[:, None] * 8 + j[None, :])
            b = tl.load(b_ptr + j[:, None] * 8 + j[None, :])
            tl.store(c_ptr + i[:, None] * 8 + j[None, :], tl.dot(a, b))

        spec = dict(fn=bad_dot, signature={"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32"})
        try:
            compile_spec(spec, 90)
        except Exception as exc:
            print("REJECTED", type(exc).__name__)
        else:
            print("ACCEPTED")
        """
    )
    path = tmp_path / "bad_kernel.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert "REJECTED" in proc.stdout, proc.stdout + proc.stderr
