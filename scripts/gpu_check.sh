#!/usr/bin/env bash
# Every check that needs a CUDA device, in one run of at most 8 minutes:
#   1. the test suite's CUDA cases (pytest -m cuda): each module against torch's in float32,
#      float16 and bfloat16, the eager, compiled (Triton) and auto backends, SyncBatchNorm on a
#      single-process NCCL group, the benchmark's CUDA paths;
#   2. batchnorm bench --device cuda in float32 and in bfloat16, against cuDNN;
#   3. batchnorm bench --memory --device cuda (saved-for-backward bytes and CUDA peak memory).
# Each step has its own time limit, and a step that fails or runs out of time does not stop the
# others. Results go to the folder given as the first argument (default: $OUT if set, else
# gpu-check/); the last thing printed is a markdown block for docs/benchmarks.md.
# Exit status: 0 when every step passed, 1 when one failed, 2 without a CUDA device.
set -uo pipefail

PYTHON=${PYTHON:-.venv/bin/python}
OUT_DIR=${1:-${OUT:-gpu-check}}
mkdir -p "$OUT_DIR"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: error: no CUDA device on this machine" >&2
    exit 2
fi

status=0
declare -a summary

# step NAME LIMIT_SECONDS COMMAND...: run with a time limit, stdout and stderr to NAME.txt/.err.
step() {
    local name=$1 limit=$2
    shift 2
    echo "gpu-check: $name (at most ${limit} s)" >&2
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.txt" 2>"$OUT_DIR/$name.err"
    local code=$?
    local outcome="passed"
    if [ "$code" -eq 124 ] || [ "$code" -eq 137 ]; then
        outcome="timed out after ${limit} s"
        status=1
    elif [ "$code" -ne 0 ]; then
        outcome="failed (exit $code)"
        status=1
    fi
    summary+=("$name: $outcome in $((SECONDS - start)) s")
    echo "gpu-check: $name $outcome" >&2
}

step tests 140 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/
step bench-float32 140 "$PYTHON" -m batchnorm.cli bench --device cuda --json "$OUT_DIR/bench-float32.json"
step bench-bfloat16 120 "$PYTHON" -m batchnorm.cli bench --device cuda --dtype bfloat16 --json "$OUT_DIR/bench-bfloat16.json"
step bench-memory 60 "$PYTHON" -m batchnorm.cli bench --memory --device cuda --json "$OUT_DIR/bench-memory.json"

device=$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name(0))')
versions=$("$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")')
{
    echo "## GPU: $device ($(date -u +%Y-%m-%d))"
    echo
    echo "$device; $versions. Command: \`make gpu-check\` (\`scripts/gpu_check.sh\`)."
    echo
    for name in bench-float32 bench-bfloat16 bench-memory; do
        echo "### \`$name\`"
        echo
        cat "$OUT_DIR/$name.txt"
        echo
    done
    echo "### Test cases (\`pytest -m cuda\`)"
    echo
    tail -n 3 "$OUT_DIR/tests.txt"
    echo
    for line in "${summary[@]}"; do
        echo "- $line"
    done
} >"$OUT_DIR/summary.md"
cat "$OUT_DIR/summary.md"
exit "$status"
