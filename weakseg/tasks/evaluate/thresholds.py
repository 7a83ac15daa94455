"""Choosing the per-class thresholds δ_k of the SP-bb / SP-seg priors on validation data.

The priors label a pixel k = argmax_k ŷ'_ij(k) when s_ij = max_k ŷ'_ij(k) · p_ij(Obj) > δ_k,
else background (255 when the model has no ``background`` class); in the chains with
SP-sppxl the label is the superpixel vote's and p(Obj) its superpixel mean. Given, per
validation image, ``s`` and the label (:func:`threshold_sample` builds them from the ILP
score maps, the objectness map and, for a chain, the superpixels, with the rule the priors
apply) and the ground truth, :func:`search_thresholds` picks δ from a grid:

1. one shared δ for every class, the grid value with the best mean IoU (a start that
   already beats any fixed default), then
2. coordinate ascent on the mean IoU: class by class (index order), δ_k moves to the grid
   value that maximises the *mean* IoU with the other thresholds fixed; sweeps repeat until
   no threshold moves (or ``max_sweeps``). A move needs a strict improvement, so ties keep
   the earlier (smaller) value and classes that never win a pixel keep the shared δ.

Mean IoU, not each class's own IoU, is the objective because δ_k also changes the
background's IoU (and, through it, the mean). Metric conventions are those of
:mod:`weakseg.tasks.evaluate.scoring`. The images are reduced in one pass to a histogram over
(argmax class, grid bin, ground-truth class) (:class:`ThresholdFit`), so the search costs
the same for 10 or 10,000 images, never holds more than one image, and one pass can feed
the searches of several prior chains.

The chosen values go to a small JSON file, read by ``weakseg segment --thresholds URL``::

    {"format": "weakseg.thresholds", "format_version": 1, "prior": "bb",
     "classes": ["background", "aeroplane", ...],   # the model's classes, index order
     "thresholds": {"aeroplane": 0.031, ...},        # δ by class name (background has none)
     "priors": ["ilp", "sppxl", "bb"],               # optional: the chain δ was chosen for
     "search": {...}}                                # optional: how they were chosen
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from .. import storage
from ..segment.priors import (
    default_thresholds,
    has_objectness,
    label_score,
    objectness_inputs,
    parse_priors,
    threshold_prior,
)
from .scoring import VOID, align_classes

__all__ = [
    "DEFAULT_GRID",
    "FORMAT",
    "FORMAT_VERSION",
    "ThresholdFit",
    "ThresholdSample",
    "ThresholdSearch",
    "ThresholdsInUse",
    "read_thresholds",
    "resolve_thresholds",
    "search_thresholds",
    "threshold_sample",
    "write_thresholds",
]

FORMAT = "weakseg.thresholds"
FORMAT_VERSION = 1
# s is a product of probabilities and often small: 0, then 120 log-spaced values 1e-4 .. 1.
DEFAULT_GRID: tuple[float, ...] = (0.0, *(float(f"{v:.4g}") for v in np.geomspace(1e-4, 1.0, 120)))


@dataclass(frozen=True)
class ThresholdSample:
    """One validation image: the label the test acts on, s = ŷ'(label)·p(Obj), and the ground truth."""

    score: np.ndarray  # float [H, W]
    label: np.ndarray  # int [H, W], index into the model's classes
    gt: np.ndarray  # uint8 [H, W], index into the ground-truth classes, 255 = void


def threshold_sample(ilp_scores: np.ndarray, objectness: np.ndarray, gt: np.ndarray,
                     superpixels: np.ndarray | None = None) -> ThresholdSample:
    """From ILP score maps ``[K, H, W]`` and objectness ``[H, W]`` (both at the gt's size).

    ``superpixels``: choose δ for the chain ilp+sppxl+bb/seg, whose objectness test acts
    on the superpixel-smoothed labels (the same rule as :func:`~weakseg.tasks.segment.priors.objectness_inputs`).
    """
    ilp_scores, objectness = np.asarray(ilp_scores), np.asarray(objectness)
    if ilp_scores.ndim != 3 or ilp_scores.shape[1:] != objectness.shape or objectness.shape != np.shape(gt):
        raise ValueError(f"scores {ilp_scores.shape}, objectness {objectness.shape} and ground truth "
                         f"{np.shape(gt)} do not line up")
    label, objectness = objectness_inputs(ilp_scores, objectness, superpixels)
    return ThresholdSample(label_score(ilp_scores, label) * objectness, label, np.asarray(gt))


