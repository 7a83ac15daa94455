"""The model registry: immutable releases addressed by content, and the pointer consumers follow.

::

    {registry}/releases/{model_id}/model.pt    the checkpoint's exact bytes (model_id: sha256[:16] of them)
    {registry}/releases/{model_id}/card.json   what the release is; written last, so its presence means complete
    {registry}/history/{seq:06d}.json          every move of the pointer: a copy of the pointer it wrote
    {registry}/current.json                    the promoted release: the model consumers resolve

A release is never rewritten: publishing the same bytes again is a no-op, other bytes under
an existing id are a :class:`RegistryError`. The pointer only ever names a complete release
(its card present, its bytes hashing to the card's sha256). Consumers resolve a registry (or
its ``current.json``) once per run with :func:`resolve_model` and record the ``model_id``.
Plain functions over :mod:`weakseg.tasks.storage`: any fsspec URL, no Prefect.

The pointer moves by compare-and-swap (:func:`write_pointer`, :func:`weakseg.tasks.storage.replace_if`):
a promotion names the release its comparison was made against, and the pointer moves only
while that release is still current, else :class:`BaselineMoved`. The sequence number is the
replaced pointer's plus one, so the swap makes it unique; the history entry is written
*after* the pointer (create-if-absent, ``history/{seq:06d}.json``), and the next promotion
writes the entry of the pointer it replaces if a crash left it unwritten. So the history is
exactly the pointer's moves: :func:`promotion_history` adds the current pointer when its
entry is not written yet, and lists no entry the pointer never reached.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import posixpath
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from ..models.checkpoint import CheckpointError, load_checkpoint
from . import storage

__all__ = [
    "ANY",
    "CARD",
    "MODEL",
    "POINTER",
    "BaselineMoved",
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


class BaselineMoved(RegistryError):
    """The current release is no longer the one the candidate was compared with: compare again."""

    def __init__(self, registry: str, expected: str | None, current: str | None) -> None:
        super().__init__(f"the current release of {storage.redact_url(registry)} moved from {expected or 'none'} to "
                         f"{current or 'none'} since the candidate was compared with it")
        self.expected, self.current = expected, current


ANY = object()  # write_pointer's ``expected``: no comparison to keep valid (replace whatever is current)


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
        # several rounds: the model the first round refined (the lineage), and the round that made this model
        "refined_from": (parent.get("origin") or parent).get("model_id"),
        "refine_round": parent.get("round", 1) if parent else None,
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


_ENTRY = re.compile(r"^(\d{6,})(-.*)?\.json$")  # {seq:06d}.json; {seq:06d}-{time}.json before compare-and-swap


def _entry_name(sequence: int) -> str:
    return posixpath.join("history", f"{sequence:06d}.json")


def _record(registry: str, doc: dict[str, Any]) -> None:
    """The history entry of a pointer that was written (create-if-absent: its sequence is its own)."""
    storage.replace_if(storage.join(registry, doc.get("history") or _entry_name(int(doc["sequence"]))),
                       _doc_bytes(doc), None)


def _doc_bytes(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2).encode() + b"\n"


def promotion_history(registry: str) -> list[dict[str, Any]]:
    """Every move of the pointer, in order: the history entries up to the pointer's sequence, and the
    pointer itself when a crash came between its write and its entry's.

    Entries past the pointer's sequence are not listed: only a registry written before
    compare-and-swap can hold them (its entry came first, and a crash left it behind).
    """
    pointer = read_pointer(registry)
    if pointer is None:
        return []
    top = int(pointer.get("sequence", 0))
    fs, path = storage.url_to_fs(storage.join(registry, "history"))
    try:
        names = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False, refresh=True))
    except FileNotFoundError:
        names = []
    chosen: dict[int, tuple[bool, str]] = {}  # seq -> (of the compare-and-swap layout, name): the best one
    for name in names:
        m = _ENTRY.match(name)
        if m and int(m.group(1)) <= top:
            rank = (m.group(2) is None, name)
            chosen[int(m.group(1))] = max(chosen.get(int(m.group(1)), rank), rank)
    entries = {seq: json.loads(fs.cat_file(posixpath.join(path, name))) for seq, (_, name) in chosen.items()}
    entries.setdefault(top, pointer)
    return [entries[s] for s in sorted(entries)]


def write_pointer(registry: str, model_id: str, *, expected: Any = ANY, forced: bool = False,
                  comparison: dict[str, Any] | None = None, reason: str = "") -> dict[str, Any]:
    """Move ``current.json`` to a complete release by compare-and-swap; its history entry follows.

    ``expected``: the ``model_id`` the candidate was compared with (None: there was no current
    release). If the pointer names another release now, or moves before the swap, raises
    :class:`BaselineMoved` and writes nothing: the comparison must be made again. Without it
    (:data:`ANY`) the release replaces whatever is current (a concurrent move makes it retry),
    and ``previous`` names that one. The release is verified (card present, bytes match)
    before anything is written, so the pointer never names a half-written release. Returns
    the new pointer document.
    """
    release = load_release(registry, model_id, verify=True)
    url = storage.join(registry, POINTER)
    token = uuid.uuid4().hex  # this promotion, to recognise our own write after a lost reply
    while True:
        held = storage.read_version(url)
        current = None if held is None else json.loads(held.data)
        current_id = None if current is None else current.get("model_id")
        if expected is not ANY and current_id != expected:
            raise BaselineMoved(registry, expected, current_id)
        if current is not None:
            _record(registry, current)  # a crash after the last swap may have left its entry unwritten
        now = datetime.now(UTC)
        sequence = int((current or {}).get("sequence", 0)) + 1
        doc = {
            "sequence": sequence,
            "model_id": release.model_id,
            "sha256": release.sha256,
            "model": _release_path(release.model_id),
            "classes": release.card.get("classes"),
            "promoted_at": now.isoformat(timespec="seconds"),
            "forced": forced,
            "reason": reason,
            "previous": current_id,
            "comparison": _json_safe(comparison or {}),
            "history": _entry_name(sequence),
            "promotion": token,
        }
        if storage.replace_if(url, _doc_bytes(doc), held) or _landed(registry, doc):
            break
        # another promotion swapped first: read again (and refuse if it moved off ``expected``)
    _record(registry, doc)
    return doc


def _landed(registry: str, doc: dict[str, Any]) -> bool:
    """Whether the store applied our swap although it answered otherwise (its reply was lost and the
    client's retry met 412): the pointer is ours, or, replaced since, the entry the next promotion wrote
    before replacing it is."""
    for raw in (_read_or_none(storage.join(registry, POINTER)), _read_or_none(storage.join(registry, doc["history"]))):
        if raw is not None and json.loads(raw).get("promotion") == doc["promotion"]:
            return True
    return False


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
