"""The demo: the whole life cycle on embedded defaults, offline, on 2 CPU cores.

synthetic photos-like data -> the life-cycle flow (shard-imagenet -> train-mil with a frozen
offline-pretrained backbone -> refine-mil -> promote-model into ``{workdir}/registry`` ->
segment-corpus of the validation images with the promoted, refined release) ->
evaluate-segmentation of that run -> the MIL model's δ_k on training images -> every prior
variant of the MIL model, and the refined model's chain step by step, scored from one forward
pass an image (:func:`~weakseg.tasks.evaluate.variants.score_variants`, as the quality tables
are) -> a short report (mean IoU per variant, a DuckDB query and overlays with a legend of
the delivered run). Everything lives under ``workdir``; a second run resumes the life cycle
where it stopped and reuses the data, shards and models.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from weakseg.flows._params import with_parameters
from weakseg.flows.choose_thresholds import read_split, search, write
from weakseg.flows.evaluate_segmentation import evaluate_segmentation
from weakseg.flows.life_cycle import life_cycle
from weakseg.flows.params import demo as P
from weakseg.tasks import storage
from weakseg.tasks.devices import native_bf16
from weakseg.tasks.evaluate.scoring import read_split_ids
from weakseg.tasks.evaluate.variants import score_variants, threshold_variants
from weakseg.tasks.images import voc_palette
from weakseg.tasks.legend import with_legend_strip
from weakseg.tasks.segment.inference import load_model, load_thresholds
from weakseg.tasks.segment.priors import VARIANTS
from weakseg.tasks.synthetic import write_synthetic_dataset

REFINED = "refined ilp+sppxl"  # the report's row for the refined model with the default chain
# The refined model's chain up to the default, step by step: a prior that lowers the product shows.
REFINED_STEPS = ("base", "ilp")
# Training and refining in bf16 where the CPU multiplies it natively (AMX, AVX512-BF16: 1.4-1.6x faster);
# fp32 elsewhere, where bf16 is emulated and no faster. The forward passes that score the demo stay fp32.
PRECISION = "bf16" if native_bf16() else "fp32"
# The demo's own training settings (the commands' defaults are for real photos on GPUs).
TRAIN_OPTIONS = {"batch_size": 16, "head_widths": [128, 128, 128], "lr": 1e-3, "num_workers": 2,
                 "checkpoint_every": 0, "rotation": 5.0, "scale": [0.9, 1.1], "precision": PRECISION}
# Output stride 16 where the head's 9x9 cells fit the images (129 px): a training step costs a third of one at
# stride 8, and on the dev copy (--seed 1) its MIL model scored higher at the default size (docs/method.md,
# *The demo's length*); smaller images train at 8.
STRIDE_16_MIN_SIZE = 129
# The refinement at refine's defaults (pseudo-label views, a soup of two, one round), in the demo's precision.
REFINE_OPTIONS = {"num_workers": 2, "precision": PRECISION}
# Test-time views of the demo's other forward passes (gate, segment, δ, the report's rows): one view at twice the
# forward size, not segment's `auto` (1.25). The demo's 160 px images give its stride-16 network 10 score cells a
# side at the plain size; its settings were chosen at `2` (docs/method.md, *The demo's length*), and at `1.25` the
# refined default chain fell from 0.545 to 0.459 mean IoU (background 0.874 -> 0.819).
TTA = "2"
# The promotion gate scores the first val images only: it runs (every stage of the cycle does), but the first
# promotion into the demo's fresh registry has no current release to beat, and segment scores them all anyway.
PROMOTE_OPTIONS: dict[str, Any] = {"limit": 16, "tta": TTA}
THRESHOLD_IMAGES = 48  # training images δ_k of the bb/seg variants is chosen on

__all__ = ["demo"]


@task
def make_data(data: str, n_train: int, n_val: int, size: int, seed: int) -> dict[str, Any]:
    if storage.exists(storage.join(data, "synthetic.json")):
        return storage.read_json(storage.join(data, "synthetic.json"))
    return write_synthetic_dataset(data, n_train=n_train, n_val=n_val, seed=seed, size=size,
                                   background_fraction=0.15)


@task
def list_split(data: str, split: str, dest: str) -> str:
    """A text manifest of one split's images, the input segment-corpus reads."""
    ids = read_split_ids(data, split)
    lines = "\n".join(storage.join(data, "JPEGImages", f"{i}.jpg") for i in ids)
    storage.write_bytes(dest, (lines + "\n").encode())
    return dest


