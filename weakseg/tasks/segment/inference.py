"""Inference: a checkpoint, images of any size -> per-pixel and image-level class probabilities.

One forward pass per batch gives, for every image, ``probs[K, H, W]`` at the image's full
resolution (softmax of the dense score maps, bilinearly resampled from the score cells'
centres, ``ModelConfig.cell_offset``) and ``image_probs[K]``, the image-level prior p(k|I) from the LSE scores over the
cells that lie on the image, so padding never counts: their softmax (the paper), or their
sigmoid for a multi-label model trained with a BCE term (``ModelConfig.image_prior``). Around the forward pass:

- Normalisation is training's (:func:`weakseg.tasks.tensors.normalize`, the checkpoint's
  mean/std).
- Images whose longer side is over ``max_side`` (default :data:`DEFAULT_MAX_SIDE`) are
  shrunk for the forward pass; with ``min_side`` set, those whose longer side is under it
  are enlarged to it (finer score maps for small photos: one score cell then covers
  fewer of the image's pixels); any side under 4 score cells (``4 x stride`` px) is
  enlarged, so a 3x5 image still gets a prediction. The probabilities
  are always brought back to the original size.
- Each image is padded (its edge pixels repeated) up to a multiple of the stride, its
  *input shape* (:func:`input_shape`); the padded cells are cut off before the LSE and the
  upsampling. A batch holds images of one input shape, whose forward sizes may differ by
  less than a stride: each is exactly the input it is alone.
- Test-time augmentation (``tta``, :mod:`weakseg.tasks.segment.tta`): the image at several
  scales of its forward size, optionally mirrored; each view is upsampled to the original
  size with its own forward size (mirrored views mirrored back) and the views' per-pixel
  and image-level probabilities are averaged. ``None`` or ``"1"`` is one plain view.

:func:`segment_image` and :func:`segment_variants` add the priors for one image; they are
the API for evaluation code (every prior variant from one forward pass).
"""
from __future__ import annotations

import hashlib
import io
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...models import Checkpoint, CheckpointError, image_probabilities, load_checkpoint
from ...models.fusion import folded_for_inference
from ...models.losses import BACKGROUND
from .. import storage
from ..devices import on_device_thread, resolve_device, uses_device_thread
from ..evaluate.thresholds import read_thresholds
from ..registry import content_id
from ..tensors import normalize
from .priors import VARIANTS, apply_priors, default_thresholds, parse_priors
from .proposals import box_objectness_map, segment_objectness_map, superpixels
from .tta import TTA, default_tta, parse_tta, resolve_tta, view_size

__all__ = [
    "DEFAULT_MAX_SIDE",
    "PRIOR_INPUTS",
    "ModelBundle",
    "ModelError",
    "Prediction",
    "SegmentResult",
    "cell_grid",
    "compute_prior_inputs",
    "load_model",
    "load_pinned",
    "load_thresholds",
    "model_loads",
    "pin_model",
    "predict",
    "sample_cells",
    "segment_image",
    "segment_variants",
    "upsample_cells",
]

# The keyword (of apply_priors, and key of compute_prior_inputs' result) each prior's input goes by.
PRIOR_INPUTS = {"sppxl": "superpixels", "bb": "box_obj", "seg": "seg_obj"}
DEFAULT_MAX_SIDE = 512  # forward-pass longer side; the probabilities come back at full size
MIN_CELLS = 4  # smaller inputs are enlarged to at least this many score cells per side


class ModelError(ValueError):
    """The model cannot be used (missing, unreadable, not a checkpoint, bad thresholds)."""


