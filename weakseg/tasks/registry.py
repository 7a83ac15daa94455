"""The model registry: immutable releases addressed by content, and the pointer consumers follow.

::

    {registry}/releases/{model_id}/model.pt    the checkpoint's exact bytes (model_id: sha256[:16] of them)
    {registry}/releases/{model_id}/card.json   what the release is; written last, so its presence means complete
    {registry}/history/{seq:06d}-{time}.json   every promotion, written before the pointer moves
    {registry}/current.json                    the promoted release: the model consumers resolve

A release is never rewritten: publishing the same bytes again is a no-op, other bytes under
an existing id are a :class:`RegistryError`. The pointer only ever names a complete release
(its card present, its bytes hashing to the card's sha256). Consumers resolve a registry (or
its ``current.json``) once per run with :func:`resolve_model` and record the ``model_id``.
Plain functions over :mod:`weakseg.tasks.storage`: any fsspec URL, no Prefect.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ..models.checkpoint import CheckpointError, load_checkpoint
from . import storage

__all__ = [
    "CARD",
    "MODEL",
    "POINTER",
    "RegistryError",
    "Release",
    "ResolvedModel",
    "content_id",
    "load_release",
    "model_card",
    "promotion_history",
    "publish_checkpoint",
    "publish_release",
    "read_pointer",
    "resolve_model",
    "write_pointer",
]

POINTER = "current.json"
MODEL = "model.pt"
CARD = "card.json"
CARD_FORMAT = "weakseg.release"


class RegistryError(ValueError):
    """A registry that cannot be used as asked: a clashing release, an incomplete one, no current release."""


def content_id(data: bytes) -> tuple[str, str]:
    """``(model_id, sha256)`` of checkpoint bytes: the id every table records (the sha256's first 16 hex digits)."""
    sha = hashlib.sha256(data).hexdigest()
    return sha[:16], sha


@dataclass(frozen=True)
class Release:
    """One published release."""

    registry: str
    model_id: str
    sha256: str
    card: dict[str, Any]

    @property
    def folder(self) -> str:
        return storage.join(self.registry, "releases", self.model_id)

    @property
    def model_url(self) -> str:
        return storage.join(self.folder, MODEL)


def _release_path(model_id: str) -> str:
    """A release's checkpoint relative to the registry (what the pointer stores: a registry can move)."""
    return posixpath.join("releases", model_id, MODEL)


def _read_or_none(url: str) -> bytes | None:
    try:
        return storage.read_bytes(url)
    except FileNotFoundError:
        return None


def _json_safe(obj: Any) -> Any:
    """Metrics as strict JSON: NaN and infinities become null, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def model_card(data: bytes) -> dict[str, Any]:
    """The card of a checkpoint: a function of its bytes alone, so publishing twice writes the same card."""
    model_id, sha = content_id(data)
    try:
        ckpt = load_checkpoint(io.BytesIO(data))
    except CheckpointError as err:
        raise RegistryError(f"not a publishable checkpoint: {err}") from None
    metrics = dict(ckpt.metrics or {})
    parent = (ckpt.training_state or {}).get("refined_from") or {}
    return _json_safe({
        "format": CARD_FORMAT,
        "model_id": model_id,
        "sha256": sha,
        "bytes": len(data),
        "classes": list(ckpt.classes),
        "backbone": ckpt.config.backbone,
        "input_size": ckpt.input_size,
        "metrics": metrics,
        "manifest": dict(ckpt.manifest or {}),
        "refined_from": parent.get("model_id"),
        "thresholds": metrics.get("thresholds"),
        "created_at": ckpt.created_at,
        "weakseg_version": ckpt.weakseg_version,
    })


def publish_release(registry: str, data: bytes) -> Release:
    """Publish checkpoint bytes as ``{registry}/releases/{model_id}/`` (model.pt, then card.json).

    Idempotent: a release with these bytes is left as it is (a card missing after an
    interrupted publish is written). Other bytes under the same id raise :class:`RegistryError`.
    """
    model_id, sha = content_id(data)
    card = model_card(data)
    release = Release(registry, model_id, sha, card)
    existing = _read_or_none(release.model_url)
    if existing is None:
        storage.write_bytes(release.model_url, data)
    elif (held := content_id(existing))[1] != sha:
        raise RegistryError(f"release {model_id} in {storage.redact_url(registry)} holds other bytes "
                            f"(sha256 {held[0]}...): releases are never rewritten")
    card_url = storage.join(release.folder, CARD)
    old_card = _read_or_none(card_url)
    if old_card is None:
        storage.write_json(card_url, card)  # last: a release is complete once its card is there
    elif json.loads(old_card).get("sha256") != sha:
        raise RegistryError(f"release {model_id} in {storage.redact_url(registry)} has a card of other bytes")
    else:
        release = Release(registry, model_id, sha, json.loads(old_card))
    return release


def publish_checkpoint(registry: str, checkpoint: str) -> Release:
    """:func:`publish_release` of the checkpoint at a URL (train's or refine's ``model.pt``)."""
    return publish_release(registry, storage.read_bytes(checkpoint))


def load_release(registry: str, model_id: str, *, verify: bool = True) -> Release:
    """A complete release: its card present and, with ``verify``, its model.pt hashing to the card's sha256."""
    folder = storage.join(registry, "releases", model_id)
    raw = _read_or_none(storage.join(folder, CARD))
    where = f"release {model_id} in {storage.redact_url(registry)}"
    if raw is None:
        raise RegistryError(f"{where} is incomplete or missing (no {CARD}): publish it first")
    card = json.loads(raw)
    if card.get("model_id") != model_id:
        raise RegistryError(f"{where}: its card names model {card.get('model_id')}")
    if verify:
        data = _read_or_none(storage.join(folder, MODEL))
        if data is None:
            raise RegistryError(f"{where} has a card but no {MODEL}")
        got = hashlib.sha256(data).hexdigest()
        if got != card.get("sha256"):
            raise RegistryError(f"{where}: {MODEL} has sha256 {got[:16]}, not the card's {card.get('sha256', '')[:16]}")
    return Release(registry, model_id, card["sha256"], card)


def read_pointer(registry: str) -> dict[str, Any] | None:
    """``current.json`` of the registry, or None before the first promotion."""
    raw = _read_or_none(storage.join(registry, POINTER))
    return None if raw is None else json.loads(raw)


def promotion_history(registry: str) -> list[dict[str, Any]]:
    """Every promotion in order (the history entries the pointer was moved after)."""
    fs, path = storage.url_to_fs(storage.join(registry, "history"))
    try:
        names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".json"))
    except FileNotFoundError:
        return []
    return [json.loads(fs.cat_file(p)) for p in names]


