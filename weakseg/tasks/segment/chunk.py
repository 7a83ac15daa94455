"""One chunk of segment-corpus: read -> decode -> batched forward -> priors -> statistics -> Parquet.

Stages are small generators with one error policy: an input that fails to read, decode,
run or encode becomes an ``errors`` row (stage, error_type, message) and the rest of the
chunk goes on. Only a failure to *write* the chunk's files raises (the Prefect task then
retries the whole chunk, which rewrites the same file names).
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np

from ..errors import ErrorRecord
from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, decode_image, voc_palette
from ..ingest.sources import image_key
from ..storage import redact
from . import tables
from .inference import (
    DEFAULT_MAX_SIDE,
    ModelBundle,
    Prediction,
    compute_prior_inputs,
    load_model,
    load_pinned,
    model_loads,
    predict,
)
from .inputs import ChunkSpec, InputRecord, SourceMeta, archive_uri, read_chunk, stored_uri
from .postprocess import Labelled, label_batch, regions

__all__ = ["STAGES", "ChunkResult", "SegmentOptions", "image_statistics", "overlay_thumbnail", "segment_chunk"]

_logger = logging.getLogger(__name__)
_PALETTE = np.array(voc_palette(), np.uint8).reshape(-1, 3)  # the overlay colours of thumbnails
TOP_CLASSES = 5  # class_probs holds this many (name, prob) pairs, best first
BAND_BYTES = 64 * 2**20  # full-resolution probabilities are produced in row bands of about this size
# Where a chunk's time goes (ChunkResult.stage_seconds): loading the model; reading (the
# skip-existing checks, the bytes, their hash); decoding; the forward pass; post-processing
# on the model's device (upsampling, ILP, argmax, superpixel vote, objectness test, per-class
# statistics: weakseg.tasks.segment.postprocess); the host-side priors' inputs (superpixels,
# box and segment proposals); encoding (the PNG mask, the rows); writing the Parquet files.
STAGES = ("load", "read", "decode", "forward", "postprocess", "priors", "encode", "write")


@dataclass(frozen=True)
class SegmentOptions:
    out: str
    run_id: str
    run_date: str
    model: str  # the run's pinned checkpoint copy (:func:`~weakseg.tasks.segment.inference.pin_model`)
    model_sha256: str = ""  # its bytes' hash: every chunk loads exactly these bytes ("" : load ``model`` as is)
    max_bytes: int = DEFAULT_MAX_BYTES  # larger inputs are error rows, never read
    device: str = "cpu"
    priors: tuple[str, ...] = ("ilp", "sppxl")
    batch_size: int = 8
    max_side: int = DEFAULT_MAX_SIDE
    min_side: int = 0  # enlarge smaller images to this longer side for the forward pass (0: never)
    tta: str = "1"  # test-time views (weakseg.tasks.segment.tta); "1": the plain forward pass
    max_pixels: int = DEFAULT_MAX_PIXELS
    thresholds: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    done_index: str | None = None  # skip-existing: URL of the index (tables.build_done_index)
    thumbnails: int = 0  # overlay thumbnails to return (for the run's markdown artifact)


@dataclass
class ChunkResult:
    index: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))  # busy time
    class_images: dict[str, int] = field(default_factory=dict)  # images whose mask holds the class
    class_pixels: dict[str, int] = field(default_factory=dict)
    prior_ms: dict[str, float] = field(default_factory=dict)  # summed over the chunk's images
    errors_by_type: dict[str, int] = field(default_factory=dict)
    thumbnails: list[dict[str, str]] = field(default_factory=list)
    worker: str = ""  # host:pid of the process that ran the chunk
    model_loads: int = 0  # checkpoint reads this chunk caused (0 when the process's cached model served)

    def count_image(self, regions: Sequence[Mapping[str, Any]], prior_ms: Mapping[str, float]) -> None:
        """One image segmented: its classes, pixels and prior timings."""
        self.ok += 1
        for name, v in prior_ms.items():
            self.prior_ms[name] = self.prior_ms.get(name, 0.0) + v
        for r in regions:
            self.class_images[r["class_name"]] = self.class_images.get(r["class_name"], 0) + 1
            self.class_pixels[r["class_name"]] = self.class_pixels.get(r["class_name"], 0) + r["pixel_count"]

    def count_errors(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """The chunk's errors rows: how many inputs failed, by error type."""
        self.failed = len(rows)
        for row in rows:
            self.errors_by_type[row["error_type"]] = self.errors_by_type.get(row["error_type"], 0) + 1


