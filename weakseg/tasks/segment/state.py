"""One chunk's run as the stages share it: its options and counts, the clock of its stages, its
rows, and the error policy every stage follows (:class:`ChunkState`).

An input that fails at a stage becomes an ``errors`` row (stage, error_type, message) and the
chunk goes on. A host job whose worker process died (:mod:`.hostpool`) is run again one input
at a time: an input whose job kills a fresh worker on its own is :data:`WORKER_CRASHED`, the
others are processed as if nothing happened.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..errors import ErrorRecord
from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..ingest.sources import image_key
from .batching import DEFAULT_MAX_SIDE
from .decode import error_kind
from .device_decode import DecodeMode
from .hostpool import BrokenProcessPool, HostPool
from .inputs import ChunkSpec
from .model import ModelBundle
from .write import ChunkWriter

__all__ = ["STAGES", "WORKER_CRASHED", "ChunkResult", "ChunkState", "Clock", "SegmentOptions"]

# Where a chunk's time goes (ChunkResult.stage_seconds): loading the model; reading (the
# skip-existing checks, the bytes, their hash); decoding (with the views' shrinking); the
# forward pass; post-processing on the model's device (upsampling, ILP, argmax, superpixel
# vote, objectness test, per-class statistics); the host-side priors' inputs (superpixels,
# box and segment proposals); encoding (the PNG mask, the rows); writing the Parquet files.
STAGES = ("load", "read", "decode", "forward", "postprocess", "priors", "encode", "write")
WORKER_CRASHED = "WorkerCrashed"  # the errors row of an input whose host job killed its worker alone


@dataclass(frozen=True)
class SegmentOptions:
    out: str
    run_id: str
    run_date: str
    model: str  # the run's pinned checkpoint copy (:func:`~weakseg.tasks.segment.model.pin_model`)
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
    host_workers: int | None = None  # worker processes for the host stages (None: host_workers())
    decode: DecodeMode = "auto"  # where JPEGs are decoded (device_decode.device_decoding; auto: CUDA, no host priors)
    precision: str = "auto"  # the forward pass's number format (forward.resolve_precision)


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
    host_workers: int = 0  # host worker processes the chunk's stages ran in (0: inline)
    precision: str = "fp32"  # the forward pass's number format

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

    def add_ms(self, stage_ms: Mapping[str, float]) -> None:
        for stage, ms in stage_ms.items():
            self.stage_seconds[stage] += ms / 1000


class Clock:
    """Adds the time spent inside ``with clock(stage):`` to a stage of ``stage_seconds``."""

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


class ChunkState:
    """The state of one chunk's run: its options, pool, writer, counts and clock."""

    def __init__(self, spec: ChunkSpec, opts: SegmentOptions, bundle: ModelBundle, pool: HostPool,
                 result: ChunkResult, clock: Clock) -> None:
        self.spec, self.opts, self.bundle, self.pool, self.result, self.clock = spec, opts, bundle, pool, result, clock
        self.writer = ChunkWriter(opts.out, opts.run_id, opts.run_date, spec.index)
        self.restarts_at_start = pool.restarts
        # Inputs decoded ahead of the forward pass (and masks being encoded), in 500x375-photo units:
        # enough to keep every worker busy while the device runs a batch (jobs are submitted only
        # as the batches are taken), never more than a few batches' pixels; inline, none.
        self.ahead = 3 * opts.batch_size + 2 * pool.workers if pool.workers else 0
        # Inputs a host job holds: a few, so a job's round trip (pickling, the pipe, waking a
        # thread) is shared by them, yet every worker has jobs while the device runs a batch.
        self.per_job = max(1, min(8, self.ahead // (2 * pool.workers))) if pool.workers else 1

    def error(self, uri: str, stage: str, error_type: str, message: str, key: str = "") -> None:
        """An errors row; ``key``: the input's image_key (:func:`~.inputs.input_key`), "" for the hash of ``uri``."""
        self.writer.rows["errors"].append(ErrorRecord(uri, key or image_key(uri), stage, error_type, message,
                                                      run_id=self.opts.run_id, chunk=self.spec.index,
                                                      occurred_at=datetime.now(UTC)).row())

    def error_from(self, uri: str, stage: str, err: BaseException, key: str = "") -> None:
        self.error(uri, stage, error_kind(err), str(err), key)

    def outcomes(self, future: Future, jobs: Sequence[Any], fn: Callable, *args: Any) -> list[Any]:
        """A host job's outcomes; when its worker died, each input again alone (an input whose job
        kills a fresh worker twice is :data:`WORKER_CRASHED`; one that raised, its own error)."""
        try:
            return future.result()
        except BrokenProcessPool:
            pass
        out = []
        for job in jobs:
            for attempt in range(2):
                self._check_restarts()
                try:
                    out.extend(self.pool.submit(fn, [job], *args).result())
                    break
                except BrokenProcessPool:
                    if attempt == 1:
                        out.append(BrokenProcessPool("the host worker process died on this input alone "
                                                     "(twice; out of memory, or a crash in a decoder)"))
        return out

    def _check_restarts(self) -> None:
        if self.pool.restarts - self.restarts_at_start > 2 * self.ahead:
            raise RuntimeError(f"host worker processes died {self.pool.restarts - self.restarts_at_start} times in "
                               f"chunk {self.spec.index}; retrying the chunk")