@dataclass
class ModelBundle:
    """A loaded checkpoint ready for inference, with what the tables record about it."""

    checkpoint: Checkpoint
    device: torch.device
    model_id: str  # first 16 hex digits of the checkpoint file's sha256
    model_uri: str  # where it was read from, without credentials
    thresholds: dict[str, np.ndarray] = field(default_factory=dict)  # by prior: "bb", "seg" -> δ[K]
    thresholds_source: str = "default"
    sha256: str = ""  # full hex digest of the checkpoint bytes (the cache key)

    @property
    def model(self):
        return self.checkpoint.model

    @property
    def classes(self) -> list[str]:
        return self.checkpoint.classes

    @property
    def background_index(self) -> int | None:
        return self.classes.index(BACKGROUND) if BACKGROUND in self.classes else None

    @property
    def default_tta(self) -> str:
        """The views ``--tta auto`` runs for this model (:func:`~.tta.default_tta`)."""
        refined = "refined_from" in (self.checkpoint.training_state or {})
        return default_tta(refined=refined, background=self.background_index is not None)

    def resolve_tta(self, tta: str | TTA | None) -> str | TTA | None:
        """``tta``, with ``"auto"`` replaced by this model's views."""
        return resolve_tta(tta, self.default_tta)

    def views(self, tta: str | TTA | None) -> str:
        """The views ``tta`` runs on this model, spelled one way (``"auto"``: the model's, ``None``: ``"1"``):
        what runs and thresholds files record."""
        return str(parse_tta(self.resolve_tta(tta)))


_CACHE: dict[tuple[str, str], ModelBundle] = {}  # (sha256 of the bytes, device) -> bundle
_CACHE_MODELS = 2  # models kept per process (most recently used): a new model evicts the oldest
_CACHE_LOCK = threading.Lock()
_LOADS = 0  # checkpoints actually read by this process (cache misses)


def model_loads() -> int:
    """How many times this process built a model from checkpoint bytes (the cache is per process)."""
    return _LOADS


def _ckpt_thresholds(ckpt: Checkpoint) -> dict[str, np.ndarray]:
    raw = (ckpt.metrics or {}).get("thresholds") or {}
    out = {}
    for prior in ("bb", "seg"):
        if isinstance(raw.get(prior), Mapping):
            out[prior] = _threshold_vector(raw[prior], ckpt.classes, "checkpoint metrics")
    return out


def _threshold_vector(values: Mapping[str, float], classes: Sequence[str], where: str) -> np.ndarray:
    missing = [c for c in classes if c not in values]
    extra = [c for c in values if c not in classes]
    if extra:
        raise ModelError(f"thresholds from {where} name classes the model does not have: {extra[:5]}")
    vec = default_thresholds(len(classes))
    for i, c in enumerate(classes):
        if c not in missing:
            vec[i] = float(values[c])
    return vec


def _read_checkpoint(url: str) -> bytes:
    fs, path = storage.url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise ModelError(f"model checkpoint {storage.redact_url(url)} does not exist") from None
    if info.get("type") == "directory":
        raise ModelError(f"model {storage.redact_url(url)} is a folder; pass the checkpoint file (e.g. "
                         f"{storage.redact_url(url).rstrip('/')}/model.pt)")
    return fs.cat_file(path)


def _cached(sha: str, dev: torch.device) -> ModelBundle | None:
    bundle = _CACHE.pop((sha, str(dev)), None)
    if bundle is not None:
        _CACHE[(sha, str(dev))] = bundle  # most recently used last
    return bundle


def _bundle(data: bytes, url: str, dev: torch.device) -> ModelBundle:
    """The model of these exact bytes on ``dev``, built once per process (call under the lock)."""
    global _LOADS
    model_id, sha = content_id(data)
    bundle = _cached(sha, dev)
    if bundle is not None:
        return bundle
    try:
        ckpt = load_checkpoint(io.BytesIO(data))
    except CheckpointError as err:
        raise ModelError(f"model {storage.redact_url(url)}: {err}") from None
    # BatchNorms folded (a faster forward, the same maps), checked on the CPU: a probe on an
    # accelerator would build its kernels on this thread, not on the device's (weakseg.tasks.devices)
    ckpt.model = folded_for_inference(ckpt.model.eval()).to(dev)
    bundle = ModelBundle(ckpt, dev, model_id, storage.redact_url(url), _ckpt_thresholds(ckpt), sha256=sha)
    if bundle.thresholds:
        bundle.thresholds_source = "checkpoint"
    while len(_CACHE) >= _CACHE_MODELS:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[(sha, str(dev))] = bundle
    _LOADS += 1
    return bundle


