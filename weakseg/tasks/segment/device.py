"""What runs where the model runs, for a batch: JPEG decoding (when the device decodes), the
forward pass and the post-processing, each retried image by image when a batch fails.

:class:`DeviceStage` is the seam a benchmark's stand-in device replaces (``bench/host_pipeline.py``).
A batch whose forward pass fails (out of device memory on one odd batch) runs again one image
at a time, as does a batch whose post-processing fails: only an image that fails alone is an
``errors`` row (stage ``inference`` or ``priors``), never a lost batch.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ..storage import redact
from .device_decode import decode_jpeg_on, decode_jpegs_on
from .forward import Pixels, Prediction, predict, resolve_precision
from .model import ModelBundle
from .postprocess import Labelled, band_bytes, label_batch
from .queues import Item
from .state import ChunkState, SegmentOptions

__all__ = ["DeviceStage", "forward", "label", "run_batch"]

_logger = logging.getLogger(__name__)


class DeviceStage:
    """What runs where the model runs: JPEG decoding (when the device decodes), the forward pass
    and the post-processing of a batch. One object per chunk; a benchmark's stand-in device
    replaces it (``bench/host_pipeline.py``)."""

    def __init__(self, bundle: ModelBundle, opts: SegmentOptions, thresholds: Mapping[str, np.ndarray]) -> None:
        self.bundle, self.opts, self.thresholds = bundle, opts, thresholds
        self.precision = resolve_precision(opts.precision, bundle.device)

    def decode(self, jpegs: Sequence[bytes]) -> list[torch.Tensor]:
        """Plain JPEGs decoded on the device in one call (raises for all when one is refused)."""
        return decode_jpegs_on(jpegs, self.bundle.device)

    def decode_one(self, jpeg: bytes) -> torch.Tensor:
        return decode_jpeg_on(jpeg, self.bundle.device)

    def forward(self, images: Sequence[Pixels]) -> list[Prediction]:
        return predict(self.bundle, images, self.opts.max_side, self.opts.min_side, self.opts.tta, self.precision)

    def label(self, preds: Sequence[Prediction], inputs: Sequence[Mapping[str, np.ndarray]]) -> list[Labelled]:
        b = self.bundle
        return label_batch(preds, inputs, self.opts.priors, self.thresholds, len(b.classes), b.background_index,
                           b.device, band_bytes(b.device))

    def release(self) -> None:
        """After a failed batch on an accelerator: give its cached memory back before retrying smaller."""
        if self.bundle.device.type == "cuda":
            torch.cuda.empty_cache()


def forward(chunk: ChunkState, device: DeviceStage, batch: Sequence[Item]) -> list[Prediction | None]:
    """The batch's forward pass; when it fails (e.g. out of device memory), image by image, so
    only an image that fails alone is an errors row (None here)."""
    try:
        return _timed_forward(chunk, device, batch)
    except Exception as err:
        if len(batch) == 1:
            chunk.error_from(batch[0].p.uri, "inference", err, batch[0].p.key)
            return [None]
        _logger.warning("chunk %d: forward pass failed for %d images (%s); one at a time", chunk.spec.index,
                        len(batch), redact(str(err)))
        device.release()
    preds: list[Prediction | None] = []
    for item in batch:
        try:
            preds.extend(_timed_forward(chunk, device, [item]))
        except Exception as err:
            chunk.error_from(item.p.uri, "inference", err, item.p.key)
            preds.append(None)
    return preds


def _timed_forward(chunk: ChunkState, device: DeviceStage, batch: Sequence[Item]) -> list[Prediction]:
    result, t0 = chunk.result, time.perf_counter()
    try:
        return list(device.forward([item.pixels for item in batch]))
    finally:
        elapsed = time.perf_counter() - t0
        result.stage_seconds["forward"] += elapsed
        result.forward_seconds += elapsed
        result.forward_batches += 1
        result.forward_images += len(batch)


def label(chunk: ChunkState, device: DeviceStage, batch: Sequence[Item],
           preds: Sequence[Prediction | None]) -> list[Labelled | BaseException | None]:
    """Device post-processing of a batch's predicted images; when the batch fails, image by image,
    so only the images that fail alone become errors (never a lost batch)."""
    idx = [i for i, p in enumerate(preds) if p is not None]
    out: list[Labelled | BaseException | None] = [None] * len(batch)
    if not idx:
        return out
    with chunk.clock("postprocess"):
        try:
            for i, labelled in zip(idx, device.label([preds[i] for i in idx], [batch[i].p.inputs for i in idx]),
                                   strict=True):
                out[i] = labelled
        except Exception as err:
            device.release()
            for i in idx:
                try:
                    out[i] = device.label([preds[i]], [batch[i].p.inputs])[0] if len(idx) > 1 else err
                except Exception as one:
                    out[i] = one
    return [o if preds[i] is not None else None for i, o in enumerate(out)]


def run_batch(chunk: ChunkState, device: DeviceStage,
              batch: Sequence[Item]) -> tuple[list[Prediction | None], list[Labelled | BaseException | None]]:
    """A batch's forward pass and post-processing (:func:`forward`, :func:`label`): the device's
    work, run on its thread (:func:`~weakseg.tasks.devices.device_thread`) while the chunk's
    thread hands the previous batch to the encoders and gathers the next one."""
    preds = forward(chunk, device, batch)
    return preds, label(chunk, device, batch, preds)
