"""The paper's Table 4 on any VOC-layout set: every prior variant from one forward pass.

Used by the demo and ``bench/quality.py``. Thresholds δ_k of SP-bb / SP-seg are chosen on
images that are not scored (the paper chose them on a validation split); the network
itself never sees a mask.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import storage
from ..images import decode_image
from ..segment.inference import ModelBundle, compute_prior_inputs, load_model, predict, segment_variants
from ..segment.priors import VARIANTS, chain_scores, has_objectness, objectness_prior, parse_priors, threshold_prior
from .scoring import (
    align_classes,
    confusion_matrix,
    decode_mask,
    gt_mask_url,
    read_gt_classes,
    read_split_ids,
    read_voc_image,
)
from .thresholds import ThresholdFit, ThresholdSample, threshold_sample, write_thresholds

__all__ = [
    "ChainThresholds",
    "choose_chain_thresholds",
    "fit_chain_thresholds",
    "fit_thresholds",
    "iter_voc",
    "read_voc",
    "score_variants",
    "threshold_variants",
    "thresholds_by_variant",
]


def read_voc(ground_truth: str, image_id: str) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 [H, W, 3] and ground truth uint8 [H, W] of one VOC-layout image (any image extension
    in ``JPEGImages/``: :func:`~weakseg.tasks.evaluate.scoring.read_voc_image`).

    Raises ``OSError`` (missing file) or ``ValueError`` (undecodable, sizes differ).
    """
    rgb = np.asarray(decode_image(read_voc_image(ground_truth, image_id)).image)
    gt = decode_mask(storage.read_bytes(gt_mask_url(ground_truth, image_id)))
    if gt.shape != rgb.shape[:2]:
        raise ValueError(f"{image_id}: mask {gt.shape} and image {rgb.shape[:2]} differ in size")
    return rgb, gt


def iter_voc(ground_truth: str, ids: Sequence[str]) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(id, RGB uint8 [H, W, 3], ground truth uint8 [H, W]) of VOC-layout images."""
    for image_id in ids:
        yield image_id, *read_voc(ground_truth, image_id)


def threshold_variants(variants: Sequence[str] = tuple(VARIANTS)) -> list[str]:
    """The variants among ``variants`` that have δ_k to choose (those with bb or seg)."""
    return [v for v in variants if has_objectness(VARIANTS[v])]


def fit_chain_thresholds(bundle: ModelBundle, ground_truth: str, ids: Sequence[str],
                         chains: Mapping[str, Sequence[str]], max_side: int = 512,
                         min_side: int = 0, tta: str | None = None,
                         progress: Callable[[int], None] | None = None,
                         ) -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
    """δ_k of each prior chain (``{name: ("ilp", "sppxl", "seg")}``), maximising its mean IoU on ``ids``.

    One pass over the images for all chains (``progress(1)`` after each). Returns ``{name: (δ by class name, how the
    search went)}``; each chain's δ are chosen for that chain (ilp+sppxl+bb tests the
    smoothed labels, ilp+bb the raw ones). An image that cannot be read (missing, corrupt,
    mask of another size) is skipped and listed in the search's ``skipped``; it never stops
    the search.
    """
    chains = {name: parse_priors(chain) for name, chain in chains.items()}
    if not chains or not all(has_objectness(chain) for chain in chains.values()):
        raise ValueError(f"every chain needs an objectness prior (bb or seg) to choose δ for; got {chains}")
    gt_classes = read_gt_classes(ground_truth)
    fits = {name: ThresholdFit(bundle.classes, gt_classes) for name in chains}
    needed = sorted({p for chain in chains.values() for p in chain})
    skipped: dict[str, str] = {}
    for image_id in ids:
        try:  # everything of one image first, so a bad one adds to no chain's fit
            rgb, gt = read_voc(ground_truth, image_id)
            samples = _chain_samples(bundle, rgb, gt, chains, needed, max_side, min_side, tta)
            checked = {name: fit.check(samples[name]) for name, fit in fits.items()}
        except (OSError, ValueError) as err:
            skipped[image_id] = f"{type(err).__name__}: {err}"
            continue
        finally:
            if progress is not None:
                progress(1)
        for name, fit in fits.items():
            fit.add_checked(*checked[name])
    if len(skipped) == len(ids):
        raise ValueError(f"none of the {len(ids)} images of {ground_truth} could be read; first: "
                         f"{next(iter(skipped.items()), None)}")
    out = {}
    for name, fit in fits.items():
        search = fit.search()
        out[name] = (search.thresholds, {**search.describe(), "priors": list(chains[name]), "images": fit.samples,
                                         "skipped": len(skipped), "skipped_images": dict(list(skipped.items())[:20])})
    return out


@dataclass(frozen=True)
class ChainThresholds:
    """δ_k chosen for one prior chain: what a thresholds file holds, before it is written."""

    chain: tuple[str, ...]
    classes: tuple[str, ...]  # the model's, in index order
    thresholds: dict[str, float]  # δ by class name
    how: dict[str, Any]  # how the search went (its ``search`` record)

    @property
    def prior(self) -> str:
        return threshold_prior(self.chain)

    def write(self, url: str, how: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The thresholds file, written atomically; ``how`` replaces the search record."""
        return write_thresholds(url, self.prior, self.classes, self.thresholds, self.how if how is None else how,
                                priors=self.chain)