@dataclass
class _Decoded:
    uri: str
    sha: str
    rgb: np.ndarray
    fmt: str
    meta: SourceMeta | None = None


def _now() -> datetime:
    return datetime.now(UTC)


def _error_row(opts: SegmentOptions, chunk: int, uri: str, stage: str, err: BaseException) -> dict[str, Any]:
    kind = err.kind if isinstance(err, ImageError) else type(err).__name__
    return ErrorRecord(uri, image_key(uri), stage, kind, str(err), run_id=opts.run_id, chunk=chunk,
                       occurred_at=_now()).row()


def label_image(bundle: ModelBundle, pred: Prediction, rgb: np.ndarray, priors: Sequence[str],
                thresholds: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Labels ``uint8[H, W]``, Σ probability of each label over its pixels ``[256]``, prior timings.

    One image through the flow's path: the host-side prior inputs, then
    :func:`~weakseg.tasks.segment.postprocess.label_batch` on the model's device (row bands
    of :data:`BAND_BYTES`, so memory is O(K · band) even for very large images).
    """
    inputs, ms = compute_prior_inputs(rgb, priors)
    t0 = time.perf_counter()
    out = label_batch([pred], [inputs], priors, thresholds, len(bundle.classes), bundle.background_index,
                      bundle.device, _band_bytes(bundle))[0]
    ms["labels"] = (time.perf_counter() - t0) * 1000  # upsampling + applying the priors + statistics
    return out.labels, out.prob_sum, ms


def _band_bytes(bundle: ModelBundle) -> int:
    """Probabilities labelled at a time: :data:`BAND_BYTES` on the CPU, 16x that on an accelerator."""
    return BAND_BYTES if bundle.device.type == "cpu" else 16 * BAND_BYTES


def image_statistics(labels: np.ndarray, prob_sum: np.ndarray, image_probs: np.ndarray,
                     classes: Sequence[str]) -> list[dict[str, Any]]:
    """One region per class present in the mask: pixels, area, mean prob, image prob, bbox."""
    counts = np.bincount(labels.ravel(), minlength=256)
    total = labels.size
    regions = []
    for k in np.flatnonzero(counts[: len(classes)]):
        rows = np.flatnonzero((labels == k).any(axis=1))
        cols = np.flatnonzero((labels == k).any(axis=0))
        regions.append({
            "class_name": classes[k], "class_index": int(k), "pixel_count": int(counts[k]),
            "area_fraction": float(counts[k] / total), "mean_prob": float(prob_sum[k] / counts[k]),
            "image_prob": float(image_probs[k]), "bbox_x0": int(cols[0]), "bbox_y0": int(rows[0]),
            "bbox_x1": int(cols[-1] + 1), "bbox_y1": int(rows[-1] + 1),
        })
    regions.sort(key=lambda r: -r["pixel_count"])
    return regions


def encode_mask(labels: np.ndarray) -> bytes:
    """Single-channel 8-bit PNG: pixel = class index, 255 = unlabelled."""
    ok, buf = cv2.imencode(".png", labels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding of the mask failed")
    return buf.tobytes()


def overlay_thumbnail(rgb: np.ndarray, labels: np.ndarray, side: int = 128) -> str:
    """Image | overlay of the mask, as a PNG data URI for a markdown artifact."""
    h, w = labels.shape
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    lab = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    blend = (0.45 * small + 0.55 * _PALETTE[lab]).astype(np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.concatenate([small, blend], axis=1), cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""


class _ChunkWriter:
    """Accumulates one chunk's rows; writes each table's file atomically at the end."""

    def __init__(self, opts: SegmentOptions, spec: ChunkSpec) -> None:
        self.opts, self.spec = opts, spec
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in tables.CHUNK_TABLES}

    def flush(self) -> None:
        for table in tables.CHUNK_TABLES:  # images last
            tables.crash_point(table, self.spec.index)
            url = tables.chunk_file(self.opts.out, table, self.opts.run_date, self.opts.run_id, self.spec.index)
            if self.rows[table]:
                tables.write_rows(url, table, self.rows[table])
            else:  # nothing to write (e.g. all skipped): drop an earlier attempt's file of this name
                tables.remove_file(url)


class _Clock:
    """Adds the time spent inside ``with clock(stage):`` to a stage of ``stage_seconds``."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0


