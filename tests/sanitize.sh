#!/usr/bin/env bash
# The C++ CPU kernels and the emulated CUDA kernels under AddressSanitizer and UBSan: every
# test that runs them, with the extension and the emulation rebuilt instrumented in a private
# cache. Not part of .ci/run (about 10 minutes on 2 cores); run it after changing csrc/.
# Extra arguments go to pytest, e.g. `bash tests/sanitize.sh -x -k lora`.
set -euo pipefail
cd "$(dirname "$0")/.."
CXX=${CXX:-g++}

SANITIZE="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
export LUCIDOPS_CACHE_DIR=${LUCIDOPS_SANITIZE_CACHE:-$HOME/.cache/lucidops-sanitize}
export LUCIDOPS_CPU_ARCH_FLAGS="-march=native $SANITIZE"
export LUCIDOPS_EMULATION_CFLAGS="$SANITIZE"
# Python is not instrumented, so the runtimes are preloaded; ASan must come first.
LD_PRELOAD="$($CXX -print-file-name=libasan.so) $($CXX -print-file-name=libubsan.so)"
export LD_PRELOAD
# Python and torch keep memory until exit by design (no leak report); torch's CUDA build maps
# memory where ASan would otherwise protect the shadow gap.
export ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1

# --capture=sys: a sanitizer report goes to file descriptor 2, which pytest would otherwise
# swallow along with the aborting test.
python -m pytest -q -p no:cacheprovider --capture=sys \
    tests/test_gaussian_mixture.py tests/test_lora_cpp.py tests/test_lora.py tests/test_attention.py \
    tests/test_activations.py tests/test_point_encoders.py tests/test_pointnet.py tests/test_cuda_emulated.py \
    tests/test_cpp_random_shapes.py \
    "$@"
