"""How well the SP-bb / SP-seg objectness maps tell objects from stuff, on MSRC-21 masks.

The objectness test of SP-bb / SP-seg can only help when p(Obj) is high on objects and low
on stuff (sky, grass, road, ...). For every map this prints the ROC AUC of "object pixel
vs stuff pixel" over the val masks (0.5 = no information, 1 = perfect), raw and averaged
over SP-sppxl's superpixels (as the ilp+sppxl+bb/seg chains use it). No network involved:
the maps come from the image alone. Also prints the median cost per image of each
prior's input (superpixels, box and segment objectness maps). Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from weakseg.tasks.evaluate.scoring import read_gt_classes, read_split_ids
from weakseg.tasks.evaluate.variants import iter_voc
from weakseg.tasks.segment.inference import compute_prior_inputs
from weakseg.tasks.segment.priors import superpixel_mean

MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"
STUFF = "building,grass,tree,sky,water,road"  # MSRC-21's stuff classes; the other 15 are objects


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney form of the ROC AUC (ties count half)."""
    ranks = rankdata(scores)
    n1 = int(positive.sum())
    n0 = positive.size - n1
    return float((ranks[positive].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.environ.get("WEAKSEG_MSRC21", str(MSRC)))
    parser.add_argument("--split", default="val")
    parser.add_argument("--stuff", default=STUFF, help="comma list of the ground truth's stuff classes")
    parser.add_argument("--every", type=int, default=2, help="use every n-th image of the split")
    args = parser.parse_args()
    if not (Path(args.data) / "JPEGImages").is_dir():
        raise SystemExit(f"MSRC-21 not found at {args.data} (set WEAKSEG_MSRC21)")
    classes = read_gt_classes(args.data)
    stuff = {c.strip() for c in args.stuff.split(",")}
    is_object = np.array([c not in stuff for c in classes] + [False] * (256 - len(classes)))
    ids = read_split_ids(args.data, args.split)[:: args.every]
    labels, maps = [], {"bb": [], "seg": [], "bb_superpixel_mean": [], "seg_superpixel_mean": []}
    costs: dict[str, list[float]] = {}
    for _, rgb, gt in iter_voc(args.data, ids):
        inputs, ms = compute_prior_inputs(rgb, ["sppxl", "bb", "seg"])
        for prior, t in ms.items():
            costs.setdefault(prior, []).append(t)
        valid = gt != 255
        labels.append(is_object[gt[valid]])
        for prior, name in (("bb", "box_obj"), ("seg", "seg_obj")):
            maps[prior].append(inputs[name][valid])
            maps[f"{prior}_superpixel_mean"].append(superpixel_mean(inputs[name], inputs["superpixels"])[valid])
    positive = np.concatenate(labels)
    report = {
        "benchmark": "objectness_msrc21",
        "images": len(ids),
        "object_pixels": int(positive.sum()),
        "stuff_pixels": int(positive.size - positive.sum()),
        "roc_auc_object_vs_stuff": {k: round(roc_auc(positive, np.concatenate(v)), 3) for k, v in maps.items()},
        "median_ms_per_image": {k: round(float(np.median(v)), 1) for k, v in costs.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
