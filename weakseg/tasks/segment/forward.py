"""The forward pass: images of any size -> per-cell class probabilities and the image-level prior.

One forward pass per batch of one input shape (:mod:`.batching`) gives, for every image,
its score cells' class probabilities (softmax of the dense score maps) and ``image_probs[K]``,
the image-level prior p(k|I) from the LSE scores over the cells that lie on the image, so
padding never counts: their softmax (the paper), or their sigmoid for a multi-label model
trained with a BCE term (``ModelConfig.image_prior``). Full-resolution probabilities are
made on demand from the cells (:meth:`Prediction.probs`, :func:`upsample_cells`: bilinear
between the cells' centres, ``ModelConfig.cell_offset``).

- Normalisation is training's (:func:`weakseg.tasks.tensors.normalize`, the checkpoint's mean/std).
- Images whose longer side is over ``max_side`` are shrunk for the forward pass; with
  ``min_side`` set, those under it are enlarged; any side under 4 score cells is enlarged.
- Test-time augmentation (``tta``, :mod:`weakseg.tasks.segment.tta`): the image at several
  scales of its forward size, optionally mirrored; the views' per-pixel and image-level
  probabilities are averaged. ``None`` or ``"1"`` is one plain view.
"""
from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...models import image_probabilities
from ..devices import PRECISIONS, autocast, on_device_thread, resolve_precision, uses_device_thread
from ..tensors import normalize
from .batching import DEFAULT_MAX_SIDE, by_input_shape, input_shape
from .model import ModelBundle
from .tta import TTA, parse_tta

__all__ = ["PRECISIONS", "Pixels", "Precision", "Prediction", "cell_grid", "forward_batches", "predict",
           "resolve_precision", "sample_cells", "upsample_cells"]

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class Pixels:
    """An image for :func:`predict` whose views' pixels were partly made already: a host worker
    (:mod:`.decode`) shrinks the image to each view size smaller than itself, so the full pixels
    travel only where a view needs them."""

    size: tuple[int, int]  # (h, w) of the image
    original: np.ndarray | torch.Tensor | None = None  # the full pixels (host, or decoded on the device)
    views: Mapping[tuple[int, int], np.ndarray] = field(default_factory=dict)  # at a view's forward size

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.size, 3)

    def at(self, size: tuple[int, int]) -> np.ndarray | torch.Tensor:
        """The pixels to resize (or not) to a view's ``size``."""
        if size in self.views:
            return self.views[size]
        if self.original is None:
            raise ValueError(f"no pixels for a {size[0]}x{size[1]} view of a {self.size[0]}x{self.size[1]} image")
        return self.original

    def mirrored(self) -> Pixels:
        return Pixels(self.size, None if self.original is None else _mirrored(self.original),
                      {s: _mirrored(a) for s, a in self.views.items()})

    def largest(self) -> np.ndarray | torch.Tensor:
        """The most detailed pixels at hand (thumbnails)."""
        if self.original is not None:
            return self.original
        return max(self.views.values(), key=lambda a: a.shape[0] * a.shape[1])


Image = np.ndarray | torch.Tensor | Pixels


