"""evaluate-segmentation: score a segment-corpus run against PASCAL VOC-layout ground truth.

ground truth index (classes, split ids) -> the run (latest by default) and its classes ->
find its masks for the split -> score in chunks -> ``{out}/metrics.json``,
``{out}/per_class.parquet``, ``{out}/confusion.parquet``, ``{out}/per_image.parquet`` and
the ``evaluate-segmentation`` table artifact. The metric conventions are documented in
:mod:`weakseg.tasks.evaluate.scoring`. Images that cannot be scored (no prediction, no ground
truth, a mask of another size, bad values) are counted in ``metrics.json`` and listed with
the reason in ``per_image.parquet``; they never stop the run.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.task_runners import ThreadPoolTaskRunner

from weakseg.flows._params import with_parameters
from weakseg.flows._progress import Progress
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.flows.params import evaluate_segmentation as P
from weakseg.tasks import storage
from weakseg.tasks.evaluate.scoring import (
    ClassAlignment,
    ImageScore,
    PredictedMask,
    align_classes,
    confusion_table,
    find_predicted_masks,
    gt_mask_url,
    latest_run,
    metrics_document,
    per_class_table,
    per_image_table,
    read_gt_classes,
    read_runs,
    read_split_ids,
    score_image,
    unmatched_scores,
)

__all__ = ["evaluate_segmentation"]

_RETRY = {**IO_RETRIES, "cache_policy": NONE}


@task(**_RETRY, retry_condition_fn=retry_unless(ValueError))
def read_ground_truth(ground_truth: str, split: str) -> tuple[tuple[str, ...], list[str]]:
    """Class names and the split's image ids (I/O: retried)."""
    return read_gt_classes(ground_truth), read_split_ids(ground_truth, split)


@task(**_RETRY, retry_condition_fn=retry_unless(ValueError))
def read_run(predictions: str, run_id: str | None, include_failed: bool = False) -> dict[str, Any]:
    """The runs-table row of the run to score (I/O: retried)."""
    return latest_run(read_runs(predictions), run_id, include_failed)


@task(**_RETRY, retry_condition_fn=retry_unless(ValueError))
def read_masks(predictions: str, run_id: str, image_ids: list[str]) -> tuple[dict[str, PredictedMask], dict]:
    """The run's masks for the split's images (I/O: retried)."""
    return find_predicted_masks(predictions, run_id, image_ids)


def _read_gt(ground_truth: str, image_id: str) -> bytes | None:
    url = gt_mask_url(ground_truth, image_id)
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        return None


@task(**_RETRY, task_run_name="score-{first}")
def score_chunk(ground_truth: str, masks: list[PredictedMask], alignment: ClassAlignment,
                first: int) -> list[ImageScore]:
    """Read each image's ground truth and score its mask (I/O: retried; bad files become statuses)."""
    return [score_image(m.image_id, _read_gt(ground_truth, m.image_id), m, alignment) for m in masks]


@task(**_RETRY)
def write_outputs(out: str, doc: dict[str, Any], scores: list[ImageScore], alignment: ClassAlignment) -> None:
    """metrics.json and the Parquet tables, each written atomically (I/O: retried)."""
    storage.write_bytes(storage.join(out, "per_class.parquet"), storage.parquet_bytes(per_class_table(doc)))
    storage.write_bytes(storage.join(out, "confusion.parquet"), storage.parquet_bytes(confusion_table(doc)))
    storage.write_bytes(storage.join(out, "per_image.parquet"),
                        storage.parquet_bytes(per_image_table(scores, alignment, doc["run_id"], doc["split"])))
    storage.write_json(storage.join(out, "metrics.json"), doc)  # last: its presence means complete


