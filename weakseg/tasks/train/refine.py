"""The refinement stage: the MIL network fine-tuned on its own pseudo-labels, pixel by pixel.

The standard second stage of weakly supervised segmentation. The refined network is the
MIL network itself (same backbone, head, LSE and cell mapping), initialised from the
input model and trained on :mod:`.pseudo_labels` with two terms:

- per-pixel cross-entropy between the softmax of the score maps, brought to the crop's
  pixels by the inference mapping (:func:`~weakseg.tasks.segment.inference.upsample_cells`),
  and the pseudo-labels (255 ignored): the maps learn sharp, tag-consistent masks;
- the MIL loss on the image's tags, weighted by ``mil_weight``: the LSE image scores
  stay calibrated, so the ILP prior of ``weakseg segment`` works as before.

The output is an ordinary checkpoint (same config and classes) that ``weakseg segment``,
``thresholds`` and ``evaluate`` use unchanged; its ``training_state`` names the model it
was refined from and the pseudo-label statistics.
"""
from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from ...models import Checkpoint, ImageLoss, checkpoint_bytes, create_model, load_checkpoint
from .. import storage
from ..devices import TRAIN_PRECISIONS, autocast, check_precision, resolve_precision
from ..segment.inference import upsample_cells
from ..segment.priors import UNLABELLED
from ..tensors import normalize
from .augment import sample_rng
from .optimizer import make_optimizer
from .shard_reader import ErrorLog, ReadShards, worker_shuffle
from .trainer import _prune, checkpoint_name, list_checkpoints

