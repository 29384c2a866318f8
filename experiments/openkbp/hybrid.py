#!/usr/bin/env python
"""The U-Net peer's foreground with the Mask R-CNN's instances on OpenKBP: does combining them help?

The U-Net peer wins the all-pixel metric by coverage (it marks more of each organ), the Mask R-CNN
models by splitting touching structures. This experiment (nothing is trained here: the run folders
of experiments/openkbp/run.py and the U-Net peer's ``model_best.pt`` are read) flattens both into
label maps and tries three ways of combining them, per slice:

* ``fill``: the Mask R-CNN label map; U-Net foreground it left uncovered becomes new structures
  (the U-Net's own, cut to the uncovered pixels, at least ``min_area`` pixels);
* ``fill_trim``: as ``fill``, and Mask R-CNN pixels the U-Net calls background are dropped;
* ``grow``: each Mask R-CNN instance grows over the U-Net foreground connected to it (a watershed
  flood in the union of both), the foreground no instance reaches becomes new structures as in ``fill``.

For each model of the run the rule and the Mask R-CNN score threshold are chosen together on the
validation split (mean per-slice all-pixel ARI; the pipeline's ``predict.threshold_grid``), never on
the test slices; then the test slices are scored and compared, per slice, with the model alone (at
its own validation threshold) and with the U-Net alone; 95% intervals from a bootstrap over the test
patients. Resumable: the U-Net's probabilities are kept in ``--work``.

  python experiments/openkbp/run.py --only unet ensemble_student --runs ~/d2ct-runs/openkbp-timed
  python experiments/openkbp/hybrid.py --runs ~/d2ct-runs/openkbp-timed --only ensemble_student
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2ct.utils.fileio import atomic_write_text  # noqa: E402
from experiments.openkbp.run import add_run_folder_arguments, experiment_of, load_variants  # noqa: E402
from experiments.openkbp.tables import Runs, patient_bootstrap, publish  # noqa: E402

RULES = ("fill", "fill_trim", "grow")


def _renumber(labels: np.ndarray, min_area: int) -> np.ndarray:
    """Structures 1..K by size (largest first), those under ``min_area`` dropped, uint8 (at most 255)."""
    ids, areas = np.unique(labels[labels > 0], return_counts=True)
    keep = sorted(((a, i) for i, a in zip(ids, areas) if a >= min_area), key=lambda t: (-t[0], t[1]))
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    for new, (_, old) in enumerate(keep[:255], start=1):
        lut[old] = new
    return lut[labels].astype(np.uint8)


def combine(instance_map: np.ndarray, unet_map: np.ndarray, rule: str, min_area: int = 5) -> np.ndarray:
    """One label map from a flattened Mask R-CNN label map and the U-Net's label map (0 = background).

    ``fill``: the Mask R-CNN map, plus the U-Net's structures cut to the pixels it left empty;
    ``fill_trim``: the same, without the Mask R-CNN pixels outside the U-Net's foreground;
    ``grow``: each Mask R-CNN structure floods the U-Net foreground connected to it first."""
    from skimage.segmentation import watershed

    if rule not in RULES:
        raise ValueError(f"rule {rule!r}: expected one of {', '.join(RULES)}")
    if instance_map.shape != unet_map.shape:
        raise ValueError(f"label maps of shapes {instance_map.shape} and {unet_map.shape}")
    foreground = unet_map > 0
    base = instance_map.astype(np.int64)
    if rule == "fill_trim":
        base = np.where(foreground, base, 0)
    elif rule == "grow" and base.any():
        # equal heights everywhere: the flood spreads outwards from every structure at the same pace
        base = watershed(np.zeros(base.shape, np.uint8), markers=base, mask=foreground | (base > 0))
    offset = int(base.max())
    rest = np.where(foreground & (base == 0), unet_map.astype(np.int64) + offset, 0)
    return _renumber(base + rest, min_area)


def unet_label_maps(unet_dir: Path, dataset, names: list[str], cache: Path) -> np.ndarray:
    """The U-Net peer's label maps of ``names`` (its best checkpoint), kept in ``cache`` (npz)."""
    from d2ct.peer.unet import load_slices, load_unet, predict_label_maps

    if cache.exists():
        saved = np.load(cache, allow_pickle=False)
        if list(saved["names"]) == list(names):
            return saved["maps"]
    model, options, device = load_unet(unet_dir / "model_best.pt", "cpu")
    images, _ = load_slices(dataset, names, with_labels=False)
    maps = predict_label_maps(model, images, options, device)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, names=np.array(names), maps=maps)
    os.replace(tmp, cache)
    return maps


