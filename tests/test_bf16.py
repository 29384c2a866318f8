"""CPU speed: bfloat16 autocast (training step and prediction), the float32 fallback on a CPU
without bfloat16, channels-last, the prediction score floor, mask pasting and progress lines."""
from __future__ import annotations

import itertools
import logging
import math

import numpy as np
import pytest
import torch

from d2ct.config import setup_cfg
from d2ct.engine import precision

from .conftest import ROOT, TINY_OPTS

DEMO = str(ROOT / "configs/demo/radiologist_r50.yaml")


@pytest.fixture
def bf16_host(monkeypatch):
    """Pretend the CPU has native bfloat16 (so the tests run the bfloat16 path on any host)."""
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)


def _cfg(data_root, *extra):
    return setup_cfg(DEMO, [*TINY_OPTS, "D2CT.DATA_ROOT", str(data_root), *extra])


def _batches(cfg, data_root, n=2):
    from detectron2.data import DatasetCatalog

    from d2ct.data.register import register_challenge_dataset
    from d2ct.engine.mapper import CTDatasetMapper

    register_challenge_dataset("bf16test", data_root, val_fraction=0.0)
    dicts = [d for d in DatasetCatalog.get("bf16test_labelled") if d["annotations"]]
    mapper = CTDatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)
    return [[mapper(d) for d in dicts[2 * i:2 * i + 2]] for i in range(n)]


def test_bf16_detection_follows_cpu_flags(monkeypatch):
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert precision.cpu_bf16_supported()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: frozenset({"avx512f", "avx2"}))
    assert not precision.cpu_bf16_supported()
    monkeypatch.setenv(precision.ENV_OVERRIDE, "1")
    assert precision.cpu_bf16_supported()


def test_host_without_bf16_falls_back_to_fp32_with_one_log_line(monkeypatch, caplog, tiny_phantom):
    from detectron2.engine import SimpleTrainer

    from d2ct.engine.trainer import CPUBF16Trainer, build_step_trainer

    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: False)
    monkeypatch.setattr(precision, "_fallback_logged", False)
    cfg = _cfg(tiny_phantom)
    assert cfg.D2CT.CPU_BF16  # on by default
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with caplog.at_level(logging.INFO, logger="d2ct.engine.precision"):
        step = build_step_trainer(cfg, model, iter([]), opt)
        assert not precision.use_cpu_bf16(cfg)
    assert type(step) is SimpleTrainer and not isinstance(step, CPUBF16Trainer)
    lines = [r.getMessage() for r in caplog.records if "bfloat16" in r.getMessage()]
    assert len(lines) == 1 and "float32" in lines[0]
    # and a host that has it gets the bfloat16 step
    monkeypatch.setattr(precision, "cpu_bf16_supported", lambda: True)
    assert isinstance(build_step_trainer(cfg, model, iter([]), opt), CPUBF16Trainer)
    cfg.defrost()
    cfg.D2CT.CPU_BF16 = False
    assert type(build_step_trainer(cfg, model, iter([]), opt)) is SimpleTrainer


def test_bf16_training_step_runs_convolutions_in_bf16_and_keeps_fp32_weights(bf16_host, tiny_phantom):
    from detectron2.utils.events import EventStorage

    from d2ct.engine import Trainer
    from d2ct.engine.trainer import CPUBF16Trainer, build_step_trainer

    cfg = _cfg(tiny_phantom)
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    seen = {}
    # (a forward hook that returns something replaces the output: these return None)
    model.backbone.bottom_up.stem.register_forward_hook(lambda m, i, o: seen.update(stem=o.dtype))
    model.roi_heads.box_predictor.register_forward_hook(lambda m, i, o: seen.update(scores=o[0].dtype))
    optimizer = Trainer.build_optimizer(cfg, model)
    step = build_step_trainer(cfg, model, itertools.cycle(_batches(cfg, tiny_phantom)), optimizer)
    assert isinstance(step, CPUBF16Trainer)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with EventStorage(0) as storage:
        step.storage = storage
        for i in range(2):
            storage.iter = i
            step.run_step()
        losses = {k: v.latest() for k, v in storage.histories().items() if "loss" in k}
    assert seen == {"stem": torch.bfloat16, "scores": torch.float32}
    assert losses and all(math.isfinite(v) for v in losses.values()), losses
    assert all(p.dtype == torch.float32 for p in model.parameters())
    changed = [k for k, p in model.named_parameters() if not torch.equal(p.detach(), before[k])]
    assert len(changed) > len(before) // 2  # the optimiser stepped on float32 weights
    assert model.backbone.bottom_up.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_group_norm_statistics_stay_fp32_accurate_in_bf16():
    gn = torch.nn.GroupNorm(32, 64)
    x = (torch.randn(2, 64, 16, 16) * 50 + 1000).bfloat16()  # a bf16 variance would lose it all
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gn(x)
    ref = gn(x.float())
    assert (y.float() - ref).abs().max() < 0.05 and ref.abs().max() > 1


