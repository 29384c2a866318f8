"""Prediction: flip-TTA fusion, the never-empty fallback, predict.py on slices (CSV readable by the
evaluator) and on a NIfTI volume (labels back on the volume's own grid)."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from d2ct.data.labels_csv import read_labels_csv
from d2ct.engine.predictor import InstancePrediction, fuse_views
from d2ct.postprocess.submission import PostprocessOptions, load_instances, prediction_to_label_map

from .conftest import run_tool


def _soft(h, w, y0, y1, x0, x1, value=230):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def test_fuse_views_averages_matched_instances_and_halves_lone_ones():
    a = _soft(20, 20, 0, 10, 0, 10)
    a_flipped_back = _soft(20, 20, 0, 10, 1, 10)
    lone = _soft(20, 20, 12, 18, 12, 18)
    scores, masks = fuse_views([(np.array([0.9, 0.8], np.float32), np.stack([a, lone])),
                                (np.array([0.7], np.float32), a_flipped_back[None])])
    assert scores.tolist() == pytest.approx([0.8, 0.4])
    assert masks[0][0, 0] == 115 and masks[0][0, 5] == 230  # mean of 230 and 0 / of 230 and 230
    assert (masks[1] == lone).all()


def test_fallback_keeps_a_slice_from_staying_empty():
    masks = np.stack([_soft(16, 16, 0, 6, 0, 6), _soft(16, 16, 8, 14, 8, 14)])
    pred = InstancePrediction("x.png", 16, 16, np.array([0.3, 0.2], np.float32), masks)
    strict = PostprocessOptions(score_threshold=0.5, min_area=1, fallback_top_k=0)
    assert prediction_to_label_map(pred, strict).max() == 0
    fallback = PostprocessOptions(score_threshold=0.5, min_area=1, fallback_top_k=1)
    label_map = prediction_to_label_map(pred, fallback)
    assert label_map.max() == 1 and label_map[:6, :6].all() and not label_map[8:, 8:].any()


def test_predict_slices_to_submission_csv(tiny_model, tiny_phantom, tmp_path):
    out = tmp_path / "sub.csv"
    proc = run_tool("predict.py", "--model", tiny_model, "--input", tiny_phantom, "--out", out,
                    "--instances", tmp_path / "inst.json", "--viz", tmp_path / "viz", "--viz-count", "2",
                    "--truth", tiny_phantom / "test-labels.csv.gz", "--fallback-top-k", "3")
    assert "3 slices" in proc.stdout and "ARI" in proc.stdout
    table = read_labels_csv(out)
    assert table.names == ["0.png", "1.png", "2.png"] and table.n_pixels == 96 * 96
    header = out.read_text().splitlines()[0]
    assert header == "pixel,0.png,1.png,2.png"
    instances = load_instances(tmp_path / "inst.json")
    assert set(instances) == set(table.names)
    assert (tmp_path / "viz" / "predictions.png").exists()
    # the evaluator reads what predict wrote
    ev = run_tool("evaluate.py", "--truth", tiny_phantom / "test-labels.csv.gz", "--pred", out, "--out", tmp_path / "ev")
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())["summary"]
    assert summary["n_images"] == 3 and -1.0 <= summary["ARI"] <= 1.0, ev.stdout


def test_predict_instances_alone_record_what_made_them(tiny_model, tiny_phantom, tmp_path):
    from d2ct.engine.predictor import prediction_source, source_changes, trained_weights
    from d2ct.postprocess.submission import read_instances

    run_tool("predict.py", "--model", tiny_model, "--input", tiny_phantom, "--instances", tmp_path / "inst.json")
    assert [f.name for f in tmp_path.iterdir()] == ["inst.json"]  # no CSV asked for, none written
    source, instances = read_instances(tmp_path / "inst.json")
    assert set(instances) == {"0.png", "1.png", "2.png"}
    weights = trained_weights(tiny_model)
    assert source["weights"] == str(weights.resolve()) and source_changes(source, prediction_source(weights, False)) == []
    assert source_changes(source, prediction_source(weights, True)) == ["flip_tta"]  # flip TTA makes other instances
    proc = run_tool("predict.py", "--model", tiny_model, "--input", tiny_phantom, check=False)
    assert proc.returncode == 2 and "--out is needed" in proc.stderr


def test_instances_files_that_are_not_ones_are_named(tmp_path):
    from d2ct.errors import DataError
    from d2ct.postprocess.submission import read_instances, save_instances

    for text, problem in [("{not json", "not valid JSON"), ('{"images": [{"name": "a.png"}]}', "an image without 'rles'"),
                          ("[1, 2]", "not an instances file"), ('{"images": ["a.png"]}', "not an object")]:
        (tmp_path / "bad.json").write_text(text)
        with pytest.raises(DataError, match=problem) as err:
            read_instances(tmp_path / "bad.json")
        assert "bad.json" in str(err.value)
    with pytest.raises(DataError, match="instances file not found"):
        read_instances(tmp_path / "missing.json")
    save_instances(tmp_path / "none.json", [], source={"weights": "w"})
    assert read_instances(tmp_path / "none.json") == ({"weights": "w"}, {})


def test_predict_bad_input_names_the_problem(tiny_model, tmp_path):
    proc = run_tool("predict.py", "--model", tiny_model, "--input", tmp_path / "nothing", "--out", tmp_path / "x.csv",
                    check=False)
    assert proc.returncode == 2 and "nothing" in proc.stderr
    (tmp_path / "list.txt").write_text("999.png\n")
    proc = run_tool("predict.py", "--model", tiny_model, "--input", tmp_path, "--out", tmp_path / "x.csv",
                    "--list", tmp_path / "list.txt", check=False)
    assert proc.returncode == 2


def test_predict_volume_writes_labels_on_the_input_grid(tiny_model, tmp_path):
    from d2ct.data.phantom import generate_slice

    rng = np.random.default_rng(0)
    hu = np.stack([generate_slice(rng, 80)[2]["hu"] for _ in range(3)])  # (Z, H, W) display order
    # store as a NIfTI in RAS order with 1.5 mm pixels: x = columns reversed, y = rows reversed
    data = np.ascontiguousarray(hu.transpose(2, 1, 0)[::-1, ::-1, :]).astype(np.float32)
    affine = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ct.nii.gz")
    out = tmp_path / "pred.nii.gz"
    proc = run_tool("predict.py", "--model", tiny_model, "--input", tmp_path / "ct.nii.gz", "--out", out,
                    "--size", "96", "--threshold", "0.0", "--min-area", "1")
    assert "3 slices" in proc.stdout
    pred = nib.load(out)
    assert pred.shape == data.shape
    assert np.allclose(pred.affine, affine)
    labels = np.asarray(pred.dataobj)
    assert labels.dtype.kind in "iu" and labels.min() >= 0


def _square(y0, x0, size=4, shape=(12, 12)):
    from pycocotools import mask as mask_util

    m = np.zeros(shape, np.uint8)
    m[y0:y0 + size, x0:x0 + size] = 1
    rle = mask_util.encode(np.asfortranarray(m))
    rle["counts"] = rle["counts"].decode()
    return rle


def test_threshold_on_labelled_slices_keeps_true_structures_and_drops_invented_ones():
    from d2ct.errors import DataError
    from d2ct.postprocess.submission import label_maps_from_instances
    from d2ct.postprocess.threshold import best_threshold, threshold_scores

    # a true square scored 0.6, an invented one scored 0.3: 0.5 keeps the first only
    instances = {"a.png": ([_square(0, 0), _square(6, 6)], np.array([0.6, 0.3], np.float32)),
                 "b.png": ([], np.zeros(0, np.float32))}
    truth = [np.zeros((12, 12), np.uint8), np.zeros((12, 12), np.uint8)]
    truth[0][0:4, 0:4] = 3
    scores = threshold_scores(instances, ["a.png", "b.png"], truth, PostprocessOptions(0.5, 1, 0), [0.2, 0.5, 0.9])
    assert scores[0.5] == pytest.approx(1.0) and scores[0.2] < 1 and scores[0.9] < 1
    assert best_threshold(scores) == 0.5
    assert best_threshold({0.3: 0.8, 0.7: 0.8, 0.9: 0.1}) == 0.3  # a tie: the lowest threshold
    maps = label_maps_from_instances(instances, ["b.png", "a.png"], PostprocessOptions(0.5, 1, 0))
    assert maps.shape == (2, 12, 12) and maps[0].max() == 0 and maps[1].max() == 1  # the empty slice keeps its size
    with pytest.raises(DataError, match="no saved instances for 1 slice"):
        label_maps_from_instances(instances, ["c.png"], PostprocessOptions())
    with pytest.raises(DataError, match="size is unknown"):
        label_maps_from_instances(instances, ["b.png"], PostprocessOptions())
    # a model that found nothing anywhere still gives empty label maps of the data set's size
    assert not label_maps_from_instances(instances, ["b.png"], PostprocessOptions(), shape=(12, 12)).any()
    with pytest.raises(DataError, match="several sizes"):
        label_maps_from_instances(instances, ["a.png"], PostprocessOptions(), shape=(10, 12))
