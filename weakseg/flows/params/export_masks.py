"""The parameters of export-masks (``weakseg export``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weakseg.flows._params import EXISTING
from weakseg.tasks.segment import tables

__all__ = ["export_masks"]


def export_masks(
    predictions: Annotated[str, Field(description="segment-corpus output folder URL (images/, regions/, masks/, "
                                      "runs/)"), EXISTING],
    run_id: Annotated[str, Field(pattern=tables.RUN_ID.pattern, description="the run to export")],
    format: Annotated[Literal["coco", "voc"], Field(  # shadows the builtin: DESIGN.md names the option --format
        description="coco: annotations.json with RLE masks (CVAT, Label Studio, FiftyOne, Detectron2); voc: "
                    "SegmentationClass/ palette PNGs, ImageSets/Segmentation/{run_id}.txt, classes.txt "
                    "(MMSegmentation, weakseg evaluate)")],
    out: Annotated[str, Field(description="output folder URL")],
    classes: Annotated[list[str] | None, Field(description="export these classes only (default: all; in VOC "
                                               "masks the others become background, or 255 without one)")] = None,
    min_area_fraction: Annotated[float, Field(ge=0, le=1, description="leave out regions covering less than this "
                                              "share of their image")] = 0.0,
    images_root: Annotated[str | None, Field(description="coco: file_name is each image's path under this "
                                             "folder URL (what tools given an image folder expect); default: "
                                             "the image's full URI")] = None,
    include_failed: Annotated[bool, Field(description="export a run that ended Failed (what it wrote)")] = False,
) -> None:
    """The parameters of export-masks (its flow: :mod:`weakseg.flows.export_masks`)."""