@dataclass(frozen=True)
class ThresholdSearch:
    thresholds: dict[str, float]  # δ by class name, background excluded
    mean_iou: float  # on the samples, with these thresholds
    shared_threshold: float  # step 1's single δ
    shared_mean_iou: float
    sweeps: int
    grid: tuple[float, ...] = field(repr=False)

    def describe(self) -> dict[str, Any]:
        return {"method": "shared grid search, then coordinate ascent on mean IoU",
                "mean_iou": self.mean_iou, "shared_threshold": self.shared_threshold,
                "shared_mean_iou": self.shared_mean_iou, "sweeps": self.sweeps, "grid_size": len(self.grid)}


def _mean_iou(conf: np.ndarray) -> np.ndarray:
    """Mean IoU of confusion matrices ``[..., K, C]`` (columns past K are misses); NaN-safe."""
    k = conf.shape[-2]
    tp = np.diagonal(conf[..., :k], axis1=-2, axis2=-1)
    union = conf.sum(axis=-1) + conf[..., :k].sum(axis=-2) - tp
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), 0.0)
    n = present.sum(axis=-1)
    return np.where(n > 0, iou.sum(axis=-1) / np.maximum(n, 1), 0.0)


class ThresholdFit:
    """The search's one pass over the images: :meth:`add` each sample, then :meth:`search`.

    Samples are reduced to a histogram over (argmax class, grid bin, ground-truth class), so
    several fits (one per prior chain) can share one pass over the images.
    ``gt_classes`` defaults to ``classes``; classes are matched by name as in evaluation.
    """

    def __init__(self, classes: Sequence[str], gt_classes: Sequence[str] | None = None,
                 grid: Sequence[float] = DEFAULT_GRID, unlabelled_as_background: bool = True) -> None:
        self.grid = np.unique(np.asarray(grid, np.float64))
        if self.grid.size == 0 or not np.isfinite(self.grid).all():
            raise ValueError("the threshold grid must hold finite values")
        self.classes = tuple(classes)
        self.alignment = align_classes(gt_classes if gt_classes is not None else self.classes, self.classes,
                                       unlabelled_as_background)
        self._kp, self._kg, self._nb = len(self.classes), len(self.alignment.gt_classes), self.grid.size + 1
        self._hist = np.zeros(self._kp * self._nb * self._kg, np.int64)  # flat [k, b, g]
        self.samples = 0

    def check(self, sample: ThresholdSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The sample's valid (not void) scores, labels and ground truth; ``ValueError`` if it does not fit."""
        score, label, gt = np.asarray(sample.score), np.asarray(sample.label), np.asarray(sample.gt)
        if not score.shape == label.shape == gt.shape:
            raise ValueError(f"sample shapes differ: score {score.shape}, label {label.shape}, gt {gt.shape}")
        valid = gt != VOID
        g, lab = gt[valid].astype(np.int64), label[valid].astype(np.int64)
        if g.size and g.max() >= self._kg:
            raise ValueError(f"ground truth has class values up to {int(g.max())} but {self._kg} classes")
        if lab.size and (lab.min() < 0 or lab.max() >= self._kp):
            raise ValueError(f"labels must index the {self._kp} classes, got {int(lab.min())}..{int(lab.max())}")
        return score[valid], lab, g

    def add(self, sample: ThresholdSample) -> None:
        self.add_checked(*self.check(sample))

    def add_checked(self, score: np.ndarray, lab: np.ndarray, g: np.ndarray) -> None:
        """Add what :meth:`check` returned (check every sample of an image first, then add them)."""
        kg, nb = self._kg, self._nb
        b = np.searchsorted(self.grid, score, side="left")  # s > grid[t]  <=>  b > t
        self._hist += np.bincount((lab * nb + b) * kg + g, minlength=self._hist.size)
        self.samples += 1

    def search(self, max_sweeps: int = 10) -> ThresholdSearch:
        """δ_k per class of ``classes`` (the model's), maximising mean IoU over the samples added."""
        if self.samples == 0:
            raise ValueError("no validation samples")
        classes, alignment, grid_arr = self.classes, self.alignment, self.grid
        kp, kg, nc, nb = self._kp, self._kg, len(alignment.columns), self._nb
        background = next((i for i, c in enumerate(classes) if c.strip().lower() == "background"), None)
        fill = int(alignment.lut[background if background is not None else VOID])
        hist = self._hist.reshape(kp, nb, kg)
        # above[k, t, g]: pixels of argmax k with s > grid[t]; below = total - above
        suffix = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1]
        above = suffix[:, 1:, :]  # t = 0 .. len(grid) - 1
        total = hist.sum(axis=1)
        columns = alignment.lut[:kp]

        def contribution(k: int, t: np.ndarray) -> np.ndarray:
            """[len(t), kg, nc]: class k's pixels in the confusion matrix for thresholds grid[t]."""
            out = np.zeros((t.size, kg, nc), np.int64)
            out[:, :, columns[k]] += above[k, t]
            out[:, :, fill] += total[k] - above[k, t]
            return out

        every = np.arange(grid_arr.size)
        shared = sum(contribution(k, every) for k in range(kp))
        shared_scores = _mean_iou(shared)
        start = int(np.argmax(shared_scores))
        choice = np.full(kp, start)
        parts = [contribution(k, np.array([start]))[0] for k in range(kp)]
        best = float(shared_scores[start])
        sweeps = 0
        for _ in range(max_sweeps):
            sweeps += 1
            moved = False
            for k in range(kp):
                if k == background or total[k].sum() == 0:
                    continue
                rest = sum(parts) - parts[k]
                candidates = rest[None] + contribution(k, every)
                scores = _mean_iou(candidates)
                t = int(np.argmax(scores))
                if scores[t] > best + 1e-12:
                    choice[k], parts[k], best, moved = t, candidates[t], float(scores[t]), True
            if not moved:
                break
        thresholds = {c: float(grid_arr[choice[k]]) for k, c in enumerate(classes) if k != background}
        return ThresholdSearch(thresholds, best, float(grid_arr[start]), float(shared_scores[start]), sweeps,
                               tuple(float(v) for v in grid_arr))


