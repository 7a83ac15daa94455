"""The streaming MIL trainer: plain functions, no Prefect (the train-mil flow wires them).

Steps, epochs and the data position
-----------------------------------
One *step* is one optimiser update over ``batch_size x grad_accum`` samples per process
(``x world_size`` under DDP): the effective batch. An epoch is ``steps_per_epoch`` steps,
by default as many as one pass over the train split takes at the effective batch. The
training stream resamples shards (see :mod:`weakseg.tasks.train.shard_reader`), so an epoch is
a number of samples drawn, not an exact pass.

The learning rate is ``lr x lr_decay ** floor(samples_seen / lr_decay_every_samples)``
(the paper: 1e-3, x0.8 every 5M samples), computed from the samples seen, so it is the
same after a resume.

Checkpoints and resume
----------------------
``{out}/checkpoint-step-{step:09d}.pt`` every ``checkpoint_every`` steps and at the end of
every epoch (after validation, so it carries that epoch's metrics); the newest
``keep_checkpoints`` are kept. At the end ``{out}/model.pt`` holds the final model. All are
ordinary weakseg checkpoints (``load_checkpoint``) plus a ``training_state``: step, epoch,
samples seen, the SGD momentum buffers, the RNG state, the metric history.

``resume=True`` continues from the newest ``checkpoint-step-*.pt`` in ``out`` (or starts
fresh when there is none) and ends with the weights an uninterrupted run gives, bit for
bit: same weights, momentum buffers, weight average, step counter, lr schedule and torch
RNG (dropout), and the same data. Each epoch's stream is seeded by (seed, epoch) alone; a
run resumed in the middle of an epoch rebuilds that epoch's stream and reads past the
batches the checkpoint already trained on (decoded and augmented again, not trained on:
the augmentations draw from per-worker generators, so skipping them would change every
later crop), then trains the rest. Without ``resume`` a folder that already holds
checkpoints is refused rather than overwritten.
"""
from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from ...models import (
    ImageLoss,
    ModelConfig,
    WeakSegNet,
    checkpoint_bytes,
    create_model,
    load_checkpoint,
    mil_loss,
)
from ...models.losses import BackgroundMode, MultiLabelLoss
from .. import storage
from ..devices import TRAIN_PRECISIONS, autocast, check_precision, resolve_device, resolve_precision
from ..ingest.manifest import ManifestError, check_shards, shard_specs
from ..tensors import normalize
from .augment import AugmentConfig, EvalTransform, TrainTransform
from .averaging import apply_average, average_window, averages_epoch, weight_average
from .optimizer import make_optimizer
from .shard_reader import eval_pipeline, make_loader, train_pipeline

__all__ = [
    "DistInfo",
    "TrainConfig",
    "average_precision",
    "checkpoint_name",
    "evaluate",
    "image_metrics",
    "list_checkpoints",
    "lr_at",
    "optimizer_step",
    "run_training",
    "setup_distributed",
]

_logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"checkpoint-step-(\d+)\.pt$")
FINAL_NAME = "model.pt"
_ARCH_FIELDS = ("num_classes", "backbone", "head_widths", "dropout", "lse_r", "output_stride", "finetune_from")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run options (the model's own are in ``ModelConfig``)."""

    epochs: int = 10
    batch_size: int = 16  # per process and forward pass
    grad_accum: int = 1
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-5
    lr_decay: float = 0.8
    lr_decay_every_samples: int = 5_000_000
    multilabel_loss: MultiLabelLoss = "softmax+bce"
    background: BackgroundMode = "auto"  # see weakseg.models.losses.with_background
    steps_per_epoch: int = 0  # 0: one pass over the train split at the effective batch
    val_every: int = 1  # epochs; 0 = never
    checkpoint_every: int = 1000  # steps; 0 = only at epoch ends
    keep_checkpoints: int = 3
    average_epochs: int = 2  # model.pt: the mean of the last N epochs' weights, N <= epochs // 3 (averaging.py)
    num_workers: int = 4
    shuffle_buffer: int = 1000
    max_skip_fraction: float = 0.5  # more skipped samples than this share: fail, nothing usable is coming
    device: str = "auto"
    precision: str = "auto"  # the layers' number format (devices.resolve_precision): auto is bf16 on CUDA only
    seed: int = 0
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_precision(self.precision, TRAIN_PRECISIONS)


# ----------------------------------------------------------------------------- devices, DDP


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> DistInfo:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (NCCL on CUDA, Gloo on CPU)."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(0, 1, device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), device)


def _barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------- schedule, metrics


def lr_at(samples_seen: int, lr: float, decay: float = 0.8, every: int = 5_000_000) -> float:
    """Step decay by samples seen (the paper: x0.8 every 5M samples)."""
    return lr * decay ** (samples_seen // every) if every > 0 else lr


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class: mean precision at the rank of each positive (NaN without positives)."""
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = positive[order].astype(np.float64)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / n_pos)


def image_metrics(scores: torch.Tensor, target: torch.Tensor, multilabel: bool) -> dict[str, float]:
    """Image-level validation metrics from LSE scores ``[N, K]`` and multi-hot targets ``[N, K]``.

    ``accuracy``: the top-scoring class is (one of) the image's labels. ``map`` (multi-label
    manifests): mean over classes with a positive image of their average precision.
    """
    n = scores.shape[0]
    if n == 0:
        return {"samples": 0}
    top = scores.argmax(dim=1)
    out = {"samples": n, "accuracy": float(target[torch.arange(n), top].mean())}
    if multilabel:
        s, t = scores.double().numpy(), target.numpy() > 0
        aps = [average_precision(s[:, k], t[:, k]) for k in range(s.shape[1])]
        aps = [a for a in aps if not math.isnan(a)]
        out["map"] = float(np.mean(aps)) if aps else float("nan")
    return out


# ----------------------------------------------------------------------------- steps


@dataclass
class _Runtime:
    """What a step needs besides the batch."""

    model: WeakSegNet
    net: torch.nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    device: torch.device
    mean: tuple[float, ...]
    std: tuple[float, ...]
    multilabel: bool
    loss_kind: MultiLabelLoss = "softmax"
    background: int | None = None  # class index made a tag of every image
    precision: str = "auto"  # the layers' number format, resolved on construction (devices.resolve_precision)

    def __post_init__(self) -> None:
        self.precision = resolve_precision(self.precision, self.device, TRAIN_PRECISIONS)

    @property
    def image_loss(self) -> ImageLoss:
        """The MIL loss of this run (recorded in its checkpoints; the refinement uses the same)."""
        return ImageLoss(self.loss_kind, self.multilabel, self.background)

    def targets(self, batch: dict[str, Any]) -> torch.Tensor:
        """Multi-hot ``[B, K]`` tag sets: the shards' labels, plus background where it is implied."""
        return self.image_loss.tags(batch["target"])

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        return autocast(self.device, self.precision)

    def inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = normalize(batch["images"].to(self.device, non_blocking=True), self.mean, self.std)
        if self.cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        valid = batch["valid"].to(self.device, non_blocking=True)
        target = self.image_loss.targets(batch["target"]).to(self.device, non_blocking=True)
        return x, valid, target


def optimizer_step(rt: _Runtime, batches: Iterator[dict[str, Any]], grad_accum: int = 1) -> dict[str, Any]:
    """One optimiser update over ``grad_accum`` batches; returns loss, sample count, errors."""
    rt.model.train()
    rt.optimizer.zero_grad(set_to_none=True)
    total, n, errors = 0.0, 0, []
    for i in range(grad_accum):
        batch = next(batches)
        errors += batch["errors"]
        x, valid, target = rt.inputs(batch)
        sync = rt.net.no_sync() if i < grad_accum - 1 and hasattr(rt.net, "no_sync") else contextlib.nullcontext()
        with sync:
            with rt.autocast():
                maps = rt.net(x, dense=True)  # the maps inference reads: every tagged region counts
            loss = mil_loss(rt.model.image_scores(maps.float(), valid, dense=True), target, rt.loss_kind) / grad_accum
            loss.backward()
        total += float(loss.detach())
        n += x.shape[0]
    rt.optimizer.step()
    return {"loss": total, "samples": n, "errors": errors}


@torch.no_grad()
def evaluate(rt: _Runtime, loader: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """Image-level metrics over a validation loader (the whole split, once)."""
    rt.model.eval()
    scores, targets, errors, loss_sum = [], [], 0, 0.0
    for batch in loader:
        errors += len(batch["errors"])
        x, valid, target = rt.inputs(batch)
        with rt.autocast():
            maps = rt.model(x, dense=True)
        s = rt.model.image_scores(maps.float(), valid, dense=True).float()
        loss_sum += float(mil_loss(s, target, rt.loss_kind)) * x.shape[0]
        scores.append(s.cpu())
        targets.append(rt.targets(batch))
    rt.model.train()
    if not scores:
        return {"samples": 0, "skipped": errors}
    s, t = torch.cat(scores), torch.cat(targets)
    out = image_metrics(s, t, rt.multilabel)
    out["loss"] = loss_sum / s.shape[0]
    out["skipped"] = errors
    return out


# ----------------------------------------------------------------------------- checkpoints


def checkpoint_name(step: int) -> str:
    return f"checkpoint-step-{step:09d}.pt"


def list_checkpoints(out: str) -> list[tuple[int, str]]:
    """``(step, url)`` of the step checkpoints in ``out``, oldest first."""
    fs, path = storage.url_to_fs(out)
    if not fs.exists(path):
        return []
    found = []
    for p in fs.ls(path, detail=False):
        m = CHECKPOINT_RE.search(posixpath.basename(str(p).rstrip("/")))
        if m:
            found.append((int(m.group(1)), storage.join(out, posixpath.basename(str(p)))))
    return sorted(found)


def _prune(out: str, keep: int) -> None:
    if keep <= 0:
        return
    for _, url in list_checkpoints(out)[:-keep]:
        fs, path = storage.url_to_fs(url)
        fs.rm(path)


def manifest_reference(shards: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records about its training data (the URL without credentials)."""
    return {
        "url": storage.redact_url(shards),
        "generation": manifest.get("generation"),
        "classes": list(manifest["classes"]),
        "multilabel": bool(manifest.get("multilabel", False)),
        "splits": {k: v.get("samples") for k, v in manifest.get("splits", {}).items()},
        "source_fingerprint": manifest.get("source_fingerprint"),
        "created_at": manifest.get("created_at"),
    }


def _check_resume(ckpt_classes: list[str], ckpt_config: ModelConfig, classes: list[str], asked: ModelConfig,
                  url: str) -> None:
    if list(ckpt_classes) != list(classes):
        extra = sorted(set(classes) - set(ckpt_classes))
        missing = sorted(set(ckpt_classes) - set(classes))
        raise ValueError(
            f"cannot resume from {storage.redact_url(url)}: its classes differ from the shard manifest's "
            f"({len(ckpt_classes)} vs {len(classes)}; only in the manifest: {extra[:5]}, only in the "
            f"checkpoint: {missing[:5]}{'' if extra or missing else '; same names, different order'}). "
            "Use another --out for these shards."
        )
    diffs = [f"{k}: checkpoint {getattr(ckpt_config, k)!r}, asked {getattr(asked, k)!r}"
             for k in _ARCH_FIELDS if getattr(ckpt_config, k) != getattr(asked, k)]
    if diffs:
        raise ValueError(f"cannot resume from {storage.redact_url(url)}: the architecture differs ({'; '.join(diffs)})")


# ----------------------------------------------------------------------------- the loop


def _oom_message(cfg: TrainConfig, input_size: int, config: ModelConfig) -> str:
    return (
        f"CUDA out of memory at --batch-size {cfg.batch_size}, --input-size {input_size}, --head-widths "
        f"{','.join(map(str, config.head_widths))}, --output-stride {config.output_stride}. Lower --batch-size "
        "(raise --grad-accum to keep the effective batch), then --input-size, the head widths, or use "
        "--output-stride 16 instead of 8."
    )


def _shard_plan(shards: str, manifest: dict[str, Any], cfg: TrainConfig, world_size: int,
                log: logging.Logger | logging.LoggerAdapter) -> tuple[dict, dict, int, int]:
    """The train and val shard specs (checked to be there), steps per epoch and the effective batch."""
    train_specs = shard_specs(shards, manifest, "train")
    try:
        val_specs = shard_specs(shards, manifest, "val") if cfg.val_every else {}
    except ManifestError:
        log.warning("the shards have no val split: no validation metrics")
        val_specs = {}
    check_shards([*train_specs.items(), *val_specs.items()])  # all there, at their sizes; sha256 when read
    train_samples = sum(s["samples"] for s in manifest["shards"] if s["split"] == "train")
    effective_batch = cfg.batch_size * cfg.grad_accum * world_size
    spe = cfg.steps_per_epoch or max(1, math.ceil(train_samples / effective_batch))
    return train_specs, val_specs, spe, effective_batch


def _resume_or_create(out: str, cfg: TrainConfig, classes: list[str], model_config: ModelConfig, pretrained: str,
                      log: logging.Logger | logging.LoggerAdapter
                      ) -> tuple[WeakSegNet, ModelConfig, dict[str, Any], dict[str, Any]]:
    """The model, its config, the checkpoint's training state and the run's progress: from the
    newest checkpoint in ``out`` with ``--resume``, else a fresh model (an ``out`` that holds
    checkpoints without ``--resume`` is an error)."""
    existing = list_checkpoints(out)
    state: dict[str, Any] = {"step": 0, "samples_seen": 0, "skipped": 0, "history": []}
    if existing and not cfg.resume:
        raise ValueError(f"{storage.redact_url(out)} already holds checkpoints (newest: "
                         f"{storage.redact_url(existing[-1][1])}); pass --resume to continue "
                         "from it, or choose another --out")
    if not existing:
        if cfg.resume:
            log.info("--resume: no checkpoint in %s yet, starting fresh", storage.redact_url(out))
        model, config = create_model(model_config, pretrained=storage.open_weights(pretrained))
        return model, config, {}, state
    url = existing[-1][1]
    ckpt = load_checkpoint(io.BytesIO(storage.read_bytes(url)))
    _check_resume(ckpt.classes, ckpt.config, classes, model_config, url)
    model, config = ckpt.model, replace(ckpt.config, image_prior=model_config.image_prior)
    ts = ckpt.training_state
    state.update(step=int(ts["step"]), samples_seen=int(ts["samples_seen"]), skipped=int(ts.get("skipped", 0)),
                 history=list(ckpt.metrics.get("history", [])))
    if "epoch_losses" in ts:
        state["epoch_losses"] = [float(x) for x in ts["epoch_losses"]]
    if "rng" in ts:
        torch.set_rng_state(ts["rng"])
    log.info("resuming from %s at step %d (%d samples seen)", storage.redact_url(url), state["step"],
             state["samples_seen"])
    return model, config, ts, state


@dataclass
class _Loop:
    """Everything the epochs share: the run's options, data, runtime and progress (``state``)."""

    out: str
    cfg: TrainConfig
    augment: AugmentConfig
    info: DistInfo
    rt: _Runtime
    config: ModelConfig
    classes: list[str]
    train_specs: dict
    val_specs: dict
    spe: int
    effective_batch: int
    mref: dict[str, Any]
    state: dict[str, Any]
    average: AveragedModel | None = None  # the running mean of the last epochs' weights

    def metrics(self) -> dict[str, Any]:
        s = self.state
        last = s["history"][-1] if s["history"] else {}
        return {"history": s["history"], "last": last, "samples_skipped": s["skipped"], "step": s["step"],
                "samples_seen": s["samples_seen"]}

    def save(self, url: str, finished: bool = False) -> None:
        """A checkpoint of the model and everything a resume needs (main process only)."""
        if not self.info.is_main:
            return
        s, cfg = self.state, self.cfg
        training_state = {
            "step": s["step"], "epoch": s["step"] // self.spe, "samples_seen": s["samples_seen"],
            "steps_per_epoch": self.spe, "effective_batch": self.effective_batch, "skipped": s["skipped"],
            "finished": finished, "optimizer": self.rt.optimizer.state_dict(), "rng": torch.get_rng_state(),
            "options": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)},
            "augment": {**asdict(self.augment), "scale": list(self.augment.scale)},
            "averaged_epochs": s.get("averaged_epochs", 0),
            "image_loss": self.rt.image_loss.to_dict(),  # what the refinement's MIL term must be
        }
        if self.average is not None and int(self.average.n_averaged):
            training_state["average"] = self.average.state_dict()  # a resume continues the mean
        if s["step"] % self.spe:  # mid-epoch: the epoch's losses so far, so its row is the uninterrupted one
            training_state["epoch_losses"] = list(s.get("epoch_losses", []))
        storage.write_bytes(url, checkpoint_bytes(self.rt.model, self.config, self.classes,
                                                  input_size=self.augment.input_size, manifest=self.mref,
                                                  metrics=self.metrics(), training_state=training_state))

    def save_step(self) -> None:
        self.save(storage.join(self.out, checkpoint_name(self.state["step"])))
        if self.info.is_main:
            _prune(self.out, self.cfg.keep_checkpoints)

    def train_epoch(self, epoch: int, bar: tqdm) -> dict[str, Any]:
        """Steps up to the end of ``epoch`` on a fresh resampled stream; returns the epoch's row."""
        cfg, info, state, optimizer = self.cfg, self.info, self.state, self.rt.optimizer
        start, end = epoch * self.spe, (epoch + 1) * self.spe
        # The epoch's stream depends on (seed, epoch) only, so a resumed epoch can replay it (module doc).
        stream_seed = hash((cfg.seed, epoch, start)) & 0x7FFFFFFF
        pipeline = train_pipeline(list(self.train_specs), len(self.classes),
                                  TrainTransform(self.augment, seed=stream_seed + info.rank),
                                  seed=stream_seed, shuffle_buffer=cfg.shuffle_buffer, specs=self.train_specs,
                                  classes=self.classes, max_skip_fraction=cfg.max_skip_fraction)
        loader = make_loader(pipeline, len(self.classes), cfg.batch_size, num_workers=cfg.num_workers,
                             pin_memory=self.rt.cuda, seed=stream_seed)
        batches = iter(loader)
        done = state["step"] - start  # > 0: resumed in the middle of this epoch
        losses = state.pop("epoch_losses", []) if done else []
        if len(losses) != done:  # a checkpoint of an older weakseg: same weights, the epoch's mean loss is partial
            _logger.warning("the checkpoint at step %d does not hold its epoch's first %d losses: this epoch's "
                            "train_loss averages the rest only", state["step"], done)
        state["epoch_losses"] = losses
        epoch_samples, speed, t0 = 0, 0.0, time.perf_counter()
        try:
            for _ in range(done * cfg.grad_accum):
                next(batches)  # already trained on before the checkpoint: read past them, as they were drawn
            while state["step"] < end:
                result = optimizer_step(self.rt, batches, cfg.grad_accum)
                state["step"] += 1
                state["samples_seen"] += result["samples"] * info.world_size
                state["skipped"] += len(result["errors"])
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state["samples_seen"], cfg.lr, cfg.lr_decay, cfg.lr_decay_every_samples)
                losses.append(result["loss"])
                epoch_samples += result["samples"]
                speed = epoch_samples * info.world_size / max(time.perf_counter() - t0, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{result['loss']:.4f}", img_s=f"{speed:.1f}", skipped=state["skipped"])
                if cfg.checkpoint_every and state["step"] % cfg.checkpoint_every == 0 and state["step"] < end:
                    self.save_step()
        finally:
            del batches, loader
        state.pop("epoch_losses", None)
        return {"epoch": epoch + 1, "step": state["step"], "train_loss": float(np.mean(losses)) if losses else None,
                "lr": optimizer.param_groups[0]["lr"], "samples_per_second": round(speed, 2),
                "samples_skipped": state["skipped"]}

    def finish_epoch(self, epoch: int, row: dict[str, Any], on_epoch: Callable[[dict[str, Any]], None] | None,
                     log: logging.Logger | logging.LoggerAdapter) -> None:
        """Validate when due, record and log the epoch's row, report it, add the weights to the mean
        when the epoch is in its window, checkpoint."""
        row.update(self.validate(epoch))
        self.state["history"].append(row)
        log.info("epoch %d/%d: %s", epoch + 1, self.cfg.epochs,
                 ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if on_epoch is not None and self.info.is_main:
            on_epoch(row)
        if self.average is not None and averages_epoch(epoch, self.cfg.epochs, average_window(
                self.cfg.epochs, self.cfg.average_epochs)):
            self.average.update_parameters(self.rt.model)
        self.save_step()
        _barrier(self.info)

    def validate(self, epoch: int) -> dict[str, Any]:
        """Validation metrics when this epoch validates (computed on the main process), else nothing."""
        cfg = self.cfg
        if not (self.val_specs and cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)):
            return {}
        metrics: dict[str, Any] = {}
        if self.info.is_main:
            pipeline = eval_pipeline(list(self.val_specs), len(self.classes), EvalTransform(self.augment.input_size),
                                     split_by_node=False, specs=self.val_specs, classes=self.classes)
            val_loader = make_loader(pipeline, len(self.classes), cfg.batch_size,
                                     num_workers=min(cfg.num_workers, 2), pin_memory=self.rt.cuda)
            metrics = {f"val_{k}": v for k, v in evaluate(self.rt, val_loader).items()}
        _barrier(self.info)
        return metrics


def _prepare_model(model: WeakSegNet, info: DistInfo) -> torch.nn.Module:
    """The model on its device (channels-last on CUDA); under DDP, its wrapper."""
    model.to(info.device)
    if info.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if info.world_size == 1:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


def run_training(
    shards: str,
    out: str,
    manifest: dict[str, Any],
    model_config: ModelConfig,
    augment: AugmentConfig,
    cfg: TrainConfig,
    *,
    pretrained: str = "auto",
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
) -> dict[str, Any]:
    """Train from ``shards`` into ``out``; returns a summary (final checkpoint URL, metrics)."""
    log = logger or _logger
    info = setup_distributed(cfg.device)
    classes = list(manifest["classes"])
    if model_config.num_classes != len(classes):
        raise ValueError(f"model has {model_config.num_classes} classes, the manifest {len(classes)}")
    # background as a tag of every image makes every target multi-hot (see losses.with_background)
    image_loss = ImageLoss.for_training(classes, bool(manifest.get("multilabel", False)), cfg.multilabel_loss,
                                        cfg.background)
    multilabel, background = image_loss.multilabel, image_loss.background
    # the loss decides what the LSE scores mean at inference (a distribution or presences)
    model_config = replace(model_config, image_prior=image_loss.image_prior)
    train_specs, val_specs, spe, effective_batch = _shard_plan(shards, manifest, cfg, info.world_size, log)
    torch.manual_seed(cfg.seed)
    model, config, ts, state = _resume_or_create(out, cfg, classes, model_config, pretrained, log)
    if augment.input_size < model.min_input_size:
        raise ValueError(f"--input-size {augment.input_size} is below the network's minimum "
                         f"{model.min_input_size} px for this backbone and output stride")
    net = _prepare_model(model, info)
    window = average_window(cfg.epochs, cfg.average_epochs)
    average = weight_average(model, ts.get("average")) if window > 1 else None
    optimizer = make_optimizer(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if ts.get("optimizer"):
        optimizer.load_state_dict(ts["optimizer"])
    rt = _Runtime(model, net, optimizer, info.device, config.mean, config.std, multilabel, cfg.multilabel_loss,
                  background, cfg.precision)
    loop = _Loop(out, cfg, augment, info, rt, config, classes, train_specs, val_specs, spe, effective_batch,
                 manifest_reference(shards, manifest), state, average)
    bar = tqdm(total=cfg.epochs * spe, initial=state["step"], unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and info.is_main), desc="train-mil")
    started, start_step = time.perf_counter(), state["step"]
    try:
        for epoch in range(state["step"] // spe, cfg.epochs):
            loop.finish_epoch(epoch, loop.train_epoch(epoch, bar), on_epoch, log)
    except torch.cuda.OutOfMemoryError as err:
        raise RuntimeError(_oom_message(cfg, augment.input_size, config)) from err
    finally:
        bar.close()
    if average is not None:
        state["averaged_epochs"] = apply_average(model, average)
        log.info("%s: the mean of the weights at the end of the last %d epochs", FINAL_NAME,
                 state["averaged_epochs"])
    final = storage.join(out, FINAL_NAME)
    loop.save(final, finished=True)
    _barrier(info)
    return {"checkpoint": final, "step": state["step"], "steps_this_run": state["step"] - start_step,
            "samples_seen": state["samples_seen"], "samples_skipped": state["skipped"],
            "seconds": round(time.perf_counter() - started, 2), "history": state["history"],
            "last": state["history"][-1] if state["history"] else {}, "classes": classes,
            "multilabel": multilabel, "rank": info.rank, "world_size": info.world_size}
