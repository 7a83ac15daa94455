"""The host's first stage: an input's bytes -> its pixels at the sizes the forward pass needs, and the priors' inputs.

:func:`prepare` is a job of the host pool (:mod:`.hostpool`): it runs in a worker process
(inline with 0 workers) and imports neither torch nor Prefect. For each input it

1. reads the bytes when it has only a URL (files; a shard's members come with their bytes),
   refusing inputs over ``max_bytes`` before reading (:mod:`.read`);
2. hashes them and skips an input whose hash this model already segmented (``--skip-existing``);
3. decodes (:func:`weakseg.tasks.images.decode_image`: EXIF orientation, 8-bit RGB,
   ``max_pixels``), unless the model's device decodes JPEGs (:mod:`.device_decode`): then a
   plain, complete JPEG goes back as bytes;
4. shrinks the image to each view's forward size smaller than itself (the forward pass
   resizes those, so the flow's process never touches a photo's full pixels for them) and
   computes the priors' host inputs at full size (superpixels, objectness maps:
   :func:`~.proposals.compute_prior_inputs`).

Each outcome is a small picklable record; its arrays travel in shared memory (:mod:`.handoff`:
the slot the job brought, else a spool file). Errors become :class:`Failed` records with the error's type and
message (exceptions themselves need not survive pickling), a passing read failure a
:class:`Transient` one: the chunk is then retried whole.
"""
from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..images import ImageError, decode_image
from .batching import view_sizes
from .device_decode import jpeg_header
from .handoff import Packed, pack
from .inputs import SourceMeta
from .proposals import compute_prior_inputs
from .read import TransientInputError, read_file

__all__ = ["CRASH_ENV", "Failed", "Job", "PrepareOptions", "Prepared", "Skipped", "Transient", "error_kind",
           "prepare"]

# Fault injection, for the crash tests only (as tables.CRASH_ENV): a worker asked to prepare an
# input whose URI (a tar member's: whose member name) ends with this text exits at once, as a
# worker killed by the system would.
CRASH_ENV = "WEAKSEG_CRASH_PREPARING"


@dataclass(frozen=True)
class PrepareOptions:
    max_bytes: int
    max_pixels: int
    priors: tuple[str, ...]
    stride: int
    max_side: int
    min_side: int
    scales: tuple[float, ...] = (1.0,)  # the test-time views' scales of the forward size
    device_jpeg: bool = False  # plain JPEGs go back as bytes, decoded on the model's device


@dataclass(frozen=True)
class Job:
    """One input: a URL to read (files), or bytes already read (a shard's members)."""

    uri: str  # as stored: canonical, no credentials
    url: str | None = None
    data: bytes | None = None
    meta: SourceMeta | None = None
    done_shas: frozenset[str] = frozenset()  # content hashes this model segmented at this URI (skip-existing)
    host_decode: bool = False  # decode on the host even where the device could (its decoder refused it)
    slot: int | None = None  # the shared-memory slot for its arrays (handoff.Slots), taken by the flow's process
    key: str = ""  # image_key (:func:`~.inputs.input_key`: distinct for URLs that differ only in a credential)


@dataclass
class Prepared:
    """An input ready for the forward pass: its pixels per view size, or its JPEG bytes (device decoding).

    The arrays come back as one :class:`~.handoff.Packed` (``arrays``); :meth:`load` lays them
    out as ``views``, ``original`` and ``inputs`` in the receiving process.
    """

    uri: str
    sha: str
    fmt: str
    meta: SourceMeta | None
    size: tuple[int, int]  # (h, w) as displayed
    arrays: Packed | dict[str, np.ndarray] = field(default_factory=dict)
    prior_ms: dict[str, float] = field(default_factory=dict)  # per prior (the images row's prior_ms)
    stage_ms: dict[str, float] = field(default_factory=dict)  # read / decode / priors, where they ran
    jpeg: bytes | None = None  # device decoding: the plain JPEG's bytes
    views: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)  # shrunk to a view's size
    original: np.ndarray | None = None  # full pixels, when a view needs them (not shrunk)
    inputs: dict[str, np.ndarray] = field(default_factory=dict)  # the priors' host inputs
    key: str = ""  # image_key (:class:`Job`)

    @property
    def pixels(self) -> int:
        return self.size[0] * self.size[1]

    def load(self, unpack: Callable[[Packed | dict[str, np.ndarray]], dict[str, np.ndarray]]) -> Prepared:
        """The arrays laid out, as ``unpack`` (the receiving pool's) gives them."""
        for name, a in unpack(self.arrays).items():
            kind, _, key = name.partition(":")
            if kind == "view":
                h, w = key.split("x")
                self.views[int(h), int(w)] = a
            elif kind == "original":
                self.original = a
            else:
                self.inputs[key] = a
        self.arrays = {}
        return self