def load_model(url: str, device: str = "auto") -> ModelBundle:
    """Load a checkpoint from any fsspec URL: its bytes are read once, ``model_id`` is their hash.

    The model built from those bytes is cached per process by content, so loading the same
    bytes again (from any URL) builds nothing; a file replaced in place is a new model.
    """
    dev = resolve_device(device)
    data = _read_checkpoint(url)
    with _CACHE_LOCK:
        return _bundle(data, url, dev)


def pin_model(url: str, folder: str, device: str = "auto", prefix: str = "") -> tuple[ModelBundle, str]:
    """Load ``url`` once and copy its exact bytes to ``{folder}/{prefix}{sha256}.pt`` (content-addressed).

    A run resolves its model here, once: every later load goes through :func:`load_pinned`
    with the returned URL and hash, so replacing the file at ``url`` mid-run changes nothing.
    """
    dev = resolve_device(device)
    data = _read_checkpoint(url)
    with _CACHE_LOCK:
        bundle = _bundle(data, url, dev)
    pinned = storage.join(folder, f"{prefix}{bundle.sha256}.pt")
    if not storage.exists(pinned):
        storage.write_bytes(pinned, data)
    return bundle, pinned


def load_pinned(url: str, sha256: str, device: str = "auto") -> ModelBundle:
    """The model whose checkpoint bytes hash to ``sha256``: from this process's cache, else read
    from ``url`` (a :func:`pin_model` copy) and verified; other bytes are a :class:`ModelError`."""
    dev = resolve_device(device)
    with _CACHE_LOCK:
        bundle = _cached(sha256, dev)
        if bundle is not None:
            return bundle
    data = _read_checkpoint(url)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ModelError(f"model {storage.redact_url(url)} has sha256 {got[:16]}, not the run's {sha256[:16]}: "
                         "the run's model changed under it")
    with _CACHE_LOCK:
        return _bundle(data, url, dev)


def load_thresholds(url: str, classes: Sequence[str]) -> tuple[str, np.ndarray, tuple[str, ...] | None, str | None]:
    """Read a thresholds file (weakseg thresholds writes them): ``(prior, δ[K] in class order, chain or None,
    views or None)``.

    The chain is the prior list δ was chosen for, the views the test-time views of the maps
    they were chosen on (``search.tta``), when the file records them.
    """
    try:
        doc = read_thresholds(url)
    except ValueError as err:
        raise ModelError(str(err)) from None
    if list(doc["classes"]) != list(classes):
        raise ModelError(f"{url}: thresholds were chosen for classes {doc['classes'][:5]}..., "
                         f"not this model's {list(classes)[:5]}...")
    chain = tuple(doc["priors"]) if doc.get("priors") is not None else None
    views = (doc.get("search") or {}).get("tta")
    vector = _threshold_vector(doc["thresholds"], classes, url)
    return doc["prior"], vector, chain, None if views is None else str(views)


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


def _view_sizes(h: int, w: int, stride: int, max_side: int, min_side: int,
                scales: Sequence[float]) -> list[tuple[int, int]]:
    """The forward size of each view at ``scales`` of an ``h x w`` image."""
    plain = forward_size(h, w, stride, max_side, min_side)
    return [view_size(plain, s, stride, MIN_CELLS) for s in scales]


def batch_key(h: int, w: int, stride: int, max_side: int, min_side: int = 0,
              scales: Sequence[float] = (1.0,)) -> tuple[tuple[int, int], ...]:
    """The input shapes of an ``h x w`` image's views at ``scales``: images with the same key
    fill the same batches in :func:`predict` (a chunk's bucketing key)."""
    return tuple(input_shape(size, stride) for size in _view_sizes(h, w, stride, max_side, min_side, scales))


