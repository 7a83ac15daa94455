"""Mixed precision against fp32 on real photos (issue 36 item 2): the same model, the same views and
priors, the forward pass once in fp32 and once under ``--precision`` (bf16 autocast by default).

Runs on the CPU (torch's CPU autocast); on CUDA bench/gpu.py times the precisions, this measures what they
change. For every image of a VOC layout's split: the labels of both runs (segment's default chain and views
for the model), the share of pixels labelled alike, and mean IoU against the ground truth of each. Prints
one JSON document: ``agreement`` (pixels labelled alike / all), ``mean_iou`` per precision and ``delta``.
Targets: agreement >= 0.99 and |delta| <= 0.005.

    .venv/bin/python bench/precision.py --model quality-output/msrc21-objects/model-seed0/model.pt \\
        --data /work/shared/data/msrc21-objects --split val
"""
from __future__ import annotations

import argparse
import json
import time

from weakseg.tasks.evaluate.scoring import (
    align_classes,
    confusion_matrix,
    read_gt_classes,
    read_split_ids,
    segmentation_metrics,
)
from weakseg.tasks.evaluate.variants import read_voc
from weakseg.tasks.segment.inference import DEFAULT_MAX_SIDE, load_model, predict, segment_image
from weakseg.tasks.segment.priors import parse_priors
from weakseg.tasks.segment.tta import AUTO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained model.pt (weakseg train / refine)")
    parser.add_argument("--data", required=True, help="a VOC layout with ground truth")
    parser.add_argument("--split", default="val")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--priors", default="ilp,sppxl")
    parser.add_argument("--tta", default=AUTO)
    parser.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE)
    parser.add_argument("--limit", type=int, default=0, help="the split's first N images (0: all)")
    args = parser.parse_args()

    bundle = load_model(args.model, "cpu")
    tta = bundle.views(args.tta)
    priors = parse_priors(args.priors)
    alignment = align_classes(read_gt_classes(args.data), bundle.classes)
    ids = read_split_ids(args.data, args.split)
    ids = ids[: args.limit] if args.limit else ids
    runs = ("fp32", args.precision)
    conf = {p: 0 for p in runs}
    seconds = {p: 0.0 for p in runs}
    alike = total = 0
    for image_id in ids:
        rgb, gt = read_voc(args.data, image_id)
        labels = {}
        for p in runs:
            t0 = time.perf_counter()
            pred = predict(bundle, [rgb], args.max_side, tta=tta, precision=p)[0]
            seconds[p] += time.perf_counter() - t0
            labels[p] = segment_image(bundle, rgb, priors, bundle.thresholds, args.max_side, prediction=pred).labels
            conf[p] = conf[p] + confusion_matrix(gt, labels[p], alignment)
        alike += int((labels["fp32"] == labels[args.precision]).sum())
        total += labels["fp32"].size
    miou = {p: segmentation_metrics(conf[p], alignment)["mean_iou"] for p in runs}
    print(json.dumps({
        "model": args.model, "data": args.data, "split": args.split, "images": len(ids), "priors": ",".join(priors),
        "tta": str(tta), "precision": args.precision, "agreement": round(alike / total, 5),
        "mean_iou": {p: round(v, 4) for p, v in miou.items()},
        "delta": round(miou[args.precision] - miou["fp32"], 4),
        "forward_seconds": {p: round(v, 1) for p, v in seconds.items()},
        "targets": {"agreement": ">= 0.99", "abs_delta": "<= 0.005"},
    }, indent=2))


if __name__ == "__main__":
    main()
