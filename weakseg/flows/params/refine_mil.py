"""The parameters of refine-mil (``weakseg refine``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weakseg.flows._params import EXISTING
from weakseg.flows.params._shared import (
    DEFAULT_MAX_SIDE,
    PSEUDO_LABEL_TTA,
    REFINE_BACKBONE_LR_SCALE,
    REFINE_CHECKPOINT_EVERY,
    REFINE_LR,
    REFINE_OUTPUT_STRIDE,
    REFINE_ROUNDS,
    REFINE_SCALE,
    REFINE_SOUP,
)

__all__ = ["refine_mil"]


def refine_mil(
    shards: Annotated[str, Field(description="folder URL of the shards the model was trained on"), EXISTING],
    model: Annotated[str, Field(description="URL of the MIL model to refine (weakseg train's model.pt), or a "
                                "registry (its current release)"), EXISTING],
    out: Annotated[str, Field(description="folder URL for pseudo-labels/ and the refined model.pt")],
    priors: Annotated[str, Field(description="priors of the pseudo-labels: the training image's tags restrict "
                                             "the labels (ilp), sppxl smooths them")] = "ilp,sppxl",
    confidence: Annotated[float, Field(ge=0, le=1, description=(
        "a pixel is ignored when its label's probability (superpixel mean with sppxl) is under this times the "
        "most that label reaches in the image"))] = 0.8,
    epochs: Annotated[int, Field(ge=1, description="passes over the pseudo-labelled images")] = 6,
    steps_per_epoch: Annotated[int, Field(ge=0, description="optimiser steps per epoch; 0: one pass")] = 0,
    batch_size: Annotated[int, Field(ge=1, description="crops per step")] = 16,
    input_size: Annotated[int, Field(ge=16, description="training crop side in pixels")] = 288,
    scale: Annotated[list[float], Field(min_length=2, max_length=2, description=(
        "range of the random rescaling of the crops, low,high (of the image fitted to input_size)"))] = REFINE_SCALE,
    lr: Annotated[float, Field(gt=0, description="peak SGD learning rate")] = REFINE_LR,
    mil_weight: Annotated[float, Field(ge=0, description="weight of the image-level MIL loss")] = 1.0,
    class_weights: Annotated[Literal["none", "balanced"], Field(description=(
        "balanced: weight the pixel loss by 1/sqrt(class share of the pseudo-labels), so objects that "
        "cover few pixels beside a large background weigh more"))] = "none",
    lr_schedule: Annotated[Literal["constant", "poly"], Field(description=(
        "poly: the learning rate falls as (1 - step/steps)^0.9 to 0 at the last step; constant: lr throughout"
    ))] = "poly",
    rounds: Annotated[int, Field(ge=1, le=5, description=(
        "refinements in a row, each on pseudo-labels from the model the round before made (the first from "
        "--model); rounds before the last write {out}/round-N/, the last writes {out}/model.pt"))] = REFINE_ROUNDS,
    soup: Annotated[int, Field(ge=1, description=(
        "refinements averaged into the refined model (a uniform model soup of seeds seed, seed+1, ...): each "
        "costs one more refinement; 1: a single refinement"))] = REFINE_SOUP,
    finetune_from: Annotated[int | None, Field(description=(
        "also train the backbone from this feature stage on (timm's features_only stages; negative: from the "
        "last back, -1 the last), BatchNorms kept; none: only what the MIL model trained"))] = None,
    backbone_lr_scale: Annotated[float, Field(gt=0, description=(
        "learning rate of the trained backbone stages (--finetune-from), as a factor of --lr"))] = (
        REFINE_BACKBONE_LR_SCALE),
    output_stride: Annotated[Literal[8, 16, 32] | None, Field(description=(
        "refine and serve the network at this output stride (8: score maps four times as dense from one plain "
        "pass); none: the model's own"))] = REFINE_OUTPUT_STRIDE,
    max_side: Annotated[int, Field(ge=16, description="longer side of the pseudo-labelling forward pass")] = (
        DEFAULT_MAX_SIDE),
    tta: Annotated[str, Field(description=(
        "test-time views of the pseudo-labelling forward pass (segment's syntax); more than segment's default, "
        "since each training image is labelled once"))] = PSEUDO_LABEL_TTA,
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: CUDA when present")] = "auto",
    num_workers: Annotated[int, Field(ge=0, description="DataLoader worker processes")] = 2,
    precision: Annotated[Literal["auto", "fp32", "bf16"], Field(description=(
        "number format of the network's layers while training: auto is bf16 autocast on CUDA, fp32 on the CPU; "
        "bf16 on a CPU with AMX or AVX512-BF16 is 1.4-1.6x faster (the losses stay fp32)"))] = "auto",
    seed: Annotated[int, Field(description="initialisation and data-order seed")] = 0,
    progress: Annotated[bool, Field(description="tqdm progress bar in the terminal")] = True,
    checkpoint_every: Annotated[int, Field(ge=0, description=(
        "steps between step checkpoints (also at every epoch's end); 0: epoch ends only"))] = (
        REFINE_CHECKPOINT_EVERY),
    resume: Annotated[bool, Field(description=(
        "continue the unfinished refinement in --out from its newest step checkpoint, on its pseudo-labels"))] = False,
    registry: Annotated[str | None, Field(description="registry folder URL: publish the refined model.pt as "
                                          "the release {registry}/releases/{model_id}/")] = None,
) -> None:
    """The parameters of refine-mil (its flow: :mod:`weakseg.flows.refine_mil`)."""
