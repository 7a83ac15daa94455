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

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE

from weakseg.flows._gpu import gpu_slot
from weakseg.flows._params import check_parameters, with_parameters
from weakseg.flows._registry import PUBLISHED, announce, publish_release
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.flows.params import train_mil as P
from weakseg.models import ModelConfig
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
@with_parameters(P.train_mil)
def train_mil(shards, out, backbone, pretrained, epochs, steps_per_epoch, batch_size, grad_accum, lr, momentum,
              weight_decay, lr_decay, lr_decay_every_samples, lse_r, input_size, head_widths, dropout, output_stride,
              finetune_from, multilabel_loss, background, hflip, rotation, scale, crop, brightness, contrast, mean, std,
              device, num_workers, precision, shuffle_buffer, max_skip_fraction, checkpoint_every, keep_checkpoints,
              average_epochs, val_every, seed, resume, progress, registry) -> dict[str, Any]:
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
        num_workers=num_workers, precision=precision,
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
