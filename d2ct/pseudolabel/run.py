"""Pseudo-label the unlabelled pool with the radiologists (partition, consensus or ensemble mode).

Outputs, in ``out_dir``:
- ``pseudo_labels.json``: COCO instances (single class, RLE, ``score`` per annotation) of the
  images that kept at least one instance; register it with ``register_coco_json`` or name it in
  ``D2CT.PSEUDO_LABELS`` for the final training. With ``ignore_below`` the uncertain instances
  (scored between it and the model's threshold) are written too, as ignore regions (``iscrowd``
  1): the final training neither learns them as structures nor as background (partition and
  ensemble modes: both give each structure one score to call uncertain).
- ``stats.json`` and ``report.md``: images labelled per model, instances per image, exclusions.
- ``score_histogram.png`` and ``overlays.png``: what a person should look at before trusting them.
- ``cache/<model>.json``: each model's raw predictions, written as they come; a killed run
  resumes from them, and any run with the same models and settings can start from a copy.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from detectron2.utils import comm

from d2ct.config import setup_cfg
from d2ct.data.coco import label_map_to_instances, to_coco_json
from d2ct.engine.predictor import BatchPredictor, InstancePrediction
from d2ct.errors import ConfigError
from d2ct.postprocess.flatten import instances_to_label_map
from d2ct.utils.fileio import atomic_write_json, atomic_write_text, file_sha256, read_json
from d2ct.utils.progress import progress_bar as tqdm  # line mode when stderr is not a terminal

from .consensus import consensus_instances
from .ensemble import EnsembleOptions, ensemble_instances
from .radiologists import Radiologist, normalised_weights, partition_pool

logger = logging.getLogger(__name__)

MODES = ("partition", "consensus", "ensemble")


@dataclass
class ConsensusOptions:
    iou_threshold: float = 0.5
    min_votes: int = 2
    single_model_score: float = 0.9
    min_score: float = 0.3


# ----------------------------------------------------------------------------------------------
# per-model predictions, cached
# ----------------------------------------------------------------------------------------------
# images predicted between two cache writes: a killed run loses at most this much of a model's work
CACHE_CHUNK = 64


def _cache_settings(model: Radiologist, flip_tta: bool) -> dict:
    """What a cached prediction depends on besides the image: other settings, other predictions."""
    return {"weights": model.weights, "config": model.config, "opts": [str(o) for o in model.opts],
            "flip_tta": bool(flip_tta)}


def _save_cache(path: Path, model: Radiologist, settings: dict, preds: dict[str, InstancePrediction]) -> None:
    atomic_write_json(path, {
        "model": model.name, **settings,
        "images": [{"name": p.name, "height": p.height, "width": p.width,
                    "scores": [float(s) for s in p.scores], "rles": p.rles or []} for p in preds.values()],
    }, indent=None)


def _load_cache(path: Path, settings: dict) -> dict[str, InstancePrediction]:
    """The cached predictions by image name ({} when none or made with other settings)."""
    if not path.exists():
        return {}
    try:
        data = read_json(path)
    except ValueError:
        logger.warning("%s is not valid JSON (a write cut short?): predicting again", path)
        return {}
    # caches written before the settings were recorded hold plain predictions (no flip TTA) of
    # the model with its own config
    made_with = {"config": settings["config"], "opts": settings["opts"], "flip_tta": False,
                 **{k: data[k] for k in settings if k in data}}
    if made_with != settings:
        changed = sorted(k for k in settings if made_with[k] != settings[k])
        logger.info("%s was made with other %s: predicting again", path, ", ".join(changed))
        return {}
    return {im["name"]: InstancePrediction(im["name"], im["height"], im["width"],
                                           np.asarray(im["scores"], np.float32), None, im["rles"])
            for im in data["images"]}


def predict_pool(model: Radiologist, named_paths: Sequence[tuple[str, str]], cache_dir: Path, *,
                 batch_size: int = 4, flip_tta: bool = False) -> list[InstancePrediction] | None:
    """The model's instances on the given images (all processes share the work; rank 0 gets them).

    ``cache/<model>.json`` keeps every image this model has predicted with these settings, in any
    run and mode: images found there are not predicted again, the others are predicted in chunks
    and added as they finish, so a killed run resumes within a model's share of the pool."""
    cache = cache_dir / f"{model.name}.json"
    settings = _cache_settings(model, flip_tta)
    cached = _load_cache(cache, settings) if comm.is_main_process() else {}
    missing = [(n, p) for n, p in named_paths if n not in cached]
    if comm.get_world_size() > 1:
        missing = comm.all_gather(missing)[0]
    if len(missing) < len(named_paths):
        logger.info("%s: %d of %d predictions read from %s", model.name, len(named_paths) - len(missing),
                    len(named_paths), cache)
    if missing:
        cfg = setup_cfg(model.config, model.opts)
        predictor = BatchPredictor(cfg, model.weights, batch_size=batch_size, flip_tta=flip_tta)
        bar = tqdm(total=len(missing), desc=f"pseudo-labelling ({model.name})", unit="slice",
                   disable=not comm.is_main_process())
        for start in range(0, len(missing), CACHE_CHUNK):
            chunk = missing[start:start + CACHE_CHUNK]
            preds = predictor.predict_files_sharded(chunk, progress=False)
            bar.update(len(chunk))
            if comm.is_main_process():
                cached.update((p.name, p) for p in preds)
                cache_dir.mkdir(parents=True, exist_ok=True)
                _save_cache(cache, model, settings, cached)
        bar.close()
    if not comm.is_main_process():
        return None
    return [cached[n] for n, _ in named_paths]


