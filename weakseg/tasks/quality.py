"""The paper's Table 4 on any VOC-layout set: every prior variant from one forward pass.

Used by the demo and ``bench/quality.py``. Thresholds δ_k of SP-bb / SP-seg are chosen on
images that are not scored (the paper chose them on a validation split); the network
itself never sees a mask.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import storage
from .evaluation import align_classes, confusion_matrix, decode_mask, gt_mask_url, read_gt_classes, read_split_ids
from .images import decode_image
from .inference import ModelBundle, compute_prior_inputs, predict, segment_variants
from .priors import VARIANTS, image_level_prior
from .thresholds import search_thresholds, threshold_sample

__all__ = ["fit_thresholds", "iter_voc", "score_variants"]

OBJECTNESS = {"bb": "box_obj", "seg": "seg_obj"}


def iter_voc(ground_truth: str, ids: Sequence[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(id, RGB uint8 [H, W, 3], ground truth uint8 [H, W]) of VOC-layout images."""
    for image_id in ids:
        rgb = np.asarray(decode_image(storage.read_bytes(storage.join(ground_truth, "JPEGImages", f"{image_id}.jpg"))
                                      ).image)
        gt = decode_mask(storage.read_bytes(gt_mask_url(ground_truth, image_id)))
        if gt.shape != rgb.shape[:2]:
            raise ValueError(f"{image_id}: mask {gt.shape} and image {rgb.shape[:2]} differ in size")
        yield image_id, rgb, gt


def fit_thresholds(bundle: ModelBundle, ground_truth: str, ids: Sequence[str], prior: str,
                   max_side: int = 512) -> tuple[dict[str, float], dict[str, Any]]:
    """δ_k for ``prior`` (bb or seg) maximising mean IoU of ILP+prior on ``ids``."""
    if prior not in OBJECTNESS:
        raise ValueError(f"thresholds exist for bb and seg, not {prior!r}")

    def samples():
        for _, rgb, gt in iter_voc(ground_truth, ids):
            pred = predict(bundle, [rgb], max_side)[0]
            inputs, _ = compute_prior_inputs(rgb, [prior])
            ilp = image_level_prior(pred.probs(), pred.image_probs)
            yield threshold_sample(ilp, inputs[OBJECTNESS[prior]], gt)

    search = search_thresholds(samples(), bundle.classes, read_gt_classes(ground_truth))
    return search.thresholds, search.describe()


def score_variants(bundle: ModelBundle, ground_truth: str, split: str,
                   thresholds: dict[str, np.ndarray] | None = None, variants: Sequence[str] = tuple(VARIANTS),
                   max_side: int = 512, limit: int | None = None) -> dict[str, dict[str, Any]]:
    """Metrics (mean IoU, per-class IoU, pixel accuracy, ...) of each variant on a split."""
    from .evaluation import segmentation_metrics

    alignment = align_classes(read_gt_classes(ground_truth), bundle.classes)
    confusions = {v: np.zeros((len(alignment.gt_classes), len(alignment.columns)), np.int64) for v in variants}
    ids = read_split_ids(ground_truth, split)[:limit]
    for _, rgb, gt in iter_voc(ground_truth, ids):
        masks = segment_variants(bundle, rgb, thresholds, max_side=max_side, variants=variants)
        for variant, mask in masks.items():
            confusions[variant] += confusion_matrix(gt, mask, alignment)
    return {v: {**segmentation_metrics(conf, alignment), "images": len(ids)} for v, conf in confusions.items()}
