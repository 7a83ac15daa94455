"""The parameters of choose-thresholds (``weakseg thresholds``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weakseg.flows._params import EXISTING
from weakseg.flows.params._shared import DEFAULT_MAX_SIDE
from weakseg.tasks.segment.tta import AUTO

__all__ = ["choose_thresholds"]


def choose_thresholds(
    model: Annotated[str, Field(description="checkpoint URL (train-mil's model.pt), or a registry (its "
                                "current release)"), EXISTING],
    ground_truth: Annotated[str, Field(description="VOC-layout folder URL (JPEGImages/, SegmentationClass/, "
                                       "ImageSets/)"), EXISTING],
    out: Annotated[str, Field(description="thresholds JSON URL to write (weakseg segment --thresholds reads it)")],
    split: Annotated[str, Field(min_length=1, description="ImageSets/Segmentation/<split>.txt to choose on "
                                "(not the split the output is evaluated on)")] = "train",
    eval_split: Annotated[str, Field(min_length=1, description="the split evaluate-segmentation scores this "
                                     "output on: choosing on it is warned about")] = "val",
    priors: Annotated[str, Field(description="the chain segment will apply, with bb or seg: e.g. ilp,sppxl,seg "
                                 "or ilp,bb")] = "ilp,sppxl,seg",
    limit: Annotated[int | None, Field(ge=1, description="use only the first N images of the split")] = None,
    max_side: Annotated[int, Field(ge=32, description="forward-pass longer side, as in segment")] = DEFAULT_MAX_SIDE,
    min_side: Annotated[int | None, Field(ge=0, description=(
        "enlarge smaller images to this longer side, as in segment (0: never; none, the default: the size the "
        "model trained at)"))] = None,
    tta: Annotated[str, Field(description="test-time views, as in segment (δ belong to the maps they were "
                              "chosen on)")] = AUTO,
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: cuda when available")] = "auto",
) -> None:
    """The parameters of choose-thresholds (its flow: :mod:`weakseg.flows.choose_thresholds`)."""
