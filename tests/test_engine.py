"""Training engine: configs, real training steps on phantom slices, evaluation, best checkpoint,
resume after a kill, the 2-process CPU launch, and the pretrained-weights check."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from d2ct.config import setup_cfg
from d2ct.engine.weights import resolve_weights, scratch_variant
from d2ct.errors import ConfigError, WeightsUnavailableError

from .conftest import PYTHON, ROOT, TINY_OPTS, run_tool, train_tiny

ALL_CONFIGS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml")
                     if not p.name.startswith(("Base", "pipeline")))
FROM_SCRATCH = ("configs/scratch", "configs/demo", "configs/cpu")
PRETRAINED = [c for c in ALL_CONFIGS if not c.startswith(FROM_SCRATCH)]


def test_every_config_loads_and_adapts_to_cpu():
    assert len(ALL_CONFIGS) >= 12
    for config in ALL_CONFIGS:
        cfg = setup_cfg(str(ROOT / config))
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1, config
        assert cfg.INPUT.MASK_FORMAT == "bitmask", config
        assert cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS is False, config
        # the CPU real-data configs keep 50 (at most 7 organs per OpenKBP slice; the mask head
        # over every detection dominates CPU inference)
        assert cfg.TEST.DETECTIONS_PER_IMAGE == (50 if config.startswith("configs/cpu") else 100), config
        if not torch.cuda.is_available():
            assert cfg.MODEL.DEVICE == "cpu", config
        if config in PRETRAINED:
            assert cfg.MODEL.WEIGHTS.startswith("detectron2://ImageNetPretrained/"), config
        elif config.startswith(("configs/scratch", "configs/cpu")):
            assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0, config
            assert cfg.MODEL.RESNETS.NORM == "GN" and cfg.MODEL.FPN.NORM == "GN", config


def test_three_radiologists_have_distinct_roles():
    cfgs = [setup_cfg(str(ROOT / f"configs/radiologist_{n}.yaml")) for n in ("r50", "r101", "x101")]
    assert [c.MODEL.RESNETS.DEPTH for c in cfgs] == [50, 101, 101]
    assert cfgs[2].MODEL.RESNETS.NUM_GROUPS == 32 and cfgs[2].MODEL.RESNETS.WIDTH_PER_GROUP == 8
    lrs = [c.SOLVER.BASE_LR for c in cfgs]
    iters = [c.SOLVER.MAX_ITER for c in cfgs]
    assert lrs == sorted(lrs, reverse=True) and iters == sorted(iters)  # quick, balanced, slow detail


def test_bad_overrides_name_the_option():
    with pytest.raises(ConfigError, match="NO_SUCH_KEY"):
        setup_cfg(str(ROOT / "configs/demo/radiologist_r50.yaml"), ["MODEL.NO_SUCH_KEY", "1"])
    with pytest.raises(ConfigError, match="config file not found"):
        setup_cfg("configs/missing.yaml")
    with pytest.raises(ConfigError, match="KEY VALUE"):
        setup_cfg(str(ROOT / "configs/demo/radiologist_r50.yaml"), ["SOLVER.MAX_ITER"])


def test_intensity_augmentation_beyond_ten_percent_needs_a_flag():
    from d2ct.engine.mapper import build_ct_augmentation

    cfg = setup_cfg(str(ROOT / "configs/demo/radiologist_r50.yaml"), ["D2CT.AUGMENT.CONTRAST", "[0.5, 1.5]"])
    with pytest.raises(ConfigError, match="UNRESTRICTED_INTENSITY"):
        build_ct_augmentation(cfg, is_train=True)
    cfg = setup_cfg(str(ROOT / "configs/demo/radiologist_r50.yaml"),
                    ["D2CT.AUGMENT.CONTRAST", "[0.5, 1.5]", "D2CT.AUGMENT.UNRESTRICTED_INTENSITY", "True"])
    names = [type(a).__name__ for a in build_ct_augmentation(cfg, is_train=True)]
    assert names[:1] == ["ResizeShortestEdge"] and "RandomRotation" in names and "RandomContrast" in names
    assert [type(a).__name__ for a in build_ct_augmentation(cfg, is_train=False)] == ["ResizeShortestEdge"]


def test_uint16_slices_are_windowed_like_the_challenge_images():
    import numpy as np

    from d2ct.engine.mapper import slice_to_uint8

    hu = np.array([[-1024, -160, 40, 240, 2000]])
    stored = (hu + 1024).astype(np.uint16)
    assert slice_to_uint8(stored).tolist() == [[0, 0, 128, 255, 255]]


def test_unfetchable_weights_stop_with_the_scratch_config_named():
    cfg = setup_cfg(str(ROOT / "configs/radiologist_r50.yaml"), ["MODEL.WEIGHTS", "https://127.0.0.1:9/R-50.pkl"])
    with pytest.raises(WeightsUnavailableError) as err:
        resolve_weights(cfg, "configs/radiologist_r50.yaml", timeout_s=5)
    assert "configs/scratch/radiologist_r50.yaml" in str(err.value) and "MODEL.WEIGHTS" in str(err.value)
    cfg = setup_cfg(str(ROOT / "configs/radiologist_r50.yaml"), ["MODEL.WEIGHTS", "/nonexistent/R-50.pkl"])
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        resolve_weights(cfg, "configs/radiologist_r50.yaml")
    cfg = setup_cfg(str(ROOT / "configs/radiologist_r50.yaml"), ["MODEL.WEIGHTS", ""])
    with pytest.raises(ConfigError, match="FrozenBN"):
        resolve_weights(cfg)
    assert scratch_variant("configs/final.yaml") == "configs/scratch/final.yaml"


def test_train_net_reports_unfetchable_weights_cleanly(tiny_phantom, tmp_path):
    proc = run_tool("train_net.py", "--config", "configs/radiologist_r101.yaml", *TINY_OPTS,
                    "MODEL.WEIGHTS", "https://127.0.0.1:9/R-101.pkl", "D2CT.DATA_ROOT", tiny_phantom,
                    "OUTPUT_DIR", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "configs/scratch/radiologist_r101.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unregistered_dataset_name_is_a_clear_error(tiny_phantom, tmp_path):
    proc = run_tool("train_net.py", "--config", "configs/demo/radiologist_r50.yaml", *TINY_OPTS,
                    "D2CT.DATA_ROOT", tiny_phantom, "DATASETS.TRAIN", "('openkbp_train',)",
                    "OUTPUT_DIR", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "DATASETS.TRAIN names 'openkbp_train', which is not registered" in proc.stderr
    assert "phantom_train" in proc.stderr  # what the data set does provide


def test_training_evaluates_keeps_best_checkpoint_and_plots(tiny_model):
    out = tiny_model
    for name in ("model_final.pth", "model_best.pth", "model_best.json", "metrics.json", "config.yaml",
                 "training_curves.png", "last_checkpoint"):
        assert (out / name).exists(), name
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    best = json.loads((out / "model_best.json").read_text())
    assert best["metric"] == "segm/AP"
    assert best["iterations_trained"] == 2  # the final evaluation: Detectron2 files it under iteration 2
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines() if line.strip()]
    aps = [m["segm/AP"] for m in metrics if "segm/AP" in m]
    assert aps and best["value"] == pytest.approx(max(aps))
    for key in ("ct/ARI", "ct/ARI_fg", "ct/Dice", "segm/AP50"):
        assert key in best["scores"], key
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"


@pytest.mark.parametrize("config", ALL_CONFIGS)
def test_each_config_trains_on_phantom_slices(config, tiny_phantom, tmp_path):
    """A real optimisation step (two for the small ones) for every config; pretrained configs load a
    local weights file, as a user without internet access would do."""
    from detectron2.modeling import build_model

    extra = ["SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()"]
    if config in PRETRAINED:
        cfg = setup_cfg(str(ROOT / config), ["MODEL.DEVICE", "cpu"])
        weights = tmp_path / "local_backbone.pth"
        torch.save({"model": build_model(cfg).state_dict()}, weights)
        extra += ["MODEL.WEIGHTS", str(weights)]
    data_name = setup_cfg(str(ROOT / config)).D2CT.DATA_NAME
    if "final" in Path(config).name:
        extra += ["DATASETS.TRAIN", f"('{data_name}_train',)", "D2CT.PSEUDO_LABELS", "[]"]
    if config.startswith("configs/cpu"):  # made for OpenKBP's patient column; the phantom has none
        extra += ["D2CT.SPLIT_GROUP_BY", ""]
    out = train_tiny(config, tiny_phantom, tmp_path / "out", *extra)
    state = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert state["iteration"] == 0
    log = (out / "log.txt").read_text()
    assert "Starting training from iteration 0" in log


def test_eval_only_scores_a_checkpoint(tiny_model, tiny_phantom, tmp_path):
    proc = run_tool("train_net.py", "--config", "configs/demo/radiologist_r50.yaml", "--eval-only", *TINY_OPTS,
                    "D2CT.DATA_ROOT", tiny_phantom, "OUTPUT_DIR", tmp_path / "eval",
                    "MODEL.WEIGHTS", tiny_model / "model_final.pth")
    out = proc.stdout + proc.stderr
    assert "copypaste: Task: segm" in out and "copypaste: Task: ct" in out


def _tagged_iteration(out) -> int:
    """Iteration of the checkpoint that last_checkpoint names (-1 when none yet)."""
    try:
        return int((out / "last_checkpoint").read_text().strip().split("_")[1].split(".")[0])
    except (OSError, IndexError, ValueError):
        return -1


def test_killed_run_resumes_from_last_checkpoint(tiny_phantom, tmp_path):
    out = tmp_path / "resume"
    cmd = [PYTHON, str(ROOT / "tools/train_net.py"), "--config", "configs/demo/radiologist_r50.yaml", *TINY_OPTS,
           "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()",
           "D2CT.DATA_ROOT", str(tiny_phantom), "OUTPUT_DIR", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        # The checkpoint file appears (renamed into place) just before last_checkpoint names it:
        # wait for the tag, which is what a resume reads.
        while _tagged_iteration(out) < 3:
            assert proc.poll() is None, "training ended before the first checkpoints"
            assert time.time() < deadline, "no checkpoint after 5 minutes"
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (out / "model_final.pth").exists()
    last = (out / "last_checkpoint").read_text().strip()
    done = _tagged_iteration(out)
    assert done >= 3 and (out / last).exists()
    assert len(list(out.glob("model_0*.pth"))) >= 2  # 1, 3, ...: the default keeps 3
    run_tool("train_net.py", "--config", "configs/demo/radiologist_r50.yaml", "--resume", *TINY_OPTS,
             "SOLVER.MAX_ITER", str(done + 3), "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()",
             "D2CT.CHECKPOINTS_TO_KEEP", "1", "D2CT.DATA_ROOT", tiny_phantom, "OUTPUT_DIR", out)
    log = (out / "log.txt").read_text()
    assert f"Resumed from {out / last} at iteration {done + 1}" in log
    assert f"Starting training from iteration {done + 1}" in log
    assert (out / "model_final.pth").exists()
    # the killed run's checkpoints are pruned too: only the newest periodic one is left
    assert sorted(p.name for p in out.glob("model_0*.pth")) == [f"model_{done + 2:07d}.pth"]


def test_prune_checkpoints_keeps_the_newest_and_never_final_or_best(tmp_path):
    from d2ct.engine.trainer import prune_checkpoints

    names = ["model_0000099.pth", "model_0001099.pth", "model_0000999.pth", "model_0000199.pth",
             "model_final.pth", "model_best.pth", "model_best.json", "last_checkpoint"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert sorted(prune_checkpoints(str(tmp_path), 2)) == ["model_0000099.pth", "model_0000199.pth"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model_0000999.pth", "model_0001099.pth", "model_final.pth", "model_best.pth", "model_best.json",
         "last_checkpoint"])
    assert prune_checkpoints(str(tmp_path), 2) == []
    assert prune_checkpoints(str(tmp_path), 0) == []  # 0 keeps all


def test_two_cpu_processes_train_with_gloo(tiny_phantom, tmp_path):
    out = tmp_path / "ddp"
    proc = run_tool("train_net.py", "--config", "configs/demo/radiologist_r50.yaml", "--num-gpus", "2", *TINY_OPTS,
                    "DATASETS.TEST", "()", "D2CT.DATA_ROOT", tiny_phantom, "OUTPUT_DIR", out)
    assert "launching 2 CPU processes" in proc.stderr
    assert (out / "log.txt").exists() and (out / "log.txt.rank1").exists(), "both ranks must log"
    rank0, rank1 = (out / "log.txt").read_text(), (out / "log.txt.rank1").read_text()
    assert "Starting training from iteration 0" in rank1
    assert "Saving checkpoint to" in rank0 and "Saving checkpoint to" not in rank1  # written once
    assert (out / "model_final.pth").exists()
    config = (out / "config.yaml").read_text()
    assert "IMS_PER_BATCH: 2" in config  # the global batch is split across the processes
