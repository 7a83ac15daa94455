"""A segment-corpus run's bookkeeping: its set-up, counts, final state, ``runs`` row and summary.

Plain functions: :func:`prepare_run` before the chunks, the rest over the chunks'
:class:`~weakseg.tasks.segment.chunk.ChunkResult`; the flow writes the row
(:func:`weakseg.tasks.segment.tables.write_rows`) and returns the summary.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from ... import __version__
from .. import storage
from ..evaluate.thresholds import resolve_thresholds
from ..registry import resolve_model
from . import tables
from .chunk import STAGES, ChunkResult
from .inference import ModelError, load_thresholds, pin_model, predict
from .inputs import ChunkSpec, iter_kinds
from .lease import Lease, lease_url
from .tta import AUTO

__all__ = [
    "Fanout",
    "ListingCount",
    "ListingTally",
    "RunSetup",
    "class_table",
    "default_run_id",
    "final_state",
    "first_thumbnails",
    "outcome_message",
    "prepare_run",
    "run_counts",
    "run_parameters",
    "run_summary",
    "runs_row",
    "stage_table",
    "stage_timing",
]

# the flow's parameters that are URLs: written and logged without credentials
_URL_PARAMETERS = ("images", "model", "out", "thresholds", "dask_address")
# the flow's parameters the runs row does not repeat (run_id has its own column)
_UNRECORDED = ("run_id", "thumbnails")


@dataclass(frozen=True)
class RunSetup:
    """What preparing a run found: the pinned model, its classes, the δ in use, the run's date."""

    model_id: str
    model_sha256: str
    model_pinned: str  # URL of the run's copy of the checkpoint
    classes: list[str]
    thresholds: dict[str, list[float]]  # prior -> δ[K]
    thresholds_source: dict[str, str]  # prior -> where its δ came from
    run_date: str
    done_index: str | None  # skip-existing: URL of the (uri, content hash) index, None when nothing is done
    done: int  # images already segmented by this model (skip-existing)
    background: bool
    device: str
    model_uri: str = ""  # the checkpoint the run reads, without credentials (a registry's release)
    tta: str = "1"  # the views the run averages, "auto" resolved for the model
    lease: str = ""  # URL of this attempt's lease (:mod:`.lease`), touched before the model was pinned
    min_side: int = 0  # the run's --min-side, none resolved for the model (its training input size)


@dataclass(frozen=True)
class Fanout:
    """What segmenting every chunk gave: results, failed chunks' messages, chunks listed, timing."""

    results: list[ChunkResult]
    failed_chunks: list[str]
    chunks: int
    seconds: float  # the fan-out's wall time after the runner started
    start_seconds: float  # time to start (or join) the runner's cluster


@dataclass
class ListingTally:
    """What a listing held: image files, and tar shards (whose images are known once read)."""

    files: int = 0
    shards: int = 0

    def add_kind(self, kind: str) -> None:
        """One input of :func:`~weakseg.tasks.segment.inputs.iter_kinds`."""
        if kind == "shard":
            self.shards += 1
        else:
            self.files += 1

    def add(self, spec: ChunkSpec) -> None:
        if spec.shard is not None:
            self.shards += 1
        else:
            self.files += len(spec.uris)

    def images(self, shard_images: int, shards_done: int) -> int | None:
        """The images listed: shards not yet read count as the mean of those read (``shard_images``
        over ``shards_done``); None while shards are listed and none has been read."""
        if self.shards == 0:
            return self.files
        if shards_done == 0:
            return None
        return self.files + round(self.shards * shard_images / shards_done)