def search_thresholds(
    samples: Iterable[ThresholdSample],
    classes: Sequence[str],
    gt_classes: Sequence[str] | None = None,
    grid: Sequence[float] = DEFAULT_GRID,
    max_sweeps: int = 10,
    unlabelled_as_background: bool = True,
) -> ThresholdSearch:
    """δ_k per class of ``classes`` (the model's), maximising mean IoU over ``samples``.

    ``gt_classes`` defaults to ``classes``; classes are matched by name as in evaluation.
    """
    fit = ThresholdFit(classes, gt_classes, grid, unlabelled_as_background)
    for sample in samples:
        fit.add(sample)
    return fit.search(max_sweeps)


def _validate(prior: str, classes: Sequence[str], thresholds: Mapping[str, float], where: str,
              priors: Any = None) -> None:
    if prior not in ("bb", "seg"):
        raise ValueError(f"{where}: prior must be 'bb' or 'seg', got {prior!r}")
    if priors is not None and (not isinstance(priors, list) or not all(isinstance(p, str) for p in priors)
                               or not set(priors) <= {"ilp", "sppxl", "bb", "seg"}
                               or not has_objectness(priors) or threshold_prior(priors) != prior):
        raise ValueError(f"{where}: 'priors' must list the prior chain the {prior!r} thresholds were chosen "
                         f"for (with bb, a chain's δ are bb's); got {priors!r}")
    if not classes or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        raise ValueError(f"{where}: classes must be distinct non-empty names")
    unknown = [c for c in thresholds if c not in classes]
    if unknown:
        raise ValueError(f"{where}: thresholds for classes not in the class list: {unknown[:5]}")
    bad = [c for c, v in thresholds.items()
           if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v)]
    if bad:
        raise ValueError(f"{where}: thresholds must be finite numbers (bad: {bad[:5]})")


