"""How to learn background from image tags: the options compared on MSRC-21-objects' dev split.

A quick, controlled comparison (not the reported figures, which come from bench/quality.py):
the frozen backbone's features of the train images (dev excluded; longer side 288 px, and
their mirror images) are computed once, the Table-1 head (256 wide) is trained on them with
the LSE and the multi-label loss for ``--epochs``, once per background mode of
:func:`weakseg.models.losses.background_index`:

- ``as-tagged``: the paper's literal reading, background only for images tagged with it;
- ``every-image``: background a tag of every image (the default, ``--background auto``).

Each model is then scored on the 71 dev images (``bench/msrc21_dev.txt``) for the prior
chains, with the mask-free default δ. Prints JSON: mean IoU, background IoU, pixel accuracy.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from weakseg.models import ModelConfig, create_model, mil_loss
from weakseg.models.checkpoint import Checkpoint
from weakseg.models.losses import background_index, with_background
from weakseg.tasks.evaluate.scoring import (
    align_classes,
    confusion_matrix,
    read_gt_classes,
    segmentation_metrics,
    voc_image_url,
)
from weakseg.tasks.evaluate.variants import iter_voc
from weakseg.tasks.segment.inference import ModelBundle, segment_variants
from weakseg.tasks.tensors import normalize

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21-objects"
DEV_IDS = Path(__file__).with_name("msrc21_dev.txt")
CHAINS = ("base", "ilp", "ilp+sppxl", "ilp+seg", "ilp+sppxl+seg")


@torch.no_grad()
def features(model, config, data: Path, ids: list[str], side: int) -> dict[str, list[torch.Tensor]]:
    out = {}
    for image_id in ids:
        img = Image.open(voc_image_url(str(data), image_id)).convert("RGB")
        scale = side / max(img.size)
        img = img.resize((round(img.size[0] * scale), round(img.size[1] * scale)), Image.BILINEAR)
        out[image_id] = []
        for im in (img, img.transpose(Image.FLIP_LEFT_RIGHT)):
            x = torch.from_numpy(np.array(im)).permute(2, 0, 1)[None]
            out[image_id].append(model.backbone(normalize(x, config.mean, config.std))[0])
    return out


def train_head(model, feats, targets: dict[str, torch.Tensor], epochs: int, lr: float, seed: int) -> None:
    """SGD on the head alone; batches of 16 feature maps of one size, a random mirror each."""
    rng = random.Random(seed)
    opt = torch.optim.SGD(model.head.parameters(), lr=lr, momentum=0.9, weight_decay=5e-5)
    model.head.train()
    for _ in range(epochs):
        groups = defaultdict(list)
        for image_id, pair in feats.items():
            groups[tuple(pair[0].shape)].append(image_id)
        batches = []
        for ids in groups.values():
            rng.shuffle(ids)
            batches += [ids[i:i + 16] for i in range(0, len(ids), 16)]
        rng.shuffle(batches)
        for ids in batches:
            fm = torch.stack([feats[i][rng.random() < 0.5] for i in ids])
            scores = model.pool(model.head_maps(fm, dense=True))
            loss = mil_loss(scores, torch.stack([targets[i] for i in ids]), "softmax+bce")
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.head.eval()


def score(model, config, classes, data: Path, ids: list[str]) -> dict[str, dict[str, float]]:
    bundle = ModelBundle(Checkpoint(model, config, classes, 288), torch.device("cpu"), "bench", "bench")
    alignment = align_classes(read_gt_classes(str(data)), classes)
    conf = {v: np.zeros((len(alignment.gt_classes), len(alignment.columns)), np.int64) for v in CHAINS}
    for _, rgb, gt in iter_voc(str(data), ids):
        for v, mask in segment_variants(bundle, rgb, variants=CHAINS).items():
            conf[v] += confusion_matrix(gt, mask, alignment)
    out = {}
    for v in CHAINS:
        m = segmentation_metrics(conf[v], alignment)
        out[v] = {"mean_iou": round(m["mean_iou"], 4), "background_iou": round(m["per_class"]["background"]["iou"], 4),
                  "pixel_accuracy": round(m["pixel_accuracy"], 4)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--modes", default="every-image,as-tagged")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = Path(args.data)
    classes = [c.strip() for c in (data / "classes.txt").read_text().splitlines() if c.strip()]
    rows = [line.split(",") for line in (data / "labels.csv").read_text().splitlines()[1:]]
    dev = sorted(DEV_IDS.read_text().split())
    train = sorted(r[0] for r in rows if r[1] == "train" and r[0] not in set(dev))
    tags = {r[0]: [classes.index(t) for t in r[2].split(";")] for r in rows}
    torch.manual_seed(args.seed)
    config = ModelConfig(num_classes=len(classes), head_widths=(256, 256, 256), image_prior="sigmoid")
    model, config = create_model(config, pretrained="auto")
    model.eval()
    started = time.perf_counter()
    feats = features(model, config, data, train, 288)
    initial = {k: v.clone() for k, v in model.head.state_dict().items()}
    report = {"benchmark": "background_modes", "dev_images": len(dev), "train_images": len(train),
              "epochs": args.epochs, "results": {}}
    for mode in args.modes.split(","):
        model.head.load_state_dict(initial)
        index = background_index(classes, mode)
        targets = {}
        for image_id in train:
            t = torch.zeros(1, len(classes))
            t[0, tags[image_id]] = 1.0
            targets[image_id] = with_background(t, index)[0]
        train_head(model, feats, targets, args.epochs, args.lr, args.seed)
        report["results"][mode] = score(model, config, classes, data, dev)
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
