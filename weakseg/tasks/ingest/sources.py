"""Listing image collections: ILSVRC-2012, per-synset tars or folders, ImageFolder, and
CSV/Parquet manifests with several labels per image. Any fsspec URL.

A listing is a list of :class:`Item` records, sorted by URI so it is the same on every
run; nothing is decoded here. A damaged input never fails a listing: a per-synset tar cut
short lists the members whose headers survive (those past its end fail when read) and one
item carrying the ``problem`` for the lost rest, so each becomes an error row of the shard
run. Reading is bounded: nothing larger than ``max_bytes`` is read (:class:`open_item_reader`).
"""
from __future__ import annotations

import csv
import hashlib
import io
import posixpath
import re
import tarfile
from dataclasses import dataclass
from typing import Literal

import pyarrow.parquet as pq

from .. import storage
from ..images import DEFAULT_MAX_BYTES
from ..uris import MANIFEST_COLUMNS, manifest_column, manifest_ref, tar_uri

__all__ = [
    "InputTooLarge",
    "Item",
    "Layout",
    "ListingIOError",
    "SourceError",
    "TruncatedInput",
    "detect_layout",
    "image_key",
    "list_source",
    "open_item_reader",
]

Layout = Literal["auto", "ilsvrc", "synset-tars", "imagefolder", "manifest"]
WNID = re.compile(r"^n\d{8}$")


class SourceError(ValueError):
    """The source cannot be listed (missing, empty, malformed): fails before any work."""


class ListingIOError(OSError):
    """Storage failed while listing (throttling, a dropped connection): worth a retry."""


class InputTooLarge(OSError):
    """An input over the byte limit: refused before it is read (error_type ``TooLarge``, as
    in segment-corpus's errors table)."""

    kind = "TooLarge"


class TruncatedInput(OSError):
    """An input cut short (a damaged tar: its member ends past the end of the file)."""


@dataclass(frozen=True)
class Item:
    uri: str  # for tar members: tar://<member>::<tar url>
    labels: tuple[str, ...]  # source labels (folder names, wnids, CSV labels)
    split: str | None = None  # the source's own split, when it has one
    size: int = 0  # bytes, when the listing knows (shard planning)
    tar_url: str | None = None
    member: str | None = None
    offset: int | None = None  # tar members: where the member's data starts in the tar
    problem: str | None = None  # found unreadable by the listing: reading it fails with this

    @property
    def wnid(self) -> str | None:
        return self.labels[0] if len(self.labels) == 1 and WNID.match(self.labels[0]) else None


def image_key(uri: str) -> str:
    """Stable id of an image: a hash of its URI, safe as a file name and a WebDataset key."""
    return hashlib.sha256(uri.encode()).hexdigest()[:24]


def _files(fs, root: str) -> dict[str, int]:
    """Non-hidden files below ``root`` with their sizes."""
    found = fs.find(root, detail=True)
    return {
        p: int(info.get("size") or 0)
        for p, info in found.items()
        if info.get("type") != "directory"
        and not any(part.startswith(".") for part in posixpath.relpath(p, root).split("/"))
    }


def _folder_items(fs, root: str, split: str | None) -> list[Item]:
    items = []
    for path, size in _files(fs, root).items():
        rel = posixpath.relpath(path, root).split("/")
        if len(rel) < 2:
            continue  # files beside the class folders are not samples
        items.append(Item(storage.to_url(fs, path), (rel[0],), split, size))
    return items


_DEVKIT_DIRS = ("", "devkit/data", "ILSVRC2012_devkit_t12/data")


def _devkit_val_labels(fs, root: str, val_stems: list[str]) -> dict[str, str]:
    """The devkit's ground-truth list: line i holds the ILSVRC2012_ID of the i-th val image
    (sorted by name); ``meta.mat`` beside it maps those ids to wnids."""
    for folder in (posixpath.join(root, d) if d else root for d in _DEVKIT_DIRS):
        truth = posixpath.join(folder, "ILSVRC2012_validation_ground_truth.txt")
        meta = posixpath.join(folder, "meta.mat")
        if not fs.exists(truth):
            continue
        if not fs.exists(meta):
            raise SourceError(f"{truth} needs the devkit's meta.mat beside it to map ids to synsets")
        import numpy as np
        from scipy.io import loadmat

        synsets = loadmat(io.BytesIO(fs.cat_file(meta)))["synsets"].ravel()
        wnid_of = {int(np.squeeze(s["ILSVRC2012_ID"])): str(np.squeeze(s["WNID"])) for s in synsets}
        ids = [int(x) for x in fs.cat_file(truth).decode().split()]
        if len(ids) != len(val_stems):
            raise SourceError(f"{truth} has {len(ids)} labels for {len(val_stems)} validation images")
        return {stem: wnid_of[i] for stem, i in zip(sorted(val_stems), ids, strict=True)}
    return {}


