"""CPU cost of device-side post-processing (``label_batch``) per image: from the score cells where
they agree (the CPU default) against every class upsampled at every pixel, on real photos.

Prints JSON (not a test). The shortcut's gain depends on how smooth the maps are, so measure
with a trained model (``--model``, e.g. one ``make quality`` trains); without one, the
paper's network with random weights (noisy maps: the shortcut steps aside). Photos: MSRC-21's
(``--photos``, default ``../shared/data/msrc21/JPEGImages``) scaled to ``--side`` px on the longer
side, as VOC's; skipped cleanly when absent.

    .venv/bin/python bench/postprocess.py --model /tmp/q/msrc21/model-seed0/model.pt
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from weakseg.models import ModelConfig, create_model, save_checkpoint  # noqa: E402
from weakseg.tasks.segment.inference import compute_prior_inputs, load_model, predict  # noqa: E402
from weakseg.tasks.segment.postprocess import label_batch  # noqa: E402

CHAINS = (("ilp",), ("ilp", "sppxl"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="a trained checkpoint (default: random weights, paper head)")
    p.add_argument("--photos", default=str(ROOT.parent / "shared" / "data" / "msrc21" / "JPEGImages"))
    p.add_argument("--images", type=int, default=24)
    p.add_argument("--side", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    files = sorted(Path(args.photos).glob("*.jpg"))[: args.images]
    if not files:
        print(json.dumps({"skipped": f"no photos at {args.photos}"}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if not model:
            torch.manual_seed(0)
            config = ModelConfig(num_classes=21, head_widths=(1024, 768, 512), output_stride=16)
            net, config = create_model(config, pretrained="none")
            model = str(Path(tmp) / "model.pt")
            save_checkpoint(model, net, config, [f"class{i}" for i in range(21)], input_size=320)
        bundle = load_model(model, "cpu")
    images = []
    for f in files:
        im = cv2.cvtColor(cv2.imread(str(f)), cv2.COLOR_BGR2RGB)
        scale = args.side / max(im.shape[:2])
        images.append(cv2.resize(im, (round(im.shape[1] * scale), round(im.shape[0] * scale))))
    preds = predict(bundle, images, tta="1")
    k = len(bundle.classes)
    report: dict = {"model": args.model or "random weights, 1024/768/512 head", "classes": k,
                    "images": len(images), "side": args.side, "torch_threads": torch.get_num_threads()}
    for chain in CHAINS:
        inputs = [compute_prior_inputs(im, chain)[0] for im in images]
        best = {True: float("inf"), False: float("inf")}
        for _ in range(args.repeats):  # interleaved, best of repeats: the machine may be shared
            for from_cells in (True, False):
                t0 = time.perf_counter()
                for pred, ins in zip(preds, inputs, strict=True):
                    label_batch([pred], [ins], chain, {}, k, bundle.background_index, "cpu", from_cells=from_cells)
                best[from_cells] = min(best[from_cells], (time.perf_counter() - t0) * 1000 / len(images))
        report[",".join(chain)] = {"ms_per_image_from_cells": round(best[True], 1),
                                   "ms_per_image_every_class": round(best[False], 1),
                                   "speed-up": round(best[False] / best[True], 2)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
