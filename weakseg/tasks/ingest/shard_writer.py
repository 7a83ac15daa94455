"""Planning and writing WebDataset shards; assembling the manifest and the error table.

Each planned shard is one unit of work: it reads, validates and re-encodes its images and
writes ``{split}-{index:06d}.tar`` and a small state file beside it, in the folder of its
generation (:func:`~weakseg.tasks.ingest.manifest.generation_folder`: never a file the current
manifest names, unless byte-identical). Shards are reproducible byte for byte (fixed tar
metadata, deterministic encoding and order), so a rerun with the same parameters skips the
finished ones and rewrites nothing.

Nothing secret is written: source URIs in samples, error rows and the manifest's
parameters pass through :func:`~weakseg.tasks.storage.redact_url`.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import random
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import webdataset as wds

from ... import __version__
from .. import storage
from ..errors import ERRORS_SCHEMA, ErrorRecord
from ..images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, ImageError, decode_image, encode_jpeg, resize_shorter_side
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME
from .sources import Item, image_key, open_item_reader

__all__ = [
    "EncodeOptions",
    "ShardPlan",
    "assign_splits",
    "error_row",
    "fingerprint",
    "plan_shards",
    "redact_parameters",
    "write_manifest",
    "write_shard",
]

STATE_DIR = "_state"


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int = 512
    jpeg_quality: int = 90
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass
class ShardPlan:
    split: str
    index: int
    items: list[Item]
    labels: list[list[str]]  # class names per item

    @property
    def name(self) -> str:
        return f"{self.split}-{self.index:06d}.tar"


@dataclass
class ShardResult:
    name: str
    split: str
    samples: int
    bytes: int
    sha256: str
    class_counts: dict[str, int]
    errors: list[dict[str, str]] = field(default_factory=list)
    fingerprint: str = ""
    skipped: bool = False


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _unit(seed: int, text: str) -> float:
    return int.from_bytes(hashlib.sha256(f"{seed}:{text}".encode()).digest()[:8], "big") / 2**64


def assign_splits(items: Sequence[Item], val_fraction: float, seed: int) -> list[str]:
    """The source's split where it has one, else a seeded hash of the URI decides."""
    return [item.split or ("val" if _unit(seed, item.uri) < val_fraction else "train") for item in items]


def plan_shards(
    items: Sequence[Item],
    labels: Sequence[list[str]],
    splits: Sequence[str],
    shard_size: int,
    shard_max_bytes: int,
    seed: int,
) -> list[ShardPlan]:
    """Shuffle each split with the seed (so no shard holds one class) and cut it into
    shards of at most ``shard_size`` samples and, by the listed sizes, ``shard_max_bytes``."""
    plans: list[ShardPlan] = []
    for split in sorted(set(splits)):
        members = [(it, lab) for it, lab, sp in zip(items, labels, splits, strict=True) if sp == split]
        members.sort(key=lambda m: m[0].uri)
        random.Random(f"{seed}:{split}").shuffle(members)
        groups: list[list[tuple[Item, list[str]]]] = [[]]
        size = 0
        for member in members:
            if groups[-1] and (len(groups[-1]) >= shard_size or size + member[0].size > shard_max_bytes):
                groups.append([])
                size = 0
            groups[-1].append(member)
            size += member[0].size
        for index, group in enumerate(g for g in groups if g):
            plans.append(ShardPlan(split, index, [m[0] for m in group], [m[1] for m in group]))
    return plans


def encode_sample(item: Item, data: bytes, class_labels: list[str], classes: Sequence[str],
                  options: EncodeOptions) -> dict[str, Any]:
    """Validate, orient, convert and (when needed) shrink one image into a WebDataset sample."""
    decoded = decode_image(data, options.max_pixels)
    resized = resize_shorter_side(decoded.image, options.max_side)
    jpg = data if decoded.unchanged and resized is decoded.image else encode_jpeg(resized, options.jpeg_quality)
    indices = [classes.index(c) for c in class_labels]
    source = storage.redact_url(item.uri)  # stored, and keyed, without credentials
    meta = {
        "labels": indices,
        "label_names": list(class_labels),
        "source": source,
        "width": decoded.width,
        "height": decoded.height,
        "wnid": item.wnid,
    }
    return {"__key__": image_key(source), "jpg": jpg, "cls": str(indices[0]).encode(),
            "json": json.dumps(meta, sort_keys=True).encode()}


def _state_url(dest: str, plan: ShardPlan) -> str:
    return storage.join(dest, STATE_DIR, plan.name.replace(".tar", ".json"))


def finished(dest: str, plan: ShardPlan, fp: str) -> ShardResult | None:
    """The recorded result of a shard already written with the same parameters (and still
    of the recorded size: a damaged one is written again, to the same bytes)."""
    url = _state_url(dest, plan)
    shard = storage.join(dest, plan.name)
    if not storage.exists(url) or not storage.exists(shard):
        return None
    state = storage.read_json(url)
    if state.get("fingerprint") != fp:
        return None
    fs, path = storage.url_to_fs(shard)
    if fs.size(path) != state.get("bytes"):
        return None
    return ShardResult(**{**state, "skipped": True})