def write_thresholds(url: str, prior: Literal["bb", "seg"], classes: Sequence[str], thresholds: Mapping[str, float],
                     search: Mapping[str, Any] | None = None, priors: Sequence[str] | None = None) -> dict[str, Any]:
    """Write the thresholds file atomically; ``classes`` are the model's, in index order.

    ``priors``: the chain δ was chosen for (e.g. ``["ilp", "sppxl", "bb"]``), recorded so
    segment-corpus can say when a run uses the file with another chain.
    """
    classes, thresholds = list(classes), {str(k): float(v) for k, v in thresholds.items()}
    chain = None if priors is None else list(priors)
    _validate(prior, classes, thresholds, url, chain)
    doc: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "prior": prior, "classes": classes,
                           "thresholds": {c: thresholds[c] for c in classes if c in thresholds}}
    if chain is not None:
        doc["priors"] = chain
    if search:
        doc["search"] = dict(search)
    storage.write_json(url, doc)
    return doc


def read_thresholds(url: str) -> dict[str, Any]:
    """The validated thresholds document (``prior``, ``classes``, ``thresholds``, maybe ``search``)."""
    try:
        doc = storage.read_json(url)
    except FileNotFoundError:
        raise ValueError(f"thresholds file {url} does not exist") from None
    except ValueError as err:
        raise ValueError(f"thresholds file {url} is not JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{url} is not a weakseg thresholds file (format {FORMAT!r})")
    version = doc.get("format_version")
    if not isinstance(version, int) or version < 1 or version > FORMAT_VERSION:
        raise ValueError(f"{url}: thresholds format version {version!r} is not supported (1..{FORMAT_VERSION})")
    if not isinstance(doc.get("classes"), list) or not isinstance(doc.get("thresholds"), dict):
        raise ValueError(f"{url}: needs a 'classes' list and a 'thresholds' object")
    _validate(doc.get("prior"), doc["classes"], doc["thresholds"], url, doc.get("priors"))
    return doc


@dataclass(frozen=True)
class ThresholdsInUse:
    """The δ a segment-corpus run applies, per prior, and where each came from."""

    values: dict[str, list[float]]  # prior -> δ[K] in the model's class order
    sources: dict[str, str]  # prior -> "checkpoint", the file's (public) URL, or "default (0.5/K)"
    warnings: tuple[str, ...] = ()  # the file's δ were chosen for another chain, or on other views


def resolve_thresholds(checkpoint: Mapping[str, Sequence[float]], num_classes: int, priors: Sequence[str],
                       from_file: tuple[str, Sequence[float], Sequence[str] | None, str | None] | None = None,
                       file_url: str = "", views: str | None = None) -> ThresholdsInUse:
    """Which δ win: a thresholds file's (``from_file`` = its prior, δ, chain, views; read from
    ``file_url``, shown without credentials) over the checkpoint's, over 0.5/K for a bb or seg
    prior of ``priors`` that has none. ``views``: the test-time views the run averages, to
    compare with the file's."""
    values = {p: list(v) for p, v in checkpoint.items()}
    sources = dict.fromkeys(values, "checkpoint")
    warnings = []
    if from_file is not None:
        prior, vec, chain, chosen_with = from_file
        if chain is not None and prior in priors and parse_priors(chain) != tuple(priors):
            warnings.append(f"{file_url} holds δ chosen for priors {','.join(chain)}; this run applies "
                            f"{','.join(priors) or 'none'} (the test then acts on other labels, so δ may not be "
                            "the best)")
        if chosen_with is not None and views is not None and chosen_with != views:
            warnings.append(f"{file_url} holds δ chosen on the maps of the views {chosen_with}; this run averages "
                            f"{views} (δ may not be the best: choose them with the same --tta)")
        values[prior] = list(vec)
        sources[prior] = file_url
    for prior in ("bb", "seg"):
        if prior in priors and prior not in values:
            values[prior] = list(default_thresholds(num_classes))
            sources[prior] = "default (0.5/K)"
    return ThresholdsInUse(values, sources, tuple(warnings))
