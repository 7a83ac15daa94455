"""The model API: a checkpoint, images of any size -> class probabilities, labels with priors.

What evaluation code, training's pseudo-labels and the benchmarks call, in one place:

- :func:`load_model` / :func:`pin_model` / :func:`load_pinned` (:mod:`.model`): a checkpoint's
  exact bytes as a cached, BatchNorm-folded :class:`ModelBundle`;
- :func:`predict` (:mod:`.forward`): batched forward passes at any size, per-pixel
  probabilities on demand at full resolution (:class:`Prediction`), the image-level prior,
  test-time views (:mod:`.tta`);
- :func:`segment_image` and :func:`segment_variants` (here): the priors applied on the host
  (:func:`~.priors.apply_priors`), every prior variant from one forward pass (the paper's Table 4).

segment-corpus runs the same steps batched on the model's device (:mod:`.chunk`,
:mod:`.postprocess`); ``tests/test_postprocess.py`` holds the two paths to the same labels.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .batching import DEFAULT_MAX_SIDE, batch_key, forward_size, input_shape
from .forward import Prediction, cell_grid, forward_batches, predict, sample_cells, upsample_cells
from .model import ModelBundle, ModelError, load_model, load_pinned, load_thresholds, model_loads, pin_model
from .priors import VARIANTS, apply_priors, parse_priors
from .proposals import PRIOR_INPUTS, compute_prior_inputs
from .tta import TTA

__all__ = [
    "DEFAULT_MAX_SIDE",
    "PRIOR_INPUTS",
    "ModelBundle",
    "ModelError",
    "Prediction",
    "SegmentResult",
    "batch_key",
    "cell_grid",
    "compute_prior_inputs",
    "forward_batches",
    "forward_size",
    "input_shape",
    "load_model",
    "load_pinned",
    "load_thresholds",
    "model_loads",
    "pin_model",
    "predict",
    "sample_cells",
    "segment_image",
    "segment_variants",
    "upsample_cells",
]


@dataclass
class SegmentResult:
    labels: np.ndarray  # uint8 [H, W], class index or 255 (unlabelled)
    prediction: Prediction
    prior_ms: dict[str, float]  # time spent computing each prior's inputs and applying it


def _labels(bundle: ModelBundle, pred: Prediction, priors: Sequence[str], inputs: Mapping[str, np.ndarray],
            thresholds: Mapping[str, np.ndarray] | None) -> np.ndarray:
    return apply_priors(pred.probs(), pred.image_probs, priors, thresholds=thresholds or bundle.thresholds,
                        background_index=bundle.background_index, **inputs)


def segment_image(bundle: ModelBundle, rgb: np.ndarray, priors: str | Sequence[str] = ("ilp", "sppxl"),
                  thresholds: Mapping[str, np.ndarray] | None = None, max_side: int = DEFAULT_MAX_SIDE,
                  prediction: Prediction | None = None, min_side: int = 0,
                  tta: str | TTA | None = None) -> SegmentResult:
    """Segment one RGB image with the given priors (the flow does the same per batch); ``tta``: see :func:`predict`."""
    priors = parse_priors(priors)
    pred = prediction or predict(bundle, [rgb], max_side, min_side, tta)[0]
    inputs, ms = compute_prior_inputs(rgb, priors)
    t0 = time.perf_counter()
    labels = _labels(bundle, pred, priors, inputs, thresholds)
    ms["apply"] = (time.perf_counter() - t0) * 1000
    return SegmentResult(labels, pred, ms)


def segment_variants(bundle: ModelBundle, rgb: np.ndarray, thresholds: Mapping[str, np.ndarray] | None = None,
                     max_side: int = DEFAULT_MAX_SIDE, variants: Sequence[str] = tuple(VARIANTS),
                     prediction: Prediction | None = None,
                     variant_thresholds: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                     min_side: int = 0, tta: str | TTA | None = None) -> dict[str, np.ndarray]:
    """The prior variants of :data:`~weakseg.tasks.segment.priors.VARIANTS` from one forward pass.

    Returns ``{variant: uint8[H, W] labels}``. Superpixels and proposals are computed once
    and shared. ``thresholds``: ``{"bb": δ[K], "seg": δ[K]}``; by default the model's.
    ``variant_thresholds``: ``{variant: {"bb": δ[K]}}``, for a variant, instead of those.
    ``tta``: test-time augmentation of the forward pass, see :func:`predict`.
    """
    pred = prediction or predict(bundle, [rgb], max_side, min_side, tta)[0]
    needed = sorted({p for v in variants for p in VARIANTS[v]})
    inputs, _ = compute_prior_inputs(rgb, needed)
    out = {}
    for v in variants:
        priors = VARIANTS[v]
        own = {PRIOR_INPUTS[p]: inputs[PRIOR_INPUTS[p]] for p in priors if p in PRIOR_INPUTS}
        out[v] = _labels(bundle, pred, priors, own, (variant_thresholds or {}).get(v) or thresholds)
    return out

