"""A refinement setting over several seeds: its mean and spread on a dev split.

One refinement moves by up to 0.10 mean IoU with the order of its crops alone
(docs/method.md, *Choices*), so a setting is compared over seeds. For each
``--class-weights``, ``--lr-schedules`` and ``--scales`` setting and each seed, the MIL model ``--model`` is refined
(:func:`~weakseg.tasks.train.refine.run_refine`, the refine-mil flow's loop) on the
pseudo-labels an earlier ``weakseg refine`` wrote (``--refined``: its ``model.pt`` names
them in ``training_state``; the labels are the same for every run, only the seed and the
setting change), and the result scores ``--split`` of ``--data`` (a VOC layout: never
val) with the default chain and views (``--tta auto``). Prints one JSON line per run, then the mean and
standard deviation per setting.

    .venv/bin/python bench/refine_seeds.py --model demo-output/model/model.pt \\
        --refined demo-output/refined/model.pt --data /tmp/sdev --split val --epochs 4 --input-size 160
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import torch

from weakseg.models import load_checkpoint
from weakseg.tasks.evaluate.variants import score_variants
from weakseg.tasks.segment.inference import DEFAULT_MAX_SIDE, load_model
from weakseg.tasks.segment.tta import AUTO
from weakseg.tasks.train.refine import RefineConfig, run_refine

CHAIN = "ilp+sppxl"


def parse_scale(text: str) -> tuple[float, float]:
    """``"0.8-1.2"`` -> ``(0.8, 1.2)``: the range of the refinement's random rescaling."""
    lo, hi = (float(v) for v in text.split("-"))
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"a scale range is LO-HI with 0 < LO <= HI, got {text!r}")
    return lo, hi


def pseudo_stats(folder: str) -> dict:
    """The statistics a refinement needs of a pseudo-labels folder: its shards and images (no class counts)."""
    import webdataset as wds

    shards = sorted(str(p) for p in Path(folder).glob("pseudo-*.tar"))
    images = sum(1 for _ in wds.DataPipeline(wds.SimpleShardList(shards), wds.tarfile_to_samples()))
    return {"shards": shards, "images": images, "class_pixels": {}}


def score(model: str, data: str, split: str, views: list[str], max_side: int, shrunk: str | None = None) -> dict:
    """The default chain's mean IoU, pixel accuracy and per-class IoU of ``model`` for each TTA spec in
    ``views``; with ``shrunk`` (bench/quality.py's shrunk_layout) also on those photos, as ``SPEC @shrunk``."""
    bundle = load_model(model, "cpu")
    out = {}
    for where, folder in (("", data), (" @shrunk", shrunk)):
        if folder is None:
            continue
        for spec in views:
            m = score_variants(bundle, folder, split, variants=[CHAIN], tta=spec, max_side=max_side)[CHAIN]
            out[f"{spec}{where}"] = {"mean_iou": round(m["mean_iou"], 4),
                                     "pixel_accuracy": round(m["pixel_accuracy"], 4),
                                     "per_class_iou": {k: round(c["iou"], 3) for k, c in m["per_class"].items()}}
    return out


