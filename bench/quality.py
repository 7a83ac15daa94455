"""The paper's Table 4 on real photos: MSRC-21 or MSRC-21-objects, weak training on image tags only.

The photos' train split is cut in two: a fixed **dev** split (``bench/msrc21_dev.txt``, 71
of the 355 train ids, drawn once with ``random.Random(12).sample``) on which every setting
is chosen, and the rest, on which the weak model trains (tags only). ``--split val`` scores
the 236 val images: the reported figure, run once with the settings dev chose.

Per seed: ``weakseg shard`` of the tags -> ``weakseg train`` (the flows the CLI runs, with
the README's settings) -> ``weakseg segment`` with the default priors and ``weakseg
evaluate`` on the split (the CLI path, the headline) -> every prior variant scored from one
forward pass (:func:`weakseg.tasks.evaluate.variants.score_variants`, with the commands' default
``--tta``; δ_k of SP-bb / SP-seg chosen on
the training images' masks for the variants marked "δ fitted", the mask-free default δ
otherwise). Prints JSON and a markdown table: mean ± standard deviation over the seeds of
mean IoU, pixel accuracy (and background IoU) per variant. ``--refine`` scores each seed's
model after ``weakseg refine`` with its defaults instead. ``make quality`` runs both data
sets on val. Models and each seed's scores are kept in the work folder (``scores/``), so a
run stopped between seeds resumes there.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

# Before Prefect is imported: the embedded server gets time to start on a busy machine, and stays offline.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from weakseg.tasks import storage
from weakseg.tasks.devices import TRAIN_PRECISIONS, native_bf16
from weakseg.tasks.evaluate.scoring import read_split_ids, voc_image_url
from weakseg.tasks.evaluate.variants import fit_thresholds, score_variants, thresholds_by_variant
from weakseg.tasks.segment.inference import ModelBundle, load_model
from weakseg.tasks.segment.priors import VARIANTS
from weakseg.tasks.segment.tta import AUTO

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASETS = {"msrc21": SHARED / "msrc21", "msrc21-objects": SHARED / "msrc21-objects"}
DEV_IDS = Path(__file__).with_name("msrc21_dev.txt")
# The README's training command (weakseg train ...) and segment defaults; one path for both. EfficientNet-Lite2
# (offline weights, like Lite0's): on MSRC-21-objects dev its refined model scored 0.644 mean IoU against 0.579
# for Lite0's (docs/method.md, *Choices*). bf16 where the CPU multiplies it natively (as on CUDA: `auto`).
PRECISION = "bf16" if native_bf16() else "auto"
TRAIN = {"backbone": "tf_efficientnet_lite2", "precision": PRECISION,
         "epochs": 10, "batch_size": 16, "input_size": 288, "head_widths": [256, 256, 256], "output_stride": 16,
         "lr": 1e-3, "num_workers": 2, "checkpoint_every": 0, "progress": False,
         "val_every": 0}  # image-level validation changes nothing in the model; scoring is below
MAX_SIDE = 320
DEFAULT_CHAIN = "ilp+sppxl"  # weakseg segment's default priors, as a variant name
REFINE_WORKERS = 1  # the refinement's DataLoader workers: the machine's second core runs the steps


def dev_layout(data: Path, dest: Path) -> Path:
    """The data set with its train split cut into train (the rest) and dev; images linked, not copied."""
    dev = set(DEV_IDS.read_text().split())
    (dest / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    for name in ("JPEGImages", "SegmentationClass", "classes.txt"):
        if not (dest / name).exists():
            (dest / name).symlink_to((data / name).resolve())
    lines = (data / "labels.csv").read_text().splitlines()
    rows, splits = [lines[0]], {"train": [], "dev": [], "val": []}
    for line in lines[1:]:
        image_id, split, labels = line.split(",")
        split = "dev" if split == "train" and image_id in dev else split
        splits[split].append(image_id)
        rows.append(f"{image_id},{split},{labels}")
    (dest / "labels.csv").write_text("\n".join(rows) + "\n")
    for split, ids in splits.items():
        (dest / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return dest


def shrunk_layout(layout: Path, dest: Path, factor: float = 0.5, splits: tuple[str, ...] = ("dev", "val")) -> Path:
    """``layout``'s ``splits`` with every photo and mask shrunk to ``factor`` of its side (small objects: at
    one half, each object has a quarter of its pixels). Photos by area averaging, masks by nearest neighbour."""
    from PIL import Image

    from weakseg.tasks.evaluate.scoring import gt_mask_url

    (dest / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    (dest / "JPEGImages").mkdir(exist_ok=True)
    (dest / "SegmentationClass").mkdir(exist_ok=True)
    if not (dest / "classes.txt").exists():
        (dest / "classes.txt").symlink_to((layout / "classes.txt").resolve())
    for split in splits:
        ids = read_split_ids(str(layout), split)
        for image_id in ids:
            jpg, png = dest / "JPEGImages" / f"{image_id}.jpg", dest / "SegmentationClass" / f"{image_id}.png"
            if jpg.exists() and png.exists():
                continue
            with Image.open(layout / "JPEGImages" / f"{image_id}.jpg") as img:
                size = (max(1, round(img.width * factor)), max(1, round(img.height * factor)))
                img.convert("RGB").resize(size, Image.Resampling.BOX).save(jpg, quality=95)
            with Image.open(gt_mask_url(str(layout), image_id)) as mask:
                mask.resize(size, Image.Resampling.NEAREST).save(png)
        (dest / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return dest


def train(layout: Path, work: Path, seed: int) -> str:
    from weakseg.flows.shard_imagenet import shard_imagenet
    from weakseg.flows.train_mil import train_mil

    shards, out = str(work / "shards"), str(work / f"model-seed{seed}")
    shard_imagenet(source=str(layout / "labels.csv"), dest=shards, max_side=MAX_SIDE)
    if not storage.exists(storage.join(out, "model.pt")):
        train_mil(shards=shards, out=out, seed=seed, **TRAIN)
    return storage.join(out, "model.pt")


def refine(model: str, work: Path, seed: int, options: dict | None = None) -> str:
    """``weakseg refine`` of the seed's model with its defaults, or ``options`` over them (the refinement stage)."""
    from weakseg.flows.refine_mil import refine_mil

    out = str(work / f"refined-seed{seed}")
    if not storage.exists(storage.join(out, "model.pt")):
        refine_mil(shards=str(work / "shards"), model=model, out=out, seed=seed,
                   **{"num_workers": REFINE_WORKERS, "progress": False, **(options or {})})
    return storage.join(out, "model.pt")