def choose_thresholds(model: str, data: str, n_images: int, out: str) -> dict[str, str]:
    """δ_k of every variant with SP-bb or SP-seg, on training images (never the scored ones): the
    choose-thresholds flow's tasks, all variants in one pass over the images."""
    urls = {v: storage.join(out, f"thresholds-{v.replace('+', '-')}.json") for v in threshold_variants()}
    missing = [v for v, url in urls.items() if not storage.exists(url)]
    if missing:
        ids = read_split(data, "train", n_images)
        for v, chosen in search(model, "cpu", data, ids, {v: VARIANTS[v] for v in missing}, 512, 0, TTA).items():
            write(urls[v], chosen, chosen.how)
    return urls


@task
def score(data: str, workdir: str, run_id: str) -> dict[str, Any]:
    """evaluate-segmentation of one segment-corpus run on the val images."""
    return evaluate_segmentation(predictions=storage.join(workdir, "segmentation"), ground_truth=data, split="val",
                                 run_id=run_id, out=storage.join(workdir, "evaluation", run_id))


@task
def score_chains(model: str, data: str, variants: list[str], thresholds: dict[str, str]) -> dict[str, dict]:
    """Mean IoU and per-class IoU of each variant on the val images, all from one forward pass an
    image (the demo's views, :data:`TTA`); δ of a variant from its thresholds file."""
    bundle = load_model(model, "cpu")
    deltas = {}
    for variant, url in thresholds.items():
        prior, delta, _, _ = load_thresholds(url, bundle.classes)
        deltas[variant] = {prior: delta}
    return score_variants(bundle, data, "val", deltas, variants, tta=TTA)


@task
def write_overlays(segmentation: str, data: str, run_id: str, dest: str, limit: int = 6) -> list[str]:
    """Image | mask | blend PNGs of a few segmented images, a legend of their classes under each, for people."""
    masks, images = (storage.join(segmentation, table, "**", "*.parquet") for table in ("masks", "images"))
    rows = storage.duckdb_connection(segmentation).execute(
        "SELECT i.image_uri, m.mask_png FROM read_parquet(?, hive_partitioning=true) m "
        "JOIN read_parquet(?, hive_partitioning=true) i USING (run_id, image_key) "
        "WHERE m.run_id = ? ORDER BY i.image_uri LIMIT ?",
        [masks, images, run_id, limit],
    ).fetchall()
    classes = storage.duckdb_connection(segmentation).execute(
        "SELECT classes FROM read_parquet(?, hive_partitioning=true) WHERE run_id = ?",
        [storage.join(segmentation, "runs", "**", "*.parquet"), run_id]).fetchone()[0]
    palette = np.array(voc_palette(), np.uint8).reshape(-1, 3)
    written = []
    for uri, png in rows:
        rgb = np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))
        labels = np.asarray(Image.open(io.BytesIO(png)))
        colour = palette[labels]
        tile = np.concatenate([rgb, colour, (0.5 * rgb + 0.5 * colour).astype(np.uint8)], axis=1)
        tile = with_legend_strip(tile, classes, labels)
        url = storage.join(dest, uri.rsplit("/", 1)[-1].rsplit(".", 1)[0] + ".png")
        buf = io.BytesIO()
        Image.fromarray(tile).save(buf, "PNG")
        storage.write_bytes(url, buf.getvalue())
        written.append(url)
    return written


QUERY = ("SELECT class_name, count(*) AS images, round(avg(area_fraction), 3) AS mean_area "
         "FROM read_parquet(?, hive_partitioning=true) WHERE run_id = ? GROUP BY class_name ORDER BY images DESC")


def _query(segmentation: str, run_id: str) -> tuple[str, list, list[tuple]]:
    """The report's DuckDB query over the regions table, its values bound (never pasted into the SQL)."""
    params = [storage.join(segmentation, "regions", "**", "*.parquet"), run_id]
    return QUERY, params, storage.duckdb_connection(segmentation).execute(QUERY, params).fetchall()


