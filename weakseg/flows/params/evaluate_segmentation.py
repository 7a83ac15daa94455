"""The parameters of evaluate-segmentation (``weakseg evaluate``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field

from weakseg.flows._params import EXISTING

__all__ = ["evaluate_segmentation"]


def evaluate_segmentation(
    predictions: Annotated[str, Field(description="segment-corpus output folder URL (images/, masks/, runs/)"),
                           EXISTING],
    ground_truth: Annotated[str, Field(description="VOC-layout folder URL (SegmentationClass/, ImageSets/)"), EXISTING],
    split: Annotated[str, Field(min_length=1, description="ImageSets/Segmentation/<split>.txt to score")] = "val",
    out: Annotated[str | None, Field(description="output folder URL; default {predictions}/evaluation")] = None,
    run_id: Annotated[str | None, Field(description="run to score, whatever its state; default the latest run "
                                        "that did not fail")] = None,
    include_failed: Annotated[bool, Field(description="let the default pick a run that ended Failed")] = False,
    unlabelled_as_background: Annotated[
        bool, Field(description="count predicted 255 as background when the ground truth has it and the run not")
    ] = True,
    chunk_size: Annotated[int, Field(ge=1, description="images per scoring task")] = 200,
) -> None:
    """The parameters of evaluate-segmentation (its flow: :mod:`weakseg.flows.evaluate_segmentation`)."""