@task(cache_policy=NONE)
def publish(doc: dict[str, Any], out: str) -> None:
    """Per-class IoU as the ``evaluate-segmentation`` table artifact; image counts in its description."""
    def pct(x: float | None) -> float | None:
        return None if x is None else round(100 * x, 2)

    rows = [{"class": name, "iou_%": pct(v["iou"]), "accuracy_%": pct(v["accuracy"]), "gt_pixels": v["gt_pixels"],
             "pred_pixels": v["pred_pixels"], "gt_images": v["gt_images"]} for name, v in doc["per_class"].items()]
    rows.append({"class": "mean", "iou_%": pct(doc["mean_iou"]), "accuracy_%": pct(doc["mean_class_accuracy"]),
                 "gt_pixels": doc["pixels"], "pred_pixels": None, "gt_images": doc["images"]["scored"]})
    im = doc["images"]
    create_table_artifact(
        key="evaluate-segmentation",
        table=rows,
        description=(
            f"run {doc['run_id']} (model {doc['model_id']}) on split {doc['split']}: mean IoU "
            f"{pct(doc['mean_iou'])}%, pixel accuracy {pct(doc['pixel_accuracy'])}%; "
            f"{im['scored']}/{im['ground_truth']} images scored, "
            f"{im['missing_prediction']} without prediction, {im['missing_ground_truth']} without ground truth, "
            f"{im['size_mismatch']} size mismatches, {im['invalid']} invalid, {im['ambiguous']} ambiguous; "
            f"{im['masks_without_ground_truth']} masks of the run not in the split. "
            f"{storage.redact_url(storage.join(out, 'metrics.json'))}"
        ),
    )


@flow(name="evaluate-segmentation", task_runner=ThreadPoolTaskRunner(max_workers=4))
@with_parameters(P.evaluate_segmentation)
def evaluate_segmentation(predictions, ground_truth, split, out, run_id, include_failed, unlabelled_as_background,
                          chunk_size) -> dict[str, Any]:
    """Score one run; returns the metrics.json document."""
    logger = get_run_logger()
    out = out or storage.join(predictions, "evaluation")
    storage.require_buckets({"--out": out})
    gt_classes, ids = read_ground_truth(ground_truth, split)
    if not ids:
        raise ValueError(f"split {split!r} of {ground_truth} lists no images")
    run = read_run(predictions, run_id, include_failed)
    if run.get("state") == "Failed":
        logger.warning("run %s ended Failed: its tables may lack images", run["run_id"])
    alignment = align_classes(gt_classes, run["classes"], unlabelled_as_background)
    extra = [c for c in alignment.columns[len(gt_classes):]]
    logger.info("scoring run %s (%d classes) on %d %s images of %s (%d classes); extra columns: %s",
                run["run_id"], len(run["classes"]), len(ids), split, storage.redact_url(ground_truth), len(gt_classes),
                extra or "none")
    found, counts = read_masks(predictions, run["run_id"], ids)
    scores = unmatched_scores(ids, found, counts)
    matched = [found[i] for i in ids if i in found]
    futures = [score_chunk.submit(ground_truth, matched[i : i + chunk_size], alignment, i)
               for i in range(0, len(matched), chunk_size)]
    with Progress("evaluate-segmentation-progress", "evaluate", total=len(matched)) as progress:
        for future in futures:
            chunk = future.result()
            scores.extend(chunk)
            progress.update(len(chunk), failed=sum(s.status != "scored" for s in chunk))
    doc = metrics_document(scores, alignment, run_id=run["run_id"], model_id=run.get("model_id"), split=split,
                           predictions=storage.redact_url(predictions),
                           ground_truth=storage.redact_url(ground_truth), gt_images=len(ids), match_counts=counts)
    if doc["images"]["scored"] == 0:
        raise ValueError(f"no image of split {split!r} could be scored: {doc['images']} "
                         "(do the image stems or keys of the run match the ground-truth ids?)")
    write_outputs(out, doc, scores, alignment)
    publish(doc, out)
    logger.info("mean IoU %.4f, pixel accuracy %.4f over %d/%d images -> %s", doc["mean_iou"] or float("nan"),
                doc["pixel_accuracy"] or float("nan"), doc["images"]["scored"], len(ids), storage.redact_url(out))
    return doc
