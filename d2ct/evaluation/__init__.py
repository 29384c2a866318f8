"""Metrics for class-agnostic CT segmentation.

* :mod:`.ari`: adjusted Rand index per image, exactly sklearn's ``adjusted_rand_score`` over all
  pixels (the organisers' script) or on truth-foreground pixels (the written rules);
* :mod:`.dice`: one-to-one IoU matching (Hungarian), Dice, recall / precision at IoU 0.5;
* :mod:`.coco_ap`: class-agnostic COCO mask AP with pycocotools;
* :mod:`.metrics`: ``score_image``, the per-image scores (ARI, ARI_fg, Dice, recall / precision at IoU 0.5);
* :mod:`.report`: evaluate label maps / challenge CSVs, breakdowns, report files;
* :mod:`.evaluator`: the Detectron2 ``CTSegmentationEvaluator`` (imported lazily: it needs Detectron2).
"""
from d2ct.evaluation.ari import adjusted_rand_index, ari_per_image, contingency_table, mean_ari
from d2ct.evaluation.coco_ap import coco_ap, coco_ap_from_label_maps
from d2ct.evaluation.dice import dice_per_image, match_structures
from d2ct.evaluation.metrics import score_image
from d2ct.evaluation.report import EvaluationResult, evaluate_csv, evaluate_label_maps

__all__ = [
    "adjusted_rand_index",
    "ari_per_image",
    "contingency_table",
    "mean_ari",
    "coco_ap",
    "coco_ap_from_label_maps",
    "dice_per_image",
    "match_structures",
    "EvaluationResult",
    "evaluate_csv",
    "evaluate_label_maps",
    "score_image",
    "CTSegmentationEvaluator",
]


def __getattr__(name):
    if name == "CTSegmentationEvaluator":
        from d2ct.evaluation.evaluator import CTSegmentationEvaluator

        return CTSegmentationEvaluator
    raise AttributeError(name)
