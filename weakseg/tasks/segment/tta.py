"""Test-time augmentation: which views of an image the forward pass averages over.

A spec is a string ``SCALES[+flip]``: ``"1,1.5,2+flip"`` is the image at 1x, 1.5x and 2x
its plain forward size, each also mirrored left-right (6 views). ``"1"``, ``""``,
``"none"`` and ``None`` are the plain path (one view, what inference did before TTA);
``"flip"`` is short for ``"1+flip"``. :func:`weakseg.tasks.segment.inference.predict`
runs every view, brings each view's per-pixel probabilities to the original image's size
with that view's own forward size (and mirrors a flipped view back), and averages them;
the image-level probabilities p(k|I) are the mean of the views' too.

Sizes. A scale multiplies the *plain* forward size (the one ``max_side``/``min_side``
give, :func:`~weakseg.tasks.segment.inference.forward_size`), so a scale above 1 goes
past ``max_side`` on purpose: that is what it is for. To keep memory bounded, a view's
longer side grows to at most :data:`MAX_VIEW_SIDE` (1024 px), or to the plain forward
size when that is larger already (a scale above 1 then adds nothing over scale 1; a
scale below 1 always applies). Scales lie in [:data:`MIN_SCALE`, :data:`MAX_SCALE`],
and every side keeps at least 4 score cells like the plain path.

``"auto"`` (the commands' default) is the views chosen on dev for the kind of model at hand,
:func:`default_tta`: resolved once the model is loaded, so a run records the views it ran.

Cost: one forward pass per view, each proportional to its pixels (``1,1.5,2+flip`` is
2 x (1 + 2.25 + 4) = 14.5 plain passes, capped as above), plus one upsampling per view
when the probabilities are read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["AUTO", "DEFAULT_TTA", "MAX_SCALE", "MAX_VIEW_SIDE", "MIN_SCALE", "REFINED_TTA", "TTA", "TTAError",
           "default_tta", "parse_tta", "resolve_tta", "view_size"]

MIN_SCALE, MAX_SCALE = 0.25, 4.0
# What "auto" runs, chosen on dev with EfficientNet-Lite2 models (docs/method.md, *Choices*): the cheapest
# view whose mean IoU stays within 0.01 of the earlier default's. A MIL model, or a refined one with a
# background class: one view at 1.25x the plain forward size (~1.6x its cost; "2" cost ~4.5x), over the
# MSRC-21-objects MIL and refined and the MSRC-21 MIL models 0.567 mean IoU against 0.576 at "2".
DEFAULT_TTA = "1.25"
# A refined model without a background class (MSRC-21 dev): 1.5x (~2.2x the plain cost; "1,2" ~5.5x),
# 0.674 mean IoU against 0.666 for "1,2"; 1.25 gave 0.648.
REFINED_TTA = "1.5"
AUTO = "auto"  # the commands' default: default_tta of the model at hand
MAX_VIEW_SIDE = 1024  # longest forward side a scale > 1 may grow a view to (unless the plain one is longer)


class TTAError(ValueError):
    """A test-time augmentation spec that cannot be used."""


@dataclass(frozen=True)
class TTA:
    """The views to average: every scale, and with ``flip`` every scale mirrored too."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    @property
    def plain(self) -> bool:
        """One unflipped view at scale 1: the plain forward pass."""
        return self.scales == (1.0,) and not self.flip

    def views(self) -> list[tuple[float, bool]]:
        """``(scale, flipped)`` of every view; the unflipped ones first, in the spec's order."""
        return [(s, False) for s in self.scales] + ([(s, True) for s in self.scales] if self.flip else [])

    def __str__(self) -> str:
        return ",".join(f"{s:g}" for s in self.scales) + ("+flip" if self.flip else "")


def default_tta(*, refined: bool, background: bool) -> str:
    """The views ``"auto"`` runs for a model: :data:`REFINED_TTA` for a refinement without a
    background class, else :data:`DEFAULT_TTA` (docs/method.md, *Choices*)."""
    return REFINED_TTA if refined and not background else DEFAULT_TTA


def _normalised(spec: str) -> str:
    """A spec as it is compared: no whitespace, lower case."""
    return "".join(spec.split()).lower()


def resolve_tta(spec: str | TTA | None, model_default: str) -> str | TTA | None:
    """``spec`` itself, or the model's views ``model_default`` when it is ``"auto"``."""
    if isinstance(spec, str) and _normalised(spec) == AUTO:
        return model_default
    return spec


def parse_tta(spec: str | TTA | None) -> TTA:
    """``"1,1.5,2+flip"`` -> ``TTA((1.0, 1.5, 2.0), flip=True)``; ``None``/``""``/``"none"``/``"1"`` -> plain."""
    if isinstance(spec, TTA):
        return spec
    if spec is None:
        return TTA()
    if not isinstance(spec, str):
        raise TTAError(f"a TTA spec is a string like '1,1.5,2+flip', not {type(spec).__name__}")
    text = _normalised(spec)
    if text == AUTO:
        raise TTAError("TTA spec 'auto' names the model's own views: resolve it with the model first "
                       "(resolve_tta)")
    if text in ("", "none"):
        return TTA()
    scales_text, plus, suffix = text.partition("+")
    if plus and suffix != "flip":
        raise TTAError(f"TTA spec {spec!r}: after '+' only 'flip' is allowed, not {suffix!r} "
                       "(form: SCALES[+flip], e.g. '1,1.5,2+flip')")
    if scales_text == "flip" and not plus:
        return TTA(flip=True)
    if not scales_text:
        if plus:  # "+flip": scale 1 mirrored too
            return TTA(flip=True)
        raise TTAError(f"TTA spec {spec!r} names no scale (form: SCALES[+flip], e.g. '1,1.5,2+flip')")
    scales = []
    for part in scales_text.split(","):
        try:
            scale = float(part)
        except ValueError:
            raise TTAError(f"TTA spec {spec!r}: {part!r} is not a scale (a number such as 1.5; "
                           "form: SCALES[+flip], e.g. '1,1.5,2+flip', or 'auto')") from None
        if not math.isfinite(scale) or not MIN_SCALE <= scale <= MAX_SCALE:
            raise TTAError(f"TTA spec {spec!r}: scale {part} is outside [{MIN_SCALE:g}, {MAX_SCALE:g}]")
        if scale in scales:
            raise TTAError(f"TTA spec {spec!r}: scale {part} is listed twice")
        scales.append(scale)
    return TTA(tuple(scales), bool(plus))


def view_size(plain: tuple[int, int], scale: float, stride: int, min_cells: int = 4) -> tuple[int, int]:
    """Forward size ``(h, w)`` of a view at ``scale`` of the plain forward size ``plain``.

    Scale 1 is ``plain`` exactly. A scale above 1 stops growing where the longer side reaches
    :data:`MAX_VIEW_SIDE` (never below scale 1); every side keeps ``min_cells`` score cells.
    """
    if scale == 1.0:
        return plain
    h, w = plain
    if scale > 1.0:
        scale = max(1.0, min(scale, MAX_VIEW_SIDE / max(h, w)))
    cells = min_cells * stride
    return max(cells, round(h * scale)), max(cells, round(w * scale))
