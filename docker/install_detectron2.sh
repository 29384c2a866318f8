#!/usr/bin/env bash
# Install Detectron2 into the image's Python (called by docker/Dockerfile).
#
#   install_detectron2.sh git  COMMIT   upstream source at a pinned commit, compiled ops built with nvcc
#                                       (TORCH_CUDA_ARCH_LIST picks the GPU generations; FORCE_CUDA=1
#                                       because no GPU is visible during `docker build`)
#   install_detectron2.sh pypi          d2ct's PyPI route: pb1-detectron2==0.6 sdist, sha256-verified and
#                                       patched by d2ct.installer; no compiled ops (Mask R-CNN with
#                                       axis-aligned boxes does not need them)
#
# Environment: PYTHON (default python), D2CT_HOME (default /opt/d2ct: where d2ct/installer.py is).
set -euo pipefail

PYTHON="${PYTHON:-python}"
D2CT_HOME="${D2CT_HOME:-/opt/d2ct}"
source_kind="${1:-}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

case "$source_kind" in
    git)
        commit="${2:?usage: install_detectron2.sh git COMMIT}"
        echo "[detectron2] upstream source at $commit, CUDA archs: ${TORCH_CUDA_ARCH_LIST:-default}"
        FORCE_CUDA="${FORCE_CUDA:-1}" "$PYTHON" -m pip install --no-build-isolation --no-deps \
            "git+https://github.com/facebookresearch/detectron2.git@${commit}"
        ;;
    pypi)
        echo "[detectron2] d2ct's PyPI route (pb1-detectron2 0.6, patched, no compiled ops)"
        # setup.py imports torch: metadata is prepared without build isolation
        "$PYTHON" -m pip download --no-deps --no-build-isolation --no-binary :all: \
            "pb1-detectron2==0.6" -d "$work"
        src="$(cd "$D2CT_HOME" && "$PYTHON" -m d2ct.installer \
            --prepare-detectron2 "$work/pb1-detectron2-0.6.tar.gz" --workdir "$work/src")"
        "$PYTHON" -m pip install --no-build-isolation --no-deps "$src"
        ;;
    *)
        echo "install_detectron2.sh: DETECTRON2_SOURCE must be 'git' or 'pypi', got '$source_kind'" >&2
        exit 2
        ;;
esac

# Detectron2's source packages install its own tools/ as a top-level package `tools`, which would
# shadow d2ct's tools/ for code that imports it: remove it when it is Detectron2's.
stray="$(cd / && "$PYTHON" -c 'import os, tools; print(os.path.dirname(tools.__file__))' 2>/dev/null || true)"
if [ -n "$stray" ] && [ -f "$stray/plain_train_net.py" ]; then
    echo "[detectron2] removing the stray top-level 'tools' package $stray"
    rm -rf "$stray"
fi

cd / && "$PYTHON" -c '
import detectron2
from detectron2 import _C, model_zoo
model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml")
print("[detectron2]", detectron2.__version__, "from", detectron2.__file__)
print("[detectron2] compiled ops:", getattr(_C, "has_compiled_ops", True), "| CUDA:", _C.get_cuda_version())
'
