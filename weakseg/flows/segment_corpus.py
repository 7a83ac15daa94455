"""segment-corpus: segment a corpus of images and write Parquet tables (the product's main job).

prepare (output check, the model pinned by content, thresholds; fails fast) -> stream the listing in chunks ->
segment each chunk as a task with retries (at most ``workers`` in flight), in a subflow on
the task runner the parameters ask for (threads, or Dask worker processes) -> one ``runs``
row -> artifacts. Tables and their layout: :mod:`weakseg.tasks.segment.tables`; per-chunk work:
:mod:`weakseg.tasks.segment.chunk`; inputs: :mod:`weakseg.tasks.segment.inputs`.

One model per run: ``prepare`` reads the checkpoint once, hashes it (``model_id``) and copies
the bytes to ``{out}/_state/model-{run_id}-{attempt}-{sha256}.pt``; every chunk loads that copy by
hash (:func:`weakseg.tasks.segment.model.load_pinned`), so a ``--model`` file replaced mid-run
changes nothing. The copy is this attempt's (a random id per flow run), removed when it ends.

Final state (also the ``runs`` row's ``state``): ``Completed`` when every input was
segmented; ``Completed`` named ``CompletedWithErrors`` when some inputs failed (bad or
vanished files: see the ``errors`` table) but every chunk was written and at most
``--max-error-fraction`` of the inputs failed; ``Failed`` when more failed, when a chunk
could not be written or read after its retries (transient read errors — expired tokens,
throttling, 5xx — retry the chunk rather than become error rows; its images are missing:
rerun with the same ``--run-id``), or when the run could not start (missing model, one
that cannot serve, output not writable, an object-store bucket that does not exist).

Dask (``--task-runner dask``): a LocalCluster of ``--workers`` processes on 127.0.0.1, or
the cluster at ``--dask-address``. Each worker process loads the pinned model once and keeps
it (:func:`weakseg.tasks.segment.model.load_pinned` caches per process, by content). When the chunks' device
is CUDA every chunk asks for one ``GPU`` Dask resource: local workers declare ``GPU=1``;
workers of an existing cluster must be started with it (``dask worker ADDRESS
--nthreads 1 --resources GPU=1``), else the run fails at once rather than wait forever.
``--device auto`` is resolved where the flow runs when it starts the cluster itself; with
``--dask-address`` it is resolved by each worker, and only ``--device cuda`` asks for GPU
slots. Prefect's global ``gpu`` concurrency limit, when one is set, caps the processes on a
GPU: one slot for the flow's own (threads) for the whole fan-out, one per chunk on Dask.

Host stages (reading, decoding, superpixels, PNG masks) run in ``--host-workers`` processes
per flow or Dask worker process (:mod:`weakseg.tasks.segment.hostpool`). A local cluster on
GPUs shares the machine's cores between its workers; the workers of an existing cluster must
be started non-daemonic (``DASK_DISTRIBUTED__WORKER__DAEMON=False``) to start processes, and
pass ``--host-workers`` to share a machine between several of them.

Interrupted and concurrent runs: a chunk's files have deterministic names
(``{run_id}-{chunk:06d}``) and are replaced whole, so rerunning a killed run with the same
``--run-id`` — on any later day: it writes into the run's first run_date and then removes
every file of the run it did not rewrite — leaves one row per image and no orphan. Runs
with different run_ids never touch each other's files (names are parsed exactly, never
matched by prefix). Two live runs with the *same* run_id over the same
listing write the same names: each file is whole (last writer wins) and holds the same
images, so readers still see one row per image; their scratch files (the output probe, the
skip-existing index, the pinned model copy) are per attempt, so neither removes what the other
still reads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NONE
from prefect.context import get_run_context
from prefect.futures import as_completed
from prefect.states import Completed, Failed
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.utilities.annotations import BaseAnnotation, quote

from weakseg.flows._gpu import gpu_slot
from weakseg.flows._params import check_parameters, with_parameters
from weakseg.flows._progress import Progress
from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.flows._runners import api_for_workers, make_task_runner
from weakseg.flows.params import segment_corpus as P
from weakseg.tasks import storage
from weakseg.tasks.devices import resolve_device
from weakseg.tasks.ingest.sources import SourceError
from weakseg.tasks.legend import legend_markdown
from weakseg.tasks.segment import runs, tables
from weakseg.tasks.segment.chunk import ChunkResult, SegmentOptions, segment_chunk
from weakseg.tasks.segment.inference import ModelError
from weakseg.tasks.segment.inputs import ChunkSpec, iter_chunks
from weakseg.tasks.segment.lease import Lease
from weakseg.tasks.segment.priors import parse_priors

__all__ = ["segment_corpus"]


# Retry I/O hiccups, never a missing model, a bad thresholds file or an unusable output.
_retry_io_only = retry_unless(ModelError, SourceError, tables.OutputError, ValueError)


@task(cache_policy=NONE, retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_io_only)
def prepare(model: str, device: str, out: str, run_id: str, thresholds: str | None, priors: tuple[str, ...],
            skip_existing: bool, tta: str, min_side: int | None, max_side: int) -> runs.RunSetup:
    """Check the output, pin the model (once, by content), resolve the views, --min-side and thresholds, find
    run_date."""
    return runs.prepare_run(model, device, out, run_id, thresholds, priors, skip_existing, get_run_logger(), tta,
                            min_side, max_side)


class _quote(quote):
    """Prefect's ``quote``, surviving pickling: Prefect's own comes back from a Dask worker as
    ``quote((value,))`` (tuple's ``__getnewargs__`` feeds its ``__new__`` a tuple)."""

    __slots__ = ()

    def __reduce__(self):
        return type(self), (self.unwrap(),)


def _chunk_run_name(parameters: dict[str, Any]) -> str:
    """``segment-chunk-000042``; on Dask the parameters arrive still wrapped in ``quote``."""
    spec = parameters["spec"]
    if isinstance(spec, BaseAnnotation):
        spec = spec.unwrap()
    return f"segment-chunk-{spec.index:06d}"


@task(retries=2, retry_delay_seconds=[2, 10], cache_policy=NONE, task_run_name=_chunk_run_name)
def segment_chunk_task(spec: ChunkSpec, opts: SegmentOptions, gpu_slot_each: bool = False) -> ChunkResult:
    """One chunk: read, decode, infer, apply priors, write its files (retried whole: same names).
    ``gpu_slot_each``: the chunk takes its own ``gpu`` slot (a Dask worker process on a GPU)."""
    with gpu_slot(opts.device) if gpu_slot_each else contextlib.nullcontext():
        return segment_chunk(spec, opts)


def _check_gpu_workers(runner: TaskRunner, logger) -> None:
    """Chunks that ask for a ``GPU`` resource wait forever where no worker has one: fail now."""
    workers = runner.client.scheduler_info(n_workers=-1).get("workers", {})
    if not workers:
        logger.warning("the Dask cluster has no workers yet; chunks wait for one started with --resources GPU=1")
        return
    if not any(w.get("resources", {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise ModelError(f"device cuda on Dask: none of the cluster's {len(workers)} workers declares a GPU "
                         f"resource; start them with `dask worker ADDRESS --nthreads 1 --resources GPU=1`")


def segment_chunks(runner: TaskRunner, images: str, chunk_size: int, opts: SegmentOptions, workers: int,
                   gpu_resources: bool = False) -> runs.Fanout:
    """Segment every chunk on ``runner`` (threads, or a Dask cluster), at most ``workers`` in flight.

    Straight from the flow (a runner is a context manager), not through a subflow carrying
    the runner: a subflow costs every run about 1 s, its own flow run and, at its end, the
    join of its heartbeat thread, which sleeps in 1 s steps.

    Returns the chunk results, the failed chunks' messages, the number of chunks listed, the
    time to start (or join) the cluster and the fan-out's wall time after it (for the Prefect
    overhead: wall time minus the chunks' own). ``gpu_resources`` (Dask on CUDA): every chunk asks
    for a ``GPU`` resource and takes its worker process's ``gpu`` slot.

    Progress, as chunks finish: a bar in the terminal and the ``segment-corpus-progress``
    artifact (images done, images/s, failed) and one log line a chunk saying the same. The
    total, hence the percentage and the ETA, comes once a listing has ended: the count that
    :class:`~weakseg.tasks.segment.runs.ListingCount` runs ahead in a background thread, or
    this loop's own; tar shards not yet read count as the mean of those read.
    """
    logger = get_run_logger()
    t_start = time.perf_counter()
    with runner:
        if hasattr(runner, "client"):  # prefect-dask starts (or joins) the cluster on first use: before the timing
            _ = runner.client
        start_seconds = time.perf_counter() - t_start
        if gpu_resources:
            _check_gpu_workers(runner, logger)
        t0 = time.perf_counter()
        results: list[ChunkResult] = []
        failed_chunks: list[str] = []
        pending: dict[Any, ChunkSpec] = {}
        n_chunks = 0
        listed = runs.ListingTally()  # what this loop has listed so far
        ahead = runs.ListingCount(images)  # the whole listing, counted in the background
        shards = {"images": 0, "done": 0}  # images of the tar shards read so far

        def total(listing_done: bool) -> int | None:
            """The run's images once a listing has ended (this loop's, or the count ahead's)."""
            tally = listed if listing_done else ahead.tally if ahead.complete else None
            return None if tally is None else tally.images(shards["images"], shards["done"])

        def collect(future, spec: ChunkSpec, listing_done: bool = False) -> None:
            try:
                r = future.result()
            except Exception as err:  # retries exhausted: the run goes on, its final state says Failed
                message = storage.redact(str(err))
                logger.error("chunk %d failed after retries: %s: %s", spec.index, type(err).__name__, message)
                failed_chunks.append(f"chunk {spec.index}: {type(err).__name__}: {message}")
                progress.update(len(spec.uris), failed=len(spec.uris))
                return
            results.append(r)
            n = r.ok + r.failed + r.skipped
            if spec.shard is not None:
                shards["images"] += n
                shards["done"] += 1
            expected = total(listing_done)
            if expected is not None and expected != progress.total:
                progress.set_total(max(expected, progress.done + n))
            progress.update(n, failed=r.failed)
            logger.info("chunk %d: %d ok, %d failed, %d skipped in %.1f s; %s", r.index, r.ok, r.failed, r.skipped,
                        r.seconds, progress.describe())

        with Progress("segment-corpus-progress", "segment-corpus") as progress, api_for_workers(runner):
            try:
                for spec in iter_chunks(images, chunk_size):
                    n_chunks += 1
                    listed.add(spec)
                    chunk_opts = opts if spec.index == 0 else dataclasses.replace(opts, thumbnails=0)
                    with _gpu_annotation() if gpu_resources else contextlib.nullcontext():
                        # quote: Prefect would otherwise walk every URI and listing record of the chunk looking
                        # for futures (0.5 ms of the flow process's CPU an image; bench/host_pipeline.py)
                        future = runner.submit(segment_chunk_task, {"spec": _quote(spec), "opts": chunk_opts,
                                                                    "gpu_slot_each": gpu_resources})
                    pending[future] = spec
                    if len(pending) >= workers:
                        done = next(iter(as_completed(list(pending))))
                        collect(done, pending.pop(done))
                for future in as_completed(list(pending)):
                    collect(future, pending.pop(future), listing_done=True)
            finally:
                ahead.stop()
        return runs.Fanout(results, failed_chunks, n_chunks, time.perf_counter() - t0, start_seconds)


def _gpu_annotation():
    import dask

    return dask.annotate(resources={"GPU": 1})


def _chunk_device(device: str, task_runner: str, dask_address: str | None) -> str:
    """Where chunks run their forward pass: resolved here unless an existing cluster's workers decide."""
    if task_runner == "dask" and dask_address:
        return device
    return str(resolve_device(device))  # fails fast on cuda without a CUDA device


def _local_dask_host_workers(dask_workers: int) -> int:
    """Host worker processes for each of ``dask_workers`` local Dask workers on GPUs: the machine's
    cores shared between them, one left to each worker's own process (hostpool.default_host_workers
    would give each every core but one)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // dask_workers - 1)


@task(**IO_RETRIES, cache_policy=NONE)
def finish_run(out: str, run_date: str, run_id: str, n_chunks: int, row: dict[str, Any],
               scratch: list[str]) -> str:
    """Drop this run's files that this attempt did not write, write its ``runs`` row, remove scratch files."""
    tables.remove_stale_chunks(out, run_date, run_id, n_chunks, before=row["started_at"])
    tables.crash_point("runs")
    url = tables.runs_file(out, run_date, run_id)
    tables.write_rows(url, "runs", [row])
    for path in scratch:
        tables.remove_file(path)
    return url


def _public(url: str | None) -> str | None:
    """A URL without credentials (userinfo, signed query parameters): what is logged and written."""
    return None if url is None else storage.redact_url(url)


def _artifacts(fanout: runs.Fanout, classes: list[str], counts: dict[str, int], out: str, thumbnails: int) -> None:
    rows = runs.class_table(fanout.results, classes)
    create_table_artifact(key="segment-corpus-classes", table=rows or [{"class": "(none)", "images": 0}],
                          description=f"classes found: {counts['ok']} images segmented, {counts['failed']} "
                          f"failed, {counts['skipped']} skipped; tables under {_public(out)}")
    lines = ["# segment-corpus: overlays", "", "| image | labels | overlay |", "|---|---|---|"]
    thumbs = runs.first_thumbnails(fanout.results, thumbnails)
    for t in thumbs:
        name = t["uri"].rsplit("/", 1)[-1].replace("|", "/")
        lines.append(f"| {name} | {t['labels']} | ![overlay]({t['png']}) |")
    if not thumbs:
        lines.append("| (no image segmented) | | |")
    else:
        lines += ["", "Legend (mask colours of the classes found):", "",
                  legend_markdown(classes, [r["class"] for r in rows])]
    create_markdown_artifact(key="segment-corpus-overlays", markdown="\n".join(lines),
                             description="image | mask overlay, first images of the run")
    create_table_artifact(key="segment-corpus-stages", table=runs.stage_table(fanout.results, fanout.seconds),
                          description="where the chunks' time went: busy seconds per stage, and the device-busy "
                          "fraction (forward seconds / the fan-out's wall time); "
                          f"{runs.mean_batch(fanout.results)} images a forward pass")


def _final_state(state_name: str, message: str | None, summary: dict[str, Any]) -> Any:
    """The flow's return: Failed, Completed named CompletedWithErrors, or the summary itself."""
    if state_name == "Failed":
        return Failed(message=message, data=summary)
    if state_name == "CompletedWithErrors":
        return Completed(name="CompletedWithErrors", data=summary, message=message)
    return summary


@flow(name="segment-corpus", task_runner=ThreadPoolTaskRunner(max_workers=16))
@with_parameters(P.segment_corpus)
def segment_corpus(images, model, out, priors, batch_size, run_id, skip_existing, chunk_size, max_side, min_side, tta,
                   max_pixels, device, decode, host_workers, precision, thresholds, task_runner, workers, dask_address,
                   thumbnails, max_bytes, max_error_fraction) -> dict[str, Any]:
    """Segment a corpus; returns the run summary (the ``runs`` row)."""
    parameters = dict(locals())  # first: exactly the flow's parameters, for the runs row
    logger = get_run_logger()
    started_at, t_start = datetime.now(UTC), time.perf_counter()
    prior_list = parse_priors(priors)
    check_parameters({"min_side": min_side, "max_side": max_side, "tta": tta})
    flow_run_id = str(get_run_context().flow_run.id)
    run_id = run_id or runs.default_run_id(started_at, flow_run_id)
    chunk_device = _chunk_device(device, task_runner, dask_address)
    # On Dask the flow process only reads the model's metadata; the workers run it.
    info = prepare(model, "cpu" if task_runner == "dask" else device, out, run_id, thresholds, prior_list,
                   skip_existing, tta, min_side, max_side)
    if task_runner == "threads":
        chunk_device = info.device
    # "auto" and none resolved for the model: the runs row records the views and the min_side that ran
    tta = parameters["tta"] = info.tta
    min_side = parameters["min_side"] = info.min_side
    if skip_existing:
        logger.info("skip-existing: %d (uri, content hash) pairs already segmented by model %s", info.done,
                    info.model_id)
    if host_workers is None and task_runner == "dask" and not dask_address and chunk_device.startswith("cuda"):
        host_workers = _local_dask_host_workers(workers)
    opts = SegmentOptions(out=out, run_id=run_id, run_date=info.run_date, model=info.model_pinned,
                          model_sha256=info.model_sha256, max_bytes=max_bytes, device=chunk_device,
                          priors=prior_list, batch_size=batch_size, max_side=max_side, min_side=min_side, tta=tta,
                          max_pixels=max_pixels, thresholds={p: tuple(v) for p, v in info.thresholds.items()},
                          done_index=info.done_index, thumbnails=thumbnails, decode=decode,
                          host_workers=host_workers, precision=precision)
    logger.info("run %s: model %s (%d classes), priors %s, writing to %s/*/run_date=%s/ (%s, %d workers, %s)",
                run_id, info.model_id, len(info.classes), ",".join(prior_list) or "none", _public(out),
                info.run_date, task_runner, workers, chunk_device)
    gpu = task_runner == "dask" and chunk_device.startswith("cuda")
    runner = make_task_runner(task_runner, workers, dask_address, resources={"GPU": 1} if gpu else None)
    # One gpu slot per process on the device: this one for threads (its chunks share the device and
    # must not queue for slots against each other), each chunk's worker process on Dask.
    # The lease says this attempt is alive while its workers may load the pinned copy (tasks.segment.lease).
    with Lease(info.lease), gpu_slot(chunk_device) if task_runner == "threads" else contextlib.nullcontext():
        fanout = segment_chunks(runner, images, chunk_size, opts, workers, gpu_resources=gpu)
    if fanout.chunks == 0:
        raise SourceError(f"--images {images} holds no images")
    counts = runs.run_counts(fanout.results, fanout.chunks, fanout.failed_chunks)
    seconds = time.perf_counter() - t_start
    state_name = runs.final_state(counts, fanout.failed_chunks, max_error_fraction)
    timing = runs.stage_timing(fanout.results, fanout.seconds)
    row = runs.runs_row(run_id=run_id, flow_run_id=flow_run_id, model=info.model_uri, info=info, priors=prior_list,
                        parameters=runs.run_parameters(parameters, chunk_device), counts=counts, state=state_name,
                        started_at=started_at, seconds=seconds, timing=timing)
    scratch = [p for p in (info.done_index, info.model_pinned, info.lease) if p]
    finish_run(out, info.run_date, run_id, fanout.chunks, row, scratch)
    _artifacts(fanout, info.classes, counts, out, thumbnails)
    summary = runs.run_summary(row, fanout.results, fanout.start_seconds, fanout.seconds)
    logger.info("run %s: %d ok, %d failed, %d skipped, %d chunks (%d failed) in %.1f s (%.2f images/s, "
                "%.1f images a forward pass)", run_id, counts["ok"], counts["failed"], counts["skipped"], fanout.chunks,
                len(fanout.failed_chunks), seconds, row["images_per_second"], summary["timing"]["mean_batch"])
    message = runs.outcome_message(state_name, counts, fanout.failed_chunks, run_id, max_error_fraction,
                                   summary["errors_by_type"])
    return _final_state(state_name, message, summary)
