"""The host jobs in flight, from the flow's process: inputs decoded ahead of the device
(:class:`Feed`), masks encoded after it (:class:`Encoder`).

Jobs go to the host pool (:mod:`.hostpool`) and their outcomes come back in input order. Both
queues are bounded in pixels, not in images (:func:`~.batching.hold_weight`: a 500x375 photo
is 1, a 12-megapixel one 64): enough jobs in flight to keep every worker busy while the
device runs a batch, never more than a few batches' pixels. A chunk that stops early leaves no
job and no spool file behind.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import tables
from .batching import hold_weight
from .decode import Failed, Job, Prepared, PrepareOptions, Skipped, Transient, prepare
from .encode import Encoded, EncodeJob, RunContext, encode, overlay_thumbnail
from .forward import Pixels, Prediction
from .hostpool import BrokenProcessPool
from .inputs import ChunkSpec, stored_and_key
from .postprocess import Labelled
from .read import TransientInputError, read_chunk
from .state import WORKER_CRASHED, ChunkState

if TYPE_CHECKING:
    from .device import DeviceStage

__all__ = ["Encoder", "Feed", "Item", "jobs"]

_logger = logging.getLogger(__name__)
JOB_MS = 20.0  # a host job's work to aim at, in milliseconds of one worker


@dataclass
class Item:
    """A prepared input in the flow's process: its pixels (or device tensor) and prior inputs,
    in the shared-memory ``slot`` its job brought (given back by :meth:`Feed.done`)."""

    p: Prepared
    pixels: Pixels
    slot: int | None = None

    @property
    def weight(self) -> int:
        return hold_weight(*self.p.size)


def jobs(chunk: ChunkState, spec: ChunkSpec, done: tables.Done) -> Iterator[Job]:
    """The chunk's inputs as host jobs, each once: URLs to read (files), or bytes read here (a
    shard's members, streamed from the archive); read failures of members are errors rows.

    "Once" is per whole canonical URL (two that differ only in a credential are two inputs,
    with one stored URI and two keys: :func:`~.inputs.input_key`). Skip-existing: each job
    carries the content hashes this model segmented at its URI (:func:`~.decode.prepare`
    skips a match); members of a tar read again that failed by their own bytes
    (``done.failed``, :mod:`.incremental`) are counted skipped and not processed.
    """
    opts, seen = chunk.opts, set()
    if spec.shard is None:
        for i, url in enumerate(spec.uris):
            if url not in seen:
                seen.add(url)
                uri, key = stored_and_key(url)  # the spec's URIs are canonical
                yield Job(uri, url=url, meta=spec.meta_of(i), done_shas=frozenset(done.hashes.get(uri, ())),
                          key=key)
        return
    failed = done.failed
    records = read_chunk(spec, opts.max_bytes)
    while True:
        with chunk.clock("read"):
            window = [rec for _, rec in zip(range(opts.batch_size), records, strict=False)]
            if opts.done_index:  # shard members: look up a window of URIs at a time
                done = tables.done_lookup(opts.done_index, [r.uri for r in window if r.error is None])
        if not window:
            return
        for rec in window:
            if rec.uri in failed:
                chunk.result.skipped += 1
            elif rec.error is not None or rec.data is None:
                chunk.error_from(rec.uri, "read", rec.error or OSError("no data"), rec.key)
            elif rec.key not in seen:
                seen.add(rec.key)
                yield Job(rec.uri, data=rec.data, meta=rec.meta, done_shas=frozenset(done.hashes.get(rec.uri, ())),
                          key=rec.key)


class Feed:
    """Host jobs in flight, ahead of the forward pass, their outcomes back in input order.

    At most :attr:`ChunkState.ahead` photo-sized inputs are in flight: the count is divided by the
    weight of the latest images (a corpus of 12-megapixel photos keeps a few in flight, never
    fewer than one job per worker). Each job's inputs take a shared-memory slot each
    (:mod:`.handoff`), given back when the forward pass and the post-processing are done with
    them (:meth:`done`). Plain JPEGs the device decodes wait for a window of ``batch_size`` and
    are decoded in one call.
    """

    def __init__(self, chunk: ChunkState, popts: PrepareOptions, device: DeviceStage) -> None:
        self.chunk, self.popts, self.device = chunk, popts, device
        self.pending: deque[tuple[Future, list[Job]]] = deque()
        self.inflight = 0  # inputs in the pending jobs
        self.window: list[tuple[Prepared, Job]] = []
        self.recent_weight: int | None = None  # of the latest image decoded; until one is, one job a worker
        self.slots: set[int] = set()  # taken for this chunk's jobs and not given back yet
        self.per_job = 1  # inputs a job holds: grows while an input's host work is short (:meth:`_measured`)
        self.input_ms: float | None = None  # a worker's milliseconds an input (moving average)

    def items(self, jobs: Iterator[Job]) -> Iterator[Item]:
        """The chunk's inputs prepared, in order, in jobs of :attr:`per_job` inputs."""
        batch = []
        for job in jobs:
            batch.append(job)
            if len(batch) >= self.per_job:
                self._submit(batch)
                batch = []
                yield from self._ready(self._limit())
        if batch:
            self._submit(batch)
        yield from self._ready(0)
        yield from self._decoded()

    def _submit(self, jobs: list[Job]) -> None:
        jobs = [dataclasses.replace(job, slot=self._take()) for job in jobs]
        self.pending.append((self.chunk.pool.submit(prepare, jobs, self.popts), jobs))
        self.inflight += len(jobs)

    def _take(self) -> int | None:
        slot = self.chunk.pool.take_slot()
        if slot is not None:
            self.slots.add(slot)
        return slot

    def _give(self, slot: int | None) -> None:
        if slot is not None and slot in self.slots:
            self.slots.discard(slot)
            self.chunk.pool.give_slot(slot)

    def done(self, items: Sequence[Item]) -> None:
        """Items the device is done with: their slots back to the pool."""
        for item in items:
            self._give(item.slot)
            item.slot = None

    def _limit(self) -> int:
        """Inputs that may be in flight: ``ahead`` photo units over the latest image's weight, at
        least one job a worker (inline: none, each job runs when it is submitted)."""
        chunk = self.chunk
        workers, ahead = chunk.pool.workers, chunk.ahead
        return max(workers * self.per_job, ahead // (self.recent_weight or ahead)) if workers else 0

    def _ready(self, limit: int) -> Iterator[Item]:
        while self.pending and self.inflight > limit:
            future, jobs = self.pending.popleft()
            self.inflight -= len(jobs)
            for job, out in zip(jobs, self.chunk.outcomes(future, jobs, prepare, self.popts), strict=True):
                if isinstance(out, Prepared) and out.jpeg is not None:
                    self._give(job.slot)  # bytes only: the device decodes them
                    self.window.append((out, job))
                    if len(self.window) >= self.chunk.opts.batch_size:
                        yield from self._decoded()
                    continue
                item = self._accounted(out, job)
                if item is not None:
                    yield item

    def _measured(self, ms: float) -> None:
        """A job's round trip (pickling, the pipe, waking threads) is shared by its inputs: as many
        as a worker does in :data:`JOB_MS` (``ilp``: several photos; with superpixels: one, so
        every worker stays busy and the photos come back in order without a long wait)."""
        self.input_ms = ms if self.input_ms is None else 0.9 * self.input_ms + 0.1 * ms
        self.per_job = max(1, min(self.chunk.per_job, round(JOB_MS / max(self.input_ms, 0.1))))

    def _accounted(self, out: Any, job: Job) -> Item | None:
        """An outcome counted (stage times, skips, errors); a prepared one as an :class:`Item`."""
        chunk = self.chunk
        if isinstance(out, Prepared):
            chunk.result.add_ms(out.stage_ms)
            self._measured(sum(out.stage_ms.values()))
            out.load(chunk.pool.unpack)
            self.recent_weight = hold_weight(*out.size)
            return Item(out, Pixels(out.size, out.original, out.views), job.slot)
        self._give(job.slot)
        if isinstance(out, Skipped):
            chunk.result.skipped += 1
        elif isinstance(out, Failed):
            chunk.error(out.uri, out.stage, out.error_type, out.message, out.key)
        elif isinstance(out, Transient):
            raise TransientInputError(out.message)
        elif isinstance(out, BrokenProcessPool):
            chunk.error(job.uri, "decode", WORKER_CRASHED, str(out), job.key)
        else:  # the job itself raised (a bug): the input is an errors row, never lost
            chunk.error_from(job.uri, "decode", out, job.key)
        return None

    def _decoded(self) -> Iterator[Item]:
        """The window's plain JPEGs decoded on the device in one call; one it refuses (the call has
        no partial results) one at a time, and one refused alone by the host decoder, which
        validates it as every other input (a truncated JPEG is a ``decode`` error row)."""
        window, self.window = self.window, []
        if not window:
            return
        chunk = self.chunk
        tensors: list[torch.Tensor | None] = [None] * len(window)
        with chunk.clock("decode"):
            try:
                tensors = list(self.device.decode([p.jpeg for p, _ in window]))
            except Exception as err:
                _logger.debug("device decoding of %d images failed (%s); one at a time", len(window), err)
                for i, (p, _) in enumerate(window):
                    with contextlib.suppress(Exception):
                        tensors[i] = self.device.decode_one(p.jpeg)
        for (p, job), rgb in zip(window, tensors, strict=True):
            chunk.result.add_ms(p.stage_ms)
            if rgb is not None and tuple(rgb.shape[:2]) == p.size:
                p.jpeg = None
                yield Item(p, Pixels(p.size, rgb))
                continue
            again = [dataclasses.replace(job, data=p.jpeg, url=None, host_decode=True, slot=self._take())]
            for out in chunk.outcomes(chunk.pool.submit(prepare, again, self.popts), again, prepare, self.popts):
                item = self._accounted(out, again[0])
                if item is not None:
                    yield item

    def close(self) -> None:
        """A chunk that stops early (an error raised) leaves no job, no spool file and no slot
        behind: jobs not started are cancelled, running ones waited for (they write into their
        slots), then every slot the chunk took goes back."""
        self.inflight = 0
        while self.pending:
            future, _ = self.pending.popleft()
            future.cancel()
            with contextlib.suppress(BaseException):
                for out in future.result():
                    if isinstance(out, Prepared):
                        self.chunk.pool.release(out.arrays)
        for slot in list(self.slots):
            self._give(slot)


class Encoder:
    """Encode jobs in flight (PNG masks and rows, in the host pool), their rows added in order;
    at most :attr:`ChunkState.ahead` photo-sized masks at a time."""

    def __init__(self, chunk: ChunkState, run: RunContext) -> None:
        self.chunk, self.run = chunk, run
        self.pending: deque[tuple[Future, list[EncodeJob], Any, int]] = deque()
        self.weight = 0
        self.thumbnails: dict[str, str] = {}  # uri -> overlay, made before the labels leave
        self.per_job = chunk.per_job  # images a job holds, until their encoding time is known
        self.image_ms: float | None = None  # a worker's milliseconds an image (moving average)

    def submit(self, done: Sequence[tuple[Item, Prediction, Labelled]]) -> None:
        """A batch's labelled images, in jobs of at most :attr:`per_job` images (as even as can be),
        each job's label maps packed together (one shared-memory slot a job). A job's round trip
        costs the flow's process more than an image's rows: as many images as a worker encodes
        in :data:`JOB_MS` (a 500x375 mask takes about 1.5 ms: a batch of 8 is one job)."""
        chunk = self.chunk
        for item, _, out in done:
            if len(chunk.result.thumbnails) + len(self.thumbnails) < chunk.opts.thumbnails:
                rgb = item.pixels.largest()
                self.thumbnails[item.p.uri] = overlay_thumbnail(
                    rgb.cpu().numpy() if isinstance(rgb, torch.Tensor) else rgb, out.labels)
        parts = -(-len(done) // max(1, self.per_job))
        for k in range(parts):
            part = done[k * len(done) // parts:(k + 1) * len(done) // parts]
            labels = chunk.pool.pack({str(i): out.labels for i, (_, _, out) in enumerate(part)})
            jobs = [_encode_job(item.p, pred, out, str(i)) for i, (item, pred, out) in enumerate(part)]
            w = sum(hold_weight(*j.size) for j in jobs)
            self.pending.append((chunk.pool.submit(encode, jobs, self.run, labels), jobs, labels, w))
            self.weight += w

    def drain(self, limit: int) -> None:
        """Rows of the encoded images, in order, until at most ``limit`` photo-sized masks are in flight."""
        chunk = self.chunk
        while self.pending and (self.weight > limit or limit == 0):
            future, jobs, labels, w = self.pending.popleft()
            self.weight -= w
            outcomes = chunk.outcomes(future, jobs, encode, self.run, labels)
            chunk.pool.release(labels)
            for job, out in zip(jobs, outcomes, strict=True):
                if isinstance(out, Encoded):
                    self._rows(out, job)
                elif isinstance(out, BrokenProcessPool):
                    chunk.error(job.uri, "encode", WORKER_CRASHED, str(out), job.key)
                else:
                    chunk.error_from(job.uri, "encode", out, job.key)

    def _rows(self, enc: Encoded, job: EncodeJob) -> None:
        result, rows = self.chunk.result, self.chunk.writer.rows
        result.stage_seconds["encode"] += enc.encode_ms / 1000
        self.image_ms = enc.encode_ms if self.image_ms is None else 0.9 * self.image_ms + 0.1 * enc.encode_ms
        self.per_job = max(1, round(JOB_MS / max(self.image_ms, 0.1)))
        rows["regions"].extend(enc.regions)
        rows["masks"].append(enc.mask)
        rows["images"].append(enc.image)
        result.count_image(enc.regions, job.prior_ms)
        png = self.thumbnails.pop(job.uri, None)
        if png is not None:
            result.thumbnails.append({"uri": job.uri, "labels": ", ".join(r["class_name"] for r in enc.regions[:3]),
                                      "png": png})

    def close(self) -> None:
        """Jobs not started cancelled, running ones waited for; their labels' memory given back."""
        while self.pending:
            future, _, labels, _ = self.pending.popleft()
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result()
            self.chunk.pool.release(labels)


def _encode_job(p: Prepared, pred: Prediction, out: Labelled, labels: str) -> EncodeJob:
    """What an encode job needs of one image: the name of its label map (shipped with the job's)
    and the statistics of the labels present only (a few values, not 256 of each)."""
    present = np.flatnonzero(out.counts)
    return EncodeJob(p.uri, p.sha, p.fmt, p.meta, labels, tuple(out.labels.shape), present, out.counts[present],
                     out.prob_sum[present], out.boxes[present], pred.image_probs, pred.inference_ms,
                     pred.forward_size, dict(p.prior_ms), p.key)