@dataclass(frozen=True)
class Failed:
    """An input that failed at ``stage``: it becomes an ``errors`` row."""

    uri: str
    stage: str
    error_type: str
    message: str
    key: str = ""


@dataclass(frozen=True)
class Skipped:
    uri: str


@dataclass(frozen=True)
class Transient:
    """A passing read failure: the chunk is retried whole."""

    uri: str
    message: str


Outcome = Prepared | Failed | Skipped | Transient


def error_kind(err: BaseException) -> str:
    """The ``errors.error_type`` of an exception: an :class:`ImageError`'s kind, else its class name."""
    return err.kind if isinstance(err, ImageError) else type(err).__name__


def prepare(jobs: Sequence[Job], opts: PrepareOptions) -> list[Outcome]:
    """Pool job: each input read, hashed, decoded, shrunk to its views and given its prior inputs."""
    return [_one(job, opts) for job in jobs]


def _one(job: Job, opts: PrepareOptions) -> Outcome:
    crash = os.environ.get(CRASH_ENV)
    if crash and (job.uri.endswith(crash) or job.uri.split("::", 1)[0].endswith(crash)):
        os._exit(70)
    ms: dict[str, float] = {}
    t0 = time.perf_counter()
    data = job.data
    if data is None:
        try:
            rec = read_file(job.url or job.uri, opts.max_bytes, meta=job.meta,
                            names=(job.uri, job.key) if job.key else None)
        except TransientInputError as err:
            return Transient(job.uri, str(err))
        if rec.error is not None or rec.data is None:
            err = rec.error or OSError("no data")
            return Failed(job.uri, "read", error_kind(err), str(err), job.key)
        data = rec.data
    sha = hashlib.sha256(data).hexdigest()
    ms["read"] = (time.perf_counter() - t0) * 1000
    if sha in job.done_shas:
        return Skipped(job.uri)
    if opts.device_jpeg and not job.host_decode:
        header = jpeg_header(data, opts.max_pixels)
        if header is not None:
            return Prepared(job.uri, sha, "JPEG", job.meta, header, jpeg=data, stage_ms=ms, key=job.key)
    t0 = time.perf_counter()
    try:
        dec = decode_image(data, opts.max_pixels)
    except Exception as err:  # ImageError kinds; anything else is recorded the same way
        return Failed(job.uri, "decode", error_kind(err), str(err), job.key)
    rgb = np.asarray(dec.image)
    h, w = rgb.shape[:2]
    arrays: dict[str, np.ndarray] = {}
    for size in dict.fromkeys(view_sizes(h, w, opts.stride, opts.max_side, opts.min_side, opts.scales)):
        if size[0] * size[1] < h * w:  # shrunk here, as the forward pass would (OpenCV's area filter)
            arrays[f"view:{size[0]}x{size[1]}"] = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)
        else:
            arrays["original"] = rgb  # enlarged, or run as is, by the forward pass
    ms["decode"] = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    try:
        inputs, prior_ms = compute_prior_inputs(rgb, opts.priors)
    except Exception as err:
        return Failed(job.uri, "priors", error_kind(err), str(err), job.key)
    for name, a in inputs.items():
        arrays[f"input:{name}"] = _compact(a) if name == "superpixels" else a
    ms["priors"] = (time.perf_counter() - t0) * 1000
    return Prepared(job.uri, sha, dec.format, job.meta, (h, w), pack(arrays, job.slot), prior_ms, ms, key=job.key)


def _compact(ids: np.ndarray) -> np.ndarray:
    """Superpixel ids in 16 bits when they fit (a 500x375 photo has hundreds): half the bytes to hand over."""
    return ids.astype(np.uint16) if ids.size and ids.min() >= 0 and ids.max() < 2**16 else ids
