"""A dense CRF as a pseudo-label step (issue 38, lever 3), measured before building it in: the refinement's
pseudo-labels with and without a CRF, scored against the training photos' own masks (training data, never val).

Per photo, as ``weakseg refine`` labels it (:mod:`weakseg.tasks.train.pseudo_labels`): the model's forward pass with
the refinement's views (``1,2+flip``), the maps restricted to the photo's tags and peak-normalised; then, for each
setting, a fully connected CRF (``pydensecrf2``: Gaussian + bilateral kernels, 8 mean-field iterations) on those
maps, and the superpixel prior and confidence gate on the result. Three scores per setting, each a mean IoU over the
classes present with the share of pixels it labels: ``kept``, the pixels the gate keeps (what the refinement trains
on); ``every``, every pixel's most probable tagged class; ``agreed``, the plain gate's labels where the CRF's most
probable class agrees with them (the CRF as a stricter gate). ``pydensecrf2`` is not a dependency (PyPI has only
its source: Cython and a C++ compiler): ``pip install pydensecrf2`` first. Prints JSON.

    .venv/bin/python bench/crf_pseudo_labels.py --model quality-output/msrc21-objects/model-seed0/model.pt \\
        --data quality-output/msrc21-objects/data --images 100
"""
from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import numpy as np

from weakseg.tasks.evaluate.scoring import read_gt_classes, read_split_ids
from weakseg.tasks.evaluate.variants import read_voc
from weakseg.tasks.segment.inference import compute_prior_inputs, load_model, predict
from weakseg.tasks.segment.priors import UNLABELLED
from weakseg.tasks.train.pseudo_labels import PSEUDO_LABEL_TTA, pseudo_label, restrict_to_tags, tag_mask

PRIORS = ["ilp", "sppxl"]
# name -> (Gaussian sxy, Gaussian weight, bilateral sxy, bilateral srgb, bilateral weight)
SETTINGS = {"none": None, "crf-a": (3, 3, 50, 13, 5), "crf-b": (3, 3, 80, 13, 10), "crf-c": (1, 3, 40, 10, 4)}


def dense_crf(image: np.ndarray, probs: np.ndarray, setting: tuple, iterations: int = 8) -> np.ndarray:
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    sxy_g, w_g, sxy_b, srgb, w_b = setting
    crf = dcrf.DenseCRF2D(image.shape[1], image.shape[0], probs.shape[0])
    crf.setUnaryEnergy(unary_from_softmax(np.clip(probs, 1e-6, 1).astype(np.float32)))
    crf.addPairwiseGaussian(sxy=sxy_g, compat=w_g)
    crf.addPairwiseBilateral(sxy=sxy_b, srgb=srgb, rgbim=np.array(image, dtype=np.uint8, order="C"), compat=w_b)
    return np.array(crf.inference(iterations), dtype=np.float32).reshape(probs.shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the MIL model whose pseudo-labels are scored")
    parser.add_argument("--data", required=True, help="a VOC layout with labels.csv (bench/quality.py's data/)")
    parser.add_argument("--split", default="train", help="training photos only: the refinement labels these")
    parser.add_argument("--images", type=int, default=100, help="photos drawn at random (seed 0) from the split")
    parser.add_argument("--confidence", type=float, default=0.8, help="weakseg refine --confidence")
    parser.add_argument("--max-side", type=int, default=512, help="weakseg refine --max-side")
    args = parser.parse_args()

    bundle = load_model(args.model, "cpu")
    classes = list(bundle.classes)
    k, background = len(classes), classes.index("background") if "background" in classes else None
    data = Path(args.data)
    with open(data / "labels.csv", newline="") as f:
        tags = {row["image_id"]: row["labels"].split(";") for row in csv.DictReader(f)}
    remap = np.full(256, 255, np.uint8)  # the data set's class indices -> the model's
    for i, name in enumerate(read_gt_classes(str(data))):
        remap[i] = classes.index(name)
    ids = read_split_ids(str(data), args.split)
    ids = random.Random(0).sample(ids, min(args.images, len(ids)))

    # per setting and scored label set: intersections and unions per class, and the pixels it labels
    counts = {(name, what): np.zeros((2, k)) for name in SETTINGS for what in ("kept", "every", "agreed")}
    labelled = dict.fromkeys(counts, 0)
    scored = 0

    def count(key: tuple[str, str], labels: np.ndarray, truth: np.ndarray, where: np.ndarray) -> None:
        for c in range(k):
            counts[key][0, c] += ((labels == c) & (truth == c) & where).sum()
            counts[key][1, c] += (((labels == c) | (truth == c)) & where).sum()
        labelled[key] += int(where.sum())

    for image_id in ids:
        rgb, truth = read_voc(str(data), image_id)
        truth = remap[truth]
        probs = predict(bundle, [rgb], args.max_side, tta=PSEUDO_LABEL_TTA)[0].probs()
        inputs, _ = compute_prior_inputs(rgb, PRIORS)
        allowed = tag_mask([classes.index(c) for c in tags[image_id] if c in classes], k, background)
        restricted = restrict_to_tags(probs, allowed, background)  # what pseudo_label reads, the CRF's input
        valid = truth < k
        scored += int(valid.sum())
        plain = pseudo_label(restricted, allowed, PRIORS, args.confidence, inputs, background)
        for name, setting in SETTINGS.items():
            maps = restricted if setting is None else dense_crf(rgb, restricted, setting) * allowed[:, None, None]
            labels = plain if setting is None else pseudo_label(maps, allowed, PRIORS, args.confidence, inputs,
                                                                 background)
            best = maps.argmax(0)
            count((name, "kept"), labels, truth, valid & (labels != UNLABELLED))
            count((name, "every"), best, truth, valid)
            # the plain gate's labels where the CRF's most probable class agrees with them (a stricter gate)
            count((name, "agreed"), plain, truth, valid & (plain != UNLABELLED) & (plain == best))

    report = {"model": args.model, "images": len(ids), "split": args.split, "settings": {}}
    for name in SETTINGS:
        present = counts[(name, "every")][1] > 0
        row: dict = {"kernels": SETTINGS[name]}
        for what in ("kept", "every", "agreed"):
            c = counts[(name, what)]
            iou = c[0][present] / np.maximum(c[1][present], 1)
            row[f"{what}_share"] = round(labelled[(name, what)] / max(scored, 1), 3)
            row[f"{what}_mean_iou"] = round(float(iou.mean()), 3)
            if what == "every":
                row["every_pixel_iou"] = {n: round(float(x), 3)
                                          for n, x in zip(np.array(classes)[present], iou, strict=True)}
        report["settings"][name] = row
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
