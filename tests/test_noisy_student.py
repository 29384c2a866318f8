"""The tiny pipeline with the ensemble teacher and a noised student (issue 23): the radiologists'
fused pseudo-labels, the student's strong augmentation on them, and the ensemble's row in the
pseudo-label quality table."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from d2ct.data.coco import load_coco_dicts

from .conftest import run_tool
from .test_pipeline import TINY_PIPELINE

STUDENT = ("final.opts=['D2CT.AUGMENT.STUDENT.ENABLED', 'True', 'D2CT.AUGMENT.STUDENT.COPY_PASTE_PROB', '1.0', "
           "'D2CT.MODEL_NOISE.DROP_PATH', '0.2', 'D2CT.MODEL_NOISE.BOX_HEAD_DROPOUT', '0.5']")


@pytest.mark.slow
def test_ensemble_teacher_and_noisy_student_pipeline(tmp_path):
    out = tmp_path / "run"
    proc = run_tool("run_pipeline.py", "--config", "configs/demo/pipeline.yaml", "--set", f"output_dir={out}",
                    f"data.root={out}/data/phantom", *TINY_PIPELINE, "pseudolabel.mode=ensemble", STUDENT,
                    "predict.score_threshold=val", "predict.threshold_grid=[0.5]", "baseline.enabled=false",
                    timeout=1500)
    stats = json.loads((out / "pseudolabels_r1" / "stats.json").read_text())
    assert stats["mode"] == "ensemble" and stats["pool_images"] == 8
    # every radiologist labelled every pool slice; the thresholds (all 0) average to 0
    assert [r["assigned"] for r in stats["radiologists"]] == [8, 8, 8]
    assert stats["ensemble"]["threshold"] == 0.0
    assert sum(stats["ensemble"]["structures_by_votes"].values()) >= stats["instances"]
    dicts = load_coco_dicts(out / "pseudolabels_r1" / "pseudo_labels.json")
    assert len(dicts) == stats["labelled_images"]
    assert all("score" in a for d in dicts for a in d["annotations"])  # how the mapper tells them apart
    final_cfg = (out / "student_r1" / "config.yaml").read_text()
    assert "STUDENT:" in final_cfg and "COPY_PASTE_PROB: 1.0" in final_cfg
    log = (out / "logs" / "student_r1.log").read_text()
    assert "Model noise: stochastic depth over 16 blocks up to 0.2, dropout 0.5 in 2 box-head layers" in log
    if stats["labelled_images"]:
        assert "phantom_pseudo" in final_cfg
        assert "student augmentation for pseudo-labelled slices" in log and "copy-paste p=1.0 from" in log
    report = (out / "report" / "report.md").read_text()
    assert "| ensemble of 3 >= 0 |" in report and "| r50 >= " in report
    assert (out / "submission.csv").exists() and "| model | ARI (all pixels)" in proc.stdout


# variants.yaml is the driver's list of --set overrides, not a pipeline config
@pytest.mark.parametrize("path", sorted(p for p in Path("experiments/openkbp").glob("*.yaml") if p.name != "variants.yaml"),
                         ids=lambda p: p.stem)
def test_openkbp_experiment_configs_load(path):
    """The prepared OpenKBP runs (docs/method-noisy-student.md): valid pipeline configs whose final
    model's overrides build (a typo in a D2CT.AUGMENT.STUDENT key fails here, not hours into a run)."""
    from d2ct.config import setup_cfg
    from d2ct.data.augment import build_student_augmentation
    from d2ct.pipeline.config import load_pipeline_config

    cfg = load_pipeline_config(str(path))
    final = setup_cfg(cfg["final"]["config"], [str(o) for o in cfg["opts"] + cfg["final"]["opts"]])
    assert bool(build_student_augmentation(final)) == final.D2CT.AUGMENT.STUDENT.ENABLED
    assert cfg["output_dir"].endswith(path.stem) and cfg["radiologists_dir"] == "output/cpu_pipeline/radiologists"