@flow(name="demo")
@with_parameters(P.demo)
def demo(workdir, n_train, n_val, size, epochs, refine_epochs, seed) -> dict[str, Any]:
    """Run the whole pipeline and print a report; returns it."""
    if "://" not in workdir:  # manifests below list image paths: make them absolute
        workdir = os.path.abspath(workdir)
    data, segmentation = storage.join(workdir, "data"), storage.join(workdir, "segmentation")
    make_data(data, n_train, n_val, size, seed)
    images = list_split(data, "val", storage.join(workdir, "val-images.txt"))
    cycle = life_cycle(
        source=storage.join(data, "labels.csv"), registry=storage.join(workdir, "registry"), images=images,
        out=segmentation, work=workdir, cycle_id="demo", ground_truth=data, refine=refine_epochs > 0,
        priors="ilp,sppxl", device="cpu", shard_options={"max_side": size},
        train_options={**TRAIN_OPTIONS, "epochs": epochs, "input_size": size,
                       "output_stride": 16 if size >= STRIDE_16_MIN_SIZE else 8},
        refine_options={**REFINE_OPTIONS, "epochs": refine_epochs, "input_size": size} if refine_epochs else {},
        promote_options=PROMOTE_OPTIONS,
        segment_options={"run_id": "demo-refined" if refine_epochs else "demo-cycle", "tta": TTA})
    run_id = cycle["run_id"]  # the val images segmented by the delivered release
    results: dict[str, dict] = {}
    model = storage.join(workdir, "model", "model.pt")  # the MIL model, before refinement
    thresholds = choose_thresholds(model, data, THRESHOLD_IMAGES, workdir)
    results.update(score_chains(model, data, list(VARIANTS), thresholds))
    if refine_epochs:  # the cycle segmented the val images with its promoted release, the refined model
        steps = score_chains(cycle["candidate"]["url"], data, list(REFINED_STEPS), {})
        results.update({f"refined {step}": steps[step] for step in REFINED_STEPS})
        results[REFINED] = score(data, workdir, run_id)
    else:
        results["ilp+sppxl"] = score(data, workdir, run_id)  # the delivered run, segment-corpus + evaluate
    overlays = write_overlays(segmentation, data, run_id, storage.join(workdir, "overlays"))
    sql, params, rows = _query(segmentation, run_id)
    report = {
        "mean_iou": {v: round(m["mean_iou"], 4) for v, m in results.items()},
        "pixel_accuracy": {v: round(m["pixel_accuracy"], 4) for v, m in results.items()},
        "background_iou": {v: round(m["per_class"]["background"]["iou"], 4) for v, m in results.items()},
        "duckdb": {"sql": sql, "parameters": params, "rows": rows},
        "overlays": storage.join(workdir, "overlays"),
        "tables": segmentation,
    }
    lines = ["| variant | mean IoU | pixel accuracy | background IoU |", "|---|---|---|---|"]
    lines += [f"| {v} | {report['mean_iou'][v]:.3f} | {report['pixel_accuracy'][v]:.3f} | "
              f"{report['background_iou'][v]:.3f} |" for v in results]
    create_markdown_artifact("\n".join(lines), key="demo-report", description="weakseg demo: mean IoU per prior")
    print("\nweakseg demo: mean IoU on the synthetic validation images, per prior variant")
    print("\n".join(lines))
    print(f"\nDuckDB over the output tables (run {run_id}):\n  con.execute({sql!r},\n              {params!r})")
    for row in rows:
        print("   ", row)
    print(f"\nLife cycle {cycle['cycle_id']}: " + ", ".join(f"{k} {v}" for k, v in cycle["steps"].items())
          + f"; current release {cycle['candidate']['model_id']} in {workdir}/registry")
    print(f"\nOverlays (image | mask | blend, with a legend): {report['overlays']} ({len(overlays)} files)")
    print(f"Tables: {segmentation}/{{images,regions,masks,errors,runs}}; metrics: {workdir}/evaluation/")
    storage.write_bytes(storage.join(workdir, "report.json"), json.dumps(report, indent=2, default=str).encode())
    return report