def cli_path(model: str, layout: Path, work: Path, split: str, seed: int, tag: str = "") -> dict:
    """The default chain exactly as a user runs it: segment-corpus, then evaluate-segmentation."""
    from weakseg.flows.evaluate_segmentation import evaluate_segmentation
    from weakseg.flows.segment_corpus import segment_corpus

    listing = work / f"{split}-images.txt"
    listing.write_text("".join(f"{voc_image_url(str(layout), i)}\n" for i in read_split_ids(str(layout), split)))
    run_id = f"seed{seed}-{split}{tag}"
    segment_corpus(images=str(listing), model=model, out=str(work / "tables"), run_id=run_id, device="cpu")
    return evaluate_segmentation(predictions=str(work / "tables"), ground_truth=str(layout), split=split,
                                 run_id=run_id, out=str(work / "evaluation" / run_id))


def score_seed(bundle: ModelBundle, layout: Path, split: str, limit: int | None, fit: bool,
               variants: tuple[str, ...] = tuple(VARIANTS), min_side: int = 0) -> dict:
    plain = score_variants(bundle, str(layout), split, None, variants, max_side=MAX_SIDE, limit=limit,
                           min_side=min_side, tta=AUTO)
    if not fit:
        return plain
    found = fit_thresholds(bundle, str(layout), read_split_ids(str(layout), "train"), variants,
                           max_side=MAX_SIDE, min_side=min_side, tta=AUTO)
    fitted = {f"{v} (δ fitted)": t for v, t in thresholds_by_variant(found, bundle.classes).items()}
    tuned = score_variants(bundle, str(layout), split, {v.split(" ")[0]: t for v, t in fitted.items()},
                           tuple(v.split(" ")[0] for v in fitted), max_side=MAX_SIDE, limit=limit,
                           min_side=min_side, tta=AUTO)
    return {**plain, **{f"{v} (δ fitted)": m for v, m in tuned.items()}}


