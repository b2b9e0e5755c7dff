#!/usr/bin/env bash
# The CUDA checks, for a lent GPU machine: no network and no pip needed; run from anywhere.
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh
#
# With a CUDA device (nvidia-smi lists a GPU and torch.cuda.is_available()):
#   (0) the versions: python -c 'import torch, transformers; print(torch.__version__,
#       transformers.__version__, torch.cuda.get_device_name())', and `pip list | head -80`
#   (a) PARAMSPLIT_TEST_DEVICE=cuda python -m pytest -q tests/test_device.py   (the core contract)
#   (b) python benchmarks/step.py --device cuda --models gpt124m,many --budget 8
#           --json $OUT/step_cuda.json
#       the GPT-2 124M tables (batch 8 x 512, bf16 autocast; fused and foreach AdamW: 10 variants
#       each, every one a 124M model built on the CPU and moved over, memory measured as they are
#       built) and the 48-weight `many` one; 8 s of timed rounds per table (whole rotations: about
#       10 s for a 124M table at 35-50 ms a step). The JSON is rewritten after every table.
#   (c) python benchmarks/phases.py --device cuda --models gpt124m,many
#           --variants baseline,rows,cols,mask,decay,sparse_1 --rounds 20 --profile rows,mask
#       where the time goes: forward + backward, and the update's host and device time
# Without one (or with PARAMSPLIT_GPU_CHECK_CPU=1), a quick mode that runs here too:
#   python benchmarks/step.py --quick --json $OUT/step_cpu_quick.json
#       --models linear,gpt2,generate,sparse,many,gpt124m     (tiny models, every table; no pytest)
#
# Everything runs from the repository root with PYTHONPATH=. (the package is not installed),
# each stage under `timeout`, all within 7 minutes. The whole output goes to the terminal and to
# $OUT/gpu_check.log; OUT defaults to a fresh temporary directory. Exit status: 0 when every stage
# passed, else 1.
set -u

TOTAL_S=420      # 7 minutes for everything
TESTS_S=180      # the test suite's share at most; the benchmark gets what is left
PHASES_S=90      # kept for the phases after the benchmark
START=$SECONDS

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")}
mkdir -p "$OUT" || exit 1
LOG="$OUT/gpu_check.log"
: >"$LOG"
FAILED=0

log() { echo "gpu_check: $*" | tee -a "$LOG"; }

# stage NAME TIMEOUT_S COMMAND...: runs COMMAND under timeout, output to the terminal and the log.
stage() {
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    if [ "$limit" -le 0 ]; then
        log "== $name: SKIPPED, no time left of the ${TOTAL_S} s"
        FAILED=1
        return
    fi
    log "== $name (timeout ${limit} s): $*"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    if [ "$rc" -eq 0 ]; then
        log "== $name: passed in $((SECONDS - t0)) s"
    else
        [ "$rc" -eq 124 ] && rc="$rc (timed out)"
        log "== $name: FAILED, exit status $rc after $((SECONDS - t0)) s"
        FAILED=1
    fi
}

left() { echo $((TOTAL_S - (SECONDS - START) - 5)); }

MODE=cpu-quick
if [ "${PARAMSPLIT_GPU_CHECK_CPU:-0}" = 1 ] || [ -n "${PARAMSPLIT_IN_GPU_CHECK:-}" ]; then
    REASON="forced (PARAMSPLIT_GPU_CHECK_CPU=1, or inside another gpu_check)"
elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    REASON="nvidia-smi lists no GPU"
elif ! timeout 120 "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
        >/dev/null 2>&1; then
    REASON="torch.cuda.is_available() is False"
else
    MODE=cuda
    REASON="CUDA available"
fi
export PARAMSPLIT_IN_GPU_CHECK=1  # a test that runs this script again gets the CPU mode

log "mode $MODE ($REASON); repository $(pwd); OUT $OUT; $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
log "python $("$PY" -c 'import platform; print(platform.python_version())' 2>&1)," \
    "commit $(git describe --always --dirty 2>/dev/null || echo '(no git)')"
if [ "$MODE" = cuda ]; then
    nvidia-smi -L 2>&1 | tee -a "$LOG"
    log "torch, transformers, GPU:"
    timeout 120 "$PY" -c \
        'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())' \
        2>&1 | tee -a "$LOG"
    log "pip list (the first 80 lines):"
    PIPS=$(timeout 60 "$PY" -m pip list 2>/dev/null || timeout 60 pip list 2>/dev/null)
    printf '%s\n' "$PIPS" | head -80 | tee -a "$LOG"
    stage "tests on cuda" "$(( $(left) < TESTS_S ? $(left) : TESTS_S ))" \
        env PARAMSPLIT_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider tests/test_device.py
    stage "step benchmark on cuda" "$(( $(left) - PHASES_S ))" \
        "$PY" benchmarks/step.py --device cuda --models gpt124m,many --budget 8 \
        --json "$OUT/step_cuda.json"
    stage "phases on cuda" "$(left)" \
        "$PY" benchmarks/phases.py --device cuda --models gpt124m,many \
        --variants baseline,rows,cols,mask,decay,sparse_1 --rounds 20 --profile rows,mask
else
    stage "step benchmark, quick, on cpu" "$(left)" \
        "$PY" benchmarks/step.py --quick --json "$OUT/step_cpu_quick.json" \
        --models linear,gpt2,generate,sparse,many,gpt124m
fi

if [ "$FAILED" = 0 ]; then
    log "done in $((SECONDS - START)) s: every stage passed; log $LOG"
else
    log "done in $((SECONDS - START)) s: SOME STAGE FAILED; log $LOG"
fi
exit "$FAILED"