class ListingCount:
    """The size of a listing, counted ahead of the run in a background thread.

    The run consumes its listing lazily, a few chunks ahead of the work, so without this the
    number of images would be known only near the end. This thread walks the same listing
    (:func:`~weakseg.tasks.segment.inputs.iter_kinds`: the same dedup, nothing read but the
    listing, and names only: no ``stat`` of a local file, no canonical URI where the listing
    cannot repeat one, so the count costs the flow's process little) and only counts, into
    ``tally``; ``complete`` once it has seen the end. A listing that fails here is left to the
    run's own listing to report.
    """

    def __init__(self, images: str) -> None:
        self.tally = ListingTally()
        self.complete = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._count, args=(images,), daemon=True,
                                        name="weakseg-listing-count")
        self._thread.start()

    def _count(self, images: str) -> None:
        try:
            for kind in iter_kinds(images):
                if self._stop.is_set():
                    return
                self.tally.add_kind(kind)
        except Exception:  # the run's own listing raises it where it counts
            return
        self.complete = True

    def stop(self) -> None:
        self._stop.set()


def default_run_id(started_at: datetime, flow_run_id: str) -> str:
    """Start time plus the flow run id's random tail (uuid7)."""
    return f"{started_at:%Y%m%dT%H%M%SZ}-{flow_run_id.replace('-', '')[-8:]}"


def check_serves(bundle, model: str) -> None:
    """One forward pass on a small blank image: a model that cannot serve fails the run now,
    not as one error row per image."""
    try:
        pred = predict(bundle, [np.full((64, 64, 3), 127, np.uint8)])[0]
    except Exception as err:
        raise ModelError(f"model {storage.redact_url(model)} cannot serve: {type(err).__name__}: "
                         f"{storage.redact(str(err))}") from None
    if not np.isfinite(pred.image_probs).all() or not np.isfinite(pred.probs()).all():
        raise ModelError(f"model {storage.redact_url(model)} cannot serve: its outputs are not finite (NaN or "
                         "infinite weights?)")


def prepare_run(model: str, device: str, out: str, run_id: str, thresholds: str | None, priors: tuple[str, ...],
                skip_existing: bool, log: logging.Logger | logging.LoggerAdapter, tta: str = AUTO,
                min_side: int | None = 0, max_side: int | None = None) -> RunSetup:
    """Check the output, resolve a registry to its current release, pin the model (once, by content),
    resolve the views (``tta``), ``min_side`` and thresholds, find run_date."""
    attempt = uuid.uuid4().hex[:12]  # scratch names per attempt: two live runs of one run_id never share them
    tables.check_writable(out, f"{run_id}-{attempt}")
    lease = lease_url(out, run_id, attempt)
    Lease(lease).touch()  # before the copy exists: a finishing attempt never sees it without a lease
    resolved = resolve_model(model)
    if resolved.registry is not None:
        log.info("model %s resolves to release %s", storage.redact_url(model), resolved.model_id)
    # Per attempt too: a live run with the same run_id (a retried deployment run overlapping its
    # predecessor) removes only its own copy when it ends, never the one this attempt's workers load.
    bundle, pinned = pin_model(resolved.url, storage.join(out, "_state"), device,
                               prefix=f"model-{run_id}-{attempt}-")
    resolved.check(bundle.model_id)
    check_serves(bundle, model)
    views = bundle.views(tta)
    in_use = resolve_thresholds(bundle.thresholds, len(bundle.classes), priors,
                                load_thresholds(thresholds, bundle.classes) if thresholds else None,
                                storage.redact_url(thresholds) if thresholds else "", views)
    for warning in in_use.warnings:
        log.warning("%s", warning)
    run_date = tables.find_run_date(out, run_id) or datetime.now(UTC).date().isoformat()
    done_index, done = None, 0
    if skip_existing:
        done_index = storage.join(out, "_state", f"done-{run_id}-{attempt}.parquet")
        done = tables.build_done_index(out, bundle.model_id, done_index, run_id)
        if not done:
            done_index = None
    return RunSetup(bundle.model_id, bundle.sha256, pinned, list(bundle.classes), in_use.values, in_use.sources,
                    run_date, done_index, done, bundle.background_index is not None, str(bundle.device),
                    storage.redact_url(resolved.url), views, lease, bundle.resolve_min_side(min_side, max_side))