# ----------------------------------------------------------------------------------------------
# instances -> non-overlapping annotations
# ----------------------------------------------------------------------------------------------
def resolve_overlaps(scores: np.ndarray, masks: np.ndarray, *, threshold: float, min_area: int,
                     ignore_below: float | None = None) -> list[dict]:
    """Keep instances >= threshold, let the higher score win overlaps, drop pieces < min_area;
    return COCO-style annotations (RLE) with their scores.

    ``ignore_below``: instances scored in [ignore_below, threshold) are kept too, as ignore
    regions (``iscrowd`` 1). A teacher that is unsure about a structure has usually seen a real
    one; left out, it would be trained as background on that slice (the missing-label problem of
    pseudo-labels). They lose every overlap with a kept instance, which always scores higher."""
    low = threshold if ignore_below is None else min(float(ignore_below), threshold)
    keep = np.flatnonzero(scores >= low)
    if len(keep) == 0:
        return []
    scores, masks = scores[keep], masks[keep]
    label_map = instances_to_label_map(masks, scores, labels=list(range(1, len(keep) + 1)), min_area=min_area)
    annotations = label_map_to_instances(label_map, min_area=min_area)
    for ann in annotations:
        ann["score"] = float(scores[ann["label_value"] - 1])
        ann["iscrowd"] = int(ann["score"] < threshold)
    annotations.sort(key=lambda a: -a["score"])
    return annotations


