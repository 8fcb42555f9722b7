"""Every Triton kernel configuration compiles for sm_80 and sm_90 (no GPU needed).

The compile tests (marked slow) run in subprocesses without TRITON_INTERPRET (the test
session itself interprets) and with an empty Triton cache, so that each configuration is
really compiled; the compile of every configuration starts right after collection and runs
beside the other tests (aot_in_background.py). The argument checks at the end compile nothing.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

import aot_in_background


@pytest.mark.slow
def test_all_kernel_configurations_compile_for_sm80_and_sm90(tmp_path):
    # Usually started by conftest right after collection and done by now (aot_in_background).
    run = aot_in_background.take() or aot_in_background.AotRun(tmp_path, background=False)
    try:
        returncode, output = run.wait(timeout=2700)
    finally:  # Ctrl-C while waiting: its own process group does not get the terminal's SIGINT
        run.stop()
    assert returncode == 0, output
    assert "FAILED" not in output
    compiled, total = re.search(r"compiled (\d+)/(\d+) kernel configurations", output).groups()
    assert compiled == total
    configurations = json.loads(run.report.read_text())["configurations"]
    assert len(configurations) == int(total)
    for c in configurations:  # every one fits its card, and its cubin's resources were read
        assert c["failure"] == "" and c["registers"] is not None and c["local_bytes"] is not None, c
        assert 0 <= c["shared_bytes"] <= {80: 166912, 90: 232448}[c["arch"]], c
    # The d = 64 target: half-precision attention keeps its tiles in registers. With the
    # tile computed by every warp (a batched dot over one head) these configurations used 5-11 KB
    # of local memory per thread; now under 100 bytes.
    d64 = [c for c in configurations if c["name"].startswith("attention.")
           and "'D_PAD': 64," in c["name"] and "'PRECISION': 'tf32'" in c["name"]]
    assert len(d64) == 48, [c["name"] for c in d64]  # 3 kernels x fp16/bf16 x i32/i64 x dropout x 2 archs
    for c in d64:
        assert c["local_bytes"] <= 256, f"{c['name']}: {c['local_bytes']} bytes of local memory per thread"


@pytest.mark.slow
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
    proc = subprocess.run([sys.executable, str(path)], env=aot_in_background.compile_env(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert "REJECTED" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.slow
def test_aot_check_rejects_a_kernel_that_needs_more_shared_memory_than_the_card(tmp_path):
    # Triton compiles this (two 128 KiB fp16 tiles in shared memory at once) but an H100 would
    # refuse to launch it: the check must report that, and a small kernel must pass it.
    script = textwrap.dedent(
        """
        import triton, triton.language as tl
        from lucidops.triton_kernels.aot import check_spec

        @triton.jit
        def greedy(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
            i = tl.arange(0, BLOCK)
            acc = tl.zeros((BLOCK, BLOCK), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + i[:, None] * K + kk[None, :])
                b = tl.load(b_ptr + kk[:, None] * BLOCK + i[None, :])
                acc += tl.dot(a, b)
            tl.store(c_ptr + i[:, None] * BLOCK + i[None, :], acc)

        signature = {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "K": "i32",
                     "BLOCK": "constexpr", "BLOCK_K": "constexpr"}
        for block_k in (512, 16):
            spec = dict(fn=greedy, signature=signature, constexprs={"BLOCK": 128, "BLOCK_K": block_k},
                        num_stages=3)
            r = check_spec(spec, 90)
            print("BLOCK_K", block_k, "shared", r.shared_bytes, "registers", r.registers, "local", r.local_bytes,
                  "FAILURE" if r.failure else "OK", r.failure)
        """
    )
    path = tmp_path / "greedy_kernel.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path)], env=aot_in_background.compile_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BLOCK_K")]
    assert len(lines) == 2, proc.stdout + proc.stderr
    big, small = (line.split() for line in lines)
    assert big[8] == "FAILURE" and int(big[3]) > 232448 and "sm_90 grants 232448" in lines[0], lines[0]
    # "BLOCK_K 16 shared S registers R local L OK": fits, and the cubin's registers were read.
    assert small[8] == "OK" and 0 < int(small[3]) <= 232448 and int(small[5]) > 0, lines[1]


# The argument checks below run no compiler: compile_all is replaced by a tripwire, since
# a bad argument must be refused before the minutes of compiling, not after.


@pytest.fixture
def aot_module(monkeypatch):
    from lucidops.triton_kernels import aot

    def tripwire(*args, **kwargs):
        raise AssertionError("compile_all ran before the arguments were checked")

    monkeypatch.setattr(aot, "compile_all", tripwire)
    return aot


def _refused(main, argv, capsys):
    """main(argv) exits as argparse does on a bad argument (status 2, a usage line and one
    error line on stderr, no traceback); returns that stderr."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err, err
    return err


def test_aot_refuses_a_json_path_it_cannot_write_before_compiling(tmp_path, aot_module, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [(tmp_path / "missing" / "aot.json", "does not exist"), (tmp_path, "is a folder"),
             (a_file / "aot.json", "is not a folder")]
    for path, reason in cases:
        err = _refused(aot_module.main, ["--arch", "80", "--json", str(path)], capsys)
        assert "--json" in err and reason in err, err
    # A folder that exists but takes no files: /proc compiled for seconds, then a traceback.
    if os.path.isdir("/proc"):
        err = _refused(aot_module.main, ["--arch", "80", "--json", "/proc/aot.json"], capsys)
        assert "--json" in err and "cannot write in '/proc'" in err, err


def test_aot_refuses_a_compute_capability_out_of_range(aot_module, capsys):
    for arch in ("-5", "7", "0", "20", "1000", "9.10", "sm_3.0"):  # "-5" and "7" used to be compiled for
        err = _refused(aot_module.main, ["--arch", "80", arch], capsys)
        assert "--arch" in err and repr(arch) in err, err
        with pytest.raises(argparse.ArgumentTypeError):
            aot_module.compute_capability(arch)
    forms = ("80", "8.0", "sm_90", " SM_86 ", "12.0", "50")
    assert [aot_module.compute_capability(t) for t in forms] == [80, 80, 90, 86, 120, 50]


def test_lucidops_aot_command_checks_its_arguments_first(tmp_path, aot_module, capsys):
    from lucidops.cli import main

    err = _refused(main, ["aot", "--json", str(tmp_path / "missing" / "aot.json")], capsys)
    assert "--json" in err and "does not exist" in err, err
    err = _refused(main, ["aot", "--arch", "-5"], capsys)
    assert "--arch" in err and "out of range" in err, err


def test_lucidops_aot_takes_the_modules_options(aot_module, monkeypatch, capsys):
    """`lucidops aot` had only --arch and --json (python -m ...aot also took --family and
    --jobs), and its last line read "for sm_[80, 90]"."""
    from lucidops.cli import main

    calls = []
    monkeypatch.setattr(aot_module, "compile_all", lambda archs, families, jobs: calls.append((archs, families, jobs))
                        or [])
    monkeypatch.setattr(aot_module, "iter_specs", lambda families: iter(range(len(families))))
    assert main(["aot", "--arch", "80", "sm_90", "--family", "lora", "attention", "--jobs", "3"]) == 0
    assert calls == [([80, 90], ["lora", "attention"], 3)]
    assert "compiled 4/4 kernel configurations for sm_80, sm_90 in" in capsys.readouterr().out
    err = _refused(main, ["aot", "--family", "nope"], capsys)
    assert "--family" in err and "'nope'" in err, err
    err = _refused(main, ["aot", "--jobs", "-1"], capsys)
    assert "--jobs" in err, err
    assert "usage: lucidops aot " in err and "lucidops aot: error:" in err, err  # not "__main__.py"


def test_every_configuration_has_its_own_name(aot_module):
    """The listing's names are how a configuration is found in it: named by the set of its
    argument types, a float32-factor LoRA configuration took the name of its half-factor twin
    (208 names were shared, one at 104 and 584 bytes of local memory)."""
    import importlib

    names = [f"{family}.{aot_module.describe(spec, arch)}" for family in aot_module.FAMILIES
             for spec in importlib.import_module(f"lucidops.triton_kernels.{family}").aot_specs() for arch in (80, 90)]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})[:3]


def test_lora_listing_holds_every_factor_dtype_the_op_takes():
    """triton_kernels.lora lists its configurations per factor dtype with its own table of
    dtype names; it must name exactly the (x, factor) dtype pairs ops.lora.factor_dtypes
    lets through, or a pair the op takes would first compile on a user's GPU."""
    import torch

    from lucidops.ops.lora import factor_dtypes
    from lucidops.triton_kernels import lora as triton_lora

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    taken = {(f"*{names[x]}", f"*{names[f]}") for x in names for f in factor_dtypes(x)}
    listed = {(s["signature"]["in_ptr"], s["signature"]["l_ptr"]) for s in triton_lora.aot_specs()
              if s["fn"] is triton_lora.lora_matmul_kernel and s["constexprs"]["LORA"]
              and not s["constexprs"]["QUANT"]}
    assert listed == taken
    chunk = {(s["signature"]["g_ptr"], s["signature"]["a_ptr"]) for s in triton_lora.aot_specs()
             if s["fn"] is triton_lora.lora_wgrad_chunk_kernel}
    assert chunk == taken
