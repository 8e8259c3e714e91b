#!/usr/bin/env bash
# idla on real hardware: every GPU check in one go, on a machine with one NVIDIA GPU (written
# for one H200 and 16 cores). From a copy of the repository:
#
#   bash scripts/gpu_check.sh                  # OUT=./gpu_out unless OUT is set
#
# Writes $OUT/gpu_report.txt, one verdict line per check ("<KIND> <check>: <detail>"):
#   PASS     it works as the code claims        FAIL     it does not (the log says why)
#   NUM      a measurement                      SKIP     not run, and why
#   TIMEOUT  cut off by its time limit          INFO     context (versions, exit codes)
# then a SUMMARY line; and $OUT/gpu_log.txt, everything every step printed. Always exits 0:
# the report is the result. Without a GPU it writes SKIP for every section within seconds.
#
# Sections, in order (limit in s; expected on the H200 box in brackets):
#   setup        a Python whose torch sees the GPU, a venv that sees its packages      [~15]
#   env          versions, the GPU, the dependencies, the fleet torchrun would get 60   [~5]
#   tests_gpu    python -m pytest tests/gpu: the assertions                        240  [~120]
#   unit_cuda    the CUDA cases of the unit tests (codecs, digests, fixed order)   60   [~10]
#   measure      scripts/gpu_measure.py: GPU alone, 2 CPU ranks, mixed (NUM)       180  [~70]
#   serve_infer  the --device tests of idla serve and idla infer                   150  [~60]
#   cli_train    idla train --workers 1 (its worker on cuda:0)                      90   [~20]
#   example_torchrun_1  examples/train_torchrun.py, torchrun, 1 process on cuda     90   [~15]
#   example_mixed       examples/train_mixed_devices.py, torchrun --nproc-per-node 3 120  [~30]
# The whole run is capped at IDLA_GPU_CHECK_BUDGET_S (default 450 s, so under 8 minutes);
# a section gets at most what is left of it.
#
# Python: the machine's own CUDA build of torch; nothing is downloaded. The first of
# $IDLA_GPU_PYTHON, python3, python, /usr/bin/python3, /usr/local/bin/python3,
# /opt/conda/bin/python whose torch sees a GPU is the base. A venv ($IDLA_GPU_VENV, default
# $TMPDIR/idla-gpu-venv) sees the base's packages through a .pth file (and $IDLA_GPU_EXTRA_SITE,
# a folder of further pure-Python packages, if given); idla goes in with
# `pip install --no-deps --no-build-isolation --no-index -e .`, and PYTHONPATH=src is set
# either way, so the copy's sources are the ones tested even where that install fails.

set -u

BUDGET=${IDLA_GPU_CHECK_BUDGET_S:-450}
RESERVE=15  # seconds kept for the report's last lines
SECTIONS=(env tests_gpu unit_cuda measure serve_infer cli_train example_torchrun_1
          example_mixed)
OUTDIR=${OUT:-$PWD/gpu_out}
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
REPORT=$OUTDIR/gpu_report.txt
LOG=$OUTDIR/gpu_log.txt
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

summary() {  # the SUMMARY line, from the verdicts in the report
    local kind counts=""
    for kind in PASS FAIL NUM SKIP TIMEOUT; do
        counts="$counts $(grep -c "^$kind " "$REPORT") $kind,"
    done
    echo "SUMMARY${counts%,} in $(( $(date +%s) - ${IDLA_GPU_CHECK_T0:-$(date +%s)} )) s" \
        >> "$REPORT"
}

if [ -z "${IDLA_GPU_CHECK_INNER:-}" ]; then  # the outer run: the hard cap, then the report
    IDLA_GPU_CHECK_T0=$(date +%s)
    export IDLA_GPU_CHECK_INNER=1 IDLA_GPU_CHECK_T0
    timeout -k 10 "$BUDGET" bash "${BASH_SOURCE[0]}" "$@"
    rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        echo "TIMEOUT overall: the ${BUDGET} s budget ran out (exit code $rc)" >> "$REPORT"
        grep -q '^SUMMARY' "$REPORT" || summary
    fi
    cat "$REPORT"
    exit 0
fi

cd "$ROOT" || exit 0
T0=$IDLA_GPU_CHECK_T0
WORK=$(mktemp -d -t idla-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
: > "$REPORT"
: > "$LOG"

note() { echo "$*" >> "$REPORT"; echo "$*" >> "$LOG"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) - RESERVE )); }
verdicts() { grep -aE '^(PASS|FAIL|NUM|SKIP|INFO) ' "$1" >> "$REPORT"; }
skip_from() {  # skip_from SECTION REASON: SKIP that section and every later one
    local name found=""
    for name in "${SECTIONS[@]}"; do
        [ "$name" = "$1" ] && found=1
        [ -n "$found" ] && note "SKIP $name: $2"
    done
}

