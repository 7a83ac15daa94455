"""Inference priors of Pinheiro & Collobert (CVPR 2015), one pure numpy function each.

Inputs are the network's per-pixel class probabilities ``probs[K, H, W]`` (softmax of the
score maps, upsampled to the image) and the image-level probabilities ``image_probs[K]``
(softmax of the LSE scores). Outputs are label maps ``uint8[H, W]``: a class index, or
:data:`UNLABELLED` (255) where a prior refuses every class and the model has no
``background`` class.

- :func:`image_level_prior` (ILP): ŷ'_ij(k) = p_ij(k) · p(k|I).
- :func:`superpixel_vote` (SP-sppxl): every superpixel takes its majority label.
- :func:`box_objectness` / :func:`segment_objectness`: pixel objectness p_ij(Obj) = mean
  score of the proposals covering the pixel (SP-bb / SP-seg).
- :func:`objectness_labels`: label k = argmax ŷ'_ij(k) if ŷ'_ij(k) · p_ij(Obj) > δ_k,
  else background.

The paper's variants chain them (see :func:`apply_priors`): base, ilp, ilp+sppxl, ilp+bb,
ilp+seg; and, beyond the paper, ilp+sppxl+bb and ilp+sppxl+seg, where the objectness test
acts on the superpixel-smoothed labelling. Proposal generators live in
:mod:`weakseg.tasks.segment.proposals`.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "PRIORS",
    "UNLABELLED",
    "VARIANTS",
    "apply_priors",
    "argmax_labels",
    "box_objectness",
    "chain_scores",
    "default_thresholds",
    "has_objectness",
    "image_level_prior",
    "keep_objects",
    "label_score",
    "objectness_inputs",
    "objectness_labels",
    "objectness_prior",
    "parse_priors",
    "segment_objectness",
    "smooth_for_objectness",
    "superpixel_mean",
    "superpixel_vote",
    "threshold_prior",
]

UNLABELLED = 255
PRIORS = ("ilp", "sppxl", "bb", "seg")
# The paper's five variants (its Table 4) and the two chains that smooth before the objectness
# test, each a tuple of priors for apply_priors.
VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "ilp": ("ilp",),
    "ilp+sppxl": ("ilp", "sppxl"),
    "ilp+bb": ("ilp", "bb"),
    "ilp+seg": ("ilp", "seg"),
    "ilp+sppxl+bb": ("ilp", "sppxl", "bb"),
    "ilp+sppxl+seg": ("ilp", "sppxl", "seg"),
}


def parse_priors(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"ilp,sppxl"`` -> ``("ilp", "sppxl")``; ``"none"`` or ``""`` -> ``()``. Unknown names raise."""
    names = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if names in ([], ["none"], ["base"]):
        return ()
    unknown = [n for n in names if n not in PRIORS]
    if unknown:
        raise ValueError(f"unknown prior(s) {unknown}: choose from {', '.join(PRIORS)}, or none")
    return tuple(p for p in PRIORS if p in names)  # canonical order, no duplicates


def image_level_prior(probs: np.ndarray, image_probs: np.ndarray) -> np.ndarray:
    """ILP: ŷ'_ij(k) = p_ij(k) · p(k|I). ``probs[K, H, W]``, ``image_probs[K]``."""
    image_probs = np.asarray(image_probs, dtype=probs.dtype)
    if probs.ndim != 3 or image_probs.shape != (probs.shape[0],):
        raise ValueError(f"need probs [K, H, W] and image_probs [K]; got {probs.shape} and {image_probs.shape}")
    return probs * image_probs[:, None, None]


def argmax_labels(scores: np.ndarray) -> np.ndarray:
    """Per-pixel argmax over classes as ``uint8[H, W]`` (at most 255 classes)."""
    if scores.shape[0] > UNLABELLED:
        raise ValueError(f"{scores.shape[0]} classes do not fit an 8-bit mask with 255 = unlabelled")
    return scores.argmax(axis=0).astype(np.uint8)


