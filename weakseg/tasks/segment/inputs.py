"""Streaming a corpus of images from any fsspec URL, in chunks, without listing it all first.

``--images`` may be:

- a folder: searched recursively (sorted, hidden files and folders skipped) for files with
  an image extension (jpg, jpeg, png, bmp, webp, tif, tiff, gif, any case); ``.tar`` files
  found there are read as WebDataset shards;
- a glob (``*``, ``?``, ``[``): every matching file (``.tar`` ones as shards);
- a text manifest (``.txt``, ``.lst``): one URI per line, ``#`` comments, relative paths
  resolved beside the manifest;
- a Parquet or CSV manifest: a column ``image_uri``, ``uri``, ``path`` or ``image_id``
  (:mod:`weakseg.tasks.uris`; ``image_id``: ``JPEGImages/<id>.jpg`` beside the manifest);
- WebDataset shards: a ``.tar`` URL, or brace notation ``shards-{000000..000009}.tar``.

:func:`iter_chunks` yields :class:`ChunkSpec` records: up to ``chunk_size`` URIs each for
files (consecutive in listing order, so names are deterministic), one per shard for tars.
Only the current chunk is held in memory, plus a 16-byte digest per input seen: URIs are
made canonical (:func:`canonical_uri`: absolute paths, normalised URLs) and an input listed
again anywhere, in any spelling, is dropped. Reading the inputs is :mod:`.read`'s job. URIs
are stored without credentials (:func:`stored_uri`).

Listing metadata: where the listing gives it (folders and globs on local disk, S3,
memory://, ...), each file keeps its :class:`SourceMeta` (size plus ETag or modification
time) from the listing itself, no extra request; ``--skip-existing`` compares it with the
``images`` table and skips an unchanged input without reading it. Manifests and brace
lists give none: those inputs are read and hashed as before.
"""
from __future__ import annotations

import csv
import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .. import storage
from ..images import IMAGE_EXTENSIONS
from ..ingest.sources import SourceError
from ..uris import MANIFEST_COLUMNS, manifest_column, manifest_ref, split_tar_uri, tar_uri

__all__ = ["ChunkSpec", "SourceMeta", "canonical_uri", "iter_chunks", "iter_inputs", "iter_listing", "source_meta",
           "stored_uri"]


TEXT_MANIFESTS = (".txt", ".lst")


@dataclass(frozen=True)
class SourceMeta:
    """What the listing says of a file (a tar member: of its archive, plus the member's place).

    Two listings of one unchanged file give equal values; a rewrite changes the ETag or the
    modification time (or the size). ``mtime`` is UTC, to the microsecond.
    """

    size: int
    etag: str | None = None
    mtime: datetime | None = None
    member_offset: int | None = None  # a tar member: where its bytes start in the archive
    member_size: int | None = None

    def member(self, offset: int, size: int) -> SourceMeta:
        return SourceMeta(self.size, self.etag, self.mtime, offset, size)

    @property
    def file_key(self) -> tuple[int, str | None, datetime | None]:
        """What identifies the listed file's version (the archive's, for a member)."""
        return self.size, self.etag, self.mtime


@dataclass(frozen=True)
class ChunkSpec:
    index: int
    uris: tuple[str, ...] = ()  # image files
    shard: str | None = None  # or one WebDataset tar, read whole
    meta: tuple[SourceMeta | None, ...] = ()  # per URI (or the shard's, one), when the listing gave it

    def meta_of(self, i: int) -> SourceMeta | None:
        return self.meta[i] if i < len(self.meta) else None



def canonical_uri(url: str) -> str:
    """One spelling per file: local paths (and ``file://`` URLs) absolute and normalised; other
    URLs with their path normalised (no ``.``/``..`` segments, no doubled slashes).

    ``./a.jpg``, ``a.jpg``, ``/data/a.jpg`` and ``file:///data/a.jpg`` (from ``/data``) are one file.
    ``tar://member::archive`` keeps the member and canonicalises the archive.
    """
    url = os.fspath(url)
    member_of = split_tar_uri(url)
    if member_of is not None:
        return tar_uri(member_of[0], canonical_uri(member_of[1]))
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" not in url:
        return os.path.abspath(url)
    parts = urlsplit(url)
    path = re.sub(r"/{2,}", "/", parts.path)
    if path:
        path = posixpath.normpath(path) + ("/" if path.endswith("/") and path != "/" else "")
        path = "/" + path.lstrip("/") if parts.path.startswith("/") else path
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, parts.query, parts.fragment))