def _scores_path(work: Path, seed: int, refined: bool) -> Path:
    return work / "scores" / f"seed{seed}{'-refined' if refined else ''}.json"


def cached_scores(work: Path, seed: int, refined: bool, key: dict) -> dict | None:
    """A seed's scores from an earlier run of the same model file, split, variants and limit.

    A long run (hours on 2 cores) can be stopped between seeds and extended later
    (``--seeds 0,1`` then ``--seeds 0,1,2``) without re-scoring what it already has.
    """
    path = _scores_path(work, seed, refined)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return doc if doc.get("key") == json.loads(json.dumps(key)) else None


def write_scores(work: Path, seed: int, refined: bool, scores: dict) -> None:
    path = _scores_path(work, seed, refined)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores, default=str))


def summary(per_seed: list[dict], key: str) -> dict[str, list[float]]:
    return {v: [s[v][key] for s in per_seed] for v in per_seed[0]}


def fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def background_iou(metrics: dict) -> float | None:
    return metrics["per_class"].get("background", {}).get("iou")


def markdown(per_seed: list[dict], headline: list[dict]) -> str:
    miou, acc = summary(per_seed, "mean_iou"), summary(per_seed, "pixel_accuracy")
    bg = background_iou(headline[0]) is not None
    bg_of = {v: [background_iou(s[v]) for s in per_seed] for v in miou}
    rows = [f"| {v} | {fmt(miou[v])} | {fmt(acc[v])} |" + (f" {fmt(bg_of[v])} |" if bg else "") for v in miou]
    rows.append(f"| `weakseg segment` defaults (CLI path) | {fmt([h['mean_iou'] for h in headline])} | "
                f"{fmt([h['pixel_accuracy'] for h in headline])} |"
                + (f" {fmt([background_iou(h) for h in headline])} |" if bg else ""))
    head = "| variant | mean IoU | pixel accuracy |" + (" background IoU |" if bg else "")
    return head + "\n|---|---|---|" + ("---|" if bg else "") + "\n" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="msrc21", choices=sorted(DATASETS))
    parser.add_argument("--data", default=None, help="the data set's folder (default: ../shared/data/DATASET)")
    parser.add_argument("--workdir", default=None, help="default: quality-output/DATASET")
    parser.add_argument("--split", default="dev", choices=("dev", "val"),
                        help="dev: choosing settings; val: the reported figure, once")
    parser.add_argument("--seeds", default="0,1,2", help="one fresh training per seed")
    parser.add_argument("--fit-thresholds", action="store_true",
                        help="also score SP-bb/SP-seg variants with δ_k fitted on the training images' masks")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N images")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="the prior variants scored beside the CLI path (comma list)")
    parser.add_argument("--shrink", type=float, default=0.5,
                        help="also score the default chain on the split's photos shrunk to this share of their side "
                             "(small objects); 0: not")
    parser.add_argument("--refine", action="store_true",
                        help="score the refined model (weakseg refine of each seed's model, its defaults)")
    parser.add_argument("--backbone", default=None, help=f"weakseg train --backbone (default: {TRAIN['backbone']})")
    parser.add_argument("--precision", default=None, choices=TRAIN_PRECISIONS,
                        help=f"weakseg train/refine --precision (default here: {PRECISION})")
    parser.add_argument("--refine-options", default="{}", type=json.loads,
                        help='weakseg refine options over its defaults, as JSON (e.g. \'{"finetune_from": 0}\')')
    args = parser.parse_args()
    for key, value in (("backbone", args.backbone), ("precision", args.precision)):
        if value is not None:
            TRAIN[key] = value
    args.refine_options.setdefault("precision", TRAIN["precision"])
    data = Path(args.data or os.environ.get("WEAKSEG_DATA", DATASETS[args.dataset]))
    if not (data / "JPEGImages").is_dir():
        raise SystemExit(f"{args.dataset} not found at {data}")
    work = Path(args.workdir or f"quality-output/{args.dataset}").resolve()
    logging.getLogger("prefect").setLevel(logging.WARNING)
    started = time.perf_counter()
    layout = dev_layout(data, work / "data")
    per_seed, headline, views, shrunk = [], [], [], []
    variants = tuple(args.variants.split(","))
    for seed in (int(s) for s in args.seeds.split(",")):
        model = train(layout, work, seed)
        if args.refine:
            model = refine(model, work, seed, args.refine_options)
        stat = os.stat(model)
        bundle = load_model(model, "cpu")
        min_side = bundle.resolve_min_side(None, MAX_SIDE)  # segment's default --min-side, as the CLI path runs it
        key = {"model": model, "model_size": stat.st_size, "model_mtime_ns": stat.st_mtime_ns, "split": args.split,
               "variants": variants, "limit": args.limit, "fit_thresholds": args.fit_thresholds,
               "tta": bundle.default_tta,  # the views `--tta auto` runs for this model
               "min_side": min_side}
        scores = cached_scores(work, seed, args.refine, key)
        if scores is None:
            scores = {"key": key,
                      "cli": cli_path(model, layout, work, args.split, seed, "-refined" if args.refine else ""),
                      "variants": score_seed(bundle, layout, args.split, args.limit, args.fit_thresholds, variants,
                                             min_side)}
            write_scores(work, seed, args.refine, scores)
        if args.shrink and "shrunk" not in scores:  # small objects: the default chain on photos at half their side
            small = shrunk_layout(layout, work / f"data-x{args.shrink:g}", args.shrink, (args.split,))
            scores["shrunk"] = {"factor": args.shrink, **score_variants(
                bundle, str(small), args.split, None, (DEFAULT_CHAIN,), max_side=MAX_SIDE, limit=args.limit,
                min_side=min_side, tta=AUTO)[DEFAULT_CHAIN]}
            write_scores(work, seed, args.refine, scores)
        shrunk.append(scores.get("shrunk"))
        headline.append(scores["cli"])
        per_seed.append(scores["variants"])
        views.append(key["tta"])
        table = report(args, work, per_seed, headline, views, started, shrunk)  # a partial run still reports
    print(table)


