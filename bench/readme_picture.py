"""The README's picture: a few MSRC-21-objects val photos, the masks a model trained on image tags
only gives them with segment's defaults (priors ilp,sppxl, --tta auto), and a legend.

    python bench/quality.py --dataset msrc21-objects --split val --seeds 0 --refine   # the model
    python bench/readme_picture.py --model quality-output/msrc21-objects/refined-seed0/model.pt

Top row the photos, bottom row each photo blended with its mask in the VOC colours
(background left as the photo, so objects stand out), one legend of the classes shown. The
photos are val images (never trained on; their masks were never used), picked by id (``--ids``).
Written as an adaptive-palette PNG, kept small for the repository (``docs/overlays.png``).
"""
from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
from PIL import Image

from weakseg.tasks.evaluate.scoring import read_gt_classes, read_voc_image
from weakseg.tasks.images import decode_image
from weakseg.tasks.legend import colour, with_legend_strip
from weakseg.tasks.segment.inference import load_model, segment_variants
from weakseg.tasks.segment.tta import AUTO

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21-objects"
# The first val photo (in id order) of cow, aeroplane, sheep and car: picked by that rule before any mask was seen.
IDS = ("1_8_s", "4_1_s", "9_2_s", "7_2_s")


def overlay(rgb: np.ndarray, labels: np.ndarray, background: int | None, alpha: float = 0.6) -> np.ndarray:
    """The photo with each labelled pixel tinted by its class colour; background (and 255) left as is."""
    colours = np.array([colour(i) for i in range(256)], np.float32)
    tint = colours[labels]
    keep = labels == 255 if background is None else (labels == 255) | (labels == background)
    out = (1 - alpha) * rgb.astype(np.float32) + alpha * tint
    out[keep] = rgb[keep]
    return out.clip(0, 255).astype(np.uint8)


def fit_height(a: np.ndarray, height: int, resample: int) -> np.ndarray:
    h, w = a.shape[:2]
    return np.asarray(Image.fromarray(a).resize((round(w * height / h), height), resample))


def picture(model: str, data: Path, ids: tuple[str, ...], height: int = 150, gap: int = 4) -> Image.Image:
    bundle = load_model(model, "cpu")
    classes = list(bundle.classes)
    background = classes.index("background") if "background" in classes else None
    tops, bottoms, shown = [], [], []
    for image_id in ids:
        rgb = np.asarray(decode_image(read_voc_image(str(data), image_id)).image)
        labels = segment_variants(bundle, rgb, variants=["ilp+sppxl"], tta=AUTO)["ilp+sppxl"]
        tops.append(fit_height(rgb, height, Image.BILINEAR))
        bottoms.append(fit_height(overlay(rgb, labels, background), height, Image.BILINEAR))
        shown.append(labels.ravel())

    def row(tiles: list[np.ndarray]) -> np.ndarray:
        spacer = np.full((height, gap, 3), 255, np.uint8)
        return np.concatenate([x for t in tiles for x in (t, spacer)][:-1], axis=1)

    grid = np.concatenate([row(tops), np.full((gap, row(tops).shape[1], 3), 255, np.uint8), row(bottoms)], axis=0)
    found = np.concatenate(shown)
    legend_labels = found[(found != 255) & (found != (background if background is not None else -1))]
    return Image.fromarray(with_legend_strip(grid, classes, np.unique(legend_labels)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a checkpoint trained on MSRC-21-objects tags only")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--ids", default=",".join(IDS), help="val image ids, left to right")
    parser.add_argument("--height", type=int, default=150)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "overlays.png"))
    args = parser.parse_args()
    ids = tuple(args.ids.split(","))
    gt_classes = read_gt_classes(args.data)
    img = picture(args.model, Path(args.data), ids, args.height)
    buf = io.BytesIO()
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(buf, "PNG",
                                                                                                optimize=True)
    Path(args.out).write_bytes(buf.getvalue())
    print(f"{args.out}: {img.size[0]}x{img.size[1]}, {len(buf.getvalue()) // 1024} KB, classes of {args.data}: "
          f"{len(gt_classes)}")


if __name__ == "__main__":
    main()