def stored_uri(url: str) -> str:
    """The URI that tables, errors and logs show for ``url``: canonical, without credentials."""
    return storage.redact_url(canonical_uri(url))


def _digest(uri: str) -> bytes:
    return hashlib.blake2b(uri.encode(), digest_size=16).digest()


class _Rebase:
    """Found paths as URLs in the user's own spelling of the base (``memory://a`` stays so)."""

    def __init__(self, fs, base_url: str) -> None:
        self.fs = fs
        self.url = base_url.rstrip("/")
        self.path = storage.url_to_fs(base_url)[1].rstrip("/") if base_url else ""

    def __call__(self, path: str) -> str:
        if self.path and (path == self.path or path.startswith(self.path + "/")):
            return self.url + path[len(self.path):]
        return storage.to_url(self.fs, path)


def _is_http(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"http", "https"} & set(protocols))


def _is_glob(url: str) -> bool:
    if url.lower().startswith(("http://", "https://")):  # "?" starts a query there, e.g. a signed URL's
        return False
    return any(c in url.split("://")[-1] for c in "*?[")


def _utc(value: Any) -> datetime | None:
    """A listing's time (epoch seconds, a datetime, or an ISO string) as UTC to the microsecond."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(round(float(value) * 1e6) / 1e6, UTC)
    try:
        return _utc(datetime.fromisoformat(str(value)))
    except ValueError:
        return None


def source_meta(info: Any) -> SourceMeta | None:
    """:class:`SourceMeta` from an fsspec info dict (``ls(detail=True)``, ``info()``), or None
    when it lacks a size or lacks both an ETag and a modification time."""
    if not isinstance(info, dict) or info.get("size") is None:
        return None
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or None
    mtime = None
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            mtime = _utc(info[key])
            break
    if etag is None and mtime is None:
        return None
    return SourceMeta(int(info["size"]), str(etag) if etag is not None else None, mtime)


def _walk_local(root: str) -> Iterator[tuple[str, SourceMeta | None]]:
    """:func:`_walk` for local folders: one ``stat`` per file (no info dicts), one folder at a time."""
    files, dirs = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if not entry.name.startswith("."):
                (dirs if entry.is_dir() else files).append(entry)
    for entry in sorted(files, key=lambda e: e.name):
        try:
            st = entry.stat()
            meta = SourceMeta(st.st_size, None, _utc(st.st_mtime_ns // 1000 / 1e6))
        except OSError:  # vanished or a broken link: reading it will say why
            meta = None
        yield posixpath.join(root, entry.name), meta
    for name in sorted(d.name for d in dirs):
        yield from _walk_local(posixpath.join(root, name))


def _walk(fs, root: str) -> Iterator[tuple[str, SourceMeta | None]]:
    """Files under ``root`` in sorted order, directory by directory (streamed), with their metadata."""
    if isinstance(fs, LocalFileSystem):
        yield from _walk_local(root)
        return
    for dirpath, dirs, files in fs.walk(root, topdown=True, detail=True):
        kept = sorted((d, info) for d, info in dirs.items() if not d.startswith("."))
        dirs.clear()
        dirs.update(kept)  # in place, in order: fsspec descends into what is left
        for name in sorted(files):
            if not name.startswith("."):
                yield posixpath.join(dirpath, name), source_meta(files[name])


def _manifest_rows(fs, path: str) -> Iterator[str]:
    lower = path.lower()
    if lower.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            col = manifest_column(pf.schema_arrow.names)
            if col is None:
                raise SourceError(f"manifest {path} needs a column {' or '.join(MANIFEST_COLUMNS)}; "
                                  f"has {pf.schema_arrow.names}")
            for batch in pf.iter_batches(columns=[col], batch_size=8192):
                yield from (manifest_ref(v, col) for v in batch.column(0).to_pylist() if v)
    elif lower.endswith(".csv"):
        with fs.open(path, "rt", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            col = manifest_column(reader.fieldnames)
            if col is None:
                raise SourceError(f"manifest {path} needs a column {' or '.join(MANIFEST_COLUMNS)}; "
                                  f"has {reader.fieldnames}")
            yield from (manifest_ref(row[col].strip(), col) for row in reader if (row.get(col) or "").strip())
    else:
        with fs.open(path, "rt", encoding="utf-8-sig") as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    yield line


def iter_inputs(images: str) -> Iterator[tuple[str, str]]:
    """``(kind, url)`` pairs in a deterministic order; kind is ``"image"`` or ``"shard"``.

    Fails fast (:class:`SourceError`) when the URL does not exist.
    """
    for kind, url, _ in iter_listing(images):
        yield kind, url


def iter_listing(images: str) -> Iterator[tuple[str, str, SourceMeta | None]]:
    """:func:`iter_inputs` with each input's :class:`SourceMeta` where the listing gives it
    (folders and globs), else None (manifests, brace lists, a single URL)."""
    if "{" in images and ".." in images and images.lower().endswith(".tar"):
        from braceexpand import braceexpand  # a webdataset dependency

        for url in braceexpand(images):
            yield "shard", url, None
        return
    fs, root = storage.url_to_fs(images)
    if _is_glob(images):
        first = min(i for i, c in enumerate(images) if c in "*?[" and i > images.find("://") + 2)
        rebase = _Rebase(fs, images[: images.rfind("/", 0, first) + 1] if "/" in images[:first] else "")
        found = fs.glob(root, detail=True)
        for path in sorted(found):
            info = found[path]
            if info.get("type") != "directory":
                yield ("shard" if path.lower().endswith(".tar") else "image"), rebase(path), source_meta(info)
        return
    if not fs.exists(root):
        raise SourceError(f"--images {storage.redact_url(images)} does not exist")
    if not _is_http(fs) and fs.isdir(root):  # an HTTP URL is one file or manifest, never listed
        rebase = _Rebase(fs, images)
        for path, meta in _walk(fs, root):
            lower = path.lower()
            if lower.endswith(".tar"):
                yield "shard", rebase(path), meta
            elif lower.endswith(IMAGE_EXTENSIONS):
                yield "image", rebase(path), meta
        return
    lower = root.lower()
    if lower.endswith(".tar"):
        yield "shard", images, None
        return
    if not lower.endswith((".parquet", ".csv", *TEXT_MANIFESTS)):
        yield "image", images, None  # a single image file
        return
    base = images[: images.rfind("/") + 1] if "/" in images else ""
    for ref in _manifest_rows(fs, root):
        if "://" in ref or ref.startswith("/"):
            yield "image", ref, None
        else:
            yield "image", (posixpath.normpath(base + ref) if "://" not in base else base + ref), None


def iter_chunks(images: str, chunk_size: int) -> Iterator[ChunkSpec]:
    """Chunks of the corpus: consecutive image URIs, or one shard each; every input once.

    URIs are canonical (:func:`canonical_uri`); one listed again anywhere later, in any
    spelling, is dropped. Seen inputs are kept as 16-byte digests of their stored URI (about
    100 bytes each in a set: ~100 MB for a million images), never as the URIs themselves.
    Each chunk carries its inputs' listing metadata (:class:`SourceMeta`) where there is some.
    """
    index, pending, metas, seen = 0, [], [], set()
    for kind, url, meta in iter_listing(images):
        url = canonical_uri(url)
        digest = _digest(storage.redact_url(url))
        if digest in seen:
            continue
        seen.add(digest)
        if kind == "shard":
            yield ChunkSpec(index, shard=url, meta=(meta,) if meta else ())
            index += 1
            continue
        pending.append(url)
        metas.append(meta)
        if len(pending) >= chunk_size:
            yield ChunkSpec(index, tuple(pending), meta=_metas(metas))
            index, pending, metas = index + 1, [], []
    if pending:
        yield ChunkSpec(index, tuple(pending), meta=_metas(metas))


def _metas(metas: list[SourceMeta | None]) -> tuple[SourceMeta | None, ...]:
    return tuple(metas) if any(m is not None for m in metas) else ()