def _by_input_shape(images: Sequence[np.ndarray | torch.Tensor], stride: int, max_side: int, min_side: int,
                    scales: Sequence[float]) -> dict[tuple[int, int], list[tuple[int, int, tuple[int, int]]]]:
    """The batches :func:`predict` runs: input shape -> (image, view, forward size) of every view."""
    groups: dict[tuple[int, int], list[tuple[int, int, tuple[int, int]]]] = {}
    for i, im in enumerate(images):
        for v, size in enumerate(_view_sizes(im.shape[0], im.shape[1], stride, max_side, min_side, scales)):
            groups.setdefault(input_shape(size, stride), []).append((i, v, size))
    return groups


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


def predict(bundle: ModelBundle, images: Sequence[np.ndarray | torch.Tensor], max_side: int = DEFAULT_MAX_SIDE,
            min_side: int = 0, tta: str | TTA | None = None) -> list[Prediction]:
    """Batched forward passes over RGB ``uint8[H, W, 3]`` images of any sizes (see :func:`forward_size`):
    host arrays, or tensors on the model's device (decoded there, :mod:`.device_decode`).

    Images are batched by input shape (:func:`input_shape`): padding an image to a larger
    neighbour's size changes what the convolutions see near its border, so a mixed batch
    would make an image's mask depend on which images it was batched with (up to 12 % of
    the pixels of a 240x320 photo batched with a 320x240 one). One forward per input shape
    keeps every image's prediction what it is alone, whatever the chunking.

    ``tta`` (a spec such as ``"1,1.5,2+flip"``, see :mod:`weakseg.tasks.segment.tta`): every
    image's views join the batches of their own input shape (:func:`~.tta.view_size`), and
    each image gets a :class:`Prediction` averaging its views. ``None`` or ``"1"``: the
    plain forward pass, unchanged.
    """
    if uses_device_thread(bundle.device):  # see weakseg.tasks.devices: cuDNN's plans are cached per thread
        return on_device_thread(bundle.device, _predict, bundle, images, max_side, min_side, tta)
    return _predict(bundle, images, max_side, min_side, tta)


@torch.no_grad()
def _predict(bundle: ModelBundle, images: Sequence[np.ndarray | torch.Tensor], max_side: int,
             min_side: int, tta: str | TTA | None) -> list[Prediction]:
    spec = parse_tta(bundle.resolve_tta(tta))
    views = spec.views()
    groups = _by_input_shape(images, bundle.model.stride, max_side, min_side, [scale for scale, _ in views])
    done: dict[tuple[int, int], Prediction] = {}
    for members in groups.values():
        batch = [_mirrored(images[i]) if views[v][1] else images[i] for i, v, _ in members]
        sizes = [size for *_, size in members]
        for (i, v, _), pred in zip(members, _forward(bundle, batch, sizes, uses_device_thread(bundle.device)),
                                   strict=True):
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
    groups = _by_input_shape(images, stride, max_side, min_side, (1.0,))
    return [normalize(_input_batch([images[i] for i, *_ in part], [size for *_, size in part], stride, bundle.device),
                      cfg.mean, cfg.std)
            for members in groups.values()
            for part in (members[k:k + batch_size] for k in range(0, len(members), batch_size))]


