"""Which images share a forward pass: forward sizes, input shapes, and the buckets a chunk fills.

An image is brought to its *forward size* (:func:`forward_size`: the longer side into
``[min_side, max_side]``, at least :data:`MIN_CELLS` score cells a side) and edge-padded up
to a multiple of the stride, its *input shape* (:func:`input_shape`). Images of one input
shape share a batch whatever their forward sizes: each is resized to its own size and padded
from its own edges, so its input is the one it has alone. :func:`buckets` fills batches of
one key from a stream of decoded images, holding a bounded weight of pixels while it waits.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .tta import view_size

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_MAX_SIDE", "HOLD_PHOTO_PIXELS", "MIN_CELLS", "batch_key", "bucket_hold", "buckets",
           "by_input_shape", "forward_size", "hold_weight", "input_shape", "view_sizes"]

T = TypeVar("T")
DEFAULT_MAX_SIDE = 512  # forward-pass longer side; the probabilities come back at full size
MIN_CELLS = 4  # smaller inputs are enlarged to at least this many score cells per side


def forward_size(h: int, w: int, stride: int, max_side: int, min_side: int = 0) -> tuple[int, int]:
    """Size fed to the network: longer side brought into [min_side, max_side], each side ≥ 4 cells."""
    longer = max(h, w)
    scale = min(1.0, max_side / longer)
    if longer * scale < min_side:
        scale = min(min_side, max_side) / longer
    cells = MIN_CELLS * stride
    return max(cells, round(h * scale)), max(cells, round(w * scale))


def input_shape(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """The shape a forward ``size`` runs at: each side edge-padded up to a multiple of ``stride``.

    Images of one input shape share a batch whatever their forward sizes: each is resized to
    its own size and padded from its own edges, so its input is the one it has alone (and its
    prediction too, up to the rounding of a batched convolution, as for any batch). Photos
    1-15 px apart (500x333, 500x334, 500x336 ...) then fill one batch.
    """
    return -(-size[0] // stride) * stride, -(-size[1] // stride) * stride


def view_sizes(h: int, w: int, stride: int, max_side: int, min_side: int,
               scales: Sequence[float]) -> list[tuple[int, int]]:
    """The forward size of each view at ``scales`` of an ``h x w`` image."""
    plain = forward_size(h, w, stride, max_side, min_side)
    return [view_size(plain, s, stride, MIN_CELLS) for s in scales]


def batch_key(h: int, w: int, stride: int, max_side: int, min_side: int = 0,
              scales: Sequence[float] = (1.0,)) -> tuple[tuple[int, int], ...]:
    """The input shapes of an ``h x w`` image's views at ``scales``: images with the same key
    fill the same batches in :func:`~.forward.predict` (a chunk's bucketing key)."""
    return tuple(input_shape(size, stride) for size in view_sizes(h, w, stride, max_side, min_side, scales))


def by_input_shape(images: Sequence[Any], stride: int, max_side: int, min_side: int,
                   scales: Sequence[float]) -> dict[tuple[int, int], list[tuple[int, int, tuple[int, int]]]]:
    """The batches :func:`~.forward.predict` runs: input shape -> (image, view, forward size) of every
    view, for ``[H, W, ...]`` images (host arrays or tensors)."""
    groups: dict[tuple[int, int], list[tuple[int, int, tuple[int, int]]]] = {}
    for i, im in enumerate(images):
        for v, size in enumerate(view_sizes(im.shape[0], im.shape[1], stride, max_side, min_side, scales)):
            groups.setdefault(input_shape(size, stride), []).append((i, v, size))
    return groups


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


def buckets(items: Iterator[T], key: Callable[[T], Hashable], size: int, hold: int,
            weight: Callable[[T], int] = lambda _: 1) -> Iterator[list[T]]:
    """Batches of up to ``size`` images of one ``key`` (their input shapes: no padding between
    them, full batches where the corpus allows); the waiting images weigh at most ``hold``
    (each ``weight``, 1 by default): past it, the fullest bucket goes."""
    waiting: dict[Hashable, list[T]] = {}
    weights: dict[Hashable, int] = {}
    held = 0
    for item in items:
        k = key(item)
        waiting.setdefault(k, []).append(item)
        w = weight(item)
        weights[k] = weights.get(k, 0) + w
        held += w
        if len(waiting[k]) >= size:
            held -= weights.pop(k)
            yield waiting.pop(k)
        while held > hold:  # one step past it with unit weights; a heavy image may take more
            fullest = max(waiting, key=lambda b: len(waiting[b]))
            held -= weights.pop(fullest)
            yield waiting.pop(fullest)
    yield from sorted(waiting.values(), key=len, reverse=True)