def _dense_ids(segments: np.ndarray) -> tuple[np.ndarray, int]:
    """Superpixel ids as 0..S-1 (flat) and S."""
    seg = np.unique(segments.ravel(), return_inverse=True)[1].ravel()
    return seg, int(seg.max()) + 1 if seg.size else 0


def _mean(values: np.ndarray, seg: np.ndarray, n: int) -> np.ndarray:
    sums = np.bincount(seg, weights=values.ravel().astype(np.float64), minlength=n)
    return (sums / np.maximum(np.bincount(seg, minlength=n), 1))[seg].reshape(values.shape).astype(np.float32)


def _vote(labels: np.ndarray, seg: np.ndarray, n_seg: int) -> np.ndarray:
    n_lab = 256
    votes = np.bincount(seg * n_lab + labels.ravel().astype(np.int64), minlength=n_seg * n_lab).reshape(n_seg, n_lab)
    return votes.argmax(axis=1).astype(np.uint8)[seg].reshape(labels.shape)


def _check_shapes(name: str, values: np.ndarray, segments: np.ndarray) -> None:
    if values.shape != segments.shape:
        raise ValueError(f"{name} {values.shape} and segments {segments.shape} differ in shape")


def superpixel_mean(values: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """Every pixel of ``values[H, W]`` replaced by its superpixel's mean (float32)."""
    _check_shapes("values", values, segments)
    return _mean(values, *_dense_ids(segments))


def superpixel_vote(labels: np.ndarray, segments: np.ndarray) -> np.ndarray:
    """SP-sppxl: each superpixel takes the most frequent label among its pixels.

    ``labels`` uint8[H, W] (255 counts as a label of its own), ``segments`` int[H, W]
    superpixel ids (any non-negative integers). Ties go to the smallest label.
    """
    _check_shapes("labels", labels, segments)
    return _vote(labels, *_dense_ids(segments))


def box_objectness(boxes: np.ndarray, scores: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """p_ij(Obj) = mean score of the boxes covering pixel (i, j); 0 where none does.

    ``boxes[N, 4]`` as x0, y0, x1, y1 in pixels (x1, y1 exclusive), ``scores[N]`` in [0, 1].
    Summed-area (difference array) accumulation: O(N + H·W), whatever the box count.
    """
    h, w = shape
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if len(boxes) != len(scores):
        raise ValueError(f"{len(boxes)} boxes but {len(scores)} scores")
    x0 = np.clip(np.floor(boxes[:, 0]), 0, w).astype(np.int64)
    y0 = np.clip(np.floor(boxes[:, 1]), 0, h).astype(np.int64)
    x1 = np.clip(np.ceil(boxes[:, 2]), 0, w).astype(np.int64)
    y1 = np.clip(np.ceil(boxes[:, 3]), 0, h).astype(np.int64)
    keep = (x1 > x0) & (y1 > y0)
    x0, y0, x1, y1, s = x0[keep], y0[keep], x1[keep], y1[keep], scores[keep]
    total = np.zeros((h + 1, w + 1))
    count = np.zeros((h + 1, w + 1))
    for acc, val in ((total, s), (count, np.ones_like(s))):
        np.add.at(acc, (y0, x0), val)
        np.add.at(acc, (y0, x1), -val)
        np.add.at(acc, (y1, x0), -val)
        np.add.at(acc, (y1, x1), val)
    total = total.cumsum(0).cumsum(1)[:h, :w]
    count = count.cumsum(0).cumsum(1)[:h, :w]
    out = np.zeros((h, w), dtype=np.float32)
    covered = count > 0.5
    out[covered] = total[covered] / count[covered]
    return out


def segment_objectness(layers: Sequence[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """p_ij(Obj) = mean score of the segment proposals covering pixel (i, j); 0 where none does.

    Proposals come as layers ``(segments int[H, W], scores float[S])``: every id ``s`` of a
    layer is one proposal (the pixels where ``segments == s``) with score ``scores[s]``; a
    NaN score means "not a proposal" (e.g. too small). A layer is a partition (one level of a
    segmentation hierarchy) or a single mask (ids 0/1 with score NaN for 0).
    """
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    for segments, scores in layers:
        if segments.shape != tuple(shape):
            raise ValueError(f"segment layer {segments.shape} does not match {shape}")
        scores = np.asarray(scores, dtype=np.float64)
        s = scores[segments]
        hit = ~np.isnan(s)
        total[hit] += s[hit]
        count[hit] += 1
    out = np.zeros(shape, dtype=np.float32)
    covered = count > 0
    out[covered] = total[covered] / count[covered]
    return out


def chain_scores(probs: np.ndarray, image_probs: np.ndarray, priors: Sequence[str]) -> np.ndarray:
    """The scores a chain labels by: ŷ' (ILP) when ``ilp`` is in ``priors``, else the probabilities."""
    return image_level_prior(probs, image_probs) if "ilp" in priors else probs


def has_objectness(priors: Sequence[str]) -> bool:
    """Whether the chain has an objectness prior (bb or seg), i.e. thresholds δ_k."""
    return bool({"bb", "seg"} & set(priors))


def threshold_prior(priors: Sequence[str]) -> str:
    """Whose δ a chain uses: ``bb`` when it has bb (also with seg: the mean map), else ``seg``."""
    if not has_objectness(priors):
        raise ValueError(f"priors {','.join(priors) or 'none'} have no objectness prior (bb or seg)")
    return "bb" if "bb" in priors else "seg"


def smooth_for_objectness(labels: np.ndarray, objectness: np.ndarray,
                          superpixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SP-sppxl before SP-bb / SP-seg: the superpixel vote of ``labels`` and p(Obj) averaged per superpixel.

    The superpixel ids are made dense once for both (a sort over the image).
    """
    _check_shapes("labels", labels, superpixels)
    _check_shapes("objectness", objectness, superpixels)
    seg, n = _dense_ids(superpixels)
    return _vote(labels, seg, n), _mean(objectness, seg, n)


def objectness_inputs(
    scores: np.ndarray, objectness: np.ndarray, superpixels: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The labels SP-bb / SP-seg test and the objectness they are tested with: ``(uint8[H, W], float[H, W])``.

    Without ``superpixels`` the label is the per-pixel argmax and p(Obj) the map itself
    (the paper). With them the labels are first smoothed (:func:`superpixel_vote`) and
    p(Obj) averaged over each superpixel (:func:`smooth_for_objectness`), so the test acts
    on the labelling SP-sppxl produced and a superpixel's objectness follows image edges
    rather than box corners. :func:`apply_priors`, the threshold search and the flow's
    banded labelling (``segmenting.label_image``) all follow this rule.
    """
    if objectness.shape != scores.shape[1:]:
        raise ValueError(f"objectness {objectness.shape} does not match the score maps {scores.shape}")
    labels = argmax_labels(scores)
    if superpixels is not None:
        labels, objectness = smooth_for_objectness(labels, objectness, superpixels)
    return labels, objectness


def label_score(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ŷ'_ij(labels_ij): each pixel's score for its label (255 = unlabelled scores 0)."""
    idx = np.minimum(labels, scores.shape[0] - 1).astype(np.int64)
    return np.where(labels < scores.shape[0], np.take_along_axis(scores, idx[None], axis=0)[0], 0.0)


def keep_objects(
    scores: np.ndarray,
    labels: np.ndarray,
    objectness: np.ndarray,
    thresholds: np.ndarray,
    background_index: int | None,
) -> np.ndarray:
    """The SP-bb / SP-seg test on given labels: keep k where ŷ'(k) · p(Obj) > δ_k, else background.

    Works on any row band of an image (the flow labels large images band by band).
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (scores.shape[0],):
        raise ValueError(f"need {scores.shape[0]} thresholds, got shape {thresholds.shape}")
    fill = UNLABELLED if background_index is None else background_index
    delta = np.append(thresholds, np.inf)[np.minimum(labels, scores.shape[0])]
    return np.where(label_score(scores, labels) * objectness > delta, labels, np.uint8(fill)).astype(np.uint8)


def objectness_labels(
    scores: np.ndarray,
    objectness: np.ndarray,
    thresholds: np.ndarray,
    background_index: int | None,
    superpixels: np.ndarray | None = None,
) -> np.ndarray:
    """SP-bb / SP-seg: k = argmax ŷ'(k) if ŷ'(k) · p(Obj) > δ_k, else background.

    ``scores[K, H, W]`` (ILP scores ŷ'), ``objectness[H, W]``, ``thresholds[K]`` (δ).
    Background is ``background_index`` or :data:`UNLABELLED` when the model has none.
    ``superpixels``: test the superpixel-smoothed labels instead (see :func:`objectness_inputs`).
    """
    labels, objectness = objectness_inputs(scores, objectness, superpixels)
    return keep_objects(scores, labels, objectness, thresholds, background_index)


def objectness_prior(
    priors: Sequence[str],
    box_obj: np.ndarray | None,
    seg_obj: np.ndarray | None,
    thresholds: Mapping[str, np.ndarray] | None,
    num_classes: int,
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(p(Obj)[H, W], δ[K])`` for the chain ``priors``, or None without bb / seg.

    bb and seg together: the mean of the two maps, with the ``bb`` thresholds. δ falls
    back to :func:`default_thresholds`.
    """
    maps = []
    for prior, obj in (("bb", box_obj), ("seg", seg_obj)):
        if prior in priors:
            if obj is None:
                raise ValueError(f"prior {prior} needs {'box_obj' if prior == 'bb' else 'seg_obj'}")
            maps.append(obj)
    if not maps:
        return None
    delta = (thresholds or {}).get(threshold_prior(priors))
    return (maps[0] if len(maps) == 1 else np.mean(maps, axis=0)), (
        default_thresholds(num_classes) if delta is None else np.asarray(delta))


def default_thresholds(num_classes: int) -> np.ndarray:
    """δ_k = 0.5 / K for every class, used when neither a thresholds file nor the checkpoint has any.

    At an objectness of 0.5 (an average proposal) a pixel keeps its label when its ILP score
    beats a uniform guess, 1/K; stronger objectness lets weaker scores through. The paper
    tunes δ_k per class on validation data: run evaluate-segmentation for real values.
    """
    return np.full(num_classes, 0.5 / num_classes)


def apply_priors(
    probs: np.ndarray,
    image_probs: np.ndarray,
    priors: Sequence[str],
    *,
    superpixels: np.ndarray | None = None,
    box_obj: np.ndarray | None = None,
    seg_obj: np.ndarray | None = None,
    thresholds: Mapping[str, np.ndarray] | None = None,
    background_index: int | None = None,
) -> np.ndarray:
    """Chain the priors the way the paper's variants do; returns ``uint8[H, W]`` labels.

    ``ilp`` rescales the scores; ``sppxl`` gives each superpixel its majority label;
    ``bb`` / ``seg`` then send pixels whose (ILP) score for their label times objectness is
    under δ_k to background (:func:`objectness_prior`; with ``sppxl``, objectness averaged
    per superpixel, see :func:`objectness_inputs`). The caller computes the superpixels
    and objectness maps the chosen priors need (see ``proposals``).
    """
    priors = parse_priors(priors)
    scores = chain_scores(probs, image_probs, priors)
    if "sppxl" in priors and superpixels is None:
        raise ValueError("prior sppxl needs superpixels")
    smoothing = superpixels if "sppxl" in priors else None
    objectness = objectness_prior(priors, box_obj, seg_obj, thresholds, probs.shape[0])
    if objectness is None:
        labels = argmax_labels(scores)
        return labels if smoothing is None else superpixel_vote(labels, smoothing)
    return objectness_labels(scores, objectness[0], objectness[1], background_index, smoothing)