def mean_ari(truth, maps) -> float:
    from d2ct.evaluation.metrics import score_image

    return float(np.mean([score_image(t, p)["ARI"] for t, p in zip(truth, maps)]))


def flatten(instances: dict, names: list[str], post, threshold: float, shape) -> np.ndarray:
    from d2ct.postprocess.submission import label_maps_from_instances

    return label_maps_from_instances(instances, names, dataclasses.replace(post, score_threshold=threshold), shape=shape)


def choose_on_validation(instances: dict, names: list[str], truth, unet_maps, post, grid) -> dict:
    """ARI on the validation slices of every (rule, threshold) and of the model alone; the best of each."""
    scores = {}
    for t in grid:
        maps = flatten(instances, names, post, t, truth[0].shape)
        scores[("alone", t)] = mean_ari(truth, maps)
        for rule in RULES:
            scores[(rule, t)] = mean_ari(truth, [combine(m, u, rule, post.min_area) for m, u in zip(maps, unet_maps)])
    alone = max((k for k in scores if k[0] == "alone"), key=lambda k: (scores[k], -k[1]))
    hybrid = max((k for k in scores if k[0] != "alone"), key=lambda k: (scores[k], -k[1]))
    return {"alone": alone, "hybrid": hybrid, "scores": scores}


def test_scores(truth, maps) -> np.ndarray:
    from d2ct.evaluation.metrics import score_image

    return np.array([score_image(t, p)["ARI"] for t, p in zip(truth, maps)])


def compare_model(name: str, run: Path, pipe, unet: dict, patients: dict) -> dict:
    from d2ct.postprocess.submission import PostprocessOptions, load_instances

    pr = pipe.cfg["predict"]
    post = PostprocessOptions(min_area=pr["min_area"], fallback_top_k=pr["fallback_top_k"])
    val_instances = load_instances(run / "predict" / "val" / f"{name}_instances.json")
    test_instances = load_instances(run / "predict" / f"{name}_instances.json")
    v, t = unet["val"], unet["test"]
    chosen = choose_on_validation(val_instances, v["names"], v["truth"], v["maps"], post, pr["threshold_grid"])
    (_, t_alone), (rule, t_hybrid) = chosen["alone"], chosen["hybrid"]
    shape = t["truth"][0].shape
    alone_maps = flatten(test_instances, t["names"], post, t_alone, shape)
    hybrid_maps = [combine(m, u, rule, post.min_area)
                   for m, u in zip(flatten(test_instances, t["names"], post, t_hybrid, shape), t["maps"])]
    alone, hybrid = test_scores(t["truth"], alone_maps), test_scores(t["truth"], hybrid_maps)
    groups = [patients[n] for n in t["names"]]
    return {"model": name, "val": (chosen["scores"][chosen["alone"]], chosen["scores"][chosen["hybrid"]]),
            "choice": f"{t_alone:g} / {rule} at {t_hybrid:g}", "alone": alone.mean(), "hybrid": hybrid.mean(),
            "minus_alone": patient_bootstrap(hybrid - alone, groups),
            "minus_unet": patient_bootstrap(hybrid - unet["test_ari"], groups),
            "val_rules": {r: max(s for (k, _), s in chosen["scores"].items() if k == r) for r in ("alone",) + RULES}}


