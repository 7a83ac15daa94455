"""The ceiling for bench/quality.py: the same backbone and head trained on pixel labels.

Fully supervised reference on MSRC-21: the train split's masks (which the weak model never
sees) train the same network with a per-pixel cross-entropy on its dense score maps, brought
to pixels by the model's own cell-to-pixel mapping (the one scoring uses); then
the val split is scored like the weak model's `base` variant. The weak/full ratio of mean
IoU says how much of the supervised quality image tags alone recover. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from weakseg.models import ModelConfig, create_model, load_checkpoint, save_checkpoint
from weakseg.tasks.evaluate.scoring import read_gt_classes, read_split_ids
from weakseg.tasks.evaluate.variants import iter_voc, score_variants
from weakseg.tasks.segment.inference import load_model, upsample_cells
from weakseg.tasks.tensors import normalize
from weakseg.tasks.train.optimizer import make_optimizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MSRC = SHARED / "msrc21"


def load_split(data: str, classes: list[str], max_side: int) -> list[tuple[np.ndarray, np.ndarray]]:
    gt_classes = read_gt_classes(data)
    lut = np.full(256, 255, np.uint8)
    for i, name in enumerate(gt_classes):
        if name in classes:
            lut[i] = classes.index(name)
    out = []
    for _, rgb, gt in iter_voc(data, read_split_ids(data, "train")):
        scale = max_side / max(rgb.shape[:2])
        size = (round(rgb.shape[1] * scale), round(rgb.shape[0] * scale))
        img = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(lut[gt]).resize(size, Image.Resampling.NEAREST))
        out.append((img, mask))
    return out


def batch(samples, rng: np.random.Generator, n: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for i in rng.integers(len(samples), size=n):
        img, mask = samples[i]
        h, w = mask.shape
        ph, pw = max(0, crop - h), max(0, crop - w)
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        mask = np.pad(mask, ((0, ph), (0, pw)), constant_values=255)
        y0, x0 = rng.integers(mask.shape[0] - crop + 1), rng.integers(mask.shape[1] - crop + 1)
        img, mask = img[y0:y0 + crop, x0:x0 + crop], mask[y0:y0 + crop, x0:x0 + crop]
        if rng.random() < 0.5:
            img, mask = img[:, ::-1], mask[:, ::-1]
        xs.append(torch.from_numpy(img.copy()).permute(2, 0, 1))
        ys.append(torch.from_numpy(mask.copy()).long())
    return torch.stack(xs), torch.stack(ys)


def train(args: argparse.Namespace) -> list[float]:
    """Train the head on the train split's pixel labels; saves ``args.out``; returns the losses."""
    torch.manual_seed(0)
    classes = sorted(c for c in read_gt_classes(args.data))
    widths = tuple(int(w) for w in args.head_widths.split(","))
    config = ModelConfig(num_classes=len(classes), backbone=args.backbone, head_widths=widths,
                         output_stride=args.output_stride)
    model, config = create_model(config)
    samples = load_split(args.data, classes, args.max_side)
    optimizer = make_optimizer(model, lr=args.lr)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(args.steps):
        images, labels = batch(samples, rng, args.batch_size, args.crop)
        model.train()
        logits = model.dense_maps(normalize(images, config.mean, config.std))
        # scoring reads the maps through upsample_cells (cell i on pixel stride·i + cell_offset): train through it too
        size = tuple(labels.shape[-2:])
        logits = torch.stack([upsample_cells(m, size, size, model.stride, model.cell_offset) for m in logits])
        loss = F.cross_entropy(logits, labels, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(args.out, model, config, classes, input_size=args.crop,
                    metrics={"supervised": True, "steps": args.steps, "final_loss": float(np.mean(losses[-20:]))})
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="msrc21", choices=("msrc21", "msrc21-objects"),
                        help="which of the shared data sets (MSRC-21-objects: with its background class)")
    parser.add_argument("--data", default=None, help="the data set's folder (default: ../shared/data/DATASET)")
    parser.add_argument("--out", default="quality-output/supervised.pt")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--backbone", default=ModelConfig.backbone, help="as weakseg train --backbone")
    parser.add_argument("--head-widths", default="256,256,256")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-side", type=int, default=0,
                        help="inference: enlarge images to this longer side, as bench/quality.py does (0 = off)")
    parser.add_argument("--model", default=None, help="score this supervised checkpoint instead of training one")
    parser.add_argument("--weak-quality", default=None, help="bench/quality.py JSON, for the weak/full ratio")
    args = parser.parse_args()
    args.data = args.data or (os.environ.get("WEAKSEG_MSRC21", str(MSRC)) if args.dataset == "msrc21"
                              else str(SHARED / args.dataset))
    started = time.perf_counter()
    if args.model:
        args.out = args.model
        steps, losses = load_checkpoint(args.model).metrics.get("steps"), []
    else:
        steps, losses = args.steps, train(args)
    bundle = load_model(args.out, "cpu")
    result = score_variants(bundle, args.data, "val", variants=("base",),
                            max_side=max(args.max_side, args.min_side), min_side=args.min_side)["base"]
    report = {
        "benchmark": f"supervised_ceiling_{args.dataset}",
        "model": args.out, "backbone": bundle.checkpoint.config.backbone,
        "steps": steps, "batch_size": args.batch_size, "crop": args.crop,
        "inference": {"max_side": max(args.max_side, args.min_side), "min_side": args.min_side},
        "loss_first": round(float(np.mean(losses[:20])), 4) if losses else None,
        "loss_last": round(float(np.mean(losses[-20:])), 4) if losses else None,
        "mean_iou": round(result["mean_iou"], 4), "pixel_accuracy": round(result["pixel_accuracy"], 4),
        "per_class_iou": {c: round(x["iou"], 4) for c, x in result["per_class"].items()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.weak_quality:
        weak = json.loads(Path(args.weak_quality).read_text())["mean_iou"]
        # bench/quality.py lists one figure per seed: their mean
        report["weak_over_full"] = {v: round(float(np.mean(m)) / report["mean_iou"], 3) for v, m in weak.items()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