def write_pointer(registry: str, model_id: str, *, forced: bool = False, comparison: dict[str, Any] | None = None,
                  reason: str = "") -> dict[str, Any]:
    """Move ``current.json`` to a complete release; the history entry is written first, the pointer last.

    The release is verified (card present, bytes match) before anything is written, so the
    pointer never names a half-written release. Returns the new pointer document.
    """
    release = load_release(registry, model_id, verify=True)
    current = read_pointer(registry)
    now = datetime.now(UTC)
    sequence = int((current or {}).get("sequence", 0)) + 1
    entry_name = f"{sequence:06d}-{now:%Y%m%dT%H%M%SZ}.json"
    doc = {
        "sequence": sequence,
        "model_id": release.model_id,
        "sha256": release.sha256,
        "model": _release_path(release.model_id),
        "classes": release.card.get("classes"),
        "promoted_at": now.isoformat(timespec="seconds"),
        "forced": forced,
        "reason": reason,
        "previous": (current or {}).get("model_id"),
        "comparison": _json_safe(comparison or {}),
        "history": posixpath.join("history", entry_name),
    }
    storage.write_json(storage.join(registry, "history", entry_name), doc)
    storage.write_json(storage.join(registry, POINTER), doc)
    return doc


@dataclass(frozen=True)
class ResolvedModel:
    """What a run uses: a concrete checkpoint URL and, from a registry, the release's id."""

    url: str  # the checkpoint to read
    model_id: str | None  # the release's id (None for a plain checkpoint URL: its bytes decide)
    registry: str | None  # the registry it came from, None for a plain checkpoint URL

    def check(self, model_id: str) -> None:
        """Refuse a loaded model whose id is not the release's (a release changed under the pointer)."""
        if self.model_id is not None and model_id != self.model_id:
            raise RegistryError(f"{storage.redact_url(self.url)} holds model {model_id}, not release {self.model_id}")


def resolve_model(model: str) -> ResolvedModel:
    """A model argument as a concrete checkpoint: a registry folder or its ``current.json`` -> the current
    release's ``model.pt`` (checked complete); anything else is a checkpoint URL, returned as it is."""
    model = model.rstrip("/") or model
    if urlsplit(model).query:
        # A signed or tokenised URL names one file; a registry is a folder, and joining a name
        # after the query would ask the server for the same file again.
        return ResolvedModel(model, None, None)
    if posixpath.basename(model) == POINTER:
        registry = posixpath.dirname(model) or "."
    elif storage.exists(storage.join(model, POINTER)):
        registry = model
    elif storage.exists(storage.join(model, "releases")):
        raise RegistryError(f"registry {storage.redact_url(model)} has no current release yet: promote one "
                            "(weakseg promote --model ... --registry ...)")
    else:
        return ResolvedModel(model, None, None)
    pointer = read_pointer(registry)
    if pointer is None:
        raise RegistryError(f"registry {storage.redact_url(registry)} has no {POINTER}")
    release = load_release(registry, pointer["model_id"], verify=False)
    return ResolvedModel(release.model_url, release.model_id, registry)
