"""The shard manifest: what shard-imagenet writes and train-mil reads.

``{dest}/manifest.json``::

    {
      "format": "weakseg.shards", "format_version": 1,
      "generation": {"id": "3f9c...", "folder": ""},     # "" or "gen-<id>" (see below)
      "classes": ["background", "aeroplane", ...],      # index order; background first if present
      "multilabel": false,                               # true when any sample has several labels
      "label_map": {"kind": "identity|voc|csv", ...},    # what mapped source labels to classes
      "splits": {"train": {"samples": 900, "class_counts": {"cat": 450, ...}}, "val": {...}},
      "shards": [{"name": "train-000000.tar", "split": "train", "samples": 300,
                  "bytes": 123456, "sha256": "..."}, ...],
      "errors": {"count": 3, "table": "errors.parquet"},
      "parameters": {...}, "source_fingerprint": "sha256 of the listing",
      "weakseg_version": "0.1.0", "created_at": "2026-11-26T12:00:00+00:00"
    }

Shard names are paths relative to the manifest's folder; always open shards through the
manifest. A sample in a shard: ``__key__`` (stable, no dots), ``jpg`` (encoded RGB image),
``cls`` (index of the first label) and ``json`` ({"labels": [indices], "label_names":
[...], "source": uri, "width": w, "height": h, "wnid": "n02085620" or null}).

Generations: shards named by a manifest are never rewritten. A shard run's *generation*
is the fingerprint of its parameters, listing and classes. The first generation written
to an empty ``dest`` (and reruns of the generation the manifest names) use the contract's
names ``{dest}/{split}-{index:06d}.tar``; any other generation writes
``{dest}/gen-{id}/{split}-{index:06d}.tar``, so a reader of the current manifest keeps
reading unchanged files while a re-shard runs or after it dies. The manifest is written
last, atomically: its presence names one complete generation. Old generations are not
deleted (a reader may still use them); remove ``gen-*`` folders no manifest names by hand.

Readers check what they open against the manifest: :func:`check_shards` (every shard
present with its recorded size, cheap) before training, :func:`shard_specs` (size and
sha256 per URL) for the stream, which refuses a shard whose bytes differ.
"""
from __future__ import annotations

import posixpath
from collections.abc import Iterable
from typing import Any, NamedTuple

from .. import storage

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ManifestError",
    "ShardMismatchError",
    "ShardSpec",
    "check_shards",
    "generation_folder",
    "load_manifest",
    "read_manifest_if_any",
    "shard_specs",
    "shard_urls",
]

FORMAT = "weakseg.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
GENERATION_PREFIX = "gen-"


class ManifestError(ValueError):
    """Shards that cannot be used, with the reason."""


class ShardMismatchError(ManifestError):
    """A shard's bytes or labels differ from what the manifest records: never skipped, always fatal."""


class ShardSpec(NamedTuple):
    """What the manifest records about one shard."""

    bytes: int
    sha256: str


def _mismatch_hint() -> str:
    return ("the shards were changed after the manifest was written (an interrupted or concurrent re-shard by an "
            "older weakseg, or a manual copy); run `weakseg shard` again to completion")


def load_manifest(shards_url: str) -> dict[str, Any]:
    """Read and check ``{shards_url}/manifest.json``."""
    url = storage.join(shards_url, MANIFEST_NAME)
    shown = storage.redact_url(url)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError:
        raise ManifestError(f"no shard manifest at {shown}: run `weakseg shard` first, or point at its --dest") \
            from None
    except ValueError as err:
        raise ManifestError(f"{shown} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{shown} is not a weakseg shard manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ManifestError(f"{shown} has format version {manifest['format_version']}; upgrade weakseg")
    for key in ("classes", "shards", "splits"):
        if key not in manifest:
            raise ManifestError(f"{shown} lacks {key!r}")
    return manifest


def read_manifest_if_any(dest: str) -> dict[str, Any] | None:
    """The manifest at ``dest``, or None when there is none (a first shard run)."""
    if not storage.exists(storage.join(dest, MANIFEST_NAME)):
        return None
    return load_manifest(dest)


def generation_folder(current: dict[str, Any] | None, generation: str) -> str:
    """Where generation ``generation`` writes its shards, relative to ``dest``.

    The contract's top-level names when ``dest`` has no manifest yet; the folder the
    manifest already uses when it names this very generation (a rerun: finished shards
    are reused); else a fresh ``gen-{id}`` folder, so no file a manifest names is rewritten.
    """
    if current is None:
        return ""
    named = current.get("generation") or {}
    if named.get("id") == generation:
        return str(named.get("folder", ""))
    return GENERATION_PREFIX + generation


def _split_shards(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    return [s for s in manifest["shards"] if s["split"] == split and s["samples"]]


def shard_urls(shards_url: str, manifest: dict[str, Any], split: str) -> list[str]:
    """URLs of the shards of one split; an empty split is an error."""
    urls = [storage.join(shards_url, s["name"]) for s in _split_shards(manifest, split)]
    if not urls:
        raise ManifestError(f"split {split!r} of {storage.redact_url(shards_url)} has no samples")
    return urls


def shard_specs(shards_url: str, manifest: dict[str, Any], split: str) -> dict[str, ShardSpec]:
    """URL -> recorded size and sha256 of the shards of one split (for verified reading)."""
    shard_urls(shards_url, manifest, split)  # the empty-split error
    return {storage.join(shards_url, s["name"]): ShardSpec(int(s["bytes"]), str(s["sha256"]))
            for s in _split_shards(manifest, split)}


def _size(url: str, listed: dict[str, Any]) -> int | None:
    """From the folder listing when it has sizes (object stores, local), else one stat."""
    size = listed.get(posixpath.basename(url))
    if size is not None:
        return int(size)
    fs, path = storage.url_to_fs(url)
    try:
        size = fs.size(path)
    except FileNotFoundError:
        return None
    return None if size is None else int(size)


def check_shards(specs: Iterable[tuple[str, ShardSpec]]) -> None:
    """Every shard exists with the size the manifest records (one listing per folder)."""
    by_folder: dict[str, list[tuple[str, ShardSpec]]] = {}
    for url, spec in specs:
        by_folder.setdefault(posixpath.dirname(url), []).append((url, spec))
    for folder, members in by_folder.items():
        fs, path = storage.url_to_fs(folder)
        try:
            listed = {posixpath.basename(str(p["name"]).rstrip("/")): p.get("size")
                      for p in fs.ls(path, detail=True)}
        except (FileNotFoundError, NotImplementedError):
            listed = {}
        for url, spec in members:
            size = _size(url, listed)
            if size is None:
                raise ShardMismatchError(f"shard {storage.redact_url(url)} named by the manifest is missing: "
                                         f"{_mismatch_hint()}")
            if size != spec.bytes:
                raise ShardMismatchError(f"shard {storage.redact_url(url)} has {size} bytes, the manifest records "
                                         f"{spec.bytes}: {_mismatch_hint()}")