def _ilsvrc_val_labels(fs, root: str, val_stems: list[str]) -> dict[str, str]:
    for candidate in (posixpath.join(root, name) for name in ("LOC_val_solution.csv", "val/LOC_val_solution.csv")):
        if fs.exists(candidate):
            rows = csv.DictReader(io.StringIO(fs.cat_file(candidate).decode()))
            return {r["ImageId"]: r["PredictionString"].split()[0] for r in rows}
    return _devkit_val_labels(fs, root, val_stems)


def _list_ilsvrc(fs, root: str) -> list[Item]:
    items = _folder_items(fs, posixpath.join(root, "train"), "train")
    val_root = posixpath.join(root, "val")
    if fs.isdir(val_root):
        files = {p: size for p, size in _files(fs, val_root).items() if not p.endswith(".csv")}
        flat = [posixpath.basename(p).rsplit(".", 1)[0] for p in files if posixpath.dirname(p) == val_root]
        labels = _ilsvrc_val_labels(fs, root, flat)
        for path, size in files.items():
            rel = posixpath.relpath(path, val_root).split("/")
            if len(rel) >= 2:  # val/<wnid>/image
                items.append(Item(storage.to_url(fs, path), (rel[0],), "val", size))
                continue
            stem = rel[0].rsplit(".", 1)[0]
            if stem not in labels:
                raise SourceError(
                    f"validation image {rel[0]} has no label: put LOC_val_solution.csv (or the devkit's "
                    f"ILSVRC2012_validation_ground_truth.txt with meta.mat) in {root}, or sort val/ into "
                    "val/<wnid>/ folders"
                )
            items.append(Item(storage.to_url(fs, path), (labels[stem],), "val", size))
    return items


def _end_marker_problem(f, members: list[tarfile.TarInfo]) -> str | None:
    """tarfile ends a listing quietly at a header cut short: a tar must end in a zero block."""
    end = max((m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE for m in members), default=0)
    f.seek(end)
    block = f.read(tarfile.BLOCKSIZE)
    if len(block) == tarfile.BLOCKSIZE and not block.strip(b"\0"):
        return None
    return "no end-of-archive block after the last complete member (cut short or overwritten)"


def _tar_headers(f) -> tuple[list[tarfile.TarInfo], str | None]:
    """Member headers of a tar; a damaged one is re-read as a stream up to the damage."""
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            members = tar.getmembers()
        return members, _end_marker_problem(f, members)
    except tarfile.TarError as err:
        problem = f"{type(err).__name__}: {err}"
    f.seek(0)
    members: list[tarfile.TarInfo] = []
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for member in tar:
                members.append(member)
    except tarfile.TarError:
        pass
    return members, problem


def _tar_items(fs, path: str) -> list[Item]:
    label = posixpath.basename(path)[: -len(".tar")]
    tar_url = storage.to_url(fs, path)
    size = int(fs.size(path))
    with fs.open(path, "rb") as f:
        members, problem = _tar_headers(f)
    items = [Item(tar_uri(m.name, tar_url), (label,), None, m.size, tar_url, m.name, m.offset_data)
             for m in members if m.isfile() and not posixpath.basename(m.name).startswith(".")]
    if problem is not None and all(m.offset_data + m.size <= size for m in members):
        # no listed member runs past the end (it fails when read): the damage is in a header
        end = max((m.offset_data + m.size for m in members), default=0)
        items.append(Item(tar_uri(f"@{end}", tar_url), (label,), None, 0, tar_url, None, None,
                          f"{tar_url} is damaged after byte {end} of {size} ({problem}): members after that are lost"))
    return items


def _list_synset_tars(fs, root: str) -> list[Item]:
    items = [item for path in sorted(fs.find(root)) if posixpath.basename(path).lower().endswith(".tar")
             for item in _tar_items(fs, path)]
    if not items:
        raise SourceError(f"no images inside the tar files under {root}")
    return items


