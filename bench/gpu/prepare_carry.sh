#!/usr/bin/env bash
# Build the carry folder for the GPU machine (runs here, with PyPI reachable): everything it lacks,
# in one folder of at most 60 MiB that the device tool's `carry` list names (bench/gpu/README.md).
#   - wheels/   for its Python (default 3.12, manylinux x86-64), no dependencies pulled in: pycocotools,
#               fvcore, iopath, yacs, omegaconf, hydra-core, antlr4, termcolor, nibabel, pydicom
#               (versions of requirements/pinned.txt), and Detectron2 (PyPI sdist pb1-detectron2,
#               patched by d2ct.installer) built into a pure-Python wheel;
#   - fallback/ small packages the machine's image lists (pyyaml, tabulate, tqdm, ...), installed
#               there only if one is missing; setuptools<81 where pkg_resources is gone;
#   - data/openkbp_holdout: the OpenKBP patient hold-out set (tools/make_holdout.py, seed 0) of the
#               CPU runs, for the short real run. Licensed data: the folder is git-ignored, never commit it.
# torch, torchvision, numpy and the CUDA libraries are not carried: the machine has them.
#
# Usage: bash bench/gpu/prepare_carry.sh [--out DIR] [--python-version X.Y] [--platform TAG]
#            [--build-python PY] [--data DIR | --no-data] [--max-mib N]
#        bash bench/gpu/prepare_carry.sh --check-only DIR [--max-mib N]    (files / size against the manifest)
# Defaults: --out .device/carry, --python-version 3.12, --platform manylinux_2_28_x86_64,
# --build-python .venv/bin/python (needs torch and setuptools<81 to build Detectron2: `make setup`),
# --data $D2CT_OPENKBP or /work/shared/data/openkbp_fewshot, --max-mib 60.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

OUT_DIR=.device/carry
PYV=3.12
PLATFORM=manylinux_2_28_x86_64
BUILD_PY=.venv/bin/python
DATA_SRC="${D2CT_OPENKBP:-/work/shared/data/openkbp_fewshot}"
MAX_MIB=60
CHECK_ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT_DIR="$2"; shift 2 ;;
        --python-version) PYV="$2"; shift 2 ;;
        --platform) PLATFORM="$2"; shift 2 ;;
        --build-python) BUILD_PY="$2"; shift 2 ;;
        --data) DATA_SRC="$2"; shift 2 ;;
        --no-data) DATA_SRC=""; shift ;;
        --max-mib) MAX_MIB="$2"; shift 2 ;;
        --check-only) CHECK_ONLY="$2"; shift 2 ;;
        -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
        *) echo "prepare_carry: unknown option $1" >&2; exit 2 ;;
    esac
done
# carry.py needs only the standard library: any python3 runs it.
HOST_PY="$(command -v python3)"

if [ -n "$CHECK_ONLY" ]; then
    exec "$HOST_PY" bench/gpu/carry.py check "$CHECK_ONLY" --max-mib "$MAX_MIB"
fi
if ! "$BUILD_PY" -c "import torch, setuptools, pkg_resources" 2>/dev/null; then
    echo "prepare_carry: $BUILD_PY must have torch and setuptools<81 (Detectron2's setup.py imports both); run 'make setup'" >&2
    exit 1
fi
if [ -n "$DATA_SRC" ] && [ ! -d "$DATA_SRC/train-images" ]; then
    echo "prepare_carry: $DATA_SRC is not an OpenKBP few-shot folder (no train-images/); pass --data DIR or --no-data" >&2
    exit 1
fi

T0=$(date +%s)
TMP="$OUT_DIR.tmp"
rm -rf "$TMP"
mkdir -p "$TMP"
echo "[prepare_carry] wheels for Python $PYV $PLATFORM (pip of $BUILD_PY)"
"$HOST_PY" bench/gpu/carry.py fetch "$TMP" --python-version "$PYV" --platform "$PLATFORM" --build-python "$BUILD_PY"
echo "[prepare_carry] Detectron2: pb1-detectron2 sdist patched by d2ct.installer, built into a wheel"
"$HOST_PY" bench/gpu/carry.py detectron2 "$TMP" --build-python "$BUILD_PY"
notes=(--note "built_by=bench/gpu/prepare_carry.sh" --note "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)")
if [ -n "$DATA_SRC" ]; then
    echo "[prepare_carry] OpenKBP patient hold-out set from $DATA_SRC (tools/make_holdout.py, 20% of patients, seed 0)"
    "$BUILD_PY" tools/make_holdout.py --data "$DATA_SRC" --out "$TMP/data/openkbp_holdout" \
        --test-fraction 0.2 --group-by patient --seed 0 >/dev/null
    rm -f "$TMP/data/openkbp_holdout/preview.png"  # not needed there
    notes+=(--note "data=$DATA_SRC via tools/make_holdout.py --test-fraction 0.2 --group-by patient --seed 0")
fi
"$HOST_PY" bench/gpu/carry.py manifest "$TMP" --python-version "$PYV" --platform "$PLATFORM" --max-mib "$MAX_MIB" "${notes[@]}"
rm -rf "$OUT_DIR"
mv "$TMP" "$OUT_DIR"
echo "[prepare_carry] $OUT_DIR ready in $(( $(date +%s) - T0 )) s: $(du -sh "$OUT_DIR" | cut -f1) on disk"