__all__ = ["PseudoTransform", "RefineConfig", "image_loss_of", "lr_scheduler", "pseudo_loader", "refine_loss",
           "run_refine", "uniform_soup"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineConfig:
    epochs: int = 6
    batch_size: int = 16
    input_size: int = 288
    lr: float = 2e-3  # peak of the poly schedule; chosen on dev over 1e-3 (docs/method.md)
    momentum: float = 0.9
    weight_decay: float = 5e-5
    mil_weight: float = 1.0  # weight of the image-level MIL term beside the pixel term
    class_weights: str = "none"  # "balanced": the pixel term weighted by 1/sqrt(class share of the pseudo-labels)
    lr_schedule: str = "poly"  # lr x (1 - step/steps)^0.9, down to 0 at the last step; "constant": lr throughout
    finetune_from: int | None = None  # also train the backbone from this stage on (BatchNorms kept); None: as trained
    backbone_lr_scale: float = 1.0  # the trained backbone stages' rate, as a factor of lr
    output_stride: int | None = None  # refine (and serve) at this output stride, e.g. 8; None: the model's own
    scale: tuple[float, float] = (0.8, 1.2)
    hflip: bool = True
    steps_per_epoch: int = 0  # 0: one pass over the pseudo-labelled images
    checkpoint_every: int = 1000  # steps between step checkpoints (and at every epoch's end); 0: epoch ends only
    keep_checkpoints: int = 2  # newest step checkpoints kept while running (removed at the end); 0: all
    resume: bool = False  # continue from the newest step checkpoint in out (bit for bit)
    soup: int = 2  # refinements averaged into the output (seeds seed, seed+1, ...): a uniform model soup
    num_workers: int = 2
    shuffle_buffer: int = 500
    precision: str = "auto"  # the layers' number format while refining (devices.resolve_precision)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        check_precision(self.precision, TRAIN_PRECISIONS)
        lo, hi = self.scale
        if not 0 < lo <= hi:
            raise ValueError(f"scale must be a range low,high with 0 < low <= high, got {self.scale}")
        if self.soup < 1:
            raise ValueError(f"soup must be at least 1 (one refinement), got {self.soup}")
        if not self.backbone_lr_scale > 0:
            raise ValueError(f"backbone_lr_scale must be positive, got {self.backbone_lr_scale}")
        if self.output_stride not in (None, 8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")


class PseudoTransform:
    """(PIL image, PIL labels) -> (``[S, S, 3]`` uint8, ``[S, S]`` uint8 labels, ``[S, S]`` bool validity).

    The longer side scaled to ``S x U(scale)``, a random flip, a random crop or padding; both
    geometries move together, padding is invalid and unlabelled.
    """

    def __init__(self, input_size: int, scale: tuple[float, float] = (0.8, 1.2), hflip: bool = True,
                 seed: int = 0) -> None:
        self.size, self.scale, self.hflip = input_size, scale, hflip
        self.rng = random.Random(seed)

    def __call__(self, img: Image.Image, labels: Image.Image,
                 rng: random.Random | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = rng if rng is not None else sample_rng(self.rng)
        s = self.size
        w, h = img.size
        factor = s / max(w, h) * rng.uniform(*self.scale)
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        im = np.asarray(img.convert("RGB").resize(size, Image.BILINEAR))
        lab = np.asarray(labels.resize(size, Image.NEAREST))
        if self.hflip and rng.random() < 0.5:
            im, lab = im[:, ::-1], lab[:, ::-1]
        nh, nw = lab.shape
        y0, x0 = rng.randint(0, max(0, nh - s)), rng.randint(0, max(0, nw - s))
        py, px = rng.randint(0, max(0, s - nh)), rng.randint(0, max(0, s - nw))
        crop_h, crop_w = min(nh, s), min(nw, s)
        out = np.zeros((s, s, 3), np.uint8)
        out_lab = np.full((s, s), UNLABELLED, np.uint8)
        valid = np.zeros((s, s), bool)
        out[py:py + crop_h, px:px + crop_w] = im[y0:y0 + crop_h, x0:x0 + crop_w]
        out_lab[py:py + crop_h, px:px + crop_w] = lab[y0:y0 + crop_h, x0:x0 + crop_w]
        valid[py:py + crop_h, px:px + crop_w] = True
        return out, out_lab, valid


def _decode(transform: Callable, num_classes: int) -> Callable[[dict], dict]:
    def decode(sample: dict) -> dict:
        with Image.open(io.BytesIO(sample["jpg"])) as img, Image.open(io.BytesIO(sample["png"])) as lab:
            image, labels, valid = transform(img, lab)
        target = np.zeros(num_classes, np.float32)
        target[json.loads(sample["json"])["labels"]] = 1.0
        return {"image": image, "labels": labels, "valid": valid, "target": target}
    return decode


def _collate(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    return {
        "images": torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).contiguous(),
        "labels": torch.from_numpy(np.stack([s["labels"] for s in samples])).long(),
        "valid": torch.from_numpy(np.stack([s["valid"] for s in samples])),
        "target": torch.from_numpy(np.stack([s["target"] for s in samples])),
    }


def pseudo_loader(urls: Sequence[str], num_classes: int, cfg: RefineConfig, seed: int) -> torch.utils.data.DataLoader:
    """An endless, resampled, shuffled stream of augmented pseudo-labelled crops, in batches."""
    pipeline = wds.DataPipeline(
        wds.ResampledShards(list(urls), seed=seed, deterministic=True),
        ReadShards(ErrorLog(0.5)),
        worker_shuffle(cfg.shuffle_buffer, seed),
        wds.map(_decode(PseudoTransform(cfg.input_size, cfg.scale, cfg.hflip, seed=seed), num_classes)),
    )
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(pipeline, batch_size=cfg.batch_size, collate_fn=_collate,
                                       num_workers=cfg.num_workers, generator=generator,
                                       prefetch_factor=4 if cfg.num_workers else None)


CLASS_WEIGHTS = ("none", "balanced")
LR_SCHEDULES = ("constant", "poly")


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """The refinement's learning-rate schedule, stepped once per optimiser step.

    ``poly`` is the usual schedule of segmentation training (DeepLab): the weights the
    refinement ends on are not one noisy SGD iterate at the full rate but settle as the
    rate goes to 0.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if schedule == "poly":
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=steps, power=0.9)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def pixel_class_weights(classes: Sequence[str], class_pixels: dict[str, int], mode: str) -> torch.Tensor | None:
    """Per-class weights of the pixel term, or None for plain cross-entropy.

    ``balanced``: w_k ∝ 1/sqrt(f_k), f_k the class's share of the pseudo-labelled pixels,
    scaled so an average pixel keeps weight 1. Beside 70 to 90 % background, an object that
    covers 1 % of the pixels adds almost nothing to plain cross-entropy, and a short
    refinement can lose it; the square root keeps a rare class from swamping the rest. Not the
    default: on the dev splits its effect was within the run-to-run spread of a refinement
    (docs/method.md, *Choices*).
    """
    if mode not in CLASS_WEIGHTS:
        raise ValueError(f"class_weights must be one of {CLASS_WEIGHTS}, got {mode!r}")
    if mode == "none":
        return None
    pixels = torch.tensor([float(class_pixels.get(c, 0)) for c in classes], dtype=torch.float64)
    if pixels.sum() <= 0:
        return None
    share = pixels / pixels.sum()
    weights = torch.where(share > 0, share.clamp_min(1e-12).rsqrt(), torch.zeros_like(share))
    return (weights / (share * weights).sum()).float()


def image_loss_of(ckpt: Checkpoint) -> ImageLoss:
    """The MIL loss ``ckpt``'s training used (its checkpoint records it; older ones are rebuilt from their options
    and manifest the way training built it): the refinement's image-level term is that loss, never another."""
    return ImageLoss.from_checkpoint(ckpt.classes, ckpt.manifest, ckpt.training_state)


def refine_loss(ckpt: Checkpoint, batch: dict[str, torch.Tensor], device: torch.device, mil_weight: float,
                image_loss: ImageLoss, class_weights: torch.Tensor | None = None, precision: str = "fp32"
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """Pixel cross-entropy on the pseudo-labels (``class_weights`` on ``device``, optional) plus ``mil_weight`` x
    the MIL loss of the model's training (``image_loss``) on the image's tags; the network's layers in
    ``precision`` (resolved), the losses in fp32."""
    model, config = ckpt.model, ckpt.config
    x = normalize(batch["images"].to(device), config.mean, config.std)
    with autocast(device, precision):
        maps = model(x, dense=True)
    maps = maps.float()
    size = tuple(x.shape[-2:])
    logits = torch.stack([upsample_cells(m, size, size, model.stride, model.cell_offset) for m in maps])
    pixel = F.cross_entropy(logits, batch["labels"].to(device), weight=class_weights, ignore_index=UNLABELLED)
    if not bool((batch["labels"] != UNLABELLED).any()):
        pixel = logits.sum() * 0.0  # a batch with no confident pixel: only the image term
    image = image_loss(model.image_scores(maps, batch["valid"].to(device), dense=True), batch["target"])
    return pixel + mil_weight * image, {"pixel_loss": float(pixel.detach()), "mil_loss": float(image.detach())}


def uniform_soup(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The mean of the members' floating-point weights (Wortsman et al., 2022: "model soups").

    Refinements of one model on the same pseudo-labels start from the same weights and differ
    by their crops and order; their mean lies in the same basin and averages away part of the
    seed-to-seed spread. Integer buffers (BatchNorm's step counts) are the first member's.
    """
    first = states[0]
    return {k: torch.stack([s[k].float() for s in states]).mean(0).to(v.dtype) if v.is_floating_point() else v
            for k, v in first.items()}


@dataclass
class _Run:
    """What the members of one refinement share, and its step checkpoints (resume)."""

    ckpt: Checkpoint
    pseudo_shards: Sequence[str]
    out: str
    cfg: RefineConfig
    spe: int
    device: torch.device
    weights: torch.Tensor | None
    config: Any  # the refined model's ModelConfig
    final_state: dict[str, Any]  # the training_state of model.pt, less what a step checkpoint adds
    bar: tqdm
    on_epoch: Callable[[dict[str, Any]], None] | None
    history: list[dict[str, Any]]
    states: list[dict[str, torch.Tensor]]  # the finished members' weights (a soup averages them)

    def save(self, member: int, step: int, optimizer: torch.optim.Optimizer, scheduler: Any,
             sums: dict[str, float]) -> None:
        """A step checkpoint: the member's weights and everything its resume needs, bit for bit."""
        state = {**self.final_state, "finished": False, "member": member, "member_step": step,
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": torch.get_rng_state(), "epoch_sums": dict(sums), "members": list(self.states),
                 "steps_per_epoch": self.spe}
        url = storage.join(self.out, checkpoint_name((member * self.cfg.epochs * self.spe) + step))
        storage.write_bytes(url, checkpoint_bytes(self.ckpt.model, self.config, self.ckpt.classes,
                                                  input_size=self.cfg.input_size, manifest=self.ckpt.manifest,
                                                  metrics={"history": self.history}, training_state=state))
        _prune(self.out, self.cfg.keep_checkpoints)

    def fit(self, member: int, resume: dict[str, Any] | None) -> None:
        """One refinement of ``ckpt.model`` (in place) with the data order and crops of seed ``seed + member``;
        from ``resume`` (a step checkpoint's training state of this member) when given."""
        cfg, spe, ckpt = self.cfg, self.spe, self.ckpt
        seed = cfg.seed + member
        torch.manual_seed(seed)
        image_loss = image_loss_of(ckpt)
        precision = resolve_precision(cfg.precision, self.device, TRAIN_PRECISIONS)
        model = ckpt.model.to(device=self.device).train()
        optimizer = make_optimizer(model, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.backbone_lr_scale)
        scheduler = lr_scheduler(optimizer, cfg.lr_schedule, cfg.epochs * spe)
        step, sums = 0, dict.fromkeys(("loss", "pixel_loss", "mil_loss"), 0.0)
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            torch.set_rng_state(resume["rng"])  # dropout draws on from where the checkpoint left it
            step, sums = int(resume["member_step"]), {k: float(v) for k, v in resume["epoch_sums"].items()}
        for epoch in range(step // spe, cfg.epochs):
            # Each epoch's stream depends on (seed, epoch) only: a resumed epoch reads past the batches it
            # already trained on (decoded and augmented again: the crops draw from per-worker generators).
            batches = iter(pseudo_loader(self.pseudo_shards, len(ckpt.classes), cfg, seed=seed * 1000 + epoch))
            for _ in range(step - epoch * spe):
                next(batches)
            while step < (epoch + 1) * spe:
                optimizer.zero_grad(set_to_none=True)
                loss, parts = refine_loss(ckpt, next(batches), self.device, cfg.mil_weight, image_loss,
                                          self.weights, precision)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                sums["loss"] += float(loss.detach())
                for k, v in parts.items():
                    sums[k] += v
                self.bar.update(1)
                self.bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % spe:
                    self.save(member, step, optimizer, scheduler, sums)
            del batches
            row = {**({} if cfg.soup == 1 else {"member": member + 1}), "epoch": epoch + 1,
                   **{k: round(v / spe, 5) for k, v in sums.items()}, "lr": scheduler.get_last_lr()[0]}
            self.history.append(row)
            _logger.info("refine epoch %d/%d: %s", epoch + 1, cfg.epochs, row)
            if self.on_epoch is not None:
                self.on_epoch(row)
            sums = dict.fromkeys(sums, 0.0)
            self.save(member, step, optimizer, scheduler, sums)


def _check_resume(ts: dict[str, Any], cfg: RefineConfig, parent: dict[str, Any], pseudo_shards: Sequence[str],
                  url: str) -> None:
    """A step checkpoint continues this refinement only: same input model, pseudo-labels and settings."""
    shown = storage.redact_url(url)
    was, now = ts.get("refined_from", {}).get("model_id"), parent.get("model_id")
    if was != now:
        raise ValueError(f"cannot resume from {shown}: it refines model {was}, not {now}; use another --out")
    if list(ts.get("pseudo_labels", {}).get("shards", [])) != list(pseudo_shards):
        raise ValueError(f"cannot resume from {shown}: it was trained on other pseudo-labels; use another --out")
    asked = {**asdict(cfg), "scale": list(cfg.scale)}
    had = ts.get("options", {}).get("refine", {})
    had = {**_ADDED, **had}
    diffs = [f"{k}: checkpoint {had.get(k)!r}, asked {v!r}" for k, v in asked.items()
             if k not in _RUN_ONLY and had.get(k) != v]
    if diffs:
        raise ValueError(f"cannot resume from {shown}: the refinement's settings differ ({'; '.join(diffs)}); "
                         "resume with the same ones, or use another --out")


_RUN_ONLY = ("progress", "resume", "checkpoint_every", "keep_checkpoints")  # settings a resume may change
_ADDED = {"precision": "auto"}  # settings newer than some checkpoints: what those checkpoints ran with


def with_output_stride(ckpt: Checkpoint, output_stride: int | None) -> Checkpoint:
    """``ckpt`` with its network rebuilt at ``output_stride`` (same weights: dilation changes no parameter shape;
    the cell offset measured anew for the new architecture), or ``ckpt`` itself.

    A model trained at stride 16 refined at stride 8 serves score maps four times as dense from one plain
    forward pass: what a view at twice the size gave, without it. The refinement teaches the head the denser
    cells (its 3x3 windows span half the image they did).
    """
    if output_stride is None or output_stride == ckpt.config.output_stride:
        return ckpt
    config = replace(ckpt.config, output_stride=output_stride, cell_offset=None)
    model, config = create_model(config, pretrained="none")
    model.load_state_dict(ckpt.model.state_dict())
    return replace(ckpt, model=model, config=config)


def run_refine(ckpt: Checkpoint, pseudo_shards: Sequence[str], images: int, out: str, cfg: RefineConfig, *,
               device: torch.device, parent: dict[str, Any], pseudo_stats: dict[str, Any],
               on_epoch: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Fine-tune ``ckpt``'s network (in place) on the pseudo-label shards; writes ``{out}/model.pt``.

    With ``cfg.soup`` > 1, that many refinements from the same start (seeds ``seed``, ``seed + 1``, ...)
    are averaged into the one written (:func:`uniform_soup`). Step checkpoints
    (``{out}/checkpoint-step-*.pt``, every ``cfg.checkpoint_every`` steps and at every epoch's end) let
    ``cfg.resume`` continue a killed run to the weights an uninterrupted one gives; they are removed once
    ``model.pt`` is written. Without ``cfg.resume`` a folder that holds them is refused.
    """
    existing = list_checkpoints(out)
    if existing and not cfg.resume:
        raise ValueError(f"{storage.redact_url(out)} holds the step checkpoints of an unfinished refinement "
                         f"(newest: {storage.redact_url(existing[-1][1])}); pass --resume to continue it, or "
                         "choose another --out")
    ckpt = with_output_stride(ckpt, cfg.output_stride)
    options = ckpt.training_state.get("options", {})
    weights = pixel_class_weights(ckpt.classes, pseudo_stats.get("class_pixels", {}), cfg.class_weights)
    weights = None if weights is None else weights.to(device)  # once, not every step
    backbone = ckpt.model.backbone
    backbone.set_finetune_from(ckpt.config.finetune_from if cfg.finetune_from is None else cfg.finetune_from,
                               freeze_norms=True)  # BatchNorms never move here
    config = replace(ckpt.config, finetune_from=backbone.finetune_from)
    spe = cfg.steps_per_epoch or max(1, -(-images // cfg.batch_size))
    start = {k: v.detach().clone() for k, v in ckpt.model.state_dict().items()} if cfg.soup > 1 else {}
    final_state = {"refined_from": parent, "pseudo_labels": pseudo_stats, "image_loss": image_loss_of(ckpt).to_dict(),
                   "options": {**options, "refine": {**asdict(cfg), "scale": list(cfg.scale)}}}
    resume: dict[str, Any] | None = None
    if existing:
        saved = load_checkpoint(io.BytesIO(storage.read_bytes(existing[-1][1])))
        resume = saved.training_state
        _check_resume(resume, cfg, parent, pseudo_shards, existing[-1][1])
        if int(resume["steps_per_epoch"]) != spe:
            raise ValueError(f"cannot resume from {storage.redact_url(existing[-1][1])}: {resume['steps_per_epoch']} "
                             f"steps an epoch, now {spe}")
        _logger.info("resuming the refinement from %s (member %d, step %d)", storage.redact_url(existing[-1][1]),
                     int(resume["member"]) + 1, int(resume["member_step"]))
    first = int(resume["member"]) if resume is not None else 0
    run = _Run(ckpt, pseudo_shards, out, cfg, spe, device, weights, config, final_state,
               tqdm(total=cfg.soup * cfg.epochs * spe, initial=first * cfg.epochs * spe +
                    (int(resume["member_step"]) if resume is not None else 0), desc="refine", unit="step",
                    disable=not cfg.progress),
               on_epoch, list(saved.metrics.get("history", [])) if resume is not None else [],
               list(resume["members"]) if resume is not None else [])
    for member in range(first, cfg.soup):
        if resume is not None and member == first:
            ckpt.model.load_state_dict(saved.model.state_dict())
        elif member:
            ckpt.model.load_state_dict(start)
        run.fit(member, resume if member == first else None)
        if cfg.soup > 1:
            run.states.append({k: v.detach().clone() for k, v in ckpt.model.state_dict().items()})
    run.bar.close()
    if run.states:
        ckpt.model.load_state_dict(uniform_soup(run.states))
    model = ckpt.model.eval()
    url = storage.join(out, "model.pt")
    storage.write_bytes(url, checkpoint_bytes(model, config, ckpt.classes, input_size=cfg.input_size,
                                              manifest=ckpt.manifest, metrics={"history": run.history,
                                                                               "last": run.history[-1]},
                                              training_state={**final_state, "finished": True}))
    for _, old in list_checkpoints(out):  # model.pt holds the result; they only served a resume
        fs, path = storage.url_to_fs(old)
        fs.rm(path)
    return {"checkpoint": url, "history": run.history, "steps": cfg.soup * cfg.epochs * spe}