def _read_table(fs, path: str) -> list[dict[str, str]]:
    data = fs.cat_file(path)
    if path.lower().endswith(".parquet"):
        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return [{k: (None if v is None else str(v)) for k, v in r.items()} for r in rows]
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def _list_manifest(fs, path: str) -> list[Item]:
    rows = _read_table(fs, path)
    if not rows:
        raise SourceError(f"manifest {path} has no rows")
    columns = set(rows[0])
    uri_col = manifest_column(columns)
    if uri_col is None or "labels" not in columns:
        raise SourceError(f"manifest {path} needs columns {' or '.join(MANIFEST_COLUMNS)} and labels; "
                          f"has {sorted(columns)}")
    base = posixpath.dirname(path)
    items = []
    for row in rows:
        ref = (row[uri_col] or "").strip()
        labels = tuple(x.strip() for x in (row["labels"] or "").split(";") if x.strip())
        if not ref or not labels:
            raise SourceError(f"manifest {path}: row without {uri_col if not ref else 'labels'}: {row}")
        ref = manifest_ref(ref, uri_col)  # image_id: the VOC layout beside the manifest (MSRC-21, PASCAL VOC)
        if "://" not in ref and not ref.startswith("/"):
            ref = posixpath.join(base, ref)
        uri = ref if "://" in ref else storage.to_url(fs, ref)
        items.append(Item(uri, labels, (row.get("split") or None), 0))
    return items


def detect_layout(fs, root: str) -> str:
    if root.lower().endswith((".csv", ".parquet")):
        return "manifest"
    if fs.isdir(posixpath.join(root, "train")):
        return "ilsvrc"
    if any(p.lower().endswith(".tar") for p in fs.ls(root, detail=False)):
        return "synset-tars"
    return "imagefolder"


def _list(source: str, layout: Layout) -> tuple[list[Item], str]:
    fs, root = storage.url_to_fs(source)
    if not fs.exists(root):
        raise SourceError(f"source {source} does not exist")
    if layout == "auto":
        layout = detect_layout(fs, root)  # type: ignore[assignment]
    listers = {"ilsvrc": _list_ilsvrc, "synset-tars": _list_synset_tars, "imagefolder": _list_imagefolder,
               "manifest": _list_manifest}
    items = listers[layout](fs, root)
    if not items:
        raise SourceError(f"source {source} ({layout}) holds no images")
    return sorted(items, key=lambda i: i.uri), layout


def list_source(source: str, layout: Layout = "auto") -> tuple[list[Item], str]:
    """All items of a source, sorted by URI, and the layout used. Fails fast when empty.

    Failures name URLs without credentials (they are logged and shown) and do not chain
    the original exception (its message would): :class:`SourceError` for a source that
    cannot be used as it is, :class:`ListingIOError` for storage errors worth a retry.
    """
    try:
        return _list(source, layout)
    except SourceError as err:
        raise SourceError(storage.redact(str(err))) from None
    except OSError as err:
        raise ListingIOError(storage.redact(f"cannot list {source}: {type(err).__name__}: {err}")) from None
    except ValueError as err:  # a malformed listing file
        raise SourceError(storage.redact(f"cannot list {source}: {type(err).__name__}: {err}")) from None


def _list_imagefolder(fs, root: str) -> list[Item]:
    return _folder_items(fs, root, None)


def _read_at_most(f, size: int | None, max_bytes: int, what: str, exact: bool = False) -> bytes:
    """Refuse by the known size first; then read no more than the limit allows (a file may grow)."""
    if size is not None and size > max_bytes:
        raise InputTooLarge(f"{storage.redact_url(what)} has {size} bytes, over --max-bytes {max_bytes}")
    data = f.read(size if exact and size is not None else max_bytes + 1)
    if len(data) > max_bytes:
        raise InputTooLarge(f"{storage.redact_url(what)} has more than --max-bytes {max_bytes} bytes")
    return data


class open_item_reader:
    """Reads item bytes, at most ``max_bytes`` each (checked before reading), keeping each
    synset tar open while its members are read."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._tars: dict[str, object] = {}

    def __enter__(self) -> open_item_reader:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._tars.values():
            f.close()  # type: ignore[attr-defined]
        self._tars.clear()

    def read(self, item: Item) -> bytes:
        if item.problem is not None:
            raise TruncatedInput(storage.redact(item.problem))
        if item.tar_url is None:
            fs, path = storage.url_to_fs(item.uri)
            size = fs.size(path)
            with fs.open(path, "rb") as f:
                return _read_at_most(f, None if size is None else int(size), self.max_bytes, item.uri)
        if item.tar_url not in self._tars:
            fs, path = storage.url_to_fs(item.tar_url)
            self._tars[item.tar_url] = fs.open(path, "rb")
        f = self._tars[item.tar_url]
        f.seek(item.offset)  # type: ignore[attr-defined]
        data = _read_at_most(f, item.size, self.max_bytes, item.uri, exact=True)
        if len(data) < item.size:
            raise TruncatedInput(f"{storage.redact_url(item.uri)}: the tar ends {item.size - len(data)} bytes "
                                 "into this member")
        return data
