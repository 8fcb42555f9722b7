#!/usr/bin/env bash
# One prepared GPU session on a CUDA machine with no network, inside the device tool's
# 10-minute call (the step limits add up to 520 s, leaving over a minute for the machine
# report, the install and info; every step has its own limit):
#   install lucidops without dependencies, build the extensions (120 s), run the tests that
#   touch the GPU (160 s, in parallel where pytest-xdist is there; on the CPU dry run they
#   are interpreter tests, 190 s warm and over 240 s cold on a 2-core Xeon, so the dry run
#   allows 360),
#   then benchmark the op families whose GPU targets
#   are still unmeasured, most wanted first, each under its own limit: gaussian_mixture
#   (50 s), lora (60 s), attention (130 s; its grid stops starting cases after
#   LUCIDOPS_BENCH_BUDGET_S=75, leaving almost a minute for the last case and the report,
#   which it writes only at its end).
# Everything is written straight into $OUT (bench/results/gpu-check without the device tool),
# so a step cut short keeps what the ones before it wrote. Commit the results folder after.
# Dry run of the plumbing on a machine without a GPU:
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SIZE= OUT=/tmp/gpu-check bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SIZE=${GPU_CHECK_SIZE---full}
LOG_DIR=${OUT:-bench/results/gpu-check}
mkdir -p "$LOG_DIR"
status=0
step() { echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$LOG_DIR/machine.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')" 2>&1 | tee -a "$LOG_DIR/machine.txt"

step "install"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1

step "build the extensions"
kinds="cpu"
[ "$DEVICE" = cuda ] && kinds="cuda cpu"
# shellcheck disable=SC2086
MAX_JOBS=$(nproc) timeout 120 python3 -m lucidops.cli build $kinds 2>&1 | tail -20 || status=1
timeout 30 python3 -m lucidops.cli info > "$LOG_DIR/info.txt" 2>&1
cat "$LOG_DIR/info.txt"

step "tests that touch the GPU (the CPU-only ones are CI's)"
parallel=()
python3 -c "import xdist" 2>/dev/null && parallel=(-n 8)
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=120)
test_limit=160
[ "$DEVICE" = cpu ] && test_limit=360  # the dry run: the interpreter, not the 10-minute call
timeout "$test_limit" python3 -m pytest tests -q -m "not slow" -k "(cuda or triton or gpu) and not emulated" -p no:cacheprovider \
  "${parallel[@]}" "${per_test[@]}" --durations=20 --junitxml="$LOG_DIR/pytest.xml" > "$LOG_DIR/pytest.txt" 2>&1
[ $? -eq 0 ] || status=1
tail -30 "$LOG_DIR/pytest.txt"

step "benchmarks, the unmeasured GPU targets first"
bench() {  # family, time limit (s): results in $LOG_DIR/bench-<family>/
  echo "--- $1 ($(date +%T))"
  # shellcheck disable=SC2086
  timeout "$2" python3 -m lucidops.cli bench $SIZE --device "$DEVICE" --families "$1" \
    --out "$LOG_DIR/bench-$1" > "$LOG_DIR/bench-$1.log" 2>&1
  local rc=$?
  tail -25 "$LOG_DIR/bench-$1.log"
  [ $rc -eq 0 ] || { echo "--- $1 exited $rc"; status=1; }
}
bench gaussian_mixture 50
bench lora 60
LUCIDOPS_BENCH_BUDGET_S=75 bench attention 130

step "done, status $status"
exit $status
