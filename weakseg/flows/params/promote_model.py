"""The parameters of promote-model (``weakseg promote``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weakseg.flows._params import EXISTING
from weakseg.flows.params._shared import DEFAULT_MAX_SIDE
from weakseg.tasks.segment.tta import AUTO

__all__ = ["promote_model"]


def promote_model(
    model: Annotated[str, Field(description="candidate checkpoint URL (train's or refine's model.pt, or a "
                                "release's); published as a release first"), EXISTING],
    registry: Annotated[str, Field(description="registry folder URL (releases/, history/, current.json)")],
    ground_truth: Annotated[str | None, Field(description="VOC-layout folder URL to score on (mean IoU); "
                                              "default: image-level mAP on --shards"), EXISTING] = None,
    split: Annotated[str, Field(min_length=1, description="split of the ground truth, or of the shards, to "
                                "score on")] = "val",
    tolerance: Annotated[float, Field(ge=0, le=1, description="promote when candidate >= current - this")] = 0.0,
    force: Annotated[bool, Field(description="promote whatever the comparison says (recorded in the "
                                 "history and the pointer)")] = False,
    reason: Annotated[str, Field(description="why, recorded with the promotion (e.g. for --force)")] = "",
    shards: Annotated[str | None, Field(description="shards whose split the mAP is scored on without ground "
                                        "truth; default: the ones the candidate was trained on"), EXISTING] = None,
    priors: Annotated[str, Field(description="prior chain scored on ground truth (as segment applies it)")] = (
        "ilp,sppxl"),
    limit: Annotated[int | None, Field(ge=1, description="score only the first N ground-truth images")] = None,
    max_side: Annotated[int, Field(ge=32, description="forward-pass longer side, as in segment")] = DEFAULT_MAX_SIDE,
    tta: Annotated[str, Field(description="test-time views, as in segment")] = AUTO,
    batch_size: Annotated[int, Field(ge=1, description="images per forward pass on shards")] = 16,
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: cuda when available")] = "auto",
) -> None:
    """The parameters of promote-model (its flow: :mod:`weakseg.flows.promote_model`)."""
