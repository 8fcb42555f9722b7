#!/usr/bin/env bash
# One prepared GPU session, inside 8 minutes, on a CUDA machine with no network:
# install lucidops without dependencies, build the CUDA extension, run the whole test
# suite with the CUDA tests enabled, run every benchmark, and write
# bench/results/<gpu>.json and .md (copied to $OUT when the device tool sets it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG_DIR=${OUT:-bench/results}
mkdir -p bench/results "$LOG_DIR"
status=0
step() { echo "=== $* ($(date +%T))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"

step "install"
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1

step "build the CUDA and CPU extensions"
timeout 240 python3 -m lucidops.cli build cuda cpu || status=1
python3 -m lucidops.cli info | tee "$LOG_DIR/info.txt"

step "tests (CUDA tests enabled; the CPU-only slow checks are CI's)"
timeout 300 python3 -m pytest tests -q -x -m "not slow" -p no:cacheprovider \
  --junitxml="$LOG_DIR/pytest.xml" 2>&1 | tail -40 | tee "$LOG_DIR/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

step "benchmarks"
timeout 150 python3 -m lucidops.cli bench --full --device cuda --out bench/results 2>&1 | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1  # results are written per family, so a timeout keeps them
[ "$LOG_DIR" != "bench/results" ] && cp bench/results/*.json bench/results/*.md "$LOG_DIR"/ 2>/dev/null

step "done, status $status"
exit $status
