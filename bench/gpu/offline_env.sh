#!/usr/bin/env bash
# Prepare a GPU host that already has PyTorch + torchvision but no network access:
# install the wheels carried in .whl/ (pycocotools, fvcore, iopath, yacs, omegaconf, hydra-core,
# nibabel, pydicom, ...) into /tmp/site and put the prepared Detectron2 source (.carry/d2src, made by
# `python -m d2ct.installer --prepare-detectron2 SDIST --workdir ...`) and d2ct on PYTHONPATH.
# Usage: source bench/gpu/offline_env.sh
set -e
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$(pwd)/.carry/d2src:$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c "import torch, torchvision, detectron2, d2ct; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'detectron2', detectron2.__version__, 'gpu', torch.cuda.get_device_name(0))"
set +e
