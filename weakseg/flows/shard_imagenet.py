"""shard-imagenet: an image collection with image-level labels -> WebDataset shards.

list (fails fast) -> map labels -> plan shards -> write shards concurrently -> manifest.

The shards go to the run's generation folder (see :mod:`weakseg.tasks.ingest.manifest`): a
re-shard never rewrites a file the current manifest names, and the manifest, written last
and atomically, switches readers to the new generation only once it is complete.
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact
from prefect.futures import as_completed
from prefect.task_runners import TaskRunner
from tqdm.auto import tqdm

from weakseg.flows._params import with_parameters
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.flows._runners import api_for_workers, make_task_runner
from weakseg.flows.params import shard_imagenet as P
from weakseg.tasks import storage
from weakseg.tasks.ingest.label_maps import LabelMap, build_label_map
from weakseg.tasks.ingest.manifest import ManifestError, generation_folder, read_manifest_if_any
from weakseg.tasks.ingest.shard_writer import (
    EncodeOptions,
    ShardPlan,
    ShardResult,
    assign_splits,
    fingerprint,
    plan_shards,
    redact_parameters,
)
from weakseg.tasks.ingest.shard_writer import write_manifest as _write_manifest
from weakseg.tasks.ingest.shard_writer import write_shard as _write_shard
from weakseg.tasks.ingest.sources import Item, SourceError, list_source

__all__ = ["shard_imagenet"]


@task(**IO_RETRIES, retry_condition_fn=retry_unless(SourceError))
def list_images(source: str, layout: str) -> tuple[list[Item], str]:
    return list_source(source, layout)  # type: ignore[arg-type]


@task
def map_labels(items: list[Item], spec: str, background_fraction: float, seed: int) -> LabelMap:
    return build_label_map(spec, {s for it in items for s in it.labels}, background_fraction, seed,
                           read_text=lambda url: storage.read_bytes(url).decode("utf-8-sig"))


@task(**IO_RETRIES, task_run_name="write-{plan.split}-{plan.index:06d}")
def write_shard(plan: ShardPlan, dest: str, classes: list[str], options: EncodeOptions, fp: str) -> ShardResult:
    return _write_shard(plan, dest, classes, options, fp)


@task(**IO_RETRIES)
def choose_folder(dest: str, generation: str) -> str:
    """Where this generation writes: never over the shards the current manifest names (nor
    over anything beside an unreadable or foreign ``manifest.json``)."""
    try:
        current = read_manifest_if_any(dest)
    except ManifestError:
        current = {}
    return generation_folder(current, generation)


@task(**IO_RETRIES)
def write_manifest(dest: str, results: list[ShardResult], label_map: LabelMap, parameters: dict,
                   source_fp: str, dropped: int, multilabel: bool, generation: str, folder: str) -> dict:
    return _write_manifest(dest, results, list(label_map.classes), label_map.describe(), parameters, source_fp,
                           dropped=dropped, multilabel=multilabel, generation=generation, folder=folder)


def write_shards(runner: TaskRunner, plans: list[ShardPlan], dest: str, classes: list[str],
                 options: EncodeOptions, fp: str) -> list[ShardResult]:
    """Write every planned shard on ``runner`` (threads, or a Dask cluster), with progress.

    Submitted straight from the flow, not through a subflow carrying the runner, which costs
    a run about 1 s (:func:`weakseg.flows.segment_corpus.segment_chunks` says why).
    """
    progress = create_progress_artifact(0.0, key="shard-imagenet-progress", description="shards written")
    results: list[ShardResult] = []
    with runner:
        with api_for_workers(runner):
            futures = [runner.submit(write_shard, {"plan": plan, "dest": dest, "classes": classes,
                                                   "options": options, "fp": fp}) for plan in plans]
        with tqdm(total=len(plans), unit="shard", desc="shard-imagenet") as bar:
            for future in as_completed(futures):
                results.append(future.result())
                bar.update(1)
                update_progress_artifact(progress, 100.0 * len(results) / len(plans))
    return results


@flow(name="shard-imagenet")
@with_parameters(P.shard_imagenet)
def shard_imagenet(source, dest, label_map, layout, max_side, val_fraction, seed, shard_size, shard_max_bytes,
                   jpeg_quality, max_pixels, max_bytes, background_fraction, task_runner, workers,
                   dask_address) -> dict:
    """Shard a collection; returns the manifest."""
    logger = get_run_logger()
    storage.require_buckets({"--dest": dest})
    params = {"source": source, "dest": dest, "label_map": label_map, "layout": layout, "max_side": max_side,
              "val_fraction": val_fraction, "seed": seed, "shard_size": shard_size,
              "shard_max_bytes": shard_max_bytes, "jpeg_quality": jpeg_quality, "max_pixels": max_pixels,
              "max_bytes": max_bytes, "background_fraction": background_fraction}
    items, used_layout = list_images(source, layout)
    # fingerprints (and so the generation) do not change when only credentials in URLs do
    source_fp = fingerprint([(storage.redact_url(i.uri), i.size, i.labels, i.split) for i in items])
    lmap = map_labels(items, label_map, background_fraction, seed)
    mapped = [(item, lmap.map(list(item.labels))) for item in items]
    kept = [(item, names) for item, names in mapped if names is not None]
    dropped = len(items) - len(kept)
    if not kept:
        raise SourceError(f"no image of {storage.redact_url(source)} maps to a class with label map "
                          f"{storage.redact_url(label_map)!r}")
    kept_items, kept_labels = [k[0] for k in kept], [k[1] for k in kept]
    plans = plan_shards(kept_items, kept_labels, assign_splits(kept_items, val_fraction, seed),
                        shard_size, shard_max_bytes, seed)
    logger.info("%d images (%s layout, %d dropped by the label map) -> %d shards", len(items), used_layout,
                dropped, len(plans))
    options = EncodeOptions(max_side, jpeg_quality, max_pixels, max_bytes)
    fp = fingerprint({**redact_parameters(params), "source_fingerprint": source_fp, "classes": lmap.classes})
    generation = fp[:16]
    folder = choose_folder(dest, generation)
    logger.info("generation %s -> %s", generation, storage.redact_url(storage.join(dest, folder)))
    classes = list(lmap.classes)
    runner = make_task_runner(task_runner, workers, dask_address)
    results = write_shards(runner, plans, storage.join(dest, folder) if folder else dest, classes, options, fp)
    manifest = write_manifest(dest, results, lmap, params, source_fp, dropped,
                              multilabel=any(len(n) > 1 for n in kept_labels), generation=generation, folder=folder)
    skipped = sum(r.skipped for r in results)
    create_table_artifact(
        key="shard-imagenet-class-counts",
        table=[{"class": c, **{split: s["class_counts"][c] for split, s in manifest["splits"].items()}}
               for c in classes],
        description=f"{manifest['errors']['count']} inputs skipped as errors; {skipped} shards already done",
    )
    logger.info("wrote %s: %s samples, %d errors, %d shards reused",
                storage.redact_url(storage.join(dest, "manifest.json")),
                {k: v["samples"] for k, v in manifest["splits"].items()}, manifest["errors"]["count"], skipped)
    return manifest