def table(rows: list[dict], unet_test: float, unet_val: float, n_slices: int, n_patients: int, unit: str) -> str:
    lines = ["# The U-Net's foreground with the Mask R-CNN's instances on OpenKBP", "",
             "Written by `experiments/openkbp/hybrid.py` (commands in experiments/openkbp/README.md). "
             "For each model: its score threshold alone, and the combining rule with its threshold, chosen "
             "together on the validation split (best mean all-pixel ARI there), then scored on the "
             f"{n_slices} held-out test slices. The U-Net peer alone: {unet_test:.3f} on the test slices, "
             f"{unet_val:.3f} on the validation slices. Differences: per-slice all-pixel ARI; 95% intervals "
             f"from 10,000 bootstrap resamples of the {n_patients} test {unit} (seed 0).", "",
             "| model | chosen on validation (alone / hybrid) | validation ARI alone -> hybrid | test ARI alone "
             "| test ARI hybrid | hybrid - model alone | hybrid - U-Net |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        (m1, l1, h1), (m2, l2, h2) = r["minus_alone"], r["minus_unet"]
        lines.append(f"| {r['model']} | {r['choice']} | {r['val'][0]:.3f} -> {r['val'][1]:.3f} | {r['alone']:.3f} "
                     f"| {r['hybrid']:.3f} | {m1:+.3f} [{l1:+.3f}, {h1:+.3f}] | {m2:+.3f} [{l2:+.3f}, {h2:+.3f}] |")
    lines += ["", "Best validation ARI of each rule (over the threshold grid):", "",
              "| model | " + " | ".join(("alone",) + RULES) + " |", "|---|" + "---|" * (len(RULES) + 1)]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{r['val_rules'][k]:.3f}" for k in ("alone",) + RULES) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    add_run_folder_arguments(p)
    p.add_argument("--only", default="ensemble_student", help="the run whose models are combined (default: %(default)s)")
    p.add_argument("--peer", default="unet", help="the U-Net peer's folder under --runs (default: %(default)s)")
    p.add_argument("--work", type=Path, help="U-Net label maps go here (default: <runs>/hybrid)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "OPENKBP_hybrid.md")
    args = p.parse_args(argv)
    spec = load_variants(args.variants)
    if args.only not in spec["variants"]:
        raise SystemExit(f"--only: {args.only} not in {args.variants}")
    exp = experiment_of(args, spec)
    unet_dir = exp.peer_dir(args.peer)
    if not (unet_dir / "model_best.pt").exists():
        raise SystemExit(f"{unet_dir}: no U-Net checkpoint (python experiments/openkbp/run.py --only {args.peer} first)")
    work = args.work.resolve() if args.work else exp.runs / "hybrid"
    args.out = args.out.resolve()
    os.chdir(ROOT)  # the pipeline config's paths are relative to the project
    runs = Runs(exp)
    run = exp.run_dir(args.only)
    if not (run / "evaluate" / "table.json").exists():
        raise SystemExit(f"{run}: not a finished run (python experiments/openkbp/run.py --only {args.only} first)")
    pipe = runs.pipeline(args.only)
    patients, unit = runs.groups()

    from d2ct.data.register import split_names

    unet = {}
    for split, images in (("val", pipe.val_images), ("test", pipe.eval_images)):
        _, names, truth_of = images()
        ds, _ = split_names(pipe.dataset(), "val" if split == "val" else pipe.eval_split(), splits=pipe.splits())
        truth = [truth_of(n) for n in names]
        unet[split] = {"names": names, "truth": truth,
                       "maps": unet_label_maps(unet_dir, ds, names, work / f"{args.peer}_{split}.npz")}
    unet["test_ari"] = test_scores(unet["test"]["truth"], unet["test"]["maps"])
    unet_val = mean_ari(unet["val"]["truth"], unet["val"]["maps"])
    rows = []
    for name, _ in pipe.models():
        if not (run / "predict" / "val" / f"{name}_instances.json").exists():
            print(f"{name}: no validation predictions in {run / 'predict' / 'val'}: skipped", flush=True)
            continue
        print(f"{name} ...", flush=True)
        rows.append(compare_model(name, run, pipe, unet, patients))
        atomic_write_text(args.out, table(rows, unet["test_ari"].mean(), unet_val, len(patients),
                                          len(set(patients.values())), unit))
    publish(args.out, table(rows, unet["test_ari"].mean(), unet_val, len(patients), len(set(patients.values())), unit))
    return 0


if __name__ == "__main__":
    sys.exit(main())