SECTION_RC=0
section() {  # section NAME LIMIT_S COMMAND...: run under its limit; output in $WORK/NAME.log
    local name=$1 limit=$2 avail start
    shift 2
    avail=$(left)
    if [ "$avail" -lt 20 ]; then
        note "SKIP $name: the overall budget is spent"
        SECTION_RC=124
        return 1
    fi
    [ "$limit" -gt "$avail" ] && limit=$avail
    echo "===== $name (limit ${limit} s): $* =====" >> "$LOG"
    start=$(date +%s)
    timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    SECTION_RC=$?
    cat "$WORK/$name.log" >> "$LOG"
    if [ "$SECTION_RC" -eq 124 ] || [ "$SECTION_RC" -eq 137 ]; then
        note "TIMEOUT $name: killed after ${limit} s"
    else
        note "INFO $name: exit code $SECTION_RC after $(( $(date +%s) - start )) s"
    fi
    return 0
}

finished() { [ "$SECTION_RC" -ne 124 ] && [ "$SECTION_RC" -ne 137 ]; }  # not cut off
tail_of() { tail -n "${2:-3}" "$WORK/$1.log" 2>/dev/null | tr '\n' ' ' | tr -s ' ' | cut -c1-300; }

cat >> "$REPORT" <<EOF
# idla GPU check, $(date -u +%FT%TZ) on $(hostname) ($(uname -m), $(nproc) cores), budget ${BUDGET} s
# PASS works | FAIL does not | NUM measurement | SKIP not run | TIMEOUT cut off | INFO context
EOF
cat "$REPORT" >> "$LOG"

# ---- setup: is there a GPU, and a torch that sees it? ------------------------------------
if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
        2>&1 | sed 's/^/INFO nvidia-smi: /' >> "$REPORT"
fi
if ! ls /dev/nvidia[0-9]* > /dev/null 2>&1 && ! nvidia-smi -L > /dev/null 2>&1 \
        && [ -z "${IDLA_GPU_CHECK_FORCE:-}" ]; then
    note "INFO gpu: none on this machine (no /dev/nvidia<N>, no working nvidia-smi)"
    skip_from env "no NVIDIA GPU on this machine"
    summary
    exit 0
fi

cuda_torch() {  # cuda_torch PYTHON: its torch imports and sees a GPU
    timeout 90 "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        >> "$LOG" 2>&1
}
BASEPY=""
seen=" "
for cand in ${IDLA_GPU_PYTHON:-} python3 python /usr/bin/python3 /usr/local/bin/python3 \
        /opt/conda/bin/python; do
    path=$(command -v "$cand" 2> /dev/null) || continue
    real=$(readlink -f "$path")
    case "$seen" in *" $real "*) continue ;; esac
    seen="$seen$real "
    if cuda_torch "$path"; then BASEPY=$path; break; fi
    echo "setup: $path has no torch that sees a GPU" >> "$LOG"
done
if [ -z "$BASEPY" ]; then
    note "FAIL setup: an NVIDIA GPU is here but no Python has a CUDA build of torch that sees it (tried:$seen); set IDLA_GPU_PYTHON"
    skip_from env "no CUDA-enabled torch (setup failed)"
    summary
    exit 0
fi
note "INFO python: $BASEPY, torch $("$BASEPY" -c 'import torch; print(torch.__version__)' 2>&1)"

VENV=${IDLA_GPU_VENV:-${TMPDIR:-/tmp}/idla-gpu-venv}
PY=""
if [ -x "$VENV/bin/python" ] && cuda_torch "$VENV/bin/python"; then
    PY=$VENV/bin/python
else
    rm -rf "$VENV"
    # no pip of its own: ensurepip's older setuptools would shadow the base's; its pip serves
    if "$BASEPY" -m venv --without-pip "$VENV" >> "$LOG" 2>&1; then
        VSITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$BASEPY" - "${IDLA_GPU_EXTRA_SITE:-}" > "$VSITE/zz_image_site.pth" 2>> "$LOG" <<'EOF'
import os, site, sys, torch
paths = [os.path.dirname(os.path.dirname(torch.__file__)), *site.getsitepackages()]
user = site.getusersitepackages()
paths += [user] if isinstance(user, str) else []
paths += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
paths += [sys.argv[1]] if sys.argv[1] else []
print("\n".join(dict.fromkeys(p for p in paths if os.path.isdir(p))))
EOF
        if cuda_torch "$VENV/bin/python"; then PY=$VENV/bin/python; fi
    fi
fi
if [ -n "$PY" ]; then
    if timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
            >> "$LOG" 2>&1; then
        note "INFO venv: $VENV sees the base's packages; idla installed editable from $ROOT"
    else
        note "INFO venv: $VENV sees the base's packages; pip install -e . failed (see the log), PYTHONPATH=src serves"
    fi
else
    PY=$BASEPY
    note "INFO venv: none could be made (see the log); $BASEPY runs everything with PYTHONPATH=src"
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
unset IDLA_DEVICE  # each check names its devices; a leftover override would change them all
TORCHRUN=("$PY" -m torch.distributed.run --master-addr 127.0.0.1 --master-port 0
          --rdzv-backend c10d --rdzv-endpoint 127.0.0.1:0)