def report(args: argparse.Namespace, work: Path, per_seed: list[dict], headline: list[dict], views: list[str],
           started: float, shrunk: list[dict | None] | None = None) -> str:
    doc = {
        "benchmark": f"quality_{args.dataset}", "split": args.split, "refined": args.refine,
        "seeds": [int(x) for x in args.seeds.split(",")][: len(per_seed)],
        "train": TRAIN, "refine_options": args.refine_options, "max_side": MAX_SIDE,
        "tta": {"spec": AUTO, "views_per_seed": views},  # what `auto` ran: the report names the views
        "cli_default_chain": [{"mean_iou": h["mean_iou"], "pixel_accuracy": h["pixel_accuracy"],
                               "per_class_iou": {c: x["iou"] for c, x in h["per_class"].items()}} for h in headline],
        "mean_iou": summary(per_seed, "mean_iou"), "pixel_accuracy": summary(per_seed, "pixel_accuracy"),
        "per_class_iou": [{v: {c: x["iou"] for c, x in m["per_class"].items()} for v, m in s.items()}
                          for s in per_seed],
        "seconds": round(time.perf_counter() - started, 1),
    }
    small = [x for x in shrunk or [] if x]
    if small:
        doc["shrunk"] = {"factor": small[0]["factor"], "chain": DEFAULT_CHAIN,
                         "mean_iou": [x["mean_iou"] for x in small],
                         "per_class_iou": [{c: m["iou"] for c, m in x["per_class"].items()} for x in small]}
    name = f"quality-{args.split}{'-refined' if args.refine else ''}"
    (work / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str))
    table = markdown(per_seed, headline)
    if small:
        table += (f"\nPhotos shrunk to {small[0]['factor']:g} of their side, {DEFAULT_CHAIN}, `--tta auto`: mean IoU "
                  f"{fmt([x['mean_iou'] for x in small])}\n")
    (work / f"{name}.md").write_text(table)
    return table


if __name__ == "__main__":
    main()
