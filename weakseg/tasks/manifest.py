"""The shard manifest: what shard-imagenet writes and train-mil reads.

``{dest}/manifest.json``::

    {
      "format": "weakseg.shards", "format_version": 1,
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

Shard names are relative to the manifest's folder. A sample in a shard: ``__key__``
(stable, no dots), ``jpg`` (encoded RGB image), ``cls`` (index of the first label) and
``json`` ({"labels": [indices], "label_names": [...], "source": uri, "width": w,
"height": h, "wnid": "n02085620" or null}).
"""
from __future__ import annotations

from typing import Any

from . import storage

__all__ = ["FORMAT", "FORMAT_VERSION", "ManifestError", "load_manifest", "shard_urls"]

FORMAT = "weakseg.shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """Shards that cannot be used, with the reason."""


def load_manifest(shards_url: str) -> dict[str, Any]:
    """Read and check ``{shards_url}/manifest.json``."""
    url = storage.join(shards_url, MANIFEST_NAME)
    try:
        manifest = storage.read_json(url)
    except FileNotFoundError:
        raise ManifestError(f"no shard manifest at {url}: run `weakseg shard` first, or point at its --dest") from None
    except ValueError as err:
        raise ManifestError(f"{url} is not valid JSON: {err}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{url} is not a weakseg shard manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ManifestError(f"{url} has format version {manifest['format_version']}; upgrade weakseg")
    for key in ("classes", "shards", "splits"):
        if key not in manifest:
            raise ManifestError(f"{url} lacks {key!r}")
    return manifest


def shard_urls(shards_url: str, manifest: dict[str, Any], split: str) -> list[str]:
    """URLs of the shards of one split; an empty split is an error."""
    urls = [storage.join(shards_url, s["name"]) for s in manifest["shards"] if s["split"] == split and s["samples"]]
    if not urls:
        raise ManifestError(f"split {split!r} of {shards_url} has no samples")
    return urls