def run_parameters(parameters: Mapping[str, Any], device: str) -> dict[str, Any]:
    """The ``runs.parameters`` record: the flow's parameters, URLs without credentials, the chunks' device."""
    out = {k: _public(v) if k in _URL_PARAMETERS else v for k, v in parameters.items() if k not in _UNRECORDED}
    out["device"] = device
    return out


def run_counts(results: Sequence[ChunkResult], n_chunks: int, failed_chunks: Sequence[str]) -> dict[str, int]:
    """The ``runs.counts`` struct: inputs ok, failed, skipped and listed; chunks and failed chunks."""
    counts = {"ok": sum(r.ok for r in results), "failed": sum(r.failed for r in results),
              "skipped": sum(r.skipped for r in results), "chunks": n_chunks, "chunks_failed": len(failed_chunks)}
    counts["listed"] = counts["ok"] + counts["failed"] + counts["skipped"]
    return counts


def final_state(counts: Mapping[str, int], failed_chunks: Sequence[str], max_error_fraction: float) -> str:
    """Failed when a chunk is missing or more than ``max_error_fraction`` of the listed inputs
    (skipped ones included: they were done before) failed."""
    listed = counts["ok"] + counts["failed"] + counts["skipped"]
    if failed_chunks or (listed and counts["failed"] / listed > max_error_fraction):
        return "Failed"
    return "CompletedWithErrors" if counts["failed"] else "Completed"


def stage_timing(results: Sequence[ChunkResult], wall_seconds: float) -> dict[str, Any]:
    """Where the chunks' time went: busy seconds per stage (:data:`~weakseg.tasks.segment.chunk.STAGES`,
    summed over the chunks, so up to ``wall_seconds`` x workers) and the device-busy fraction:
    forward seconds / ``wall_seconds`` (the fan-out's wall time; at most 1)."""
    stages = {s: round(sum(r.stage_seconds.get(s, 0.0) for r in results), 4) for s in STAGES}
    forward = sum(r.forward_seconds for r in results)
    busy = min(1.0, forward / wall_seconds) if wall_seconds > 0 else 0.0
    return {"stage_seconds": stages, "device_busy_fraction": round(busy, 4)}


def mean_batch(results: Sequence[ChunkResult]) -> float:
    """Images per forward pass: below ``--batch-size`` when the corpus's sizes split the batches
    (one input shape a batch), which leaves an accelerator part-filled."""
    batches = sum(r.forward_batches for r in results)
    return round(sum(r.forward_images for r in results) / batches, 2) if batches else 0.0


def stage_table(results: Sequence[ChunkResult], wall_seconds: float) -> list[dict[str, Any]]:
    """The run's stages for its artifact: busy seconds and share of the chunks' summed time."""
    timing = stage_timing(results, wall_seconds)
    total = sum(r.seconds for r in results) or 1.0
    rows = [{"stage": s, "busy_seconds": v, "share_of_chunk_time": round(v / total, 3)}
            for s, v in timing["stage_seconds"].items()]
    rows.append({"stage": "device busy (forward / wall)", "busy_seconds": round(wall_seconds, 3),
                 "share_of_chunk_time": timing["device_busy_fraction"]})
    return rows


