"""One chunk of segment-corpus: read -> decode -> batched forward -> post-processing -> PNG -> Parquet.

A pipelined engine built of small generators over standard tools (``concurrent.futures``):

- **read** on the calling thread (sequential I/O of the chunk's inputs, the skip-existing
  checks and the content hash);
- **decode and prior inputs** (:func:`~weakseg.images.decode_image`, then superpixels and
  proposals, :func:`~weakseg.tasks.segment.inference.compute_prior_inputs`) as jobs in the
  process's host pool, up to ``ahead`` inputs ahead of the forward pass (PIL, OpenCV, scipy
  and scikit-image's Felzenszwalb release the GIL in their loops); on CUDA, with no prior
  that needs host pixels, JPEGs are decoded on the device instead
  (:mod:`~weakseg.tasks.segment.device_decode`, nvjpeg);
- **batches bucketed by input shape** (:func:`_buckets`,
  :func:`~weakseg.tasks.segment.inference.batch_key`): full batches of one padded shape,
  whose photos may differ by up to a stride but are each padded only from their own
  edges, a bounded number of images waiting;
- **forward and post-processing** on the model's device, on the calling thread
  (:func:`~weakseg.tasks.segment.inference.predict`, then
  :func:`~weakseg.tasks.segment.postprocess.label_batch`: only uint8 labels and per-class
  vectors come back);
- **PNG encoding** as pool jobs, rows added in input order as they finish;
- **Parquet**: the chunk's tables written side by side in the pool, ``images`` last.

Every queue is bounded (``ahead`` decoded inputs, :func:`bucket_hold` images in buckets,
``ahead`` encodes), so memory does not grow with the chunk or the corpus. With ``host_workers=0``
(the default when the model runs on the CPU, whose cores the forward pass already uses)
the same code runs inline, one stage after the other. ``stage_seconds`` are busy seconds
per stage, timed where the work runs, so with a pool they add up over threads.

One error policy: an input that fails to read, decode, run or encode becomes an ``errors``
row (stage, error_type, message) and the rest of the chunk goes on; a batch whose
post-processing fails is retried image by image. Only a failure to *write* the chunk's
files (or a transient read error) raises: the Prefect task then retries the whole chunk,
which rewrites the same file names.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
import torch

from ..errors import ErrorRecord
from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, decode_image, voc_palette
from ..ingest.sources import image_key
from ..storage import redact
from . import tables
from .device_decode import DecodeMode, decode_jpeg_on, decode_jpegs_on, device_decoding, jpeg_header
from .inference import (
    DEFAULT_MAX_SIDE,
    ModelBundle,
    Prediction,
    batch_key,
    compute_prior_inputs,
    load_model,
    load_pinned,
    model_loads,
    predict,
)
from .inputs import ChunkSpec, InputRecord, SourceMeta, archive_uri, read_chunk, stored_uri
from .postprocess import Labelled, label_batch, regions
from .tta import parse_tta

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
HOST_WORKERS_ENV = "WEAKSEG_HOST_WORKERS"  # overrides the automatic host pool size (host_workers())
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
    host_workers: int | None = None  # threads for decode, prior inputs, PNG, Parquet (None: host_workers())
    decode: DecodeMode = "auto"  # where JPEGs are decoded (device_decode.device_decoding; auto: CUDA, no host priors)


@dataclass
class ChunkResult:
    index: int
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    forward_batches: int = 0  # forward passes: batches hold images of one input shape (see segment_chunk)
    forward_images: int = 0
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
    rgb: np.ndarray | torch.Tensor  # uint8 [H, W, 3] on the host, or on the model's device (device_decode)
    fmt: str
    meta: SourceMeta | None = None

    def host_rgb(self) -> np.ndarray:
        return self.rgb.cpu().numpy() if isinstance(self.rgb, torch.Tensor) else self.rgb


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
    """Accumulates one chunk's rows (from the calling thread only); writes each table's file atomically at the end."""

    def __init__(self, opts: SegmentOptions, spec: ChunkSpec) -> None:
        self.opts, self.spec = opts, spec
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in tables.CHUNK_TABLES}

    def _write(self, table: str) -> None:
        tables.crash_point(table, self.spec.index)
        url = tables.chunk_file(self.opts.out, table, self.opts.run_date, self.opts.run_id, self.spec.index)
        if self.rows[table]:
            tables.write_rows(url, table, self.rows[table])
        else:  # nothing to write (e.g. all skipped): drop an earlier attempt's file of this name
            tables.remove_file(url)

    def flush(self, pool: Executor | None = None) -> None:
        """The tables before ``images`` side by side in ``pool`` (Arrow and fsspec release the GIL), ``images`` last."""
        first = tables.CHUNK_TABLES[:-1]
        if pool is None:
            for table in first:
                self._write(table)
        else:
            for future in [pool.submit(self._write, table) for table in first]:
                future.result()
        self._write(tables.CHUNK_TABLES[-1])


class _Clock:
    """Adds the time spent inside ``with clock(stage):`` to a stage of ``stage_seconds`` (thread-safe:
    pool threads time their own stages, so a stage's seconds are busy seconds summed over threads)."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - t0
            with self._lock:
                self.seconds[stage] += elapsed


class _Inline(Executor):
    """An executor that runs each job when it is submitted: the engine with ``host_workers=0``
    (one thread, stages one after the other, the same code path as with a pool)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # delivered through the future, as a pool would
            future.set_exception(err)
        return future


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def host_workers(requested: int | None, device: torch.device) -> int:
    """Threads for the host-side stages (decode, prior inputs, PNG, Parquet): ``requested``, else
    ``$WEAKSEG_HOST_WORKERS``, else every core when the model runs on an accelerator, and none (0:
    inline) when it runs on the CPU, whose cores the forward pass already keeps busy."""
    if requested is None and os.environ.get(HOST_WORKERS_ENV, "").strip():
        requested = int(os.environ[HOST_WORKERS_ENV])
    if requested is not None:
        if requested < 0:
            raise ValueError(f"host workers must be >= 0, not {requested}")
        return requested
    if device.type == "cpu":
        return 0
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _pool(workers: int) -> Executor:
    """The process's shared host pool of ``workers`` threads (chunks running side by side share it,
    so the threads stay sized to the cores); 0: :class:`_Inline`."""
    if workers == 0:
        return _Inline()
    with _POOLS_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="weakseg-host")
        return _POOLS[workers]


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


@dataclass
class _Failed:
    """An input that failed at ``stage``: it becomes an ``errors`` row."""

    uri: str
    stage: str
    err: BaseException


@dataclass
class _Prepared:
    """A decoded image with its host-side prior inputs, ready for the forward pass."""

    d: _Decoded
    inputs: dict[str, np.ndarray]
    ms: dict[str, float]


def _prepare(rec: InputRecord, sha: str, opts: SegmentOptions, clock: _Clock,
             decode_on: torch.device | None = None) -> _Prepared | _Failed:
    """Pool job: decode one input (on ``decode_on`` when it is a plain JPEG, see
    :mod:`.device_decode`) and compute its prior inputs (superpixels, proposals) on the host."""
    if decode_on is not None and jpeg_header(rec.data, opts.max_pixels) is not None:
        try:
            with clock("decode"):
                rgb = decode_jpeg_on(rec.data, decode_on)
            return _Prepared(_Decoded(rec.uri, sha, rgb, "JPEG", rec.meta), {}, {})
        except Exception as err:  # the host decoder below decodes it or says why it cannot
            _logger.debug("%s: device decoding failed (%s); decoding on the host", redact(rec.uri), err)
    try:
        with clock("decode"):
            dec = decode_image(rec.data, opts.max_pixels)
    except Exception as err:  # ImageError kinds; anything else is recorded the same way
        return _Failed(rec.uri, "decode", err)
    d = _Decoded(rec.uri, sha, np.asarray(dec.image), dec.format, rec.meta)
    try:
        with clock("priors"):
            inputs, ms = compute_prior_inputs(d.rgb, opts.priors)
    except Exception as err:
        return _Failed(rec.uri, "priors", err)
    return _Prepared(d, inputs, ms)


def _prepare_each(window: Sequence[tuple[InputRecord, str]], opts: SegmentOptions,
                  clock: _Clock) -> list[_Prepared | _Failed]:
    """Pool job: the inputs decoded on the host, one by one (:func:`_prepare`)."""
    return [_prepare(rec, sha, opts, clock) for rec, sha in window]


def _prepare_window(window: Sequence[tuple[InputRecord, str]], opts: SegmentOptions, clock: _Clock,
                    decode_on: torch.device) -> list[_Prepared | _Failed]:
    """Pool job where JPEGs are decoded on the device: a window's plain JPEGs in one call (one
    nvjpeg batch on CUDA); the other inputs, and each JPEG of a window the call refuses (it has
    no partial results), one by one as :func:`_prepare` does them."""
    plain = [i for i, (rec, _) in enumerate(window) if jpeg_header(rec.data, opts.max_pixels) is not None]
    decoded: dict[int, torch.Tensor] = {}
    if len(plain) > 1:
        try:
            with clock("decode"):
                decoded = dict(zip(plain, decode_jpegs_on([window[i][0].data for i in plain], decode_on),
                                   strict=True))
        except Exception as err:
            _logger.debug("device decoding of %d images failed (%s); one at a time", len(plain), err)
    device_ok = set(plain)  # the others' headers were read above: straight to the host decoder
    return [_Prepared(_Decoded(rec.uri, sha, decoded[i], "JPEG", rec.meta), {}, {}) if i in decoded
            else _prepare(rec, sha, opts, clock, decode_on if i in device_ok else None)
            for i, (rec, sha) in enumerate(window)]


def _prepared(records: Iterator[InputRecord], opts: SegmentOptions, spec: ChunkSpec, writer: _ChunkWriter,
              result: ChunkResult, done: tables.Done, clock: _Clock, pool: Executor,
              ahead: int, decode_on: torch.device | None = None) -> Iterator[_Prepared]:
    """Decoded images with their prior inputs, in input order, decoded in ``pool`` up to ``ahead``
    inputs ahead of the consumer (one job an input, or one a window when the device decodes);
    read and decode failures and skipped inputs are accounted here."""
    index = opts.done_index
    seen: set[str] = set()
    pending: deque[tuple[Future, int]] = deque()  # a job's future and how many inputs it prepares
    waiting = 0

    def ready(limit: int) -> Iterator[_Prepared]:
        nonlocal waiting
        while waiting > limit:
            future, n = pending.popleft()
            waiting -= n
            for out in future.result():
                if isinstance(out, _Failed):
                    writer.rows["errors"].append(_error_row(opts, spec.index, out.uri, out.stage, out.err))
                else:
                    yield out

    for window in _windows(_timed(records, clock, "read"), opts.batch_size):
        if index and spec.shard is not None:  # shard members: look up a batch of URIs at a time
            with clock("read"):
                done = tables.done_lookup(index, [r.uri for r in window if r.error is None])
        todo: list[tuple[InputRecord, str]] = []
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
            todo.append((rec, sha))
        if decode_on is not None and todo:
            pending.append((pool.submit(_prepare_window, todo, opts, clock, decode_on), len(todo)))
            waiting += len(todo)
            yield from ready(ahead)
            continue
        for rec, sha in todo:
            pending.append((pool.submit(_prepare_each, [(rec, sha)], opts, clock), 1))
            waiting += 1
            yield from ready(ahead)
    yield from ready(0)


HOLD_PHOTO_PIXELS = 500 * 375  # what one image of a bucket hold is: a larger one counts as several


def bucket_hold(batch_size: int, device: torch.device) -> int:
    """Images of up to :data:`HOLD_PHOTO_PIXELS` that may wait in buckets for a full batch (a
    larger image counts as several, :func:`hold_weight`): two batches' worth on the CPU, whose
    throughput hardly depends on the batch; eight on an accelerator, where a corpus of many
    photo shapes otherwise runs part-empty passes (bench/batching.py: 5.0 -> 11.7 images a
    pass at batch 64 in chunks of 512 of a web-like size mix). At batch 64 that is at most
    about 288 MB of decoded pixels a chunk, whatever the photos' size."""
    return (2 if device.type == "cpu" else 8) * batch_size