def error_row(item: Item, split: str, stage: str, error_type: str, message: str) -> dict[str, Any]:
    """One ``errors.parquet`` row (:class:`~weakseg.tasks.errors.ErrorRecord`), without credentials."""
    uri = storage.redact_url(item.uri)
    return ErrorRecord(uri, image_key(uri), stage, error_type, message, split=split).row()


def write_shard(plan: ShardPlan, dest: str, classes: Sequence[str], options: EncodeOptions, fp: str) -> ShardResult:
    """Write one shard (unless already finished) and its state file; bad inputs become errors.

    ``dest`` is the generation's folder. Inputs over ``options.max_bytes``, unreadable or
    cut short (a damaged synset tar) are error rows, like undecodable images.
    """
    done = finished(dest, plan, fp)
    if done is not None:
        return done
    buf = io.BytesIO()
    errors: list[dict[str, str]] = []
    counts: Counter[str] = Counter()
    samples = 0
    with (open_item_reader(options.max_bytes) as reader,
          wds.TarWriter(buf, user="weakseg", group="weakseg", mtime=0.0) as sink):
        for item, class_labels in zip(plan.items, plan.labels, strict=True):
            try:
                data = reader.read(item)
            except (OSError, ValueError, tarfile.TarError) as err:
                errors.append(error_row(item, plan.split, "read", getattr(err, "kind", type(err).__name__), str(err)))
                continue
            try:
                sample = encode_sample(item, data, class_labels, classes, options)
            except ImageError as err:
                errors.append(error_row(item, plan.split, "decode", err.kind, str(err)))
                continue
            sink.write(sample)
            samples += 1
            counts.update(class_labels)
    data = buf.getvalue()
    storage.write_bytes(storage.join(dest, plan.name), data)
    result = ShardResult(plan.name, plan.split, samples, len(data), hashlib.sha256(data).hexdigest(),
                         dict(sorted(counts.items())), errors, fp)
    state = asdict(result)
    state.pop("skipped")
    storage.write_json(_state_url(dest, plan), state)
    return result


def redact_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Parameters as recorded: every string passed through :func:`storage.redact_url`."""
    return {k: storage.redact_url(v) if isinstance(v, str) else v for k, v in parameters.items()}


def _split_summary(results: Sequence[ShardResult], classes: Sequence[str]) -> dict[str, dict[str, Any]]:
    splits: dict[str, dict[str, Any]] = {}
    for r in results:
        entry = splits.setdefault(r.split, {"samples": 0, "shards": 0, "errors": 0, "class_counts": Counter()})
        entry["samples"] += r.samples
        entry["shards"] += 1
        entry["errors"] += len(r.errors)
        entry["class_counts"].update(r.class_counts)
    for entry in splits.values():
        entry["class_counts"] = {c: entry["class_counts"].get(c, 0) for c in classes}
    return splits


def write_manifest(
    dest: str,
    results: Sequence[ShardResult],
    classes: Sequence[str],
    label_map: dict[str, Any],
    parameters: dict[str, Any],
    source_fingerprint: str,
    listing_errors: Sequence[dict[str, str]] = (),
    dropped: int = 0,
    multilabel: bool = False,
    generation: str = "",
    folder: str = "",
) -> dict[str, Any]:
    """The generation's ``errors.parquet``, then ``manifest.json`` (last and atomic: its
    presence names one complete generation), then a copy of the errors at ``{dest}``.

    ``folder``: where the generation's shards are, relative to ``dest`` ("" for the top).
    """
    errors = [e for r in results for e in r.errors] + list(listing_errors)
    errors_name = posixpath.join(folder, "errors.parquet") if folder else "errors.parquet"
    errors_bytes = storage.parquet_bytes(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA))
    storage.write_bytes(storage.join(dest, errors_name), errors_bytes)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generation": {"id": generation, "folder": folder},
        "classes": list(classes),
        "multilabel": multilabel,
        "label_map": label_map,
        "splits": _split_summary(results, classes),
        "shards": [{"name": posixpath.join(folder, r.name) if folder else r.name, "split": r.split,
                    "samples": r.samples, "bytes": r.bytes, "sha256": r.sha256}
                   for r in sorted(results, key=lambda r: r.name)],
        "errors": {"count": len(errors), "table": errors_name,
                   "by_type": dict(Counter(e["error_type"] for e in errors))},
        "dropped_unmapped": dropped,
        "parameters": redact_parameters(parameters),
        "source_fingerprint": source_fingerprint,
        "weakseg_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    storage.write_json(storage.join(dest, MANIFEST_NAME), manifest)
    if folder:  # the contract's {dest}/errors.parquet follows the manifest
        storage.write_bytes(storage.join(dest, "errors.parquet"), errors_bytes)
    return manifest