def _timed(items: Iterator[InputRecord], clock: _Clock, stage: str) -> Iterator[InputRecord]:
    """``items``, the time spent producing each (reading it) counted to ``stage``."""
    while True:
        with clock(stage):
            item = next(items, None)
        if item is None:
            return
        yield item


def _windows(records: Iterator[InputRecord], n: int) -> Iterator[list[InputRecord]]:
    window: list[InputRecord] = []
    for rec in records:
        window.append(rec)
        if len(window) >= n:
            yield window
            window = []
    if window:
        yield window


def skip_unchanged(spec: ChunkSpec, index: str | None, result: ChunkResult) -> tuple[ChunkSpec | None, tables.Done]:
    """Skip-existing before reading: inputs done by this model whose listing metadata (size plus
    ETag or mtime) is unchanged are counted skipped and never read; what is left to read (None:
    nothing), and the index's rows for it (content hashes, for inputs read and hashed).

    A shard is skipped whole when its archive is unchanged and members of it were done; then
    members that failed before are not read again either (their bytes did not change).
    """
    if not index:
        return spec, tables.Done()
    if spec.shard is not None:
        meta = spec.meta_of(0)
        members = tables.done_archive(index, archive_uri(spec.shard), meta.file_key) if meta else 0
        if members:
            result.skipped += members
            return None, tables.Done()
        return spec, tables.Done()
    done = tables.done_lookup(index, [stored_uri(u) for u in spec.uris])
    keep = [i for i, u in enumerate(spec.uris)
            if not done.unchanged(stored_uri(u), m.file_key if (m := spec.meta_of(i)) else None)]
    result.skipped += len(spec.uris) - len(keep)
    if not keep:
        return None, done
    if len(keep) == len(spec.uris):
        return spec, done
    return dataclasses.replace(spec, uris=tuple(spec.uris[i] for i in keep),
                               meta=tuple(spec.meta_of(i) for i in keep) if spec.meta else ()), done


def _decoded(records: Iterator[InputRecord], opts: SegmentOptions, spec: ChunkSpec, writer: _ChunkWriter,
             result: ChunkResult, done: tables.Done, clock: _Clock) -> Iterator[list[_Decoded]]:
    """Batches of decoded images; read and decode failures and skipped inputs are accounted here."""
    index = opts.done_index
    seen: set[str] = set()
    for window in _windows(_timed(records, clock, "read"), opts.batch_size):
        if index and spec.shard is not None:  # shard members: look up a batch of URIs at a time
            with clock("read"):
                done = tables.done_lookup(index, [r.uri for r in window if r.error is None])
        batch: list[_Decoded] = []
        for rec in window:
            if rec.error is not None or rec.data is None:
                err = rec.error or OSError("no data")
                writer.rows["errors"].append(_error_row(opts, spec.index, rec.uri, "read", err))
                continue
            if rec.uri in seen:
                continue
            seen.add(rec.uri)
            with clock("read"):
                sha = hashlib.sha256(rec.data).hexdigest()
            if done.hashed(rec.uri, sha):
                result.skipped += 1
                continue
            try:
                with clock("decode"):
                    dec = decode_image(rec.data, opts.max_pixels)
            except Exception as err:  # ImageError kinds; anything else is recorded the same way
                writer.rows["errors"].append(_error_row(opts, spec.index, rec.uri, "decode", err))
                continue
            batch.append(_Decoded(rec.uri, sha, np.asarray(dec.image), dec.format, rec.meta))
        if batch:
            yield batch