def _mirrored(image: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """An ``[H, W, 3]`` image mirrored left-right (a TTA view)."""
    return image.flip(1) if isinstance(image, torch.Tensor) else np.ascontiguousarray(image[:, ::-1])


def _input_batch(images: Sequence[np.ndarray | torch.Tensor], sizes: Sequence[tuple[int, int]], stride: int,
                 device: torch.device) -> torch.Tensor:
    """``uint8 [B, 3, bh, bw]`` on ``device``: each image resized to its size in ``sizes`` (one
    :func:`input_shape` for all), edge-padded from there to the shape.

    Host arrays are resized with OpenCV and copied over in one transfer; images decoded on
    the device (:mod:`~weakseg.tasks.segment.device_decode`) are resized where they are.
    """
    bh, bw = input_shape(sizes[0], stride)
    if any(input_shape(s, stride) != (bh, bw) for s in sizes):
        raise ValueError(f"one batch needs one input shape, not forward sizes {sorted(set(sizes))}")
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


def _forward(bundle: ModelBundle, images: Sequence[np.ndarray | torch.Tensor],
             sizes: Sequence[tuple[int, int]], pad_batch: bool = False) -> list[Prediction]:
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


@dataclass
class SegmentResult:
    labels: np.ndarray  # uint8 [H, W], class index or 255 (unlabelled)
    prediction: Prediction
    prior_ms: dict[str, float]  # time spent computing each prior's inputs and applying it


def compute_prior_inputs(rgb: np.ndarray, priors: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The superpixels / objectness maps the priors need, with the time each took (ms)."""
    inputs, ms = {}, {}
    makers = {"sppxl": superpixels, "bb": box_objectness_map, "seg": segment_objectness_map}
    for prior in priors:
        if prior in makers:
            t0 = time.perf_counter()
            inputs[PRIOR_INPUTS[prior]] = makers[prior](rgb)
            ms[prior] = (time.perf_counter() - t0) * 1000
    return inputs, ms


def _labels(bundle: ModelBundle, pred: Prediction, priors: Sequence[str], inputs: Mapping[str, np.ndarray],
            thresholds: Mapping[str, np.ndarray] | None) -> np.ndarray:
    return apply_priors(pred.probs(), pred.image_probs, priors, thresholds=thresholds or bundle.thresholds,
                        background_index=bundle.background_index, **inputs)


def segment_image(bundle: ModelBundle, rgb: np.ndarray, priors: str | Sequence[str] = ("ilp", "sppxl"),
                  thresholds: Mapping[str, np.ndarray] | None = None, max_side: int = DEFAULT_MAX_SIDE,
                  prediction: Prediction | None = None, min_side: int = 0,
                  tta: str | TTA | None = None) -> SegmentResult:
    """Segment one RGB image with the given priors (the flow does the same per batch); ``tta``: see :func:`predict`."""
    priors = parse_priors(priors)
    pred = prediction or predict(bundle, [rgb], max_side, min_side, tta)[0]
    inputs, ms = compute_prior_inputs(rgb, priors)
    t0 = time.perf_counter()
    labels = _labels(bundle, pred, priors, inputs, thresholds)
    ms["apply"] = (time.perf_counter() - t0) * 1000
    return SegmentResult(labels, pred, ms)


def segment_variants(bundle: ModelBundle, rgb: np.ndarray, thresholds: Mapping[str, np.ndarray] | None = None,
                     max_side: int = DEFAULT_MAX_SIDE, variants: Sequence[str] = tuple(VARIANTS),
                     prediction: Prediction | None = None,
                     variant_thresholds: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                     min_side: int = 0, tta: str | TTA | None = None) -> dict[str, np.ndarray]:
    """The prior variants of :data:`~weakseg.tasks.segment.priors.VARIANTS` from one forward pass.

    Returns ``{variant: uint8[H, W] labels}``. Superpixels and proposals are computed once
    and shared. ``thresholds``: ``{"bb": δ[K], "seg": δ[K]}``; by default the model's.
    ``variant_thresholds``: ``{variant: {"bb": δ[K]}}``, for a variant, instead of those.
    ``tta``: test-time augmentation of the forward pass, see :func:`predict`.
    """
    pred = prediction or predict(bundle, [rgb], max_side, min_side, tta)[0]
    needed = sorted({p for v in variants for p in VARIANTS[v]})
    inputs, _ = compute_prior_inputs(rgb, needed)
    out = {}
    for v in variants:
        priors = VARIANTS[v]
        own = {PRIOR_INPUTS[p]: inputs[PRIOR_INPUTS[p]] for p in priors if p in PRIOR_INPUTS}
        out[v] = _labels(bundle, pred, priors, own, (variant_thresholds or {}).get(v) or thresholds)
    return out