# ----------------------------------------------------------------------------------------------
# the run
# ----------------------------------------------------------------------------------------------
def pseudo_label_pool(
    radiologists: Sequence[Radiologist],
    pool: Sequence[tuple[str, str, int]],
    out_dir: str | os.PathLike,
    *,
    mode: str = "partition",
    seed: int = 0,
    min_area: int = 10,
    batch_size: int = 4,
    flip_tta: bool = False,
    consensus: ConsensusOptions | None = None,
    ensemble: EnsembleOptions | None = None,
    ignore_below: float | None = None,
    overlays: int = 12,
) -> dict | None:
    """Pseudo-label ``pool`` = [(name, image path, image_id), ...]; returns the stats (rank 0).

    Partition (the published method): the pool is split at random (seeded) into groups whose
    sizes follow the radiologists' normalised validation APs; each labels its group with its own
    score threshold. Consensus: every model labels every image and only agreed structures stay.
    Ensemble: every model labels every image and their instances are fused into one set, each
    structure scored by the models' AP-weighted agreement (:mod:`d2ct.pseudolabel.ensemble`),
    kept from ``ensemble.threshold`` up. ``ignore_below`` (partition and ensemble modes): see
    :func:`resolve_overlaps`; images are kept and counted by their structures, never by ignore
    regions alone.
    """
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {MODES}, got {mode!r}")
    if not radiologists:
        raise ConfigError("no radiologists given")
    weights = normalised_weights([r.ap for r in radiologists])
    ensemble = ensemble or EnsembleOptions()
    ensemble.check()
    ensemble_threshold = ensemble.resolved_threshold([r.threshold for r in radiologists], weights)
    if ignore_below is not None:
        if mode == "consensus":
            raise ConfigError("--ignore-below needs one score per structure: partition mode only, or ensemble "
                              "mode (consensus keeps or drops a structure by its votes and has no single score "
                              "to call uncertain)")
        lowest = ensemble_threshold if mode == "ensemble" else min(r.threshold for r in radiologists)
        if not 0.0 <= ignore_below < lowest:
            what = "the ensemble threshold" if mode == "ensemble" else "every model's threshold (lowest"
            raise ConfigError(f"--ignore-below {ignore_below} must be at least 0 and below {what} "
                              f"{lowest:g}{')' if mode != 'ensemble' else ''}")
    model_names = [r.name for r in radiologists]
    if len(set(model_names)) != len(model_names):
        raise ConfigError(f"two radiologists share a name ({model_names}): give distinct output folders or "
                          "names (pseudolabel.py --names)")
    names = [n for n, _, _ in pool]
    if len(set(names)) != len(names):
        raise ConfigError("the pool lists an image twice")
    out_dir = Path(out_dir)
    cache_dir = out_dir / "cache"
    by_name = {n: (p, i) for n, p, i in pool}
    annotations: dict[str, list[dict]] = {}
    labelled_by: dict[str, str] = {}
    per_model: dict[str, dict] = {}
    consensus = consensus or ConsensusOptions()

    if mode == "partition":
        groups = partition_pool(names, weights, seed)
        for model, group in zip(radiologists, groups):
            preds = predict_pool(model, [(n, by_name[n][0]) for n in group], cache_dir,
                                 batch_size=batch_size, flip_tta=flip_tta)
            if not comm.is_main_process():
                continue
            kept = 0
            for pred in preds:
                anns = resolve_overlaps(pred.scores, pred.masks(), threshold=model.threshold, min_area=min_area,
                                        ignore_below=ignore_below)
                annotations[pred.name] = anns
                labelled_by[pred.name] = model.name
                kept += _has_structure(anns)
            per_model[model.name] = {"assigned": len(group), "labelled": kept}
    else:
        all_preds = [predict_pool(m, [(n, by_name[n][0]) for n in names], cache_dir,
                                  batch_size=batch_size, flip_tta=flip_tta) for m in radiologists]
        if comm.is_main_process() and mode == "ensemble":
            agreed = np.zeros(len(radiologists) + 1, np.int64)  # kept structures by how many models saw them
            for i, name in enumerate(names):
                per_image = [(p[i].scores, p[i].masks()) for p in all_preds]
                scores, masks, votes = ensemble_instances(
                    per_image, weights, iou_threshold=ensemble.iou_threshold, vote=ensemble.vote,
                    min_score=ensemble.min_score)
                annotations[name] = resolve_overlaps(scores, masks, threshold=ensemble_threshold, min_area=min_area,
                                                     ignore_below=ignore_below)
                labelled_by[name] = "ensemble"
                np.add.at(agreed, votes[scores >= ensemble_threshold], 1)
            for m in radiologists:
                per_model[m.name] = {"assigned": len(names), "labelled": None}
        elif comm.is_main_process():
            for i, name in enumerate(names):
                per_image = [(p[i].scores, p[i].masks()) for p in all_preds]
                scores, masks = consensus_instances(
                    per_image, weights, iou_threshold=consensus.iou_threshold, min_votes=consensus.min_votes,
                    single_model_score=consensus.single_model_score, min_score=consensus.min_score)
                annotations[name] = resolve_overlaps(scores, masks, threshold=0.0, min_area=min_area)
                labelled_by[name] = "consensus"
            for m in radiologists:
                per_model[m.name] = {"assigned": len(names), "labelled": None}
    if not comm.is_main_process():
        return None

    dicts, excluded = [], []
    for name in names:
        anns = annotations.get(name, [])
        if not _has_structure(anns):
            excluded.append(name)
            continue
        path, image_id = by_name[name]
        pred_shape = anns[0]["segmentation"]["size"]
        dicts.append({"file_name": str(Path(path).resolve()), "height": pred_shape[0], "width": pred_shape[1],
                      "image_id": image_id, "name": name, "labelled_by": labelled_by[name], "annotations": anns})
    coco = to_coco_json(dicts, description=f"d2ct pseudo-labels ({mode})", image_root=out_dir.resolve())
    atomic_write_json(out_dir / "pseudo_labels.json", coco, indent=None)

    all_scores = [a["score"] for d in dicts for a in _structures(d["annotations"])]
    counts = [len(_structures(d["annotations"])) for d in dicts]
    stats = {
        "mode": mode,
        "seed": seed,
        "min_area": min_area,
        "flip_tta": flip_tta,
        "pool_images": len(names),
        "labelled_images": len(dicts),
        "excluded_images": len(excluded),
        "instances": int(sum(counts)),
        "instances_per_image": float(np.mean(counts)) if counts else 0.0,
        "score_mean": float(np.mean(all_scores)) if all_scores else None,
        "ignore_below": ignore_below,
        "ignore_regions": int(sum(a["iscrowd"] for d in dicts for a in d["annotations"])),
        "radiologists": [
            {"name": m.name, "ap": m.ap, "weight": float(w), "threshold": m.threshold, "weights_file": m.weights,
             "weights_sha256": file_sha256(m.weights), **per_model.get(m.name, {})}
            for m, w in zip(radiologists, weights)
        ],
        "consensus": consensus.__dict__ if mode == "consensus" else None,
        "ensemble": {**ensemble.__dict__, "threshold": ensemble_threshold,
                     # fused structures above the threshold, by the number of models that saw them
                     # (before overlaps are resolved and small pieces dropped)
                     "structures_by_votes": {str(k): int(agreed[k]) for k in range(1, len(agreed))}}
        if mode == "ensemble" else None,
    }
    atomic_write_json(out_dir / "stats.json", stats)
    _write_pictures(out_dir, dicts, all_scores, overlays, seed)
    atomic_write_text(out_dir / "report.md", format_report(stats))
    logger.info("pseudo-labels: %d of %d pool images kept, %d instances -> %s",
                len(dicts), len(names), stats["instances"], out_dir / "pseudo_labels.json")
    return stats