@dataclass
class Prediction:
    """One image's network output; full-resolution probabilities are made on demand."""

    cells: torch.Tensor  # [K, ch, cw] per-cell class probabilities (cell i over forward pixel i·stride + offset)
    image_probs: np.ndarray  # float64 [K], p(k|I): softmax (or sigmoid, see above) of the LSE scores
    size: tuple[int, int]  # (h, w) of the original image
    forward_size: tuple[int, int]  # (h, w) fed to the network
    stride: int
    inference_ms: float  # this image's share of the batch forward pass
    offset: tuple[float, float] = (0.0, 0.0)  # (dy, dx) px, the model's cell offset (ModelConfig.cell_offset)
    flipped: bool = False  # the cells are of the image mirrored left-right (a TTA view); probs() mirrors back
    # TTA: the one-view Predictions averaged (then cells / forward_size are the first view's, and
    # image_probs / inference_ms the views' mean / sum); empty for a plain prediction.
    views: tuple[Prediction, ...] = ()

    def probs(self, row0: int = 0, row1: int | None = None) -> np.ndarray:
        """float32 ``[K, rows, W]`` per-pixel probabilities of rows ``row0:row1`` at full size."""
        if self.views:
            total = self.views[0].probs(row0, row1)
            for view in self.views[1:]:
                total += view.probs(row0, row1)
            return total / np.float32(len(self.views))
        p = upsample_cells(self.cells, self.forward_size, self.size, self.stride, self.offset, row0, row1)
        return (p.flip(-1) if self.flipped else p).cpu().numpy()

    @classmethod
    def average(cls, views: Sequence[Prediction]) -> Prediction:
        """One image's views (same original size) as one prediction averaging them lazily."""
        first = views[0]
        if any(v.size != first.size or v.views for v in views):
            raise ValueError("views to average must be one-view predictions of the same image size")
        return cls(first.cells, np.mean([v.image_probs for v in views], axis=0), first.size, first.forward_size,
                   first.stride, float(sum(v.inference_ms for v in views)), first.offset, first.flipped,
                   tuple(views))


