"""The paper's Table 4 on any VOC-layout set: every prior variant from one forward pass.

Used by the demo and ``bench/quality.py``. Thresholds δ_k of SP-bb / SP-seg are chosen on
images that are not scored (the paper chose them on a validation split); the network
itself never sees a mask.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from . import storage
from .evaluation import align_classes, confusion_matrix, decode_mask, gt_mask_url, read_gt_classes, read_split_ids
from .images import decode_image
from .inference import ModelBundle, compute_prior_inputs, predict, segment_variants
from .priors import VARIANTS, image_level_prior, objectness_prior
from .thresholds import ThresholdFit, threshold_sample

__all__ = ["fit_thresholds", "iter_voc", "score_variants", "threshold_variants", "thresholds_by_variant"]

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


def threshold_variants(variants: Sequence[str] = tuple(VARIANTS)) -> list[str]:
    """The variants among ``variants`` that have δ_k to choose (those with bb or seg)."""
    return [v for v in variants if set(VARIANTS[v]) & set(OBJECTNESS)]


def fit_thresholds(bundle: ModelBundle, ground_truth: str, ids: Sequence[str],
                   variants: Sequence[str] | None = None,
                   max_side: int = 512, min_side: int = 0) -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
    """δ_k of each variant with bb or seg, maximising its mean IoU on ``ids``, in one pass.

    Returns ``{variant: (δ by class name, how the search went)}``. Each variant's δ are
    chosen for its own chain: ilp+sppxl+bb tests the smoothed labels, ilp+bb the raw ones.
    """
    variants = threshold_variants(variants if variants is not None else tuple(VARIANTS))
    if not variants:
        raise ValueError("none of the variants has an objectness prior (bb or seg) to choose δ for")
    gt_classes = read_gt_classes(ground_truth)
    fits = {v: ThresholdFit(bundle.classes, gt_classes) for v in variants}
    needed = sorted({p for v in variants for p in VARIANTS[v]})
    for _, rgb, gt in iter_voc(ground_truth, ids):
        pred = predict(bundle, [rgb], max_side, min_side)[0]
        inputs, _ = compute_prior_inputs(rgb, needed)
        ilp = image_level_prior(pred.probs(), pred.image_probs)
        for v in variants:
            priors = VARIANTS[v]
            objectness, _ = objectness_prior(priors, inputs.get("box_obj"), inputs.get("seg_obj"), None,
                                             len(bundle.classes))
            smoothing = inputs["superpixels"] if "sppxl" in priors else None
            fits[v].add(threshold_sample(ilp, objectness, gt, smoothing))
    out = {}
    for v, fit in fits.items():
        search = fit.search()
        out[v] = (search.thresholds, {**search.describe(), "priors": list(VARIANTS[v]), "images": len(ids)})
    return out


def thresholds_by_variant(found: Mapping[str, tuple[Mapping[str, float], Any]],
                          classes: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """:func:`fit_thresholds`' result as ``{variant: {"bb" or "seg": δ[K]}}`` for :func:`score_variants`."""
    out = {}
    for v, (deltas, _) in found.items():
        prior = "bb" if "bb" in VARIANTS[v] else "seg"
        out[v] = {prior: np.array([deltas.get(c, 0.0) for c in classes])}
    return out


def score_variants(bundle: ModelBundle, ground_truth: str, split: str,
                   thresholds: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                   variants: Sequence[str] = tuple(VARIANTS),
                   max_side: int = 512, limit: int | None = None, min_side: int = 0) -> dict[str, dict[str, Any]]:
    """Metrics (mean IoU, per-class IoU, pixel accuracy, ...) of each variant on a split.

    ``thresholds``: δ per variant, ``{variant: {"bb" or "seg": δ[K]}}`` (see
    :func:`thresholds_by_variant`); variants without any use the model's.
    """
    from .evaluation import segmentation_metrics

    alignment = align_classes(read_gt_classes(ground_truth), bundle.classes)
    confusions = {v: np.zeros((len(alignment.gt_classes), len(alignment.columns)), np.int64) for v in variants}
    ids = read_split_ids(ground_truth, split)[:limit]
    for _, rgb, gt in iter_voc(ground_truth, ids):
        masks = segment_variants(bundle, rgb, max_side=max_side, variants=variants, variant_thresholds=thresholds,
                                 min_side=min_side)
        for variant, mask in masks.items():
            confusions[variant] += confusion_matrix(gt, mask, alignment)
    return {v: {**segmentation_metrics(conf, alignment), "images": len(ids)} for v, conf in confusions.items()}