def segment_chunk(spec: ChunkSpec, opts: SegmentOptions, bundle: ModelBundle | None = None) -> ChunkResult:
    """Segment every input of one chunk and write its four table files (see module doc)."""
    started = time.perf_counter()
    result = ChunkResult(spec.index, worker=f"{socket.gethostname()}:{os.getpid()}")
    clock = _Clock(result.stage_seconds)
    loads = model_loads()
    with clock("load"):
        if bundle is None:
            bundle = (load_pinned(opts.model, opts.model_sha256, opts.device) if opts.model_sha256
                      else load_model(opts.model, opts.device))
    result.model_loads = model_loads() - loads
    thresholds = {p: np.asarray(v, dtype=np.float64) for p, v in opts.thresholds.items()} or bundle.thresholds
    writer = _ChunkWriter(opts, spec)
    with clock("read"):
        to_read, done = skip_unchanged(spec, opts.done_index, result)
    records = read_chunk(to_read, opts.max_bytes) if to_read is not None else iter(())
    for batch in _decoded(records, opts, spec, writer, result, done, clock):
        t0 = time.perf_counter()
        try:
            preds = predict(bundle, [d.rgb for d in batch], opts.max_side, opts.min_side, opts.tta)
        except Exception as err:  # e.g. out of memory on one odd batch: record, go on
            _logger.warning("chunk %d: forward pass failed for %d images: %s", spec.index, len(batch), redact(str(err)))
            for d in batch:
                writer.rows["errors"].append(_error_row(opts, spec.index, d.uri, "inference", err))
            continue
        finally:
            result.stage_seconds["forward"] += time.perf_counter() - t0
        result.forward_seconds += time.perf_counter() - t0
        _segment_batch(bundle, batch, preds, thresholds, opts, spec.index, writer, result, clock)
    with clock("write"):
        writer.flush()
    result.count_errors(writer.rows["errors"])
    result.seconds = time.perf_counter() - started
    return result


