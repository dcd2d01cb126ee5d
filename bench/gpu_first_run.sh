#!/usr/bin/env bash
# The first run on a GPU machine, in one command:
#   bash bench/gpu_first_run.sh
# 1. what this machine can do (`tbrun info`: GPU, pinned memory, Triton, the gather method and why);
# 2. the GPU tests (`pytest -m gpu`);
# 3. the gather methods on their own (`tbrun bench gather`);
# 4. the whole latency report: every mode at 32k, 64k, 128k and 256k, one context per command into
#    one report (a context that fails, say out of memory, does not lose the others).
# Every step runs even if an earlier one failed; the end says which failed and where its log is.
# Settings (environment): VENV (default .venv; `make setup` makes it), OUT (default bench/results),
# CONTEXTS (default "32k 64k 128k 256k"), ARCH (default llama-3.1-8b), LATENCY_ARGS (more options for
# `tbrun bench latency`, e.g. "--interval 4"), DRY_RUN=1 (print the steps only).
set -uo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
OUT=${OUT:-bench/results}
CONTEXTS=${CONTEXTS:-32k 64k 128k 256k}
ARCH=${ARCH:-llama-3.1-8b}
LATENCY_ARGS=${LATENCY_ARGS:-}
DRY_RUN=${DRY_RUN:-0}
LOGS="$OUT/first-run-logs"
STEPS=()
RESULTS=()

run_step() {  # run_step NAME COMMAND...: run, log to $LOGS/NAME.log, remember the outcome
    local name=$1
    shift
    STEPS+=("$name")
    if [ "$DRY_RUN" = 1 ]; then
        echo "[dry run] $name: $*"
        RESULTS+=("not run")
        return
    fi
    echo "=== $name: $*"
    "$@" 2>&1 | tee "$LOGS/$name.log"
    local status=${PIPESTATUS[0]}
    if [ "$status" = 0 ]; then RESULTS+=("ok"); else RESULTS+=("FAILED (exit $status)"); fi
}

if [ "$DRY_RUN" != 1 ]; then
    if [ ! -x "$VENV/bin/tbrun" ]; then
        echo "=== setting up $VENV (make setup)"
        make setup VENV="$VENV" || { echo "FAILED: make setup (see above)"; exit 2; }
    fi
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "FAILED: torch sees no CUDA GPU here ($("$VENV/bin/python" -c 'import torch; print(torch.__version__)')):"
        echo "this script is for a machine with a GPU and a CUDA build of torch (make setup installs one"
        echo "where nvidia-smi works)."
        exit 2
    fi
    mkdir -p "$LOGS"
fi

run_step info "$VENV/bin/tbrun" info
run_step gpu-tests "$VENV/bin/python" -m pytest -m gpu -ra -q
run_step bench-gather "$VENV/bin/tbrun" bench gather --out "$OUT"
append=()
for context in $CONTEXTS; do
    # shellcheck disable=SC2086  # LATENCY_ARGS is a list of options
    run_step "latency-$context" "$VENV/bin/tbrun" bench latency --arch "$ARCH" --contexts "$context" --out "$OUT" \
        ${append[@]+"${append[@]}"} $LATENCY_ARGS
    append=(--append)
done

echo
echo "=== summary"
failed=0
for i in "${!STEPS[@]}"; do
    printf '%-16s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}"
    case "${RESULTS[$i]}" in FAILED*) failed=1 ;; esac
done
if [ "$DRY_RUN" = 1 ]; then exit 0; fi
echo "logs: $LOGS/<step>.log; reports: $OUT"
if [ "$failed" = 1 ]; then
    echo "Some steps FAILED: send the summary above and the logs of the failed steps."
    exit 1
fi
echo "Every step passed."