def test_channels_last_does_not_change_outputs(tiny_model):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    cfg = setup_cfg(str(tiny_model / "config.yaml"), ["D2CT.CPU_BF16", "False"])
    models = []
    for cl in (False, True):
        model = build_model(cfg).eval()
        DetectionCheckpointer(model).load(str(tiny_model / "model_final.pth"))
        if cl:
            precision.to_channels_last(model)
        models.append(model)
    assert models[1].backbone.bottom_up.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    image = (torch.rand(3, 96, 96) * 255).round()
    with torch.no_grad():
        feats = [m.backbone(m.preprocess_image([{"image": image}]).tensor) for m in models]
        outs = [m([{"image": image, "height": 96, "width": 96}])[0]["instances"] for m in models]
    for k in feats[0]:
        torch.testing.assert_close(feats[0][k], feats[1][k], rtol=1e-3, atol=1e-3)
    n = min(len(outs[0]), len(outs[1]), 10)
    assert n > 0
    torch.testing.assert_close(outs[0].scores[:n], outs[1].scores[:n], rtol=1e-3, atol=1e-3)


def test_bf16_prediction_matches_fp32(bf16_host, tiny_model, tiny_phantom):
    from d2ct.engine.predictor import BatchPredictor, load_trained

    files = [(p.name, str(p)) for p in sorted((tiny_phantom / "test-images").glob("*.png"))]
    preds = {}
    for bf16 in (False, True):
        cfg, weights = load_trained(tiny_model, opts=["D2CT.CPU_BF16", str(bf16), "D2CT.PREDICT_SCORE_FLOOR", "0.0"])
        predictor = BatchPredictor(cfg, weights, batch_size=2)
        assert predictor.bf16 is bf16
        preds[bf16] = predictor.predict_files(files, compact=False)
    for a, b in zip(preds[False], preds[True]):
        assert a.scores.dtype == b.scores.dtype == np.float32 and np.isfinite(b.scores).all()
        assert b.soft_masks.shape[1:] == (96, 96) and b.soft_masks.dtype == np.uint8
        assert len(b) > 0
        # the best-scored instances agree: same score to about bf16 precision
        k = min(len(a), len(b), 3)
        np.testing.assert_allclose(a.scores[:k], b.scores[:k], atol=0.05)


def test_score_floor_skips_masks_but_keeps_the_best(tiny_model, tiny_phantom):
    from d2ct.engine.predictor import BatchPredictor, load_trained

    files = [(p.name, str(p)) for p in sorted((tiny_phantom / "test-images").glob("*.png"))]
    cfg, weights = load_trained(tiny_model, opts=["D2CT.CPU_BF16", "False", "D2CT.PREDICT_SCORE_FLOOR", "0.0"])
    full = BatchPredictor(cfg, weights).predict_files(files, compact=False)
    cfg, weights = load_trained(tiny_model, opts=["D2CT.CPU_BF16", "False", "D2CT.PREDICT_SCORE_FLOOR", "2.0",
                                                  "D2CT.PREDICT_KEEP_TOP_K", "2",
                                                  "D2CT.POSTPROCESS.FALLBACK_TOP_K", "1"])
    floored = BatchPredictor(cfg, weights).predict_files(files, compact=False)
    for a, b in zip(full, floored):
        assert len(a) > 2 and len(b) == 2  # nothing reaches 2.0: only the two best get masks
        np.testing.assert_array_equal(a.scores[:2], b.scores)
        np.testing.assert_array_equal(a.soft_masks[:2], b.soft_masks)


def test_paste_soft_masks_matches_detectron2():
    from detectron2.layers import paste_masks_in_image

    from d2ct.engine.predictor import paste_soft_masks

    torch.manual_seed(0)
    masks = torch.rand(40, 28, 28)
    xy = torch.rand(40, 2) * 80
    boxes = torch.cat([xy, xy + 4 + torch.rand(40, 2) * 60], 1)
    boxes[0] = torch.tensor([-5.0, -3.0, 130.0, 120.0])  # beyond the image
    ours = paste_soft_masks(masks, boxes, 100, 110, chunk=16)
    ref = paste_masks_in_image(masks, boxes, (100, 110), threshold=-1)
    assert ours.dtype == ref.dtype == torch.uint8 and ours.shape == ref.shape
    assert (ours.int() - ref.int()).abs().max() <= 1  # float summation order only
    assert paste_soft_masks(masks[:0], boxes[:0], 10, 10).shape == (0, 10, 10)


def test_progress_lines_give_rate_and_eta():
    from d2ct.engine.predictor import ProgressLog

    now = [0.0]
    lines = []
    log = ProgressLog(100, "predicting r50", interval=30, clock=lambda: now[0], log=lines.append)
    for _ in range(10):
        now[0] += 5.0
        log.update(4)  # 4 slices every 5 s: 0.8 slices/s
    log.close()
    assert lines[0] == "predicting r50: 24/100 slices, 0.80 slices/s, 30s elapsed, ETA 1m35s"
    assert len(lines) == 2 and lines[-1].startswith("predicting r50: 40/100 slices, 0.80 slices/s, 50s elapsed")
