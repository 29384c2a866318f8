#!/usr/bin/env bash
# Rehearse the GPU machine's run on this CPU host (bench/gpu/README.md):
#   1. a stand-in for the machine's Python: a venv of Python 3.12 (3.11 if no 3.12 is found) with
#      torch 2.11 / torchvision 0.26 and the image's other packages (bench/gpu/rehearsal_base.txt),
#      from PyPI, built once (.device/rehearsal-venv, or $D2CT_REHEARSAL_VENV);
#   2. the carry folder for that Python (bench/gpu/prepare_carry.sh; PyPI), built once
#      (.device/carry-rehearsal-pyXY) unless --fresh-carry;
#   3. a clean clone of the committed HEAD, the carry copied to its .device/carry, and there
#      `bash bench/gpu/device_run.sh --carry .device/carry --smoke` with no network at all
#      (a network namespace, `unshare -n`, where the kernel allows it) and pip's index off.
# Results: .device/rehearsal-out/ (results.json, results.md, log.txt), and a summary here.
#
# Usage: bash bench/gpu/rehearse.sh [--fresh-carry] [--full] [--keep]
#   --full   the full sizes instead of --smoke (hours on 2 cores; for a bigger CPU only)
#   --keep   keep the clone (its path is printed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT="$(pwd)"
FRESH=0
MODE=--smoke
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --fresh-carry) FRESH=1; shift ;;
        --full) MODE=""; shift ;;
        --keep) KEEP=1; shift ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "rehearse: unknown option $1" >&2; exit 2 ;;
    esac
done
T0=$(date +%s)
say() { echo "[rehearse +$(( $(date +%s) - T0 ))s] $*"; }

# 1. the machine's Python
VENV="${D2CT_REHEARSAL_VENV:-$ROOT/.device/rehearsal-venv}"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
    BASE_PY=""
    for c in "${D2CT_REHEARSAL_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 \
             /root/.pyenv/versions/3.12*/bin/python3.12 python3.11 python3; do
        # run it, not just find it: a pyenv shim is found for a version pyenv has not enabled, then fails
        if [ -n "$c" ] && "$c" -c 'import sys' >/dev/null 2>&1; then BASE_PY="$(command -v "$c")"; break; fi
    done
    [ -n "$BASE_PY" ] || { echo "rehearse: no python3.12 / python3.11 found" >&2; exit 1; }
    say "building the stand-in venv $VENV from $BASE_PY ($("$BASE_PY" -V 2>&1)); torch's CUDA build is a few GB"
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r bench/gpu/rehearsal_base.txt
fi
PYV="$("$VENV/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
say "stand-in Python: $VENV/bin/python ($PYV, torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'))"
[ "$PYV" = 3.12 ] || say "NOTE: Python $PYV, not the machine's 3.12: the carry is built for cp${PYV/./} here"

# 2. the carry for that Python
CARRY="$ROOT/.device/carry-rehearsal-py${PYV/./}"
if [ "$FRESH" = 1 ] || ! python3 bench/gpu/carry.py check "$CARRY" >/dev/null 2>&1; then
    say "building the carry $CARRY"
    t=$(date +%s)
    bash bench/gpu/prepare_carry.sh --out "$CARRY" --python-version "$PYV" > "$ROOT/.device/rehearsal-prepare.log" 2>&1 || {
        tail -30 "$ROOT/.device/rehearsal-prepare.log"; exit 1; }
    tail -2 "$ROOT/.device/rehearsal-prepare.log"
    say "prepare_carry took $(( $(date +%s) - t )) s"
fi
python3 bench/gpu/carry.py check "$CARRY" --hashes

# 3. a clean clone, the carry inside it, no network
WORK="$(mktemp -d /tmp/d2ct-rehearsal.XXXXXX)"
git clone -q "$ROOT" "$WORK/repo"
say "clean clone of $(git -C "$WORK/repo" rev-parse --short HEAD) in $WORK/repo"
[ -z "$(git status --porcelain --untracked-files=no)" ] || say "NOTE: uncommitted changes here are not in the clone"
mkdir -p "$WORK/repo/.device"
cp -r "$CARRY" "$WORK/repo/.device/carry"
OUTDIR="$WORK/out"
mkdir -p "$OUTDIR"
NET=(env)
if unshare -n true 2>/dev/null; then
    # A new network namespace has only a loopback interface, and it is down: bring it up (the
    # launcher's TCP store listens on 127.0.0.1, as on the machine).
    NET=(unshare -n sh -c 'ip link set lo up 2>/dev/null || ifconfig lo up 2>/dev/null; exec "$@"' sh)
    if "${NET[@]}" "$VENV/bin/python" -c "import socket; socket.create_connection(('pypi.org', 443), 3)" 2>/dev/null; then
        echo "rehearse: the network namespace still reaches pypi.org" >&2; exit 1
    fi
    say "network: none but loopback (unshare -n; pypi.org unreachable there)"
else
    say "network: unshare -n is not allowed here; relying on pip --isolated --no-index alone"
fi
t=$(date +%s)
set +e
# A clean environment, as on the machine: no PIP_* settings, no PYTHONPATH, no proxy.
(cd "$WORK/repo" && "${NET[@]}" env -i PATH="/usr/local/bin:/usr/bin:/bin" HOME="$WORK" LANG=C.UTF-8 \
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" OUT="$OUTDIR" \
    bash bench/gpu/device_run.sh --carry .device/carry --python "$VENV/bin/python" $MODE)
rc=$?
set -e
say "device_run.sh exited $rc after $(( $(date +%s) - t )) s"
rm -rf "$ROOT/.device/rehearsal-out"
cp -r "$OUTDIR" "$ROOT/.device/rehearsal-out"
[ "$KEEP" = 1 ] && say "clone kept: $WORK/repo" || rm -rf "$WORK"
say "results: $ROOT/.device/rehearsal-out/results.md"
exit $rc
