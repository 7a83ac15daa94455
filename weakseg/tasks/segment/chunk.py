"""One chunk of segment-corpus: read -> decode -> batch -> forward -> post-process -> encode -> write.

The stages, each in a module of its own:

- **read** and **decode** (:mod:`.read`, :mod:`.decode`): host jobs in the process's host
  pool (:mod:`.hostpool`: worker processes, or inline with ``host_workers=0``), up to a
  bounded number of inputs ahead of the forward pass (:class:`~.queues.Feed`); a shard's
  members are read here, on the chunk's thread, and go to the jobs with their bytes. On
  CUDA, with no prior that needs host pixels, plain JPEGs come back as bytes and are decoded
  on the device (:mod:`.device_decode`, one nvjpeg call a window);
- **batch** (:mod:`.batching`): full batches of one input shape, a bounded weight of pixels
  waiting;
- **forward** and **post-process** on the model's device (:mod:`.device`:
  :func:`~.forward.predict`, then :func:`~.postprocess.label_batch`: only ``uint8`` labels
  and per-class vectors come back);
- **encode** (:mod:`.encode`): host jobs again, PNG masks and the tables' rows, their
  outcomes back in order (:class:`~.queues.Encoder`);
- **write** (:mod:`.write`): the chunk's four Parquet files, ``images`` last.

What the stages share (options, counts, clock, rows, the error policy) is :mod:`.state`.
Memory is bounded in pixels, not in images: the inputs being decoded ahead, the images
waiting in buckets and the masks being encoded each weigh their pixels
(:func:`~.batching.hold_weight`), so a chunk of 12-megapixel photos holds a few of them
where it would hold dozens of 500x375 ones. ``stage_seconds`` are busy seconds per stage,
timed where the work runs (summed over workers for the host stages).

One error policy: an input that fails to read, decode, run or encode becomes an ``errors``
row (stage, error_type, message) and the rest of the chunk goes on; a batch whose forward
pass or post-processing fails is retried image by image; a host worker that dies takes only
the input it was working on alone with it (``WorkerCrashed``). A transient read error, or a
failure to *write* the chunk's files, raises: the Prefect task then retries the whole chunk,
which rewrites the same file names.
"""
from __future__ import annotations

import contextlib
import os
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from ..devices import device_thread
from .batching import batch_key, bucket_hold, buckets
from .decode import PrepareOptions
from .device import DeviceStage, run_batch
from .device_decode import device_decoding
from .encode import RunContext
from .hostpool import default_host_workers, host_pool
from .incremental import skip_unchanged
from .inputs import ChunkSpec
from .model import ModelBundle, load_model, load_pinned, model_loads
from .queues import Encoder, Feed, Item, jobs
from .state import STAGES, ChunkResult, ChunkState, Clock, SegmentOptions
from .tta import parse_tta

__all__ = ["STAGES", "ChunkResult", "DeviceStage", "SegmentOptions", "host_workers", "segment_chunk"]

_WRITERS = ThreadPoolExecutor(3, thread_name_prefix="weakseg-write")  # a chunk's first three files side by side


def host_workers(requested: int | None, device: torch.device) -> int:
    """Worker processes for the host stages (:func:`~.hostpool.default_host_workers`): every core
    but one on an accelerator, none (inline) on the CPU, unless asked."""
    return default_host_workers(requested, device.type != "cpu")


def segment_chunk(spec: ChunkSpec, opts: SegmentOptions, bundle: ModelBundle | None = None) -> ChunkResult:
    """Segment every input of one chunk and write its four table files (see module doc)."""
    started = time.perf_counter()
    result = ChunkResult(spec.index, worker=f"{socket.gethostname()}:{os.getpid()}")
    clock = Clock(result.stage_seconds)
    loads = model_loads()
    with clock("load"):
        if bundle is None:
            bundle = (load_pinned(opts.model, opts.model_sha256, opts.device) if opts.model_sha256
                      else load_model(opts.model, opts.device))
    result.model_loads = model_loads() - loads
    thresholds = {p: np.asarray(v, dtype=np.float64) for p, v in opts.thresholds.items()} or bundle.thresholds
    pool = host_pool(host_workers(opts.host_workers, bundle.device))
    device = DeviceStage(bundle, opts, thresholds)
    result.host_workers, result.precision = pool.workers, device.precision
    chunk = ChunkState(spec, opts, bundle, pool, result, clock)
    with clock("read"):
        to_read, done, skipped = skip_unchanged(spec, opts.done_index)
    result.skipped += skipped
    scales = tuple(parse_tta(bundle.resolve_tta(opts.tta)).scales)
    popts = PrepareOptions(opts.max_bytes, opts.max_pixels, tuple(opts.priors), bundle.model.stride, opts.max_side,
                           opts.min_side, scales, device_decoding(opts.decode, bundle.device, opts.priors))
    run = RunContext(opts.run_id, bundle.model_id, tuple(bundle.classes), ",".join(opts.priors) or "none", spec.index)
    stride = bundle.model.stride

    def key(item: Item) -> tuple[tuple[int, int], ...]:
        return batch_key(*item.p.size, stride, opts.max_side, opts.min_side, scales)

    feed = Feed(chunk, popts, device)
    encoder = Encoder(chunk, run)
    on_device = device_thread(bundle.device)
    running: tuple[list[Item], Future] | None = None  # the batch on the device while the next is gathered

    def finish(batch: list[Item], future: Future) -> None:
        """A batch back from the device: its labelled images to the encoders, its pixels let go."""
        preds, labelled = future.result()
        ready = []
        for item, pred, out in zip(batch, preds, labelled, strict=True):
            if isinstance(out, BaseException):
                chunk.error_from(item.p.uri, "priors", out, item.p.key)
            elif out is not None:  # None: its forward pass failed (an errors row already)
                ready.append((item, pred, out))
        encoder.submit(ready)
        feed.done(batch)
        encoder.drain(chunk.ahead)

    try:
        items = feed.items(jobs(chunk, to_read, done)) if to_read is not None else iter(())
        for batch in buckets(items, key, opts.batch_size, bucket_hold(opts.batch_size, bundle.device),
                             lambda item: item.weight):
            previous, running = running, (batch, on_device.submit(run_batch, chunk, device, batch))
            if previous is not None:
                finish(*previous)
        if running is not None:
            previous, running = running, None
            finish(*previous)
        encoder.drain(0)
    finally:
        if running is not None:  # a chunk that raises waits for its batch on the device before cleaning up
            with contextlib.suppress(BaseException):
                running[1].result()
        feed.close()
        encoder.close()
    with clock("write"):
        chunk.writer.flush(None if pool.workers == 0 else _WRITERS)
    result.count_errors(chunk.writer.rows["errors"])
    result.seconds = time.perf_counter() - started
    return result