def runs_row(*, run_id: str, flow_run_id: str, model: str, info: RunSetup, priors: Sequence[str],
             parameters: Mapping[str, Any], counts: Mapping[str, int], state: str, started_at: datetime,
             seconds: float, timing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's one ``runs`` row; ``info`` is what preparing the run found (model, classes, thresholds);
    ``timing`` is :func:`stage_timing`'s."""
    classes = info.classes
    thresholds = {**{p: dict(zip(classes, v, strict=True)) for p, v in info.thresholds.items()},
                  "sources": {p: _public(v) for p, v in info.thresholds_source.items()}}
    return {"run_id": run_id, "flow_run_id": flow_run_id, "model_id": info.model_id, "model_uri": _public(model),
            "classes": classes, "priors": ",".join(priors) or "none", "parameters": tables.dumps(parameters),
            "thresholds": tables.dumps(thresholds), "counts": dict(counts), "state": state,
            "started_at": started_at, "ended_at": datetime.now(UTC),
            "images_per_second": counts["ok"] / seconds if seconds > 0 else 0.0, "weakseg_version": __version__,
            "stage_seconds": tables.dumps(timing["stage_seconds"]) if timing else None,
            "device_busy_fraction": timing["device_busy_fraction"] if timing else None}


def run_summary(row: Mapping[str, Any], results: Sequence[ChunkResult], start_seconds: float,
                fanout_seconds: float) -> dict[str, Any]:
    """What the flow returns: the ``runs`` row with ISO times, prior timings, errors by type, timing."""
    ok = max(row["counts"]["ok"], 1)
    return {**row, "started_at": row["started_at"].isoformat(), "ended_at": row["ended_at"].isoformat(),
            "prior_ms_per_image": {k: round(sum(r.prior_ms.get(k, 0.0) for r in results) / ok, 2)
                                   for k in sorted({k for r in results for k in r.prior_ms})},
            "errors_by_type": {k: sum(r.errors_by_type.get(k, 0) for r in results)
                               for k in sorted({k for r in results for k in r.errors_by_type})},
            "timing": {"runner_start_seconds": start_seconds, "fanout_seconds": fanout_seconds,
                       "chunk_seconds": sum(r.seconds for r in results),
                       "chunks_done": len(results), "workers": sorted({r.worker for r in results}),
                       "forward_batches": sum(r.forward_batches for r in results), "mean_batch": mean_batch(results),
                       "model_loads": sum(r.model_loads for r in results),
                       "host_workers": max((r.host_workers for r in results), default=0),
                       "precision": ",".join(sorted({r.precision for r in results}))}}


def outcome_message(state: str, counts: Mapping[str, int], failed_chunks: Sequence[str], run_id: str,
                    max_error_fraction: float, errors_by_type: Mapping[str, int]) -> str | None:
    """Why a run ended ``Failed`` or ``CompletedWithErrors`` (None when it completed cleanly)."""
    if failed_chunks:
        return (f"{len(failed_chunks)} of {counts['chunks']} chunks failed after retries "
                f"(rerun with --run-id {run_id}): {list(failed_chunks)[:3]}")
    if state == "Failed":
        return (f"{counts['failed']} of {counts['listed']} inputs failed, over --max-error-fraction "
                f"{max_error_fraction} (see the errors table): {dict(errors_by_type)}")
    if counts["failed"]:
        return f"{counts['failed']} of {counts['listed']} inputs failed; see the errors table"
    return None


def class_table(results: Sequence[ChunkResult], classes: Sequence[str]) -> list[dict[str, Any]]:
    """Per class found: images it is in and its share of the labelled pixels, most images first."""
    images: dict[str, int] = {}
    pixels: dict[str, int] = {}
    for r in results:
        for c, n in r.class_images.items():
            images[c] = images.get(c, 0) + n
        for c, n in r.class_pixels.items():
            pixels[c] = pixels.get(c, 0) + n
    total_px = sum(pixels.values()) or 1
    rows = [{"class": c, "images": images.get(c, 0), "pixel_share": round(pixels.get(c, 0) / total_px, 4)}
            for c in classes if images.get(c)]
    rows.sort(key=lambda r: -r["images"])
    return rows


def first_thumbnails(results: Sequence[ChunkResult], n: int) -> list[dict[str, str]]:
    """The run's first ``n`` overlay thumbnails, in chunk order."""
    return [t for r in sorted(results, key=lambda r: r.index) for t in r.thumbnails][:n]


def _public(url: str | None) -> str | None:
    """A URL without credentials (userinfo, signed query parameters): what is logged and written."""
    return None if url is None else storage.redact_url(url)
