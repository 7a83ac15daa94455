"""Streaming a corpus of images from any fsspec URL, in chunks, without listing it all first.

``--images`` may be:

- a folder: searched recursively (sorted, hidden files and folders skipped) for files with
  an image extension (jpg, jpeg, png, bmp, webp, tif, tiff, gif, any case); ``.tar`` files
  found there are read as WebDataset shards;
- a glob (``*``, ``?``, ``[``): every matching file (``.tar`` ones as shards);
- a text manifest (``.txt``, ``.lst``): one URI per line, ``#`` comments, relative paths
  resolved beside the manifest;
- a Parquet or CSV manifest: a column ``image_uri``, ``uri`` or ``path``;
- WebDataset shards: a ``.tar`` URL, or brace notation ``shards-{000000..000009}.tar``.

:func:`iter_chunks` yields :class:`ChunkSpec` records: up to ``chunk_size`` URIs each for
files (consecutive in listing order, so names are deterministic), one per shard for tars.
Only the current chunk is held in memory. :func:`read_chunk` yields each input's bytes or
the exception that prevented reading it, so the caller can record it and go on.
"""
from __future__ import annotations

import csv
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from . import storage
from .images import IMAGE_EXTENSIONS
from .listing import SourceError

__all__ = ["ChunkSpec", "InputRecord", "iter_chunks", "iter_inputs", "read_chunk"]

MANIFEST_COLUMNS = ("image_uri", "uri", "path")
TEXT_MANIFESTS = (".txt", ".lst")


@dataclass(frozen=True)
class ChunkSpec:
    index: int
    uris: tuple[str, ...] = ()  # image files
    shard: str | None = None  # or one WebDataset tar, read whole


@dataclass
class InputRecord:
    uri: str
    data: bytes | None
    error: BaseException | None = None


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


def _is_glob(url: str) -> bool:
    return any(c in url.split("://")[-1] for c in "*?[")


def _walk(fs, root: str) -> Iterator[str]:
    """Files under ``root`` in sorted order, directory by directory (streamed)."""
    for dirpath, dirs, files in fs.walk(root, topdown=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith("."):
                yield posixpath.join(dirpath, name)


def _manifest_rows(fs, path: str) -> Iterator[str]:
    lower = path.lower()
    if lower.endswith(".parquet"):
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            col = next((c for c in MANIFEST_COLUMNS if c in pf.schema_arrow.names), None)
            if col is None:
                raise SourceError(f"manifest {path} needs a column {' or '.join(MANIFEST_COLUMNS)}; "
                                  f"has {pf.schema_arrow.names}")
            for batch in pf.iter_batches(columns=[col], batch_size=8192):
                yield from (v for v in batch.column(0).to_pylist() if v)
    elif lower.endswith(".csv"):
        with fs.open(path, "rt", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            col = next((c for c in MANIFEST_COLUMNS if c in (reader.fieldnames or [])), None)
            if col is None:
                raise SourceError(f"manifest {path} needs a column {' or '.join(MANIFEST_COLUMNS)}; "
                                  f"has {reader.fieldnames}")
            yield from (row[col].strip() for row in reader if (row.get(col) or "").strip())
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
    if "{" in images and ".." in images and images.lower().endswith(".tar"):
        from braceexpand import braceexpand  # a webdataset dependency

        for url in braceexpand(images):
            yield "shard", url
        return
    fs, root = storage.url_to_fs(images)
    if _is_glob(images):
        first = min(i for i, c in enumerate(images) if c in "*?[" and i > images.find("://") + 2)
        rebase = _Rebase(fs, images[: images.rfind("/", 0, first) + 1] if "/" in images[:first] else "")
        for path in sorted(fs.glob(root)):
            if not fs.isdir(path):
                yield ("shard" if path.lower().endswith(".tar") else "image"), rebase(path)
        return
    if not fs.exists(root):
        raise SourceError(f"--images {images} does not exist")
    if fs.isdir(root):
        rebase = _Rebase(fs, images)
        for path in _walk(fs, root):
            lower = path.lower()
            if lower.endswith(".tar"):
                yield "shard", rebase(path)
            elif lower.endswith(IMAGE_EXTENSIONS):
                yield "image", rebase(path)
        return
    lower = root.lower()
    if lower.endswith(".tar"):
        yield "shard", images
        return
    if not lower.endswith((".parquet", ".csv", *TEXT_MANIFESTS)):
        yield "image", images  # a single image file
        return
    base = images[: images.rfind("/") + 1] if "/" in images else ""
    for ref in _manifest_rows(fs, root):
        if "://" in ref or ref.startswith("/"):
            yield "image", ref
        else:
            yield "image", posixpath.normpath(base + ref) if "://" not in base else base + ref


def iter_chunks(images: str, chunk_size: int) -> Iterator[ChunkSpec]:
    """Chunks of the corpus: consecutive image URIs (duplicates dropped), or one shard each."""
    index, pending, last = 0, [], None
    for kind, url in iter_inputs(images):
        if kind == "shard":
            yield ChunkSpec(index, shard=url)
            index += 1
            continue
        if url == last or url in pending:
            continue
        last = url
        pending.append(url)
        if len(pending) >= chunk_size:
            yield ChunkSpec(index, tuple(pending))
            index, pending = index + 1, []
    if pending:
        yield ChunkSpec(index, tuple(pending))


def _read_file(uri: str, attempts: int = 2) -> InputRecord:
    for attempt in range(attempts):
        try:
            return InputRecord(uri, storage.read_bytes(uri))
        except (FileNotFoundError, PermissionError, IsADirectoryError) as err:
            return InputRecord(uri, None, err)  # vanished or unreadable: retrying will not help
        except Exception as err:  # a transient read error gets one more try, then is recorded
            if attempt == attempts - 1:
                return InputRecord(uri, None, err)
    raise AssertionError("unreachable")


def _tar_uri(tar_url: str, member: str) -> str:
    base = tar_url if "://" in tar_url else "file://" + tar_url
    return f"tar://{member}::{base}"


def _read_shard(url: str) -> Iterator[InputRecord]:
    """The images of a WebDataset tar (one per sample key, the first image-typed member)."""
    try:
        fs, path = storage.url_to_fs(url)
        f = fs.open(path, "rb")
    except Exception as err:
        yield InputRecord(url, None, err)
        return
    seen: set[str] = set()
    try:
        with f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                name = member.name
                base = posixpath.basename(name)
                if not member.isfile() or base.startswith("."):
                    continue
                key = posixpath.join(posixpath.dirname(name), base.split(".", 1)[0])
                ext = "." + base.split(".", 1)[1].lower() if "." in base else ""
                if key in seen or not ext.endswith(IMAGE_EXTENSIONS):
                    continue
                seen.add(key)
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                yield InputRecord(_tar_uri(url, name), data)
    except Exception as err:  # a truncated or corrupt tar: what was read stays, the rest is one error
        yield InputRecord(url, None, err)


def read_chunk(spec: ChunkSpec) -> Iterator[InputRecord]:
    """Each input of the chunk with its bytes, or with the error that prevented reading it."""
    if spec.shard is not None:
        yield from _read_shard(spec.shard)
        return
    for uri in spec.uris:
        yield _read_file(uri)