def refine_and_score(args: argparse.Namespace, stats: dict, weights: str, schedule: str, seed: int,
                     scale: tuple[float, float] = RefineConfig.scale) -> dict:
    setting = weights if weights == "unrefined" else (
        f"{weights}/{schedule}/scale {scale[0]:g}-{scale[1]:g}/ft {args.finetune_from}/blr {args.backbone_lr_scale:g}"
        f"/os {args.output_stride}/epochs {args.epochs}/input {args.input_size}/soup {args.soup}")
    with tempfile.TemporaryDirectory() as tmp:
        out = tmp if not args.save else f"{args.save}/{setting.replace('/', '_').replace(' ', '')}-seed{seed}"
        if weights == "unrefined":
            model = args.model
        else:
            cfg = RefineConfig(epochs=args.epochs, input_size=args.input_size, num_workers=args.workers,
                               progress=False, seed=seed, class_weights=weights, lr_schedule=schedule,
                               finetune_from=args.finetune_from, scale=scale, soup=args.soup,
                               backbone_lr_scale=args.backbone_lr_scale, output_stride=args.output_stride,
                               lr=args.lr, checkpoint_every=0, resume=True)
            model = f"{out}/model.pt"
            if not os.path.exists(model):
                with open(args.model, "rb") as f:
                    run_refine(load_checkpoint(f), stats["shards"], stats["images"], out, cfg,
                               device=torch.device("cpu"), parent={}, pseudo_stats=stats)
        scores = score(model, args.data, args.split, args.views.split(";"), args.max_side, args.shrunk)
    first = scores[args.views.split(";")[0]]
    return {"setting": setting, "seed": seed, "mean_iou": first["mean_iou"], "pixel_accuracy": first["pixel_accuracy"],
            "per_class_iou": first["per_class_iou"],
            "views": {k: {"mean_iou": v["mean_iou"], "pixel_accuracy": v["pixel_accuracy"],
                          "background_iou": v["per_class_iou"].get("background")} for k, v in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the MIL model's model.pt")
    parser.add_argument("--refined", default=None, help="a weakseg refine model.pt of that model (its pseudo-labels)")
    parser.add_argument("--pseudo", default=None, help="or the pseudo-labels folder of such a refinement")
    parser.add_argument("--data", required=True, help="VOC-layout folder with the dev images and masks")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--class-weights", default="none,balanced",
                        help="comma list of settings; 'unrefined' scores the MIL model itself")
    parser.add_argument("--lr-schedules", default=RefineConfig.lr_schedule, help="comma list: constant, poly")
    parser.add_argument("--scales", default="{:g}-{:g}".format(*RefineConfig.scale),
                        help="comma list of LO-HI ranges of the crops' random rescaling")
    parser.add_argument("--soup", type=int, default=RefineConfig.soup,
                        help="refinements averaged into each refined model (seeds S, S+1, ...)")
    parser.add_argument("--epochs", type=int, default=RefineConfig.epochs)
    parser.add_argument("--input-size", type=int, default=RefineConfig.input_size)
    parser.add_argument("--finetune-from", type=int, default=None,
                        help="train the backbone from this feature stage on (default: as the MIL model)")
    parser.add_argument("--backbone-lr-scale", type=float, default=RefineConfig.backbone_lr_scale,
                        help="the trained backbone stages' learning rate, a factor of --lr")
    parser.add_argument("--output-stride", type=int, default=None, help="refine at this output stride")
    parser.add_argument("--lr", type=float, default=RefineConfig.lr)
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE, help="forward-pass longer side when scoring")
    parser.add_argument("--views", "--tta", default=AUTO,
                        help="';'-separated TTA specs to score each model with; the first is the summary's "
                             "(default: each model's own, as segment)")
    parser.add_argument("--shrunk", default=None, help="also score this VOC layout (bench/quality.py shrunk_layout)")
    parser.add_argument("--save", default=None, help="keep each refined model under this folder (and reuse it)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers of each refinement")
    args = parser.parse_args()
    if args.refined:
        stats = torch.load(args.refined, weights_only=True, map_location="cpu")["training_state"]["pseudo_labels"]
    elif args.pseudo:
        stats = pseudo_stats(args.pseudo)
    else:
        parser.error("--refined or --pseudo is needed")
    runs: dict[str, list[dict]] = {}
    scales = [parse_scale(s) for s in args.scales.split(",")]
    settings = [(w, s, r) for w in args.class_weights.split(",")
                for s in ([""] if w == "unrefined" else args.lr_schedules.split(","))
                for r in (scales[:1] if w == "unrefined" else scales)]
    for weights, schedule, scale in settings:
        seeds = [0] if weights == "unrefined" else [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            row = refine_and_score(args, stats, weights, schedule, seed, scale)
            runs.setdefault(row["setting"], []).append(row)
            print(json.dumps(row), flush=True)
    summary = {w: {"mean_iou": round(statistics.mean(r["mean_iou"] for r in rows), 4),
                   "sd": round(statistics.stdev(r["mean_iou"] for r in rows), 4) if len(rows) > 1 else 0.0,
                   "pixel_accuracy": round(statistics.mean(r["pixel_accuracy"] for r in rows), 4)}
               for w, rows in runs.items()}
    print(json.dumps({"benchmark": "refine_seeds", "chain": CHAIN, "summary": summary}))


if __name__ == "__main__":
    main()
