#!/usr/bin/env bash
# The prepared device run: one H100/H200 with torch, Triton and transformers preinstalled, no network, nothing
# installable; finishes in under 8 minutes (each step has its own hard limit, 440 s together on the GPU).
#
#   bash bench/gpu_check.sh OUT_DIR
#   bash bench/gpu_check.sh --cpu-smoke OUT_DIR   (no GPU: the same steps at tiny sizes on the CPU, the kernels
#                                                  under the Triton interpreter; checks the script; CI runs it)
#
# Steps (every result lands in OUT_DIR; a short table is printed last; exit status non-zero if any step failed):
#   1. bench/gpu_check.py: the kernels against the float64 oracle at real shapes; the bf16 matmul rate; fwd+bwd
#      at the Qwen3-4B head (N=16384, H=2560, V=151936, bf16) for fastprerl, Liger's fused linear cross-entropy,
#      Cut Cross-Entropy's Triton path and torch's chunked linear_cross_entropy, each checked against the oracle
#   2. bench/gpu_memory_24gb.py: the 24 GB single-GPU plan (DSRL steps of a Qwen2.5-1.5B-shaped model, capped)
#   3. bench/test_onepass_bench.py --quick: the one-pass bench (a CPU benchmark: its model runs on the CPU)
# Liger-Kernel and Cut Cross-Entropy are pure Python: their wheels are taken from bench/wheels/ (gitignored),
# filled beforehand on a machine with a package index by
#   pip download --no-deps -d bench/wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# and unpacked into OUT_DIR/_wheels (a wheel is a zip archive; nothing is installed). The checkout is used
# through PYTHONPATH. No GPU setting is changed (nvidia-smi is only queried).
set -u
cd "$(dirname "$0")/.."
SMOKE=0
if [[ "${1:-}" == "--cpu-smoke" ]]; then
    SMOKE=1
    shift
fi
if [[ $# -ne 1 ]]; then
    echo "usage: bash bench/gpu_check.sh [--cpu-smoke] OUT_DIR" >&2
    exit 2
fi
OUT="$(mkdir -p "$1" && cd "$1" && pwd)"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$SECONDS

nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit \
    --format=csv > "$OUT/nvidia_smi.csv" 2>&1 || true

# the peers' wheels, unpacked (never installed)
mkdir -p "$OUT/_wheels"
shopt -s nullglob
wheels=(bench/wheels/*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "gpu_check.sh: no wheels in bench/wheels/: Liger and CCE will be reported as skipped" | tee "$OUT/wheels.txt"
else
    "$PY" -c "import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]" \
        "$OUT/_wheels" "${wheels[@]}"
    printf '%s\n' "${wheels[@]}" > "$OUT/wheels.txt"
    export PYTHONPATH="$PYTHONPATH:$OUT/_wheels"
fi

declare -A RC
step() {   # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s, t=$((SECONDS - start)) s) =="
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    tail -n 5 "$OUT/$name.log"
    [[ ${RC[$name]} -eq 124 ]] && echo "$name: stopped by its ${limit} s limit"
}

if [[ $SMOKE -eq 1 ]]; then    # 2 slow CPU cores: generous limits
    step gpu_check 400 "$PY" bench/gpu_check.py --out "$OUT" --budget-s 370 --cpu-smoke
    step gpu_memory_24gb 300 "$PY" bench/gpu_memory_24gb.py --out "$OUT" --device cpu --tiny --variants offload
    MEM_MD="$OUT/gpu_memory_24gb_cpu_tiny.md"
    ONEPASS_LIMIT=900
else
    step gpu_check 250 "$PY" bench/gpu_check.py --out "$OUT" --budget-s 220
    step gpu_memory_24gb 120 "$PY" bench/gpu_memory_24gb.py --out "$OUT" --budget-s 90 --nsr-steps 1 \
        --grpo-steps 1 --max-new-tokens 256
    MEM_MD="$OUT/gpu_memory_24gb.md"
    ONEPASS_LIMIT=70
fi
step onepass "$ONEPASS_LIMIT" env FASTPRERL_BENCH_RESULTS="$OUT" "$PY" -m pytest -q -p no:cacheprovider \
    bench/test_onepass_bench.py --quick

echo
echo "== summary (total $((SECONDS - start)) s; results in $OUT) =="
sed -n '/^## summary/,$p' "$OUT/gpu_check.md" 2>/dev/null | tail -n +2
grep -E '^\| (offload|resident) ' "$MEM_MD" 2>/dev/null
grep -E '^\| (fastprerl_onepass|reference_two_padded) ' "$OUT"/onepass_*.md 2>/dev/null
status=0
for name in gpu_check gpu_memory_24gb onepass; do
    echo "$name: exit ${RC[$name]}"
    [[ ${RC[$name]} -ne 0 ]] && status=1
done
exit $status