def choose_chain_thresholds(model: str, device: str, ground_truth: str, ids: Sequence[str],
                            chains: Mapping[str, Sequence[str]], max_side: int = 512,
                            min_side: int | None = 0, tta: str | None = None,
                            progress: Callable[[int], None] | None = None) -> dict[str, ChainThresholds]:
    """Load the model and choose δ_k of each chain on ``ids`` in one pass (:func:`fit_chain_thresholds`);
    each search record names the model (``model_id``) and the views its maps came from (``tta``)."""
    bundle = load_model(model, device)
    min_side = bundle.resolve_min_side(min_side, max_side)
    found = fit_chain_thresholds(bundle, ground_truth, ids, chains, max_side, min_side, tta, progress)
    return {name: ChainThresholds(parse_priors(chains[name]), tuple(bundle.classes), thresholds,
                                  {**how, "model_id": bundle.model_id, "tta": bundle.views(tta)})
            for name, (thresholds, how) in found.items()}


def _chain_samples(bundle: ModelBundle, rgb: np.ndarray, gt: np.ndarray, chains: Mapping[str, tuple[str, ...]],
                   needed: Sequence[str], max_side: int, min_side: int,
                   tta: str | None = None) -> dict[str, ThresholdSample]:
    """One image's threshold sample for every chain, from one forward pass."""
    pred = predict(bundle, [rgb], max_side, min_side, tta)[0]
    inputs, _ = compute_prior_inputs(rgb, needed)
    probs = pred.probs()
    samples = {}
    for name, chain in chains.items():
        objectness, _ = objectness_prior(chain, inputs.get("box_obj"), inputs.get("seg_obj"), None,
                                         len(bundle.classes))
        smoothing = inputs["superpixels"] if "sppxl" in chain else None
        samples[name] = threshold_sample(chain_scores(probs, pred.image_probs, chain), objectness, gt, smoothing)
    return samples


def fit_thresholds(bundle: ModelBundle, ground_truth: str, ids: Sequence[str],
                   variants: Sequence[str] | None = None,
                   max_side: int = 512, min_side: int = 0,
                   tta: str | None = None) -> dict[str, tuple[dict[str, float], dict[str, Any]]]:
    """:func:`fit_chain_thresholds` for the :data:`~weakseg.tasks.segment.priors.VARIANTS` with bb or seg."""
    names = threshold_variants(variants if variants is not None else tuple(VARIANTS))
    if not names:
        raise ValueError("none of the variants has an objectness prior (bb or seg) to choose δ for")
    return fit_chain_thresholds(bundle, ground_truth, ids, {v: VARIANTS[v] for v in names}, max_side, min_side,
                                tta)


def thresholds_by_variant(found: Mapping[str, tuple[Mapping[str, float], Any]],
                          classes: Sequence[str]) -> dict[str, dict[str, np.ndarray]]:
    """:func:`fit_thresholds`' result as ``{variant: {"bb" or "seg": δ[K]}}`` for :func:`score_variants`."""
    out = {}
    for v, (deltas, _) in found.items():
        out[v] = {threshold_prior(VARIANTS[v]): np.array([deltas.get(c, 0.0) for c in classes])}
    return out


def score_variants(bundle: ModelBundle, ground_truth: str, split: str,
                   thresholds: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                   variants: Sequence[str] = tuple(VARIANTS),
                   max_side: int = 512, limit: int | None = None, min_side: int = 0,
                   tta: str | None = None, progress: Callable[[int], None] | None = None) -> dict[str, dict[str, Any]]:
    """Metrics (mean IoU, per-class IoU, pixel accuracy, ...) of each variant on a split
    (``progress(1)`` after each image).

    ``thresholds``: δ per variant, ``{variant: {"bb" or "seg": δ[K]}}`` (see
    :func:`thresholds_by_variant`); variants without any use the model's.
    """
    from .scoring import segmentation_metrics

    alignment = align_classes(read_gt_classes(ground_truth), bundle.classes)
    confusions = {v: np.zeros((len(alignment.gt_classes), len(alignment.columns)), np.int64) for v in variants}
    ids = read_split_ids(ground_truth, split)[:limit]
    for _, rgb, gt in iter_voc(ground_truth, ids):
        masks = segment_variants(bundle, rgb, max_side=max_side, variants=variants, variant_thresholds=thresholds,
                                 min_side=min_side, tta=tta)
        for variant, mask in masks.items():
            confusions[variant] += confusion_matrix(gt, mask, alignment)
        if progress is not None:
            progress(1)
    return {v: {**segmentation_metrics(conf, alignment), "images": len(ids)} for v, conf in confusions.items()}
