"""The parameters of train-mil (``weakseg train``): types, bounds, defaults, help.

Imported by the flow (whose signature this becomes) and by the command line, which
needs it without torch or Prefect.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from weakseg.flows._params import EXISTING, Existing
from weakseg.flows.params._shared import TRAIN_AVERAGE_EPOCHS, BackgroundMode, MultiLabelLoss

__all__ = ["train_mil"]


def train_mil(
    shards: Annotated[str, Field(description="folder URL of the shards and their manifest.json (weakseg shard)"),
                      EXISTING],
    out: Annotated[str, Field(description="folder URL for checkpoint-step-*.pt and the final model.pt")],
    backbone: Annotated[str, Field(description="any timm model name")] = "tf_efficientnet_lite0",
    pretrained: Annotated[str, Field(description="auto, none, or a state-dict path/URL"),
                          Existing(keywords=("auto", "none"))] = "auto",
    epochs: Annotated[int, Field(ge=1, description="epochs to train (in total, counting resumed ones)")] = 10,
    steps_per_epoch: Annotated[int, Field(ge=0, description="optimiser steps per epoch; 0: one pass")] = 0,
    batch_size: Annotated[int, Field(ge=1, description="images per forward pass and process")] = 16,
    grad_accum: Annotated[int, Field(ge=1, description="forward passes per optimiser step")] = 1,
    lr: Annotated[float, Field(gt=0, description="SGD learning rate")] = 1e-3,
    momentum: Annotated[float, Field(ge=0, lt=1, description="SGD momentum")] = 0.9,
    weight_decay: Annotated[float, Field(ge=0, description="SGD weight decay (not on biases)")] = 5e-5,
    lr_decay: Annotated[float, Field(gt=0, le=1, description="lr factor every --lr-decay-every-samples")] = 0.8,
    lr_decay_every_samples: Annotated[int, Field(ge=1, description="samples between lr decays")] = 5_000_000,
    lse_r: Annotated[float, Field(gt=0, description="r of the Log-Sum-Exp aggregation")] = 5.0,
    input_size: Annotated[int, Field(ge=16, description="training crop side in pixels (paper: 400)")] = 400,
    head_widths: Annotated[list[int], Field(min_length=1, description="widths of the head's hidden layers")] = (
        1024, 768, 512),
    dropout: Annotated[float, Field(ge=0, lt=1, description="dropout after the head's hidden layers")] = 0.5,
    output_stride: Annotated[Literal[8, 16, 32], Field(description="backbone stride (8, 16 dilate)")] = 16,
    finetune_from: Annotated[int | None, Field(ge=0, description="train backbone stages from this one on")] = None,
    multilabel_loss: Annotated[MultiLabelLoss, Field(
        description="loss for multi-label shards; with bce in it, the image prior is the per-class sigmoid")
    ] = "softmax+bce",
    background: Annotated[BackgroundMode, Field(
        description="with a 'background' class: every-image makes it a tag of every training image (so the maps "
                    "learn where it is); as-tagged only of images tagged with it; auto: every-image")] = "auto",
    hflip: Annotated[bool, Field(description="random horizontal flips")] = True,
    rotation: Annotated[float, Field(ge=0, le=180, description="max rotation in degrees")] = 10.0,
    scale: Annotated[list[float], Field(min_length=2, max_length=2, description="scale range low,high")] = (
        0.8, 1.2),
    crop: Annotated[Literal["auto", "random", "whole"], Field(
        description="random: the paper's crop of the shorter side; whole: fit the longer side, keeping every "
                    "tagged region; auto: whole for multi-label shards, random otherwise")] = "auto",
    brightness: Annotated[float, Field(ge=0, lt=1, description="brightness jitter (factor 1 +- b)")] = 0.2,
    contrast: Annotated[float, Field(ge=0, lt=1, description="contrast jitter (factor 1 +- c)")] = 0.2,
    mean: Annotated[list[float], Field(description="per-channel mean; empty: the backbone's")] = (),
    std: Annotated[list[float], Field(description="per-channel std; empty: the backbone's")] = (),
    device: Annotated[Literal["auto", "cpu", "cuda"], Field(description="auto: CUDA when present")] = "auto",
    num_workers: Annotated[int, Field(ge=0, description="DataLoader worker processes per rank")] = 4,
    precision: Annotated[Literal["auto", "fp32", "bf16"], Field(description=(
        "number format of the network's layers while training: auto is bf16 autocast on CUDA, fp32 on the CPU; "
        "bf16 on a CPU with AMX or AVX512-BF16 is 1.4-1.6x faster (the losses stay fp32)"))] = "auto",
    shuffle_buffer: Annotated[int, Field(ge=1, description="samples in the shuffle buffer")] = 1000,
    max_skip_fraction: Annotated[float, Field(gt=0, le=1, description=(
        "fail when more than this share of the samples read were skipped (after 100 skips): nothing usable "
        "is coming"))] = 0.5,
    checkpoint_every: Annotated[int, Field(ge=0, description="steps between checkpoints; 0: epoch ends")] = 1000,
    keep_checkpoints: Annotated[int, Field(ge=0, description="step checkpoints kept; 0: all")] = 3,
    average_epochs: Annotated[int, Field(ge=1, description=(
        "model.pt is the mean of the weights at the end of the last N epochs (at most a third of them); "
        "1: the last weights"))] = TRAIN_AVERAGE_EPOCHS,
    val_every: Annotated[int, Field(ge=0, description="epochs between validations; 0: never")] = 1,
    seed: Annotated[int, Field(description="initialisation and data-order seed")] = 0,
    resume: Annotated[bool, Field(description="continue from the newest checkpoint in --out")] = False,
    progress: Annotated[bool, Field(description="tqdm progress bar in the terminal")] = True,
    registry: Annotated[str | None, Field(description="registry folder URL: publish the final model.pt as "
                                          "the release {registry}/releases/{model_id}/")] = None,
) -> None:
    """The parameters of train-mil (its flow: :mod:`weakseg.flows.train_mil`)."""
