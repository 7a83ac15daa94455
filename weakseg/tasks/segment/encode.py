"""The host's last stage: an image's labels and statistics -> its PNG mask and table rows.

:func:`encode` is a job of the host pool (:mod:`.hostpool`), run in a worker process (inline
with 0 workers): the mask's PNG, the ``regions`` rows (one per class present, from the
per-label statistics the device computed, :class:`~.postprocess.Labelled`), the ``masks``
row and the ``images`` row. What the job needs of each image comes in an :class:`EncodeJob`;
the label maps of a job's images travel together in shared memory (:mod:`.handoff`: one slot
for the job, not one an image, so the slots last for the inputs decoded ahead). No torch, no
Prefect.
"""
from __future__ import annotations

import base64
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np

from ..images import voc_palette
from ..ingest.sources import image_key
from .handoff import Packed, unpack
from .inputs import SourceMeta

__all__ = ["TOP_CLASSES", "EncodeJob", "Encoded", "RunContext", "encode", "encode_mask", "overlay_thumbnail",
           "regions"]

TOP_CLASSES = 5  # class_probs holds this many (name, prob) pairs, best first
_PALETTE = np.array(voc_palette(), np.uint8).reshape(-1, 3)  # the overlay colours of thumbnails


@dataclass(frozen=True)
class RunContext:
    """What every row of a chunk shares."""

    run_id: str
    model_id: str
    classes: tuple[str, ...]
    priors: str  # the chain as the images row records it ("ilp,sppxl", or "none")
    chunk: int


@dataclass
class EncodeJob:
    uri: str
    sha: str
    fmt: str
    meta: SourceMeta | None
    labels: str  # the name of its uint8 [H, W] label map among the job's packed arrays (:func:`encode`)
    size: tuple[int, int]  # (h, w) of the labels
    present: np.ndarray  # the label values present (class indices, 255), ascending
    counts: np.ndarray  # int64 [P] pixels of each value present
    prob_sum: np.ndarray  # float64 [P] Σ probability of each over its pixels
    boxes: np.ndarray  # int64 [P, 4] x0, y0, x1, y1 (exclusive)
    image_probs: np.ndarray  # float64 [K]
    inference_ms: float
    forward_size: tuple[int, int]
    prior_ms: dict[str, float] = field(default_factory=dict)
    key: str = ""  # image_key (:func:`~.inputs.input_key`); "" : the hash of ``uri``


@dataclass
class Encoded:
    """One image's rows and what the chunk counts of it."""

    regions: list[dict[str, Any]]
    mask: dict[str, Any]
    image: dict[str, Any]
    encode_ms: float


def encode_mask(labels: np.ndarray) -> bytes:
    """Single-channel 8-bit PNG: pixel = class index, 255 = unlabelled."""
    ok, buf = cv2.imencode(".png", labels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding of the mask failed")
    return buf.tobytes()


def regions(labels_size: int, counts: np.ndarray, prob_sum: np.ndarray, boxes: np.ndarray,
            image_probs: np.ndarray, classes: Sequence[str]) -> list[dict[str, Any]]:
    """One ``regions`` row (without run_id / image_key) per class present, most pixels first."""
    rows = []
    for k in np.flatnonzero(counts[: len(classes)]):
        n = counts[k]
        x0, y0, x1, y1 = (int(v) for v in boxes[k])
        rows.append({
            "class_name": classes[k], "class_index": int(k), "pixel_count": int(n),
            "area_fraction": float(n / labels_size), "mean_prob": float(prob_sum[k] / n),
            "image_prob": float(image_probs[k]), "bbox_x0": x0, "bbox_y0": y0, "bbox_x1": x1, "bbox_y1": y1,
        })
    rows.sort(key=lambda r: -r["pixel_count"])
    return rows


def encode(jobs: Sequence[EncodeJob], run: RunContext, labels: Packed | Mapping[str, np.ndarray]
           ) -> list[Encoded | BaseException]:
    """Pool job: each image's PNG mask and rows, its label map ``labels[job.labels]`` (the job's label
    maps packed together, :func:`~.handoff.pack`; a job retried alone gets them all); a failure
    is that image's alone (returned, not raised)."""
    try:
        arrays = unpack(labels)
    except Exception as err:  # e.g. a spool file already mapped by a worker that died
        return [err for _ in jobs]
    out: list[Encoded | BaseException] = []
    for job in jobs:
        try:
            out.append(_one(job, run, arrays[job.labels]))
        except Exception as err:
            out.append(err)
    return out


def _one(job: EncodeJob, run: RunContext, labels: np.ndarray) -> Encoded:
    t0 = time.perf_counter()
    h, w = labels.shape
    counts, prob_sum, boxes = np.zeros(256, np.int64), np.zeros(256), np.zeros((256, 4), np.int64)
    counts[job.present], prob_sum[job.present], boxes[job.present] = job.counts, job.prob_sum, job.boxes
    rows = regions(labels.size, counts, prob_sum, boxes, job.image_probs, run.classes)
    png = encode_mask(labels)
    key = job.key or image_key(job.uri)
    classes = run.classes
    order = np.argsort(-job.image_probs)
    image = {
        "run_id": run.run_id, "model_id": run.model_id, "image_key": key, "image_uri": job.uri,
        "content_sha256": job.sha, "width": w, "height": h, "status": "ok",
        "top_class": classes[order[0]], "top_prob": float(job.image_probs[order[0]]),
        "labels": [r["class_name"] for r in rows],
        "class_probs": [{"name": classes[i], "prob": float(job.image_probs[i])} for i in order[:TOP_CLASSES]],
        "priors": run.priors, "inference_ms": job.inference_ms, "prior_ms": float(sum(job.prior_ms.values())),
        "forward_width": job.forward_size[1], "forward_height": job.forward_size[0], "source_format": job.fmt,
        "chunk": run.chunk, "processed_at": datetime.now(UTC), **_source_columns(job.meta),
    }
    return Encoded([{"run_id": run.run_id, "image_key": key, **r} for r in rows],
                   {"run_id": run.run_id, "image_key": key, "width": w, "height": h, "mask_png": png},
                   image, (time.perf_counter() - t0) * 1000)


def _source_columns(meta: SourceMeta | None) -> Mapping[str, Any]:
    """The ``images`` row's ``source_*`` columns: what the listing said (nulls where it said nothing)."""
    if meta is None:
        return {}
    return {"source_size": meta.size, "source_etag": meta.etag, "source_mtime": meta.mtime,
            "source_member_offset": meta.member_offset, "source_member_size": meta.member_size}


def overlay_thumbnail(rgb: np.ndarray, labels: np.ndarray, side: int = 128) -> str:
    """Image | overlay of the mask, as a PNG data URI for a markdown artifact (``rgb`` at any size)."""
    h, w = labels.shape
    s = side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    lab = cv2.resize(labels, size, interpolation=cv2.INTER_NEAREST)
    blend = (0.45 * small + 0.55 * _PALETTE[lab]).astype(np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(np.concatenate([small, blend], axis=1), cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(buf.tobytes()).decode() if ok else ""
