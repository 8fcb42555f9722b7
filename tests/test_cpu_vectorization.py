"""The C++ kernels' math vectorises on AVX2 as well as on AVX-512.

Two defects made the CPU kernels several times slower on AVX2 machines (AMD Zen 2/3, most
Intel client chips) while every test passed: vec_math::Vec was 64 bytes everywhere, which
GCC splits through the stack and general registers where a register holds 32 (attention's
score products), and GCC kept every loop calling vec_math::exp or sincos scalar there,
because without AVX-512's masked operations it will not if-convert a float comparison that
might trap (-ftrapping-math, its default). These tests compile small loops with the CPU
extension's own flags for an AVX2 and an AVX-512 target and read GCC's vectoriser report,
and check which targets get the Gaussian mixture's float32 forward with channels in the lanes.
"""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from lucidops import _ext_sources

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
    reason="x86-64 targets compiled with g++",
)

TARGETS = {"avx2": "-march=x86-64-v3", "avx512": "-march=x86-64-v4"}

# Each loop is marked by a comment on the line GCC's report names (the first line of its body).
SNIPPET = """
#include <cstdint>
#include "cpu/vec_math.h"
namespace vm = lucidops::vec_math;

float softmax_row(float* s, int64_t n, float shift) {
  float sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = vm::exp(s[j] - shift);  // LOOP exp
    sum += s[j];
  }
  return sum;
}

void sines(const float* u, float* s, float* c, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) vm::sincos(u[j], s + j, c + j);  // LOOP sincos
}

void tanhs(float* v, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) v[j] = vm::tanh(v[j]);  // LOOP tanh
}

void exps(double* v, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) v[j] = vm::exp(v[j]);  // LOOP exp double
}

int64_t float_lanes() { return vm::Vec<float>::kLanes; }
static_assert(sizeof(vm::Vec<float>::type) == LUCIDOPS_EXPECT_VEC_BYTES, "one register of the target");
"""
EXPECTED_VEC_BYTES = {"avx2": 32, "avx512": 64}


def _cpu_flags(march: str) -> List[str]:
    """The CPU extension's compile flags, with the target's -march for the build host's."""
    flags = [f for f in _ext_sources.spec("cpu").cflags if not f.startswith("-march=")]
    return flags + [march]


def _vectorised_loops(tmp_path: Path, target: str) -> Dict[str, bool]:
    source = tmp_path / f"loops_{target}.cpp"
    source.write_text(SNIPPET)
    command = ["g++", "-std=c++17", *_cpu_flags(TARGETS[target]), f"-DLUCIDOPS_EXPECT_VEC_BYTES={EXPECTED_VEC_BYTES[target]}",
               f"-I{_ext_sources.csrc_root()}", "-fopt-info-vec-optimized", "-c", str(source),
               "-o", str(tmp_path / f"loops_{target}.o")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr}"
    vectorised_lines = {int(m.group(1)) for m in re.finditer(rf"{re.escape(source.name)}:(\d+):\d+: optimized: loop vectorized",
                                                              done.stderr)}
    loops = {}
    for number, line in enumerate(SNIPPET.splitlines(), start=1):
        if "// LOOP " in line:
            loops[line.split("// LOOP ")[1]] = number in vectorised_lines
    return loops


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_vec_math_loops_vectorise_with_the_extension_flags(tmp_path, target):
    loops = _vectorised_loops(tmp_path, target)
    assert loops == {name: True for name in loops}, f"{target}: loops left scalar: {[n for n, v in loops.items() if not v]}"
    assert len(loops) == 4


def test_extension_flags_keep_exceptions_untrapped():
    """The flag the vectorisation above depends on, named so that a change of flags says why."""
    assert "-fno-trapping-math" in _ext_sources.spec("cpu").cflags


# Where the Gaussian mixture's float32 forward takes forward_item_f32, channels in the vector
# lanes: on the Zen 3 EPYC (AVX2) the portable layout culled only 1.39x-1.44x on trained
# Gaussians, against 1.66x with channels in the lanes (bench/results/*avx2*-gaussian-05*.*).
CHANNEL_LANES = {"-march=x86-64-v3": True, "-march=x86-64-v4": True, "-march=x86-64": False}


@pytest.mark.parametrize("march", sorted(CHANNEL_LANES))
def test_gaussian_mixture_float32_forward_has_channels_in_lanes_on_avx2_and_avx512(march):
    import sysconfig

    from torch.utils import cpp_extension

    includes = [_ext_sources.csrc_root(), *cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    command = ["g++", "-std=c++20", *_cpu_flags(march), "-E", "-dM", *[f"-I{i}" for i in includes],
               str(_ext_sources.csrc_root() / "cpu" / "gaussian_mixture.cpp")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stderr[-2000:]}"
    defined = re.search(r"^#define LUCIDOPS_CHANNEL_LANES\b", done.stdout, re.MULTILINE) is not None
    assert defined == CHANNEL_LANES[march], f"{march}: channels in the lanes {'expected' if CHANNEL_LANES[march] else 'unexpected'}"
