"""The served model: a checkpoint's exact bytes -> a :class:`ModelBundle` on a device, cached per process.

``model_id`` is the sha256 of the bytes (16 hex digits). :func:`pin_model` resolves a run's
model once and copies its bytes under the run's state folder; every chunk then loads that
copy by hash (:func:`load_pinned`), so replacing the ``--model`` file mid-run changes
nothing. The served copy has its BatchNorms folded into the convolutions
(:func:`weakseg.models.fusion.folded_for_inference`), checked on the CPU before it moves to
the device. δ_k thresholds come from a thresholds file (:func:`load_thresholds`) or the
checkpoint's metrics.
"""
from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...models import Checkpoint, CheckpointError, load_checkpoint
from ...models.fusion import folded_for_inference
from ...models.losses import BACKGROUND
from .. import storage
from ..devices import resolve_device
from ..evaluate.thresholds import read_thresholds
from ..registry import content_id
from .priors import default_thresholds
from .tta import TTA, default_tta, parse_tta, resolve_tta

__all__ = ["ModelBundle", "ModelError", "load_model", "load_pinned", "load_thresholds", "model_loads", "pin_model"]


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

    @property
    def default_min_side(self) -> int:
        """The longer side ``--min-side`` none (the default) enlarges smaller photos to: the size the model
        trained at, so small photos (and their objects) are seen at the scale the model learnt them at; photos
        that large or larger are unchanged (docs/method.md, *Choices*)."""
        return int(self.checkpoint.input_size or 0)

    def resolve_min_side(self, min_side: int | None, max_side: int | None = None) -> int:
        """``min_side``, with None replaced by :attr:`default_min_side` (within ``max_side``): what a run
        records as the value it used."""
        if min_side is not None:
            return int(min_side)
        return self.default_min_side if max_side is None else min(self.default_min_side, max_side)

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
    if dev.type == "cuda":  # the layout cuDNN's bf16/fp16 convolutions run fastest in (inputs come NHWC too)
        ckpt.model = ckpt.model.to(memory_format=torch.channels_last)
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

