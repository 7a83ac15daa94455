"""The paper's Table 4 on real photos: MSRC-21, weak training on image tags only.

shard MSRC-21's labels.csv (train/val split of the data set) -> train-mil on the train tags
-> δ_k of SP-bb / SP-seg chosen on train-split images, for each variant that has them
(the network never sees a mask) -> every prior variant on the 236 val images, scored
against the val masks. Prints JSON and a markdown table: mean IoU, pixel accuracy and
per-class IoU per variant, plus the model's image-level mAP. `make quality` runs it; `--model` reuses a checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from weakseg.models import load_checkpoint
from weakseg.tasks import storage
from weakseg.tasks.evaluation import read_split_ids
from weakseg.tasks.inference import load_model
from weakseg.tasks.priors import VARIANTS
from weakseg.tasks.quality import fit_thresholds, score_variants, thresholds_by_variant

MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"


def train(args, shards: str, out: str) -> str:
    from weakseg.flows.shard_imagenet import shard_imagenet
    from weakseg.flows.train_mil import train_mil

    shard_imagenet(source=str(Path(args.data) / "labels.csv"), dest=shards, max_side=args.max_side)
    if not storage.exists(storage.join(out, "model.pt")):
        train_mil(shards=shards, out=out, epochs=args.epochs, batch_size=16, input_size=args.input_size,
                  head_widths=[int(w) for w in args.head_widths.split(",")], output_stride=args.output_stride,
                  lr=args.lr, crop=args.crop, num_workers=2, checkpoint_every=0, progress=False)
    return storage.join(out, "model.pt")


def markdown(results: dict, classes: list[str]) -> str:
    head = "| variant | mean IoU | pixel acc. | mean class acc. |\n|---|---|---|---|\n"
    rows = "".join(f"| {v} | {m['mean_iou']:.3f} | {m['pixel_accuracy']:.3f} | {m['mean_class_accuracy']:.3f} |\n"
                   for v, m in results.items())
    per = "\n| class | " + " | ".join(results) + " |\n|---|" + "---|" * len(results) + "\n"
    for c in classes:
        cells = [results[v]["per_class"][c]["iou"] for v in results]
        per += f"| {c} | " + " | ".join("-" if np.isnan(x) else f"{x:.3f}" for x in cells) + " |\n"
    return head + rows + per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.environ.get("WEAKSEG_MSRC21", str(MSRC)))
    parser.add_argument("--workdir", default="quality-output")
    parser.add_argument("--model", default=None, help="reuse this checkpoint instead of training")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--input-size", type=int, default=288)
    parser.add_argument("--max-side", type=int, default=320)
    parser.add_argument("--head-widths", default="256,256,256")
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop", default="auto", choices=("auto", "random", "whole"))
    parser.add_argument("--threshold-images", type=int, default=None,
                        help="choose δ_k on the first N train images (default: all 355; 80 overfit SP-seg's δ)")
    parser.add_argument("--min-side", type=int, default=0,
                        help="inference: enlarge images to this longer side (MSRC's are 320 px; 0 = as they are)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N val images")
    args = parser.parse_args()
    if not (Path(args.data) / "JPEGImages").is_dir():
        raise SystemExit(f"MSRC-21 not found at {args.data} (set WEAKSEG_MSRC21)")
    logging.getLogger("prefect").setLevel(logging.WARNING)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    started = time.perf_counter()
    model = args.model or train(args, str(Path(args.workdir) / "shards"), str(Path(args.workdir) / "model"))
    bundle = load_model(model, "cpu")
    ids = read_split_ids(args.data, "train")[: args.threshold_images]
    sides = {"max_side": max(args.max_side, args.min_side), "min_side": args.min_side}
    found = fit_thresholds(bundle, args.data, ids, tuple(VARIANTS), **sides)
    results = score_variants(bundle, args.data, "val", thresholds_by_variant(found, bundle.classes),
                             tuple(VARIANTS), limit=args.limit, **sides)
    metrics = load_checkpoint(model).metrics
    last = metrics.get("last") or (metrics.get("history") or [{}])[-1]
    gt_classes = [c for c in next(iter(results.values()))["per_class"]]
    report = {
        "benchmark": "quality_msrc21",
        "model": model,
        "train": {k: last.get(k) for k in ("epoch", "step", "val_map", "val_accuracy", "train_loss")},
        "image_level_map": last.get("val_map"),
        "inference": sides,
        "thresholds": {v: {"search": search, "delta": deltas} for v, (deltas, search) in found.items()},
        "mean_iou": {v: round(m["mean_iou"], 4) for v, m in results.items()},
        "pixel_accuracy": {v: round(m["pixel_accuracy"], 4) for v, m in results.items()},
        "per_class_iou": {v: {c: round(x["iou"], 4) for c, x in m["per_class"].items()} for v, m in results.items()},
        "val_images": next(iter(results.values()))["images"],
        "seconds": round(time.perf_counter() - started, 1),
    }
    text = json.dumps(report, indent=2, default=str)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    (Path(args.workdir) / "quality.json").write_text(text)
    (Path(args.workdir) / "quality.md").write_text(markdown(results, gt_classes))
    print(text)
    print(markdown(results, gt_classes))


if __name__ == "__main__":
    main()
