#!/usr/bin/env bash
# The prepared GPU check: everything lad-fast measures on a GPU, in one run of at most 8 minutes on one
# H100 / H200 from a cold start. Run it first whenever a GPU is available:
#
#   bash bench/gpu_suite.sh [--out DIR]      # on the GPU machine; results in bench/results/gpu/<date>/
#   bash bench/gpu_suite.sh --cpu-dry-run    # the same steps at tiny shapes on a CPU (interpreter); CI
#   bash bench/gpu_suite.sh --fetch-wheels   # on a machine with pip access: fill .whl/ (see below)
#
# Steps, each under its own time limit inside an overall budget (a step that overruns is stopped and
# logged, the suite goes on):
#   1. install   what the GPU image lacks, from wheels carried in the working tree (.whl/, or
#                $LAD_FAST_WHEELS), then lad-fast itself (editable, no index, no build isolation)
#   2. env       device and versions
#   3. topology  the structure vector's torch GPU path against the numpy path
#   4. sampler   `lad-fast bench sampler` per backend, when that command exists (else one logged line)
#   5. pytest    tests/kernels, bf16 tests included (they run only on CUDA); in the dry run, a quick subset
#   6. kernels   Triton vs the PyTorch paths at `lad` shapes, forward and forward+backward
#   7. compile   the ahead-of-time compile check, loaded on this GPU (bench/compile_sweep.py --device)
#   8. calibrate each `lad` model's real training step against `lad-fast plan`: measured / predicted
#                peak memory and step time, the plan's calibration factors (lines of train.jsonl)
#   9. train     one compiled bf16 training step of the `lad` VQ-GAN and U-Net, impl triton vs torch
#                (last: it gets what is left of the budget; each model/impl is written as it finishes)
# Every result is a JSON line carrying device and versions, in DIR/<step>.jsonl; DIR/steps.jsonl holds
# each step's status and seconds, DIR/suite.log the whole output, DIR/pytest.xml the test report: nine
# files at most, what the device tool returns. Commit DIR under bench/results/.
#
# Wheels carried to the GPU machine (its image has torch 2.11, triton 3.6, cupy, onnxruntime, numpy,
# scipy, typer, rich, safetensors, pillow, pytest, pytest-xdist): the list is bench/gpu_wheels.txt
# (nibabel only, ~3.5 MiB: lad_fast.data.io needs it; gudhi, the topology oracle, is not needed here).
# With the device tool: `--fetch-wheels` here, then run with carry [".whl"] and the command
#   bash bench/gpu_suite.sh --out $OUT/gpu     (then copy $OUT/gpu to bench/results/gpu/<date>/)
# Exit status: 0 when no step failed (skipped steps are not failures), 1 otherwise, 2 on bad usage.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
WHEELS=${LAD_FAST_WHEELS:-.whl}
DRY=0
FETCH=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) DRY=1 ;;
        --fetch-wheels) FETCH=1 ;;
        --out) shift; OUT=${1:-} ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "gpu_suite.sh: unknown option '$1' (see --help)"; exit 2 ;;
    esac
    shift
done

if [ "$FETCH" = 1 ]; then
    # Wheels for the GPU image's Python (3.12, x86-64 manylinux), without dependencies: the list names all.
    mkdir -p "$WHEELS"
    grep -v '^#' bench/gpu_wheels.txt | grep -v '^$' | while read -r req; do
        "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
            -d "$WHEELS" "$req" || exit 1
    done
    du -sh "$WHEELS"
    exit 0
fi

if [ -z "$OUT" ]; then
    if [ "$DRY" = 1 ]; then OUT=$(mktemp -d); else OUT=bench/results/gpu/$(date -u +%Y-%m-%d); fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
exec > >(tee -a "$OUT/suite.log") 2>&1

START=$(date +%s)
BUDGET=${LAD_FAST_SUITE_BUDGET:-470}  # seconds for all steps: 8 minutes less the machine's start
FAILED=0
SKIP=75  # the exit status of a step that had nothing to run
TINY=()
if [ "$DRY" = 1 ]; then
    TINY=(--tiny)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
# A handful of autotune configs per conv kernel instead of the full sweep (see _conv3d_triton.py).
export LAD_FAST_AUTOTUNE=${LAD_FAST_AUTOTUNE:-quick} PYTHONUNBUFFERED=1

log() { echo "[gpu_suite $(date -u +%H:%M:%S)] $*"; }

record() {  # step status seconds [note]
    printf '{"step": "%s", "status": "%s", "seconds": %s, "note": "%s", "dry_run": %s}\n' \
        "$1" "$2" "$3" "${4:-}" "$([ "$DRY" = 1 ] && echo true || echo false)" >>"$OUT/steps.jsonl"
}