def hold_weight(h: int, w: int) -> int:
    """How many :data:`HOLD_PHOTO_PIXELS` photos a decoded ``h x w`` image weighs in a bucket hold."""
    return max(1, -(-h * w // HOLD_PHOTO_PIXELS))


def _buckets(items: Iterator[_Prepared], key: Callable[[_Prepared], Hashable], size: int,
             hold: int, weight: Callable[[_Prepared], int] = lambda _: 1) -> Iterator[list[_Prepared]]:
    """Batches of up to ``size`` images of one ``key`` (their input shapes: no padding between
    them, full batches where the corpus allows); the waiting images weigh at most ``hold``
    (each ``weight``, 1 by default): past it, the fullest bucket goes."""
    buckets: dict[Hashable, list[_Prepared]] = {}
    weights: dict[Hashable, int] = {}
    held = 0
    for item in items:
        k = key(item)
        buckets.setdefault(k, []).append(item)
        w = weight(item)
        weights[k] = weights.get(k, 0) + w
        held += w
        if len(buckets[k]) >= size:
            held -= weights.pop(k)
            yield buckets.pop(k)
        while held > hold:  # one step past it with unit weights; a heavy image may take more
            fullest = max(buckets, key=lambda b: len(buckets[b]))
            held -= weights.pop(fullest)
            yield buckets.pop(fullest)
    yield from sorted(buckets.values(), key=len, reverse=True)


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
    workers = host_workers(opts.host_workers, bundle.device)
    pool = _pool(workers)
    ahead = 0 if workers == 0 else max(opts.batch_size, 2 * workers)  # inputs decoded ahead of the forward
    writer = _ChunkWriter(opts, spec)
    with clock("read"):
        to_read, done = skip_unchanged(spec, opts.done_index, result)
    records = read_chunk(to_read, opts.max_bytes) if to_read is not None else iter(())
    stride = bundle.model.stride
    decode_on = bundle.device if device_decoding(opts.decode, bundle.device, opts.priors) else None

    scales = parse_tta(bundle.resolve_tta(opts.tta)).scales

    def size_of(p: _Prepared) -> tuple[tuple[int, int], ...]:
        return batch_key(*p.d.rgb.shape[:2], stride, opts.max_side, opts.min_side, scales)

    encoding: deque[tuple[_Prepared, Prediction, Future]] = deque()
    try:
        prepared = _prepared(records, opts, spec, writer, result, done, clock, pool, ahead, decode_on)
        for batch in _buckets(prepared, size_of, opts.batch_size, bucket_hold(opts.batch_size, bundle.device),
                              lambda p: hold_weight(*p.d.rgb.shape[:2])):
            preds = _forward(bundle, batch, opts, spec.index, writer, result)
            if preds is not None:
                _postprocess(bundle, batch, preds, thresholds, opts, spec.index, writer, clock, pool, encoding)
            _rows(bundle, encoding, ahead, opts, spec.index, writer, result, clock)
        _rows(bundle, encoding, 0, opts, spec.index, writer, result, clock)
    finally:
        for *_, future in encoding:  # a chunk that raises (e.g. a transient read error) leaves no job behind
            future.cancel()
    with clock("write"):
        writer.flush(None if workers == 0 else pool)
    result.count_errors(writer.rows["errors"])
    result.seconds = time.perf_counter() - started
    return result


def _forward(bundle: ModelBundle, batch: Sequence[_Prepared], opts: SegmentOptions, chunk: int,
             writer: _ChunkWriter, result: ChunkResult) -> list[Prediction] | None:
    """The batch's forward pass; a failure (e.g. out of memory on one odd batch) makes errors rows."""
    t0 = time.perf_counter()
    try:
        return predict(bundle, [p.d.rgb for p in batch], opts.max_side, opts.min_side, opts.tta)
    except Exception as err:
        _logger.warning("chunk %d: forward pass failed for %d images: %s", chunk, len(batch), redact(str(err)))
        for p in batch:
            writer.rows["errors"].append(_error_row(opts, chunk, p.d.uri, "inference", err))
        return None
    finally:
        elapsed = time.perf_counter() - t0
        result.stage_seconds["forward"] += elapsed
        result.forward_seconds += elapsed
        result.forward_batches += 1
        result.forward_images += len(batch)


def _label(bundle: ModelBundle, preds: Sequence[Prediction], inputs: Sequence[Mapping[str, np.ndarray]],
           thresholds: Mapping[str, np.ndarray], priors: Sequence[str]) -> list[Labelled | BaseException]:
    """Device post-processing of a batch; when the batch fails, image by image, so only the
    images that fail alone become errors (never a lost batch)."""
    def one(ps, ins):
        return label_batch(ps, ins, priors, thresholds, len(bundle.classes), bundle.background_index,
                           bundle.device, _band_bytes(bundle))
    try:
        return list(one(preds, inputs))
    except Exception as err:
        if len(preds) == 1:
            return [err]
    out: list[Labelled | BaseException] = []
    for p, i in zip(preds, inputs, strict=True):
        try:
            out.extend(one([p], [i]))
        except Exception as err:
            out.append(err)
    return out


def _postprocess(bundle: ModelBundle, batch: Sequence[_Prepared], preds: Sequence[Prediction],
                 thresholds: Mapping[str, np.ndarray], opts: SegmentOptions, chunk: int, writer: _ChunkWriter,
                 clock: _Clock, pool: Executor, encoding: deque) -> None:
    """Device post-processing of a predicted batch; each labelled image's PNG goes to the pool."""
    t0 = time.perf_counter()
    with clock("postprocess"):
        labelled = _label(bundle, preds, [p.inputs for p in batch], thresholds, opts.priors)
    share = (time.perf_counter() - t0) * 1000 / len(batch)
    for p, pred, out in zip(batch, preds, labelled, strict=True):
        if isinstance(out, BaseException):
            writer.rows["errors"].append(_error_row(opts, chunk, p.d.uri, "priors", out))
            continue
        p.ms["labels"] = share
        encoding.append((p, pred, pool.submit(_encode, out, pred.image_probs, bundle.classes, clock)))


def _encode(out: Labelled, image_probs: np.ndarray, classes: Sequence[str],
            clock: _Clock) -> tuple[np.ndarray, list[dict[str, Any]], bytes]:
    """Pool job: an image's regions and PNG mask."""
    with clock("encode"):
        return out.labels, regions(out, image_probs, classes), encode_mask(out.labels)


def _rows(bundle: ModelBundle, encoding: deque, limit: int, opts: SegmentOptions, chunk: int,
          writer: _ChunkWriter, result: ChunkResult, clock: _Clock) -> None:
    """Rows of the encoded images, in order, until at most ``limit`` are still in the pool."""
    while len(encoding) > limit:
        p, pred, future = encoding.popleft()
        try:
            labels, rows, png = future.result()
        except Exception as err:
            writer.rows["errors"].append(_error_row(opts, chunk, p.d.uri, "priors", err))
            continue
        with clock("encode"):
            _image_rows(bundle, p.d, pred, labels, rows, png, p.ms, opts, chunk, writer, result)


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
                                  "png": overlay_thumbnail(d.host_rgb(), labels)})


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
