#!/usr/bin/env bash
# Make d2ct importable on a GPU machine that has PyTorch + torchvision but no network: install the
# carry folder's wheels (bench/gpu/prepare_carry.sh: pycocotools, fvcore, iopath, yacs, omegaconf,
# hydra-core, nibabel, the patched Detectron2, ...) into a fresh --target folder with pip's index off,
# and put it and the project on PYTHONPATH. Fails in seconds, saying why, when this Python does not
# fit the carry (its version, or torch / torchvision / numpy ... missing or too old).
#
# Usage, from the project root:  source bench/gpu/offline_env.sh [CARRY]     (default .device/carry)
# Environment: PYTHON (default python3), D2CT_SITE (default /tmp/d2ct-site), OUT (install facts go to
# $OUT/install.json when set).
_d2ct_offline_env() {
    local carry="${1:-${D2CT_CARRY:-.device/carry}}"
    local py="${PYTHON:-python3}"
    local site="${D2CT_SITE:-/tmp/d2ct-site}"
    local root facts plan
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    facts="${OUT:+$OUT/install.json}"
    if [ ! -d "$carry" ]; then
        echo "offline_env: carry folder $carry not found (build it with bench/gpu/prepare_carry.sh)" >&2
        return 1
    fi
    # Which wheels: the always-needed ones, plus fallbacks for modules this Python lacks.
    plan="$("$py" "$root/bench/gpu/carry.py" plan "$carry" ${facts:+--facts "$facts"})" || return 1
    rm -rf "$site"
    # --isolated: no pip config file or PIP_* variable (index, find-links) takes part.
    # shellcheck disable=SC2086
    "$py" -m pip --isolated install -q --no-index --no-deps --no-compile --no-cache-dir \
        --disable-pip-version-check --target "$site" $plan || {
        echo "offline_env: pip could not install the carried wheels into $site" >&2
        return 1
    }
    export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
    export PYTHONUNBUFFERED=1
    "$py" -c "import torch, torchvision, detectron2, d2ct, pycocotools.mask, fvcore, omegaconf, hydra, nibabel; \
from detectron2.engine import DefaultTrainer; import d2ct.engine; \
torchvision.ops.nms(torch.zeros(1, 4), torch.ones(1), 0.5); \
print('offline_env: torch', torch.__version__, '| torchvision', torchvision.__version__, '| detectron2', \
detectron2.__version__, 'from', detectron2.__file__.rsplit('/', 2)[0], '| cuda', torch.cuda.is_available())" || {
        echo "offline_env: the installed packages do not import, or torchvision does not fit this torch (see above)" >&2
        return 1
    }
}
_d2ct_offline_env "$@"
