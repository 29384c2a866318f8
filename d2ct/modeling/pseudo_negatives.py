"""Unlabelled is not background on pseudo-labelled slices (``D2CT.PSEUDO_NEGATIVES ignore``).

A teacher finds a fraction of a slice's structures (on the phantom, about one in ten at the
thresholds that keep its precision up: the pseudo-label quality table). Trained as Detectron2
trains, the student learns every structure the teacher missed as background, on every
pseudo-labelled slice: it is taught to miss them. With ``ignore``, anchors and proposals of a
pseudo-labelled slice that match no pseudo-label are sampled neither as object nor as background:
such a slice teaches only what it shows (its structures' objectness, boxes, masks); background is
learnt from the human-labelled slices, whose every structure is drawn. Positives and ignore regions
are untouched.

``D2CT.PSEUDO_NEGATIVES_KEEP`` (0-1, with ``ignore``) keeps that share of such a slice's sampled
background anchors and proposals as background, chosen at random, and ignores the rest. Why: with
no background from most of its slices (on the phantom, 79% pseudo-labelled) a student's scores
saturate and it draws too much (experiments/phantom); a share of the background keeps its
scores calibrated while teaching a missed structure as background only that often.

The mapper marks a pseudo-labelled slice's instances with a ``gt_pseudo`` field; these subclasses of
Detectron2's RPN and StandardROIHeads turn the background samples of such an image into ignored
ones. ``apply_pseudo_negatives(cfg)`` (called by ``d2ct.config.setup_cfg``) swaps them in.
"""
from __future__ import annotations

import torch
from detectron2.config import configurable
from detectron2.modeling import PROPOSAL_GENERATOR_REGISTRY, ROI_HEADS_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.modeling.roi_heads import StandardROIHeads

from d2ct.errors import ConfigError

MODES = ("background", "ignore")


def is_pseudo_image(instances) -> bool:
    """Whether an image's ground truth holds pseudo-labels (the mapper's ``gt_pseudo`` field)."""
    return instances is not None and instances.has("gt_pseudo") and bool(instances.gt_pseudo.any())


def drop_background(labels: torch.Tensor, background: torch.Tensor, keep: float) -> torch.Tensor:
    """Mask of the ``background`` entries to ignore: all of them, or each with probability 1 - keep."""
    if keep <= 0.0:
        return background
    return background & (torch.rand(labels.shape, device=labels.device) >= keep)


class _KeepsBackgroundShare:
    """Mixin for the two pseudo-aware parts: ``pseudo_negatives_keep`` from D2CT.PSEUDO_NEGATIVES_KEEP
    next to the Detectron2 part's own configurable arguments."""

    @configurable
    def __init__(self, *args, pseudo_negatives_keep: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pseudo_negatives_keep = pseudo_negatives_keep

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["pseudo_negatives_keep"] = float(cfg.D2CT.PSEUDO_NEGATIVES_KEEP)
        return ret


@PROPOSAL_GENERATOR_REGISTRY.register()
class PseudoAwareRPN(_KeepsBackgroundShare, RPN):
    """Detectron2's RPN; on pseudo-labelled images the sampled background anchors are ignored
    (all, or all but a ``pseudo_negatives_keep`` share)."""

    @torch.no_grad()
    def label_and_sample_anchors(self, anchors, gt_instances):
        gt_labels, matched_gt_boxes = super().label_and_sample_anchors(anchors, gt_instances)
        for labels, instances in zip(gt_labels, gt_instances):
            if is_pseudo_image(instances):  # 1 object, 0 background, -1 ignored
                labels[drop_background(labels, labels == 0, self.pseudo_negatives_keep)] = -1
        return gt_labels, matched_gt_boxes


@ROI_HEADS_REGISTRY.register()
class PseudoAwareROIHeads(_KeepsBackgroundShare, StandardROIHeads):
    """Detectron2's StandardROIHeads; on pseudo-labelled images, proposals that match no instance
    are ignored rather than sampled as background (all, or all but a ``pseudo_negatives_keep`` share
    of the sampled ones)."""

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals, targets):
        # _sample_proposals sees one image at a time without its targets: hand it the flags in order
        self._pseudo_flags = [is_pseudo_image(t) for t in targets]
        try:
            return super().label_and_sample_proposals(proposals, targets)
        finally:
            self._pseudo_flags = []

    def _sample_proposals(self, matched_idxs, matched_labels, gt_classes):
        pseudo = self._pseudo_flags.pop(0) if getattr(self, "_pseudo_flags", None) else False
        if pseudo and self.pseudo_negatives_keep <= 0.0:
            matched_labels = matched_labels.clone()
            matched_labels[matched_labels == 0] = -1  # background -> ignored
        sampled_idxs, sampled_classes = super()._sample_proposals(matched_idxs, matched_labels, gt_classes)
        if pseudo and self.pseudo_negatives_keep > 0.0:
            # after sampling: before it, the sampler would refill its background quota from the rest
            drop = drop_background(sampled_classes, sampled_classes == self.num_classes, self.pseudo_negatives_keep)
            sampled_idxs, sampled_classes = sampled_idxs[~drop], sampled_classes[~drop]
        return sampled_idxs, sampled_classes


def apply_pseudo_negatives(cfg) -> None:
    """For ``D2CT.PSEUDO_NEGATIVES ignore``, use the pseudo-aware RPN and ROI heads (unfrozen cfg)."""
    mode = cfg.D2CT.PSEUDO_NEGATIVES
    if mode not in MODES:
        raise ConfigError(f"D2CT.PSEUDO_NEGATIVES must be one of {', '.join(MODES)}, got {mode!r}")
    keep = cfg.D2CT.PSEUDO_NEGATIVES_KEEP
    if not isinstance(keep, (int, float)) or not 0.0 <= float(keep) <= 1.0:
        raise ConfigError(f"D2CT.PSEUDO_NEGATIVES_KEEP must be a number from 0 to 1, got {keep!r}")
    if mode == "background":
        if float(keep) > 0.0:
            raise ConfigError(f"D2CT.PSEUDO_NEGATIVES_KEEP {keep} applies with D2CT.PSEUDO_NEGATIVES ignore "
                              "(background keeps every background sample already)")
        return
    swaps = (("PROPOSAL_GENERATOR", "RPN", "PseudoAwareRPN"),
             ("ROI_HEADS", "StandardROIHeads", "PseudoAwareROIHeads"))
    for section, standard, aware in swaps:
        name = cfg.MODEL[section].NAME
        if name not in (standard, aware):
            raise ConfigError(f"D2CT.PSEUDO_NEGATIVES ignore needs MODEL.{section}.NAME {standard} "
                              f"(it has a pseudo-aware subclass), got {name}")
        cfg.MODEL[section].NAME = aware