def _structures(annotations: list[dict]) -> list[dict]:
    """The annotations that are structures, not ignore regions (``iscrowd`` 1)."""
    return [a for a in annotations if not a.get("iscrowd")]


def _has_structure(annotations: list[dict]) -> bool:
    return bool(_structures(annotations))


def _write_pictures(out_dir: Path, dicts: list[dict], scores: list[float], n_overlays: int, seed: int) -> None:
    from d2ct.visualization.overlay import overlay_grid, score_histogram

    score_histogram(scores, out_dir / "score_histogram.png", title="pseudo-label instance scores")
    if dicts and n_overlays:
        rng = np.random.default_rng(seed)
        chosen = sorted(rng.choice(len(dicts), size=min(n_overlays, len(dicts)), replace=False))
        items = []
        for i in chosen:
            d = dicts[i]
            structures = _structures(d["annotations"])  # ignore regions are not drawn
            label_map = instances_to_label_map([a["segmentation"] for a in structures], [a["score"] for a in structures])
            items.append((d["file_name"], label_map, f"{d['name']} ({d['labelled_by']}, {len(structures)})"))
        overlay_grid(items, out_dir / "overlays.png", title="pseudo-labels (random sample)")


def format_report(stats: dict) -> str:
    lines = [
        f"# Pseudo-labels ({stats['mode']} mode)",
        "",
        f"- pool images: {stats['pool_images']}",
        f"- kept (at least one instance): {stats['labelled_images']}; excluded (none above threshold): "
        f"{stats['excluded_images']}",
        f"- instances: {stats['instances']} ({stats['instances_per_image']:.1f} per kept image)",
        *([f"- ignore regions (scored from {stats['ignore_below']} up to the model's threshold): "
           f"{stats['ignore_regions']}"] if stats.get("ignore_below") is not None else []),
        *([f"- ensemble: fused score (AP-weighted agreement) >= {stats['ensemble']['threshold']:.3g}; "
           "structures by the number of models that saw them: "
           + ", ".join(f"{k}: {v}" for k, v in stats["ensemble"]["structures_by_votes"].items())]
          if stats.get("ensemble") else []),
        "",
        "| radiologist | val mask AP | weight | threshold | images assigned | images kept |",
        "|---|---|---|---|---|---|",
    ]
    for r in stats["radiologists"]:
        kept = "-" if r.get("labelled") is None else r["labelled"]
        lines.append(f"| {r['name']} | {r['ap']:.2f} | {r['weight']:.3f} | {r['threshold']} | "
                     f"{r.get('assigned', '-')} | {kept} |")
    lines += ["", "![scores](score_histogram.png)", "", "![overlays](overlays.png)", ""]
    return "\n".join(lines)
