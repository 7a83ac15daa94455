"""Test-time augmentation on the dev split: what each ``--tta`` setting gains and costs.

For the weak models ``bench/quality.py`` trained (``{workdir}/model-seed{N}/model.pt``,
trained on MSRC-21(-objects) train minus dev) and its dev layout (``{workdir}/data``),
every TTA setting of ``--settings`` segments the **dev** split (never val: settings are
chosen here) with the base variant (no priors) and the default chain ``ilp,sppxl``, both
from one (augmented) forward pass per image, scored with the evaluation code
(:mod:`weakseg.tasks.evaluate.scoring`: one confusion matrix per variant over the split).

Cost: ``ms_per_image`` is the wall time of :func:`~weakseg.tasks.segment.inference.predict`
with that setting plus reading its full-resolution probabilities once (the views'
upsampling and averaging), one image at a time, on ``--threads`` torch threads; the
priors cost the same whatever the setting and are left out. ``cost_x`` divides it by the
plain setting's (``1``). Prints JSON (per seed, and mean over seeds) and, on stderr, a
markdown table of the means.

    nice -n 10 .venv/bin/python bench/tta.py --workdir /tmp/q/objects --seeds 0,1,2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import MAX_SIDE  # bench/quality.py: the forward size its tables used

from weakseg.tasks.evaluate.scoring import (
    align_classes,
    confusion_matrix,
    read_gt_classes,
    read_split_ids,
    segmentation_metrics,
)
from weakseg.tasks.evaluate.variants import iter_voc
from weakseg.tasks.segment.inference import load_model, predict, segment_variants
from weakseg.tasks.segment.tta import parse_tta

SETTINGS = ("1", "1+flip", "1.5", "2", "1,1.5", "1,2", "1,1.5,2", "1,1.5+flip", "1,2+flip", "1,1.5,2+flip")
VARIANTS = ("base", "ilp+sppxl")


def score_seed(model: str, layout: str, settings: list[str], images: list[tuple], max_side: int) -> dict:
    """Per setting: metrics of each variant over the images, and the forward cost per image."""
    bundle = load_model(model, "cpu")
    alignment = align_classes(read_gt_classes(layout), bundle.classes)
    for spec in settings:  # warm-up: first calls at each forward size pay one-off set-up costs
        predict(bundle, [images[0][1]], max_side, tta=spec)[0].probs()
    out = {}
    for spec in settings:
        conf = {v: np.zeros((len(alignment.gt_classes), len(alignment.columns)), np.int64) for v in VARIANTS}
        seconds = 0.0
        for _, rgb, gt in images:
            t0 = time.perf_counter()
            pred = predict(bundle, [rgb], max_side, tta=spec)[0]
            pred.probs()
            seconds += time.perf_counter() - t0
            masks = segment_variants(bundle, rgb, max_side=max_side, variants=VARIANTS, prediction=pred)
            for v, mask in masks.items():
                conf[v] += confusion_matrix(gt, mask, alignment)
        metrics = {v: segmentation_metrics(c, alignment) for v, c in conf.items()}
        out[spec] = {
            "views": len(parse_tta(spec).views()),
            "ms_per_image": round(seconds * 1000 / len(images), 1),
            **{v: {"mean_iou": m["mean_iou"], "pixel_accuracy": m["pixel_accuracy"],
                   "background_iou": m["per_class"].get("background", {}).get("iou")} for v, m in metrics.items()},
        }
        print(f"  {spec}: {json.dumps(out[spec])}", file=sys.stderr, flush=True)
    return out


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(per_seed: list[dict], settings: list[str]) -> dict:
    """Mean (and sd) over seeds per setting; ``cost_x`` relative to the first setting."""
    out = {}
    for spec in settings:
        rows = [s[spec] for s in per_seed]
        entry = {"views": rows[0]["views"], "ms_per_image": _mean_sd([r["ms_per_image"] for r in rows])[0],
                 "cost_x": statistics.mean(r["ms_per_image"] / s[settings[0]]["ms_per_image"]
                                           for r, s in zip(rows, per_seed, strict=True))}
        for v in VARIANTS:
            for key in ("mean_iou", "pixel_accuracy", "background_iou"):
                values = [r[v][key] for r in rows if r[v][key] is not None]
                if values:
                    entry[f"{v} {key}"] = _mean_sd(values)
        out[spec] = entry
    return out


def markdown(summary: dict, seeds: int) -> str:
    def cell(x: tuple[float, float] | None) -> str:
        return "-" if x is None else (f"{x[0]:.3f} ± {x[1]:.3f}" if seeds > 1 else f"{x[0]:.3f}")

    head = ("| --tta | views | base: mean IoU | pixel acc. | bg IoU | ilp,sppxl: mean IoU | pixel acc. | bg IoU "
            "| ms / image | cost |\n|---|---|---|---|---|---|---|---|---|---|\n")
    rows = []
    for spec, e in summary.items():
        cols = [cell(e.get(f"{v} {k}")) for v in VARIANTS for k in ("mean_iou", "pixel_accuracy", "background_iou")]
        rows.append(f"| `{spec}` | {e['views']} | " + " | ".join(cols)
                    + f" | {e['ms_per_image']:.0f} | {e['cost_x']:.1f}x |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="quality-output/msrc21-objects",
                        help="bench/quality.py's workdir: model-seed{N}/model.pt and the dev layout data/")
    parser.add_argument("--seeds", default="0", help="the trained models to score, e.g. 0,1,2")
    parser.add_argument("--settings", default=";".join(SETTINGS),
                        help="TTA specs separated by ';' (the first is the cost baseline)")
    parser.add_argument("--max-side", type=int, default=MAX_SIDE)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (timings depend on it)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N dev images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    layout = str(work / "data")
    settings = [str(parse_tta(s)) for s in args.settings.split(";") if s.strip()]
    ids = read_split_ids(layout, "dev")[: args.limit]  # dev only: settings are chosen here, val is scored once
    images = list(iter_voc(layout, ids))
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = []
    for seed in seeds:
        print(f"seed {seed}", file=sys.stderr, flush=True)
        per_seed.append(score_seed(str(work / f"model-seed{seed}" / "model.pt"), layout, settings, images,
                                   args.max_side))
    summary = summarise(per_seed, settings)
    doc = {"benchmark": "tta", "split": "dev", "images": len(ids), "workdir": str(work), "seeds": seeds,
           "max_side": args.max_side, "threads": args.threads, "variants": list(VARIANTS),
           "mean_over_seeds": {s: {k: (v[0] if isinstance(v, tuple) else v) for k, v in e.items()}
                               for s, e in summary.items()},
           "per_seed": per_seed, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(doc, indent=2))
    print(markdown(summary, len(seeds)), file=sys.stderr)


if __name__ == "__main__":
    main()
