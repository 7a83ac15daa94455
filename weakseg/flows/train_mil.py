"""train-mil: train the MIL network (Pinheiro & Collobert, CVPR 2015) from WebDataset shards.

Reads ``{shards}/manifest.json`` and the shards it lists (any fsspec URL), trains, and
writes checkpoints to ``{out}/`` (see :mod:`weakseg.tasks.train.trainer` for the names and the
resume semantics): ``checkpoint-step-{step:09d}.pt`` during training, ``model.pt`` at the
end. With ``--registry URL`` the finished ``model.pt`` is also published as the immutable
release ``{registry}/releases/{model_id}/`` (:mod:`weakseg.tasks.registry`). Per-epoch
metrics go to the checkpoint, to the ``train-mil-metrics`` table artifact and to the log; a
tqdm bar shows loss and speed in the terminal.

Multi-GPU: ``torchrun --nproc-per-node 8 -m weakseg.flows.cli train --shards ... --out ...``.
Every rank runs this flow (and is its own Prefect flow run); rank 0 writes checkpoints and
artifacts. On CUDA each rank holds one slot of the ``gpu`` global concurrency limit, so the
limit should equal the number of GPUs of the machine (``prefect gcl create gpu --limit 8``);
with no such limit the slot is not enforced.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from pydantic import Field

from weakseg.flows._gpu import gpu_slot
from weakseg.flows._params import check_parameters
from weakseg.flows._registry import PUBLISHED, announce, publish_release
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.models import ModelConfig
from weakseg.models.losses import BackgroundMode, MultiLabelLoss
from weakseg.tasks import storage
from weakseg.tasks.devices import resolve_device
from weakseg.tasks.ingest.manifest import ManifestError, load_manifest
from weakseg.tasks.storage import redact_url
from weakseg.tasks.train.augment import AugmentConfig, resolve_crop
from weakseg.tasks.train.trainer import TrainConfig, run_training

__all__ = ["train_mil"]


@task(**IO_RETRIES, retry_condition_fn=retry_unless(ManifestError), cache_policy=NONE)
def read_manifest(shards: str) -> dict[str, Any]:
    """The shard manifest (I/O: retried)."""
    return load_manifest(shards)


@task(cache_policy=NONE)
def train(shards: str, out: str, manifest: dict[str, Any], model_config: ModelConfig, augment: AugmentConfig,
          config: TrainConfig, pretrained: str) -> dict[str, Any]:
    """The training loop; never cached, never retried (resume is the user's explicit choice)."""
    return run_training(shards, out, manifest, model_config, augment, config, pretrained=pretrained,
                        logger=get_run_logger())


@task(cache_policy=NONE)
def publish_metrics(result: dict[str, Any]) -> None:
    """Per-epoch metrics as the ``train-mil-metrics`` table artifact (rank 0 only)."""
    if result["rank"] != 0 or not result["history"]:
        return
    order = list(dict.fromkeys(k for row in result["history"] for k in row))
    rows = [{k: row.get(k) for k in order} for row in result["history"]]
    create_table_artifact(
        key="train-mil-metrics",
        table=rows,
        description=f"train-mil: {result['step']} steps, {result['samples_seen']} samples, "
        f"{result['samples_skipped']} skipped; checkpoint {redact_url(result['checkpoint'])}",
    )


@flow(name="train-mil")
def train_mil(
    shards: Annotated[str, Field(description="folder URL of the shards and their manifest.json (weakseg shard)")],
    out: Annotated[str, Field(description="folder URL for checkpoint-step-*.pt and the final model.pt")],
    backbone: Annotated[str, Field(description="any timm model name")] = "tf_efficientnet_lite0",
    pretrained: Annotated[str, Field(description="auto, none, or a state-dict path/URL")] = "auto",
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
    shuffle_buffer: Annotated[int, Field(ge=1, description="samples in the shuffle buffer")] = 1000,
    max_skip_fraction: Annotated[float, Field(gt=0, le=1, description=(
        "fail when more than this share of the samples read were skipped (after 100 skips): nothing usable "
        "is coming"))] = 0.5,
    checkpoint_every: Annotated[int, Field(ge=0, description="steps between checkpoints; 0: epoch ends")] = 1000,
    keep_checkpoints: Annotated[int, Field(ge=0, description="step checkpoints kept; 0: all")] = 3,
    average_epochs: Annotated[int, Field(ge=1, description=(
        "model.pt is the mean of the weights at the end of the last N epochs (at most a third of them); "
        "1: the last weights"))] = TrainConfig.average_epochs,
    val_every: Annotated[int, Field(ge=0, description="epochs between validations; 0: never")] = 1,
    seed: Annotated[int, Field(description="initialisation and data-order seed")] = 0,
    resume: Annotated[bool, Field(description="continue from the newest checkpoint in --out")] = False,
    progress: Annotated[bool, Field(description="tqdm progress bar in the terminal")] = True,
    registry: Annotated[str | None, Field(description="registry folder URL: publish the final model.pt as "
                                          "the release {registry}/releases/{model_id}/")] = None,
) -> dict[str, Any]:
    """Train the MIL network; returns the final checkpoint URL, the metrics and, with a registry, the release."""
    logger = get_run_logger()
    check_parameters({"mean": mean, "std": std})
    storage.require_buckets({"--out": out, "--registry": registry})
    manifest = read_manifest(shards)
    model_config = ModelConfig(
        num_classes=len(manifest["classes"]), backbone=backbone, head_widths=tuple(head_widths), dropout=dropout,
        lse_r=lse_r, output_stride=output_stride, finetune_from=finetune_from, mean=tuple(mean), std=tuple(std),
    )
    augment = AugmentConfig(input_size=input_size, hflip=hflip, rotation=rotation, scale=(scale[0], scale[1]),
                            brightness=brightness, contrast=contrast,
                            crop=resolve_crop(crop, bool(manifest.get("multilabel"))))
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, grad_accum=grad_accum, lr=lr, momentum=momentum,
        weight_decay=weight_decay, lr_decay=lr_decay, lr_decay_every_samples=lr_decay_every_samples,
        multilabel_loss=multilabel_loss, background=background, steps_per_epoch=steps_per_epoch, val_every=val_every,
        checkpoint_every=checkpoint_every, keep_checkpoints=keep_checkpoints, average_epochs=average_epochs,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer, max_skip_fraction=max_skip_fraction, device=device, seed=seed, resume=resume,
        progress=progress,
    )
    logger.info("training %s on %d classes (%s) from %s into %s", backbone, len(manifest["classes"]),
                "multi-label" if manifest.get("multilabel") else "single-label", redact_url(shards), redact_url(out))
    with gpu_slot(str(resolve_device(device))):
        result = train(shards, out, manifest, model_config, augment, config, pretrained)
    publish_metrics(result)
    if registry and result["rank"] == 0:
        result["release"] = publish_release(registry, result["checkpoint"])
        announce(PUBLISHED, registry, result["release"]["model_id"])
    logger.info("final checkpoint %s (step %d, last epoch: %s)", redact_url(result["checkpoint"]), result["step"],
                result["last"])
    return result