run_step() {  # name limit_seconds command...
    local name=$1 limit=$2
    shift 2
    local left=$((BUDGET - ($(date +%s) - START)))
    if [ "$left" -lt 10 ]; then
        log "$name: skipped, the suite's ${BUDGET}s budget is spent"
        record "$name" skipped 0 "budget spent"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    log "$name: start (limit ${limit}s)"
    local t0 rc
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then
        timeout --kill-after=10 "$limit" bash -c "$*"  # a function of this script (exported below)
    else
        timeout --kill-after=10 "$limit" "$@"
    fi
    rc=$?
    local dt=$(($(date +%s) - t0))
    if [ "$rc" = 0 ]; then
        log "$name: ok in ${dt}s"
        record "$name" ok "$dt"
    elif [ "$rc" = "$SKIP" ]; then
        record "$name" skipped "$dt" "see $name.jsonl"
    elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        log "$name: TIMED OUT after ${dt}s (partial results kept)"
        record "$name" timeout "$dt"
        FAILED=1
    else
        log "$name: FAILED (exit $rc) after ${dt}s"
        record "$name" failed "$dt" "exit $rc"
        FAILED=1
    fi
}

install() {
    if [ "$DRY" = 1 ]; then
        log "dry run: nothing installed; lad_fast must already import here"
        "$PY" -c "import lad_fast, lad_fast.kernels" || return 1
        grep -v '^#' bench/gpu_wheels.txt | grep -v '^$' | sed 's/^/  would install: /'
        return 0
    fi
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl || return 1
    else
        log "no wheels in $WHEELS: modules that need them (lad_fast.data.io) will not import"
    fi
    if ! "$PY" -c "import lad_fast.kernels" 2>/dev/null; then
        if ! "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e "$ROOT"; then
            # No usable setuptools: the package-dir mapping by hand (kernels/, export/, cli/ are
            # sub-packages of lad_fast) as links inside lad_fast/ of this copy; $ROOT is on PYTHONPATH.
            log "editable install failed: linking kernels/, export/, cli/ into lad_fast/ instead"
            for sub in kernels export cli; do ln -sfn "../$sub" "$ROOT/lad_fast/$sub" || return 1; done
        fi
    fi
    "$PY" -c "import lad_fast, torch, triton; print('lad_fast', lad_fast.__file__, 'torch', torch.__version__, 'triton', triton.__version__)"
}

run_pytest() {
    local args=(-q -p no:cacheprovider --junitxml="$OUT/pytest.xml")
    if [ "$DRY" = 1 ]; then
        # CI runs the whole folder on its own; the dry run checks that this step works.
        "$PY" -m pytest "${args[@]}" tests/kernels/test_conv3d_backward.py -k "minimal or buckets"
    else
        # xdist spreads the kernels' JIT compiles over the cores when it is installed (it is on the image).
        local par=()
        "$PY" -c "import xdist" 2>/dev/null && par=(-n 8)
        "$PY" -m pytest "${args[@]}" "${par[@]}" tests/kernels
    fi
}

lad_fast_cli() {  # the CLI without relying on the console script being on PATH
    "$PY" -c "import sys; from lad_fast.cli.app import main; sys.argv[0] = 'lad-fast'; main()" "$@"
}

run_sampler() {
    if ! lad_fast_cli bench sampler --help >/dev/null 2>&1; then
        log "sampler: skipped: 'lad-fast bench sampler' does not exist in this checkout"
        printf '{"step": "sampler", "skipped": "lad-fast bench sampler does not exist in this checkout"}\n' \
            >>"$OUT/sampler.jsonl"
        return "$SKIP"
    fi
    if [ "$DRY" = 1 ]; then  # tiny network, eager only, one volume, two baseline steps; nothing appended
        lad_fast_cli bench sampler --preset tiny --backends torch --n 1 --baseline-steps 2 --no-write \
            --note "gpu_suite --cpu-dry-run"
        return
    fi
    # lad sizes, every backend this machine has, beside the official configuration (10 DDPM steps timed,
    # scaled to its 300); the line appended to bench/results/sampler.jsonl is also kept with the suite
    lad_fast_cli bench sampler --preset lad --device cuda --n 2 --baseline-steps 10 --note "bench/gpu_suite.sh" \
        && tail -n 1 "$ROOT/bench/results/sampler.jsonl" >>"$OUT/sampler.jsonl"
}

SITE=/tmp/lad_fast_site  # where the carried wheels go (pip --target), first on PYTHONPATH, then the repo
export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PY DRY WHEELS OUT ROOT SITE SKIP
export -f log install run_pytest run_sampler lad_fast_cli

log "results in $OUT (dry run: $DRY)"
# Short steps first; the training step (inductor compiles four graphs) last, with what is left.
run_step install 60 install
run_step env 30 "$PY" bench/gpu_suite.py env --out "$OUT" "${TINY[@]}"
run_step topology 25 "$PY" bench/gpu_suite.py topology --out "$OUT" "${TINY[@]}"
run_step sampler 30 run_sampler
run_step pytest 120 run_pytest
run_step kernels 110 "$PY" bench/gpu_suite.py kernels --out "$OUT" "${TINY[@]}"
run_step compile 90 "$PY" bench/compile_sweep.py --device "${TINY[@]}"  # AOT check on this GPU; log only
run_step calibrate 120 "$PY" bench/gpu_suite.py calibrate --out "$OUT" "${TINY[@]}"
run_step train "$BUDGET" "$PY" bench/gpu_suite.py train --out "$OUT" "${TINY[@]}"
log "done in $(($(date +%s) - START))s; steps:"
cat "$OUT/steps.jsonl"
exit "$FAILED"