def cell_grid(cells: tuple[int, int], fwd: tuple[int, int], out: tuple[int, int], stride: int,
              offset: tuple[float, float], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid_sample`` coordinates (align_corners, in [-1, 1]) of every output row and column in a
    ``cells``-sized map: :func:`upsample_cells`'s mapping, one axis at a time."""
    (ch, cw), (fh, fw), (h, w) = cells, fwd, out

    def axis(n_out: int, n_fwd: int, n_cells: int, off: float) -> torch.Tensor:
        pixel = (torch.arange(n_out, dtype=torch.float32, device=device) + 0.5) * n_fwd / n_out - 0.5
        pos = ((pixel - off) / stride).clamp(0, n_cells - 1)
        return pos / (n_cells - 1) * 2 - 1 if n_cells > 1 else torch.zeros_like(pos)

    return axis(h, fh, ch, offset[0]), axis(w, fw, cw, offset[1])


def upsample_cells(p: torch.Tensor, fwd: tuple[int, int], out: tuple[int, int], stride: int,
                   offset: tuple[float, float] = (0.0, 0.0), row0: int = 0, row1: int | None = None) -> torch.Tensor:
    """Resample cell values ``[K, ch, cw]`` (cell i centred on forward pixel i·stride + offset) to ``out``.

    The one cell-to-pixel mapping of inference (and of bench/supervised.py's training loss):
    bilinear between cell centres, the edge cells' values beyond them. Differentiable. A batch
    ``[B, K, ch, cw]`` of same-size maps gives ``[B, K, rows, W]`` (each as it would alone).
    """
    gy, gx = cell_grid(tuple(p.shape[-2:]), fwd, out, stride, offset, p.device)
    return sample_cells(p, gy[row0:row1], gx)


def sample_cells(p: torch.Tensor, gy: torch.Tensor, gx: torch.Tensor) -> torch.Tensor:
    """Cell values ``[K, ch, cw]`` (or a batch ``[B, K, ch, cw]``) bilinearly sampled at every
    row ``gy`` x column ``gx`` of :func:`cell_grid`'s coordinates: ``[K, rows, W]`` (``[B, ...]``)."""
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
    if p.ndim == 4:
        return F.grid_sample(p, grid.expand(p.shape[0], -1, -1, -1), mode="bilinear", align_corners=True)
    return F.grid_sample(p[None], grid, mode="bilinear", align_corners=True)[0]


def predict(bundle: ModelBundle, images: Sequence[Image], max_side: int = DEFAULT_MAX_SIDE,
            min_side: int = 0, tta: str | TTA | None = None, precision: str = "auto") -> list[Prediction]:
    """Batched forward passes over RGB ``uint8[H, W, 3]`` images of any sizes (see :func:`~.batching.forward_size`):
    host arrays, tensors on the model's device (decoded there, :mod:`.device_decode`), or
    :class:`Pixels` with some views' pixels made already.

    Images are batched by input shape (:func:`input_shape`): padding an image to a larger
    neighbour's size changes what the convolutions see near its border, so a mixed batch
    would make an image's mask depend on which images it was batched with (up to 12 % of
    the pixels of a 240x320 photo batched with a 320x240 one). One forward per input shape
    keeps every image's prediction what it is alone, whatever the chunking.

    ``tta`` (a spec such as ``"1,1.5,2+flip"``, see :mod:`weakseg.tasks.segment.tta`): every
    image's views join the batches of their own input shape (:func:`~.tta.view_size`), and
    each image gets a :class:`Prediction` averaging its views. ``None`` or ``"1"``: the
    plain forward pass, unchanged.

    ``precision`` (:func:`resolve_precision`): ``auto`` runs bf16 autocast on CUDA, fp32
    elsewhere; the probabilities are computed in float32 (float64 for the image-level prior)
    whatever the layers ran in.
    """
    precision = resolve_precision(precision, bundle.device)
    if uses_device_thread(bundle.device):  # see weakseg.tasks.devices: cuDNN's plans are cached per thread
        return on_device_thread(bundle.device, _predict, bundle, images, max_side, min_side, tta, precision)
    return _predict(bundle, images, max_side, min_side, tta, precision)


@torch.no_grad()
def _predict(bundle: ModelBundle, images: Sequence[Image], max_side: int, min_side: int, tta: str | TTA | None,
             precision: str) -> list[Prediction]:
    spec = parse_tta(bundle.resolve_tta(tta))
    views = spec.views()
    groups = by_input_shape(images, bundle.model.stride, max_side, min_side, [scale for scale, _ in views])
    done: dict[tuple[int, int], Prediction] = {}
    for members in groups.values():
        batch = [_mirrored(images[i]) if views[v][1] else images[i] for i, v, _ in members]
        sizes = [size for *_, size in members]
        preds = _forward(bundle, batch, sizes, uses_device_thread(bundle.device), precision)
        for (i, v, _), pred in zip(members, preds, strict=True):
            pred.flipped = views[v][1]
            done[i, v] = pred
    if spec.plain:
        return [done[i, 0] for i in range(len(images))]
    return [Prediction.average([done[i, v] for v in range(len(views))]) for i in range(len(images))]


def forward_batches(bundle: ModelBundle, images: Sequence[np.ndarray], batch_size: int,
                    max_side: int = DEFAULT_MAX_SIDE, min_side: int = 0) -> list[torch.Tensor]:
    """The normalised input batches :func:`predict` runs the plain views of ``images`` in (one
    input shape each, up to ``batch_size`` images; an accelerator's filling up to a power of
    two aside): what a benchmark times as the bare forward."""
    stride, cfg = bundle.model.stride, bundle.checkpoint.config
    groups = by_input_shape(images, stride, max_side, min_side, (1.0,))
    return [normalize(_input_batch([images[i] for i, *_ in part], [size for *_, size in part], stride, bundle.device),
                      cfg.mean, cfg.std)
            for members in groups.values()
            for part in (members[k:k + batch_size] for k in range(0, len(members), batch_size))]


def _mirrored(image: Image) -> Image:
    """An ``[H, W, 3]`` image mirrored left-right (a TTA view)."""
    if isinstance(image, Pixels):
        return image.mirrored()
    return image.flip(1) if isinstance(image, torch.Tensor) else np.ascontiguousarray(image[:, ::-1])


def _input_batch(images: Sequence[Image], sizes: Sequence[tuple[int, int]], stride: int,
                 device: torch.device) -> torch.Tensor:
    """``uint8 [B, 3, bh, bw]`` on ``device``: each image resized to its size in ``sizes`` (one
    :func:`input_shape` for all), edge-padded from there to the shape.

    On the CPU host arrays are resized with OpenCV and batched in place. On an accelerator
    they are copied over as they are (pinned, asynchronously) and resized and padded there,
    like the images decoded on the device (:mod:`~weakseg.tasks.segment.device_decode`): the
    host's cores are what limits an accelerator's rate.
    """
    bh, bw = input_shape(sizes[0], stride)
    if any(input_shape(s, stride) != (bh, bw) for s in sizes):
        raise ValueError(f"one batch needs one input shape, not forward sizes {sorted(set(sizes))}")
    images = [im.at(size) if isinstance(im, Pixels) else im for im, size in zip(images, sizes, strict=True)]
    if device.type != "cpu":
        images = [_uploaded(im, device) if isinstance(im, np.ndarray) else im for im in images]
    host = [i for i, im in enumerate(images) if isinstance(im, np.ndarray)]
    if not host:  # all decoded on the device: no host batch, no index to send over
        return _resized_on_device(images, sizes, (bh, bw), device).permute(0, 3, 1, 2)
    batch = np.empty((len(host), bh, bw, 3), dtype=np.uint8)
    for j, i in enumerate(host):
        im, (fh, fw) = images[i], sizes[i]
        if (fh, fw) != im.shape[:2]:
            shrink = fh * fw < im.shape[0] * im.shape[1]
            im = cv2.resize(im, (fw, fh), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        batch[j] = np.pad(im, ((0, bh - fh), (0, bw - fw), (0, 0)), mode="edge")
    x = torch.from_numpy(batch).to(device)
    if len(host) < len(images):
        tensors = [i for i, im in enumerate(images) if isinstance(im, torch.Tensor)]
        x = torch.empty((len(images), bh, bw, 3), dtype=torch.uint8, device=device).index_copy_(
            0, torch.tensor(host, dtype=torch.long, device=device), x)
        x.index_copy_(0, torch.tensor(tensors, dtype=torch.long, device=device),
                      _resized_on_device([images[i] for i in tensors], [sizes[i] for i in tensors], (bh, bw),
                                         device))
    return x.permute(0, 3, 1, 2)  # channels-last in memory, whichever way the images came


def _uploaded(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the accelerator: through pinned memory, without waiting for the copy."""
    return torch.from_numpy(image).pin_memory().to(device, non_blocking=True)


def _resized_on_device(images: Sequence[torch.Tensor], sizes: Sequence[tuple[int, int]], padded: tuple[int, int],
                       device: torch.device, together: bool | None = None) -> torch.Tensor:
    """``uint8 [N, bh, bw, 3]`` on ``device``: every image resized to its size and padded (:func:`_resize_pad`).

    ``together`` (default: on an accelerator) resizes the images of one source shape and size in one
    call. There the device's one thread issues every kernel of a batch, and a bucket of
    same-shape photos then costs a few launches, not a few per photo. On the CPU one image at
    a time is faster: a whole batch in float32 no longer fits in cache.
    """
    if together is None:
        together = device.type != "cpu"
    groups: dict[object, list[int]] = {}  # images resized in one call: one source shape and size, or one image
    for j, im in enumerate(images):
        groups.setdefault((tuple(im.shape), sizes[j]) if together else j, []).append(j)
    parts = [(js, _resize_pad(torch.stack([images[j].to(device) for j in js]), sizes[js[0]], padded))
             for js in groups.values()]
    if len(parts) == 1:
        return parts[0][1]
    out = torch.empty((len(images), *padded, 3), dtype=torch.uint8, device=device)
    for js, part in parts:
        out.index_copy_(0, torch.tensor(js, dtype=torch.long, device=device), part)
    return out


def _resize_pad(images: torch.Tensor, size: tuple[int, int], padded: tuple[int, int]) -> torch.Tensor:
    """``uint8 [N, H, W, 3]`` on the device -> ``uint8 [N, bh, bw, 3]``: antialiased shrink or
    bilinear enlargement to ``size`` (as OpenCV's area / linear do on the host), then edge padding."""
    x = images.permute(0, 3, 1, 2).float()
    if tuple(x.shape[-2:]) != size:
        shrink = size[0] * size[1] < x.shape[-2] * x.shape[-1]
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    x = F.pad(x, (0, padded[1] - size[1], 0, padded[0] - size[0]), mode="replicate")
    return x.permute(0, 2, 3, 1).round_().clamp_(0, 255).to(torch.uint8)


def _forward(bundle: ModelBundle, images: Sequence[Image], sizes: Sequence[tuple[int, int]],
             pad_batch: bool = False, precision: str = "fp32") -> list[Prediction]:
    """One forward pass over images each brought to its forward size in ``sizes``, all of one
    :func:`input_shape`.

    ``pad_batch`` (accelerators): the batch is filled up to a power of two with copies of its
    last image, whose outputs are dropped. cuDNN builds its plans per input shape, about 1 s
    each for the paper's network on an H200, and a corpus of many image sizes would otherwise
    build one for every batch size that a size's leftovers happen to make.
    """
    model, stride, offset = bundle.model, bundle.model.stride, bundle.model.cell_offset
    started = time.perf_counter()
    n = len(images)
    x = _input_batch(images, sizes, stride, bundle.device)
    if pad_batch and n & (n - 1):
        x = torch.cat([x, x[-1:].expand((1 << n.bit_length()) - n, -1, -1, -1)])
    x = normalize(x, bundle.checkpoint.config.mean, bundle.checkpoint.config.std)
    with autocast(bundle.device, precision):
        maps = model.dense_maps(x)[:n]  # [B, K, bh/stride, bw/stride]; cell i over pixel i*stride + cell_offset
    forward_ms = (time.perf_counter() - started) * 1000 / n
    by_cells: dict[tuple[int, int], list[int]] = {}  # the cells on an image: its LSE and its map
    for i, (fh, fw) in enumerate(sizes):
        cells = (_cells_on_image(fh, maps.shape[-2], stride, offset[0]),
                 _cells_on_image(fw, maps.shape[-1], stride, offset[1]))
        by_cells.setdefault(cells, []).append(i)
    # Whole-batch ops and one transfer per batch: each per-image ``.cpu()`` waited for the device,
    # then for the GIL that the other chunks' threads hold.
    prior = bundle.checkpoint.config.image_prior
    if len(by_cells) == 1:  # the common case: no index sent to the device
        (ch, cw), = by_cells
        m = maps[:, :, :ch, :cw].float()
        image_probs, probs = image_probabilities(model.pool(m).double(), prior), list(m.softmax(1))
    else:
        image_probs = torch.empty((n, maps.shape[1]), dtype=torch.float64, device=maps.device)
        probs = [None] * n
        for (ch, cw), js in by_cells.items():
            index = torch.tensor(js, device=maps.device)
            m = maps.index_select(0, index)[:, :, :ch, :cw].float()
            image_probs.index_copy_(0, index, image_probabilities(model.pool(m).double(), prior))
            for i, p in zip(js, m.softmax(1), strict=True):
                probs[i] = p
    host_probs = image_probs.cpu().numpy()
    return [Prediction(probs[i], host_probs[i], tuple(im.shape[:2]), sizes[i], stride, forward_ms, offset)
            for i, im in enumerate(images)]


def _cells_on_image(n: int, cells: int, stride: int, offset: float) -> int:
    """Cells whose centre, clamped to the input as training's validity mask clamps it, lies on ``n`` pixels."""
    return max(1, min(cells, math.ceil((n - offset) / stride)))

