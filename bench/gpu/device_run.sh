#!/usr/bin/env bash
# Everything d2ct wants to know from a GPU machine, in one call of at most ~9 minutes
# (bench/gpu/README.md): offline install from the carry folder, CUDA checks, training / inference
# speed, and a short real run on OpenKBP with its test-patient scores. Every result lands in
# $OUT (results.json, results.md, log.txt, logs/log.txt, install.json) as soon as it exists, so a
# run cut short still returns what finished.
#
#   bash bench/gpu/device_run.sh --carry .device/carry            # on the GPU machine ($OUT set)
#   bash bench/gpu/device_run.sh --carry DIR --out DIR --smoke    # CPU rehearsal (tiny sizes)
#
# Options: --carry DIR (default .device/carry), --out DIR (default $OUT, else .device/out),
# --python PY (default $PYTHON or python3), --total-s S (wall-time budget, default 530 s),
# --short-budget-s S (short-run training seconds, default 240), --smoke.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1

CARRY=.device/carry
OUTDIR="${OUT:-.device/out}"
PY="${PYTHON:-python3}"
SMOKE=0
TOTAL=530
SHORT=240
while [ $# -gt 0 ]; do
    case "$1" in
        --carry) CARRY="$2"; shift 2 ;;
        --out) OUTDIR="$2"; shift 2 ;;
        --python) PY="$2"; shift 2 ;;
        --smoke) SMOKE=1; shift ;;
        --total-s) TOTAL="$2"; shift 2 ;;
        --short-budget-s) SHORT="$2"; shift 2 ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "device_run: unknown option $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$OUTDIR" || exit 1
OUTDIR="$(cd "$OUTDIR" && pwd)"
export OUT="$OUTDIR" PYTHON="$PY" PYTHONUNBUFFERED=1
exec > >(tee -a "$OUTDIR/log.txt") 2>&1

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
say() { echo "[device_run +$(elapsed)s] $*"; }
FAILED=0

# part NAME LIMIT_S CMD...: run CMD with a time limit; its wall time and exit status go into results.
part() {
    local name="$1" limit="$2" start rc
    shift 2
    start=$(date +%s)
    say "== $name (limit ${limit}s)"
    timeout -k 10 "$limit" "$@"
    rc=$?
    [ "$rc" -ne 0 ] && FAILED=1 && say "$name: exit $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')"
    "$PY" bench/gpu/device_checks.py timing --out "$OUTDIR" --part "$name" --seconds $(( $(date +%s) - start )) --rc "$rc"
    return "$rc"
}

say "mode: $([ $SMOKE = 1 ] && echo smoke || echo full), carry $CARRY, out $OUTDIR, python $PY ($("$PY" -V 2>&1))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# a. offline install against the torch found here (fails in seconds when it does not fit)
start=$(date +%s)
# shellcheck source=bench/gpu/offline_env.sh
if ! source bench/gpu/offline_env.sh "$CARRY"; then
    say "install failed: nothing else can run"
    "$PY" bench/gpu/device_checks.py timing --out "$OUTDIR" --part install --seconds $(( $(date +%s) - start )) --rc 1
    exit 1
fi
"$PY" bench/gpu/device_checks.py timing --out "$OUTDIR" --part install --seconds $(( $(date +%s) - start )) --rc 0

DATA="$CARRY/data/openkbp_holdout"
if [ ! -d "$DATA/test-images" ]; then
    say "$DATA: no OpenKBP hold-out set in the carry (prepare_carry.sh --data)"; exit 1
fi
C=(bench/gpu/device_checks.py --out "$OUTDIR" --data "$DATA")
if [ $SMOKE = 1 ]; then
    # 2 CPU cores: tiny inputs, 2 images per iteration; CUDA-only checks are reported as skipped.
    # Limits are loose: a shared 2-core host can be several times slower than when idle.
    part env 300 "$PY" "${C[@]}" env --smoke
    part train 1200 "$PY" "${C[@]}" train --smoke
    part nccl 600 "$PY" "${C[@]}" nccl --smoke
    part short_run 1200 "$PY" "${C[@]}" short_run --smoke --budget-s 20 --test-limit 6
else
    # b + c. versions and ops, then every radiologist x fp32 / AMP (finite losses, speed, memory)
    part env 90 "$PY" "${C[@]}" env
    part train 210 "$PY" "${C[@]}" train
    part nccl 90 "$PY" "${C[@]}" nccl
    # d. the short real run gets what is left: training budget = left - 100 s (startup, scoring,
    # inference timing), at most SHORT.
    left=$(( TOTAL - $(elapsed) ))
    budget=$(( left - 100 < SHORT ? left - 100 : SHORT ))
    if [ "$budget" -ge 30 ]; then
        part short_run $(( left - 5 )) "$PY" "${C[@]}" short_run --budget-s "$budget"
    else
        say "short_run skipped: only ${left}s left"; FAILED=1
    fi
fi
"$PY" bench/gpu/device_checks.py table --out "$OUTDIR"
say "done in $(elapsed)s; results: $OUTDIR/results.md, $OUTDIR/results.json"
cat "$OUTDIR/results.md"
exit $FAILED