REPORTER=("$PY" scripts/gpu_check_report.py)

# ---- env ---------------------------------------------------------------------------------
section env 60 "${REPORTER[@]}" env && verdicts "$WORK/env.log"
if ! "$PY" -c 'import idla, sklearn' >> "$LOG" 2>&1; then
    note "FAIL setup: $PY cannot import idla (from $ROOT/src) or scikit-learn: $(tail -n 1 "$LOG")"
    skip_from tests_gpu "idla or its dependencies do not import (setup failed)"
    summary
    exit 0
fi

# ---- the assertions: pytest ----------------------------------------------------------------
run_pytest() {  # run_pytest NAME LIMIT_S PATHS...: one verdict per test
    local name=$1 limit=$2
    shift 2
    section "$name" "$limit" "$PY" -m pytest -v -p no:cacheprovider --junitxml="$WORK/$name.xml" \
        "$@" || return 0
    if [ -s "$WORK/$name.xml" ]; then
        "${REPORTER[@]}" junit "$WORK/$name.xml" >> "$REPORT" 2>> "$LOG"
    else
        "${REPORTER[@]}" pytest-log "$WORK/$name.log" >> "$REPORT" 2>> "$LOG"
        note "INFO $name: no JUnit file (cut short?); the verdicts above come from the -v log"
    fi
}
if "$PY" -c 'import pytest' >> "$LOG" 2>&1; then
    run_pytest tests_gpu 240 tests/gpu
    run_pytest unit_cuda 60 -k "cuda or gpu" tests/unit/test_codecs.py tests/unit/test_digest.py \
        tests/unit/test_fixed_order.py tests/unit/test_devices.py
else
    note "SKIP tests_gpu: pytest does not import in $PY (no registry here to install it)"
    note "SKIP unit_cuda: pytest does not import in $PY"
fi

# ---- measurements --------------------------------------------------------------------------
section measure 180 "$PY" scripts/gpu_measure.py && verdicts "$WORK/measure.log"
if [ "$SECTION_RC" -ne 0 ] && ! grep -qE '^(NUM|FAIL) ' "$WORK/measure.log" 2>/dev/null; then
    note "FAIL measure: $(tail_of measure)"
fi

# ---- serve and infer on cuda (their own tests, skipif no CUDA) -----------------------------
if "$PY" -c 'import pytest, fastapi, httpx, uvicorn, prometheus_client' >> "$LOG" 2>&1; then
    run_pytest serve_infer 150 tests/distributed/test_serve_devices.py \
        tests/cli/test_infer_device.py
else
    note "SKIP serve_infer: pytest or the serving dependencies do not import in $PY"
fi

# ---- the CLI and the examples, as users run them ------------------------------------------
if section cli_train 90 "$PY" -m idla.cli train --workers 1 --emulate-speeds none --epochs 4 \
        --global-batch 128 --out "$WORK/train1" --quiet && finished; then
    if [ -s "$WORK/train1/report.json" ]; then
        "${REPORTER[@]}" train cli_train_cuda0 "$WORK/train1/report.json" >> "$REPORT" 2>> "$LOG"
    else
        note "FAIL cli_train_cuda0: no report.json (exit code $SECTION_RC): $(tail_of cli_train)"
    fi
fi

# GLOO_SOCKET_IFNAME is left unset, as a user leaves it: idla's Group chooses it
if section example_torchrun_1 90 "${TORCHRUN[@]}" --nproc-per-node 1 \
        examples/train_torchrun.py --epochs 4 --global-batch 128 && finished; then
    "${REPORTER[@]}" example example_torchrun_1 "$WORK/example_torchrun_1.log" --world 1 \
        >> "$REPORT" 2>> "$LOG"
fi

MIXED_ENV=(env)
visible=${CUDA_VISIBLE_DEVICES:-}
if [ -n "$visible" ] && [ "${visible#*,}" = "$visible" ] \
        && [ "$(nvidia-smi -L 2> /dev/null | grep -c '^GPU')" = 1 ]; then
    # one GPU named by CUDA_VISIBLE_DEVICES puts every rank on it (a GPU per task, as Slurm
    # gives); this box has only that GPU, so unsetting it hides and adds nothing
    MIXED_ENV+=(-u CUDA_VISIBLE_DEVICES)
    note "INFO example_mixed: CUDA_VISIBLE_DEVICES=$visible would put all 3 ranks on cuda:0; unset for this run"
fi
fleet=$("${MIXED_ENV[@]}" "${REPORTER[@]}" expected-fleet 3 2>> "$LOG")
if section example_mixed 120 "${MIXED_ENV[@]}" "${TORCHRUN[@]}" --nproc-per-node 3 \
        examples/train_mixed_devices.py --epochs 8 --global-batch 256 && finished; then
    "${REPORTER[@]}" example example_mixed "$WORK/example_mixed.log" --world 3 \
        --fleet "$fleet" >> "$REPORT" 2>> "$LOG"
fi

summary
exit 0
