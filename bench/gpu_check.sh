#!/usr/bin/env bash
# GPU check of the fused log-prob op (correctness at real shapes + benchmark); see bench/gpu_check.py.
# Run from anywhere: bash bench/gpu_check.sh [extra gpu_check.py args]
# Needs torch + triton only (the checkout is used through PYTHONPATH, nothing is installed).
# Outputs go to $FASTPRERL_BENCH_OUT if set, else bench/results/. Finishes in under 8 minutes (hard limit 470 s).
set -u
cd "$(dirname "$0")/.."
OUT_DIR="${FASTPRERL_BENCH_OUT:-bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# read-only snapshot of the device state (no settings are changed)
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit \
  --format=csv > "$OUT_DIR/gpu_check_nvidia_smi.csv" 2>&1 || true
timeout -k 10 470 python bench/gpu_check.py --out "$OUT_DIR" --budget-s 440 "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "gpu_check: stopped by the 470 s limit; partial output in $OUT_DIR/gpu_check.log"
exit "$rc"