def _prior_inputs(d: _Decoded, priors: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Host-side prior inputs of one image (superpixels, objectness maps) and their timings."""
    return compute_prior_inputs(d.rgb, priors)


def _label(bundle: ModelBundle, preds: Sequence[Prediction], inputs: Sequence[Mapping[str, np.ndarray]],
           thresholds: Mapping[str, np.ndarray], priors: Sequence[str]) -> list[Labelled | BaseException]:
    """Device post-processing of a batch; when the batch fails, image by image, so only the
    images that fail alone become errors (never a lost batch)."""
    def one(ps, ins):
        return label_batch(ps, ins, priors, thresholds, len(bundle.classes), bundle.background_index,
                           bundle.device, _band_bytes(bundle))
    try:
        return list(one(preds, inputs))
    except Exception:
        if len(preds) == 1:
            raise
    out: list[Labelled | BaseException] = []
    for p, i in zip(preds, inputs, strict=True):
        try:
            out.extend(one([p], [i]))
        except Exception as err:
            out.append(err)
    return out


def _segment_batch(bundle: ModelBundle, batch: Sequence[_Decoded], preds: Sequence[Prediction],
                   thresholds: Mapping[str, np.ndarray], opts: SegmentOptions, chunk: int, writer: _ChunkWriter,
                   result: ChunkResult, clock: _Clock) -> None:
    """One predicted batch: host prior inputs -> device post-processing -> rows; a failure is an errors row."""
    ready: list[tuple[_Decoded, Prediction, dict[str, np.ndarray], dict[str, float]]] = []
    for d, pred in zip(batch, preds, strict=True):
        try:
            with clock("priors"):
                inputs, ms = _prior_inputs(d, opts.priors)
        except Exception as err:
            writer.rows["errors"].append(_error_row(opts, chunk, d.uri, "priors", err))
            continue
        ready.append((d, pred, inputs, ms))
    if not ready:
        return
    t0 = time.perf_counter()
    try:
        with clock("postprocess"):
            labelled = _label(bundle, [r[1] for r in ready], [r[2] for r in ready], thresholds, opts.priors)
    except Exception as err:
        labelled = [err] * len(ready)
    share = (time.perf_counter() - t0) * 1000 / len(ready)
    for (d, pred, _, ms), out in zip(ready, labelled, strict=True):
        if isinstance(out, BaseException):
            writer.rows["errors"].append(_error_row(opts, chunk, d.uri, "priors", out))
            continue
        ms["labels"] = share
        _encode_image(bundle, d, pred, out, ms, opts, chunk, writer, result, clock)


def _encode_image(bundle: ModelBundle, d: _Decoded, pred: Prediction, out: Labelled, ms: dict[str, float],
                  opts: SegmentOptions, chunk: int, writer: _ChunkWriter, result: ChunkResult, clock: _Clock) -> None:
    """One labelled image: regions, PNG mask, rows; a failure is an errors row."""
    try:
        with clock("encode"):
            rows = regions(out, pred.image_probs, bundle.classes)
            png = encode_mask(out.labels)
    except Exception as err:
        writer.rows["errors"].append(_error_row(opts, chunk, d.uri, "priors", err))
        return
    with clock("encode"):
        _image_rows(bundle, d, pred, out.labels, rows, png, ms, opts, chunk, writer, result)


def _image_rows(bundle: ModelBundle, d: _Decoded, pred: Prediction, labels: np.ndarray,
                regions: list[dict[str, Any]], png: bytes, ms: dict[str, float], opts: SegmentOptions, chunk: int,
                writer: _ChunkWriter, result: ChunkResult) -> None:
    """One segmented image's rows (regions, masks, images), counts and thumbnail."""
    key = image_key(d.uri)
    h, w = labels.shape
    writer.rows["regions"].extend({"run_id": opts.run_id, "image_key": key, **r} for r in regions)
    writer.rows["masks"].append({"run_id": opts.run_id, "image_key": key, "width": w, "height": h, "mask_png": png})
    writer.rows["images"].append(_image_row(bundle, d, pred, regions, ms, opts, chunk, (h, w)))
    result.count_image(regions, ms)
    if len(result.thumbnails) < opts.thumbnails:
        result.thumbnails.append({"uri": d.uri, "labels": ", ".join(r["class_name"] for r in regions[:3]),
                                  "png": overlay_thumbnail(d.rgb, labels)})


def _image_row(bundle: ModelBundle, d: _Decoded, pred: Prediction, regions: Sequence[Mapping[str, Any]],
               ms: Mapping[str, float], opts: SegmentOptions, chunk: int, size: tuple[int, int]) -> dict[str, Any]:
    """The ``images`` row of one segmented image."""
    classes, (h, w) = bundle.classes, size
    order = np.argsort(-pred.image_probs)
    return {
        "run_id": opts.run_id, "model_id": bundle.model_id, "image_key": image_key(d.uri), "image_uri": d.uri,
        "content_sha256": d.sha, "width": w, "height": h, "status": "ok",
        "top_class": classes[order[0]], "top_prob": float(pred.image_probs[order[0]]),
        "labels": [r["class_name"] for r in regions],
        "class_probs": [{"name": classes[i], "prob": float(pred.image_probs[i])} for i in order[:TOP_CLASSES]],
        "priors": ",".join(opts.priors) or "none", "inference_ms": pred.inference_ms,
        "prior_ms": float(sum(ms.values())), "forward_width": pred.forward_size[1],
        "forward_height": pred.forward_size[0], "source_format": d.fmt, "chunk": chunk,
        "processed_at": _now(), **_source_columns(d.meta),
    }


def _source_columns(meta: SourceMeta | None) -> dict[str, Any]:
    """The ``images`` row's ``source_*`` columns: what the listing said (nulls where it said nothing)."""
    if meta is None:
        return {}
    return {"source_size": meta.size, "source_etag": meta.etag, "source_mtime": meta.mtime,
            "source_member_offset": meta.member_offset, "source_member_size": meta.member_size}
