"""Streaming a corpus of images from any fsspec URL, in chunks, without listing it all first.

``--images`` may be:

- a folder: searched recursively (hidden files and folders skipped) for files with an image
  extension (jpg, jpeg, png, bmp, webp, tif, tiff, gif, any case); ``.tar`` files found
  there are read as WebDataset shards;
- a glob (``*``, ``?``, ``[``, ``**``; fsspec's rules): every matching file (``.tar`` ones as shards);
- a text manifest (``.txt``, ``.lst``): one URI per line, ``#`` comments, relative paths
  resolved beside the manifest;
- a Parquet or CSV manifest: a column ``image_uri``, ``uri``, ``path`` or ``image_id``
  (:mod:`weakseg.tasks.uris`; ``image_id``: ``JPEGImages/<id>.jpg`` beside the manifest);
- WebDataset shards: a ``.tar`` URL, or brace notation ``shards-{000000..000009}.tar``.

**Streamed.** :func:`iter_chunks` yields :class:`ChunkSpec` records: up to ``chunk_size``
URIs each for files (consecutive in listing order, so names are deterministic), one per
shard for tars. Only the current chunk is held, never the listing: an S3 prefix is read a
``ListObjectsV2`` page (1,000 keys) at a time, a local folder one directory at a time
(a directory of more than :data:`SPILL_ENTRIES` entries is sorted in runs spilled to
temporary files and merged), manifests a line or a Parquet batch at a time, brace
patterns expanded lazily. Folders and globs list in one order everywhere: sorted by path,
a folder's name sorting as ``name/`` (the order S3 lists keys in).

**Each input once.** URIs are made canonical (:func:`canonical_uri`: absolute paths,
normalised URLs). Where a listing can name an input twice (manifests, brace patterns,
which may repeat a line or a spelling), a 16-byte digest of each canonical URI seen is kept
(about 100 bytes in a set: ~100 MB a million) and a repeat is dropped. A folder walk, an S3
prefix or a glob cannot repeat a path, and keeps nothing. The digest is of the *whole*
URI, credentials included (it never leaves memory): two URLs that differ only in a
``token=``/``sig=`` parameter are two inputs, though they are stored alike
(:func:`stored_uri`, without credentials); :func:`input_key` tells their rows apart.

**Listing metadata.** Where the listing gives it (folders and globs on local disk, S3,
memory://, ...), each file keeps its :class:`SourceMeta` (size plus ETag or modification
time) from the listing itself, no extra request. For inputs the listing says nothing of
(manifests, brace lists, a single URL), :func:`describe` asks the store before anything is
read: a ``stat`` locally, one ``HEAD`` (``fs.info``) per object on S3 and HTTP, many at a
time. ``--skip-existing`` compares it with the ``images`` table and skips an unchanged input
without reading it (:mod:`.incremental`).
"""
from __future__ import annotations

import asyncio
import csv
import hashlib
import heapq
import os
import pickle
import posixpath
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .. import storage
from ..images import IMAGE_EXTENSIONS
from ..ingest.sources import SourceError, image_key
from ..uris import MANIFEST_COLUMNS, manifest_column, manifest_ref, split_tar_uri, tar_uri

__all__ = ["SPILL_ENTRIES", "ChunkSpec", "Listing", "SourceMeta", "canonical_uri", "describe", "fill_meta",
           "input_key", "iter_chunks", "iter_inputs", "iter_kinds", "iter_listing", "source_meta", "stored_and_key",
           "stored_uri"]


TEXT_MANIFESTS = (".txt", ".lst")
SPILL_ENTRIES = 65536  # a directory's entries held in memory at most while sorting it
DESCRIBE_CONCURRENCY = 32  # HEAD requests in flight at once (describe)
S3_PAGE_KEYS = 1000  # keys a ListObjectsV2 page asks for (S3's own default and most)


@dataclass(frozen=True)
class SourceMeta:
    """What the listing (or a ``HEAD``) says of a file (a tar member: of its archive, plus the member's place).

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
        """What identifies the listed file's version (the archive's, for a member): see :func:`listing_key`."""
        return listing_key(self.size, self.etag, self.mtime)


def listing_key(size: Any, etag: Any, mtime: Any) -> tuple[int, str | None, datetime | None]:
    """(size, ETag) where the store gives an ETag, else (size, modification time).

    An ETag names the stored version (S3's is the content's MD5 or its parts'); the time
    beside it is left out because stores give it at different precisions (a ``HEAD`` says
    whole seconds, a listing milliseconds), which would make one unchanged object look
    changed to a run that sees it another way.
    """
    return (int(size), str(etag), None) if etag else (int(size), None, mtime)


@dataclass(frozen=True)
class ChunkSpec:
    index: int
    uris: tuple[str, ...] = ()  # image files, canonical (:func:`canonical_uri`; as :func:`iter_chunks` gives them)
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
    out = urlunsplit((parts.scheme.lower(), parts.netloc, path, parts.query, parts.fragment))
    if "://" not in out:  # canonical once and for all (a canonical URI is its own canonical URI)
        if not parts.scheme:  # no scheme after all ("a/b://c"): a local path
            return os.path.abspath(out)
        out = out.replace(":", "://", 1)  # memory:///a: urlunsplit drops the "//" of an empty host
    return out


def stored_uri(url: str) -> str:
    """The URI that tables, errors and logs show for ``url``: canonical, without credentials."""
    return storage.redact_url(canonical_uri(url))


def stored_and_key(canonical: str) -> tuple[str, str]:
    """:func:`stored_uri` and :func:`input_key` of a URI already canonical (:func:`canonical_uri`:
    a :class:`ChunkSpec`'s), made canonical once per input rather than once per use."""
    stored = storage.redact_url(canonical)
    return stored, image_key(stored) if stored == canonical else image_key(f"{stored}\n{canonical}")


def input_key(url: str) -> str:
    """The ``image_key`` of the input ``url``: the hash of its stored URI, as always, unless the URL
    carries a credential (userinfo, ``token=``, ``sig=``, ...). Then the stored URI is the same
    for every credential, so the key hashes the whole canonical URL: two inputs that differ
    only in a credential have one ``image_uri`` and two keys, one row each. The key is a
    truncated SHA-256; the credential cannot be read back from it.
    """
    return stored_and_key(canonical_uri(url))[1]


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


def _is_s3(fs) -> bool:
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return bool({"s3", "s3a"} & set(protocols)) and hasattr(fs, "_call_s3")


def _kind(fs, path: str) -> str | None:
    """``"dir"``, ``"file"`` or None (nothing there), without listing a folder: fsspec's ``isdir``
    lists an S3 folder whole (and caches it: every key in memory before the first is used),
    and its ``exists`` on HTTP is a ``GET`` that starts sending the body. An HTTP URL is a
    file (or a manifest), never listed."""
    if _is_http(fs):
        try:
            fs.info(path)  # a HEAD
        except FileNotFoundError:
            return None
        return "file"
    if _is_s3(fs):
        return _s3_kind(fs, path)
    if not fs.exists(path):
        return None
    return "dir" if fs.isdir(path) else "file"


def _s3_kind(fs, path: str) -> str | None:
    """One ``HEAD`` (an object?) and at most one one-key listing (a folder?)."""
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(path)
    key = key.strip("/")
    if key:
        try:
            sync(fs.loop, fs._call_s3, "head_object", Bucket=bucket, Key=key, **getattr(fs, "req_kw", {}))
            return "file"
        except FileNotFoundError:
            pass
    try:
        out = sync(fs.loop, fs._call_s3, "list_objects_v2", Bucket=bucket, Prefix=key + "/" if key else "",
                   MaxKeys=1, **getattr(fs, "req_kw", {}))
    except FileNotFoundError:  # no such bucket
        return None
    return "dir" if out.get("KeyCount", 0) or out.get("Contents") or out.get("CommonPrefixes") else None


def _is_glob(url: str) -> bool:
    if url.lower().startswith(("http://", "https://")):  # "?" starts a query there, e.g. a signed URL's
        return False
    return any(c in url.split("://")[-1] for c in "*?[")


def _utc(value: Any) -> datetime | None:
    """A listing's time (epoch seconds, a datetime, an ISO or HTTP date) as UTC to the microsecond."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(round(float(value) * 1e6) / 1e6, UTC)
    try:
        return _utc(datetime.fromisoformat(str(value)))
    except ValueError:
        pass
    try:  # an HTTP Last-Modified: "Wed, 21 Oct 2015 07:28:00 GMT"
        return _utc(parsedate_to_datetime(str(value)))
    except (TypeError, ValueError):
        return None


def source_meta(info: Any) -> SourceMeta | None:
    """:class:`SourceMeta` from an fsspec info dict (``ls(detail=True)``, ``info()``, an HTTP ``HEAD``),
    or None when it lacks a size or lacks both an ETag and a modification time."""
    if not isinstance(info, dict) or info.get("size") is None:
        return None
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash") or None
    mtime = None
    for key in ("mtime", "LastModified", "last_modified", "Last-Modified", "updated", "created"):
        if info.get(key) is not None:
            mtime = _utc(info[key])
            break
    if etag is None and mtime is None:
        return None
    return SourceMeta(int(info["size"]), str(etag) if etag is not None else None, mtime)


# --- walking a folder, in sorted order, one page or directory at a time -------------------------

def _sorted_stream(items: Iterable[tuple[str, str, bool]], spill: int) -> Iterator[tuple[str, str, bool]]:
    """``items`` sorted, holding at most ``spill`` of them: more are sorted in runs written to
    temporary files (pickled in small blocks) and merged (an external merge sort)."""
    batch: list[tuple[str, str, bool]] = []
    runs: list[IO[bytes]] = []
    try:
        for item in items:
            batch.append(item)
            if len(batch) >= spill:
                runs.append(_spill(sorted(batch)))
                batch = []
        batch.sort()
        if not runs:
            yield from batch
            return
        runs.append(_spill(batch))
        batch = []
        yield from heapq.merge(*(_replay(f) for f in runs))
    finally:
        for f in runs:
            f.close()


def _spill(items: list[tuple[str, str, bool]], block: int = 256) -> IO[bytes]:
    f = tempfile.TemporaryFile(prefix="weakseg-listing-")  # noqa: SIM115 (closed by _sorted_stream)
    for i in range(0, len(items), block):
        pickle.dump(items[i:i + block], f, protocol=pickle.HIGHEST_PROTOCOL)
    f.seek(0)
    return f


def _replay(f: IO[bytes]) -> Iterator[tuple[str, str, bool]]:
    while True:
        try:
            yield from pickle.load(f)
        except EOFError:
            return


def _scan_local(folder: str, hidden: bool) -> Iterator[tuple[str, str, bool]]:
    """``(sort key, name, is_dir)`` of a local folder's entries, as ``scandir`` gives them."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if hidden or not entry.name.startswith("."):
                is_dir = entry.is_dir()
                yield (entry.name + "/" if is_dir else entry.name), entry.name, is_dir


def _stat_meta(path: str) -> SourceMeta | None:
    try:
        st = os.stat(path)
    except OSError:  # vanished or a broken link: reading it will say why
        return None
    return SourceMeta(st.st_size, None, _utc(st.st_mtime_ns // 1000 / 1e6))


def _walk_local(folder: str, hidden: bool = False, depth: int | None = None, meta: bool = True
                ) -> Iterator[tuple[str, SourceMeta | None]]:
    """Files under a local folder, sorted by path (one ``stat`` each unless ``meta`` is False),
    one directory at a time; ``depth`` levels at most (1: the folder's own files)."""
    for _, name, is_dir in _sorted_stream(_scan_local(folder, hidden), SPILL_ENTRIES):
        path = posixpath.join(folder, name)
        if not is_dir:
            yield path, _stat_meta(path) if meta else None
        elif depth is None or depth > 1:
            yield from _walk_local(path, hidden, None if depth is None else depth - 1, meta)


def _s3_pages(fs, bucket: str, prefix: str, delimiter: str) -> Iterator[list[dict[str, Any]]]:
    """The objects under ``prefix``, a ``ListObjectsV2`` page (:data:`S3_PAGE_KEYS`) at a time, in key
    order. Each page goes through s3fs's ``_call_s3`` (its retries and error translation); only
    the page in hand is held."""
    from fsspec.asyn import sync

    async def pages():
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": S3_PAGE_KEYS,
                                  **getattr(fs, "req_kw", {})}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:
            out = await fs._call_s3("list_objects_v2", **kwargs)
            yield out.get("Contents", [])
            if not out.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = out["NextContinuationToken"]

    agen = pages()
    try:
        while True:
            try:
                yield sync(fs.loop, agen.__anext__)
            except StopAsyncIteration:
                return
    finally:
        sync(fs.loop, agen.aclose)


def _walk_s3(fs, folder: str, hidden: bool = False, depth: int | None = None, stem: str = ""
             ) -> Iterator[tuple[str, SourceMeta | None]]:
    """Objects under an S3 folder (``bucket/key``) in key order, listed page by page: one flat
    listing of the whole prefix (one request per 1,000 keys, whatever the folders), or of one
    level (``depth`` 1). ``stem``: the start of the names wanted (a glob's literal part)."""
    bucket, key, _ = fs.split_path(folder)
    base = key.strip("/") + "/" if key.strip("/") else ""
    for page in _s3_pages(fs, bucket, base + stem, "/" if depth == 1 else ""):
        for obj in page:
            rel = obj["Key"][len(base):]
            if not rel or rel.endswith("/"):  # a folder marker
                continue
            parts = rel.split("/")
            if (not hidden and any(p.startswith(".") for p in parts)) or (depth is not None and len(parts) > depth):
                continue
            yield f"{bucket}/{obj['Key']}", SourceMeta(int(obj["Size"]), obj.get("ETag") or None,
                                                      _utc(obj.get("LastModified")))


def _walk_fs(fs, folder: str, hidden: bool = False, depth: int | None = None
             ) -> Iterator[tuple[str, SourceMeta | None]]:
    """Other filesystems (memory://, GCS, ...): one ``ls`` per directory (fsspec lists a
    directory whole), in the same sorted order."""
    entries = []
    for info in fs.ls(folder, detail=True):
        name = info["name"].rstrip("/")
        if name == folder.rstrip("/"):
            continue
        base, is_dir = posixpath.basename(name), info.get("type") == "directory"
        if hidden or not base.startswith("."):
            entries.append((base + "/" if is_dir else base, name, is_dir, info))
    entries.sort(key=lambda e: e[0])
    for _, name, is_dir, info in entries:
        if not is_dir:
            yield name, source_meta(info)
        elif depth is None or depth > 1:
            yield from _walk_fs(fs, name, hidden, None if depth is None else depth - 1)


def _walk(fs, folder: str, hidden: bool = False, depth: int | None = None, stem: str = "", meta: bool = True
          ) -> Iterator[tuple[str, SourceMeta | None]]:
    """Files under ``folder`` (a path inside ``fs``), sorted by path, streamed, with their metadata
    (``meta`` False: none where it costs a request, i.e. a ``stat`` a local file)."""
    if isinstance(fs, LocalFileSystem):
        walk = _walk_local(folder if folder else "/", hidden, depth, meta)
    elif _is_s3(fs):
        walk = _walk_s3(fs, folder, hidden, depth, stem)
    else:
        walk = _walk_fs(fs, folder, hidden, depth)
    stem_path = posixpath.join(folder, stem) if stem else ""
    for path, meta in walk:
        if not stem_path or path.startswith(stem_path):
            yield path, meta


def _glob(fs, pattern: str, meta: bool = True) -> Iterator[tuple[str, SourceMeta | None]]:
    """Files matching a glob (a path inside ``fs``), fsspec's rules (:func:`fsspec.utils.glob_translate`),
    found by walking from its literal folder no deeper than the pattern reaches."""
    from fsspec.utils import glob_translate

    first = min(i for i, c in enumerate(pattern) if c in "*?[")
    cut = pattern.rfind("/", 0, first)
    folder = pattern[:cut] if cut > 0 else ("/" if cut == 0 else "")
    rest = pattern[cut + 1:]
    depth = None if "**" in rest else rest.count("/") + 1
    stem = pattern[cut + 1:first]  # the literal start of the first name with a wildcard (no "/")
    regex = re.compile(glob_translate(pattern))
    for path, found in _walk(fs, folder, hidden=True, depth=depth, stem=stem, meta=meta):
        if regex.match(path):
            yield path, found


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


class Listing:
    """``(kind, url, meta)`` for each input of ``--images``, streamed in a deterministic order; kind
    is ``"image"`` or ``"shard"``, meta the :class:`SourceMeta` where the listing gives it
    (folders and globs), else None (manifests, brace lists, a single URL).

    :attr:`repeats` (known once iteration has started) says whether the listing can name an
    input twice: manifests and brace patterns can, a folder walk, an S3 prefix or a glob cannot.
    Fails fast (:class:`SourceError`) when the URL does not exist. ``meta`` False: names only, no
    metadata where it would cost a request (a ``stat`` a local file; counting needs none).
    """

    def __init__(self, images: str, meta: bool = True) -> None:
        self.images = images
        self.meta = meta
        self.repeats = True

    def __iter__(self) -> Iterator[tuple[str, str, SourceMeta | None]]:
        images = self.images
        if "{" in images and ".." in images and images.lower().endswith(".tar"):
            from braceexpand import braceexpand  # a webdataset dependency; lazy, one name at a time

            for url in braceexpand(images):
                yield "shard", url, None
            return
        fs, root = storage.url_to_fs(images)
        if _is_glob(images):
            self.repeats = False
            first = min(i for i, c in enumerate(images) if c in "*?[" and i > images.find("://") + 2)
            rebase = _Rebase(fs, images[: images.rfind("/", 0, first) + 1] if "/" in images[:first] else "")
            for path, meta in _glob(fs, root, self.meta):
                yield ("shard" if path.lower().endswith(".tar") else "image"), rebase(path), meta
            return
        kind = _kind(fs, root)
        if kind is None:
            raise SourceError(f"--images {storage.redact_url(images)} does not exist")
        if kind == "dir":
            self.repeats = False
            rebase = _Rebase(fs, images)
            for path, meta in _walk(fs, root, meta=self.meta):
                lower = path.lower()
                if lower.endswith(".tar"):
                    yield "shard", rebase(path), meta
                elif lower.endswith(IMAGE_EXTENSIONS):
                    yield "image", rebase(path), meta
            return
        lower = root.lower()
        if lower.endswith(".tar"):
            self.repeats = False
            yield "shard", images, None
            return
        if not lower.endswith((".parquet", ".csv", *TEXT_MANIFESTS)):
            self.repeats = False
            yield "image", images, None  # a single image file
            return
        base = images[: images.rfind("/") + 1] if "/" in images else ""
        for ref in _manifest_rows(fs, root):
            if "://" in ref or ref.startswith("/"):
                yield "image", ref, None
            else:
                yield "image", (posixpath.normpath(base + ref) if "://" not in base else base + ref), None


def iter_inputs(images: str) -> Iterator[tuple[str, str]]:
    """``(kind, url)`` pairs in a deterministic order; kind is ``"image"`` or ``"shard"``.

    Fails fast (:class:`SourceError`) when the URL does not exist.
    """
    for kind, url, _ in Listing(images):
        yield kind, url


def iter_listing(images: str) -> Iterator[tuple[str, str, SourceMeta | None]]:
    """:func:`iter_inputs` with each input's :class:`SourceMeta` where the listing gives it
    (folders and globs), else None (manifests, brace lists, a single URL)."""
    yield from Listing(images)


def iter_chunks(images: str, chunk_size: int) -> Iterator[ChunkSpec]:
    """Chunks of the corpus: consecutive image URIs, or one shard each; every input once.

    URIs are canonical (:func:`canonical_uri`). Where the listing can repeat an input
    (:attr:`Listing.repeats`), one listed again anywhere later, in any spelling, is dropped:
    seen inputs are kept as 16-byte digests of their whole canonical URI (credentials
    included, in memory only), never as the URIs themselves. Each chunk carries its inputs'
    listing metadata (:class:`SourceMeta`) where there is some.
    """
    index, pending, metas = 0, [], []
    for kind, url, meta in _once(Listing(images)):
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


def _once(listing: Listing, canonical: bool = True) -> Iterator[tuple[str, str, SourceMeta | None]]:
    """The listing's inputs, each once: where it can repeat one (:attr:`Listing.repeats`), a later
    listing of a canonical URI already seen is dropped. URLs canonical; with ``canonical`` False,
    as listed where the listing cannot repeat (counting needs no spelling)."""
    seen: set[bytes] = set()
    for kind, url, meta in listing:
        if listing.repeats:
            url = canonical_uri(url)
            digest = _digest(url)
            if digest in seen:
                continue
            seen.add(digest)
        elif canonical:
            url = canonical_uri(url)
        yield kind, url, meta


def iter_kinds(images: str) -> Iterator[str]:
    """The kind (``"image"`` or ``"shard"``) of each input :func:`iter_chunks` gives, in order, found
    cheaply: the same listing and the same dropping of repeats, but names only (no ``stat`` of a
    local file) and nothing made canonical where the listing cannot repeat."""
    for kind, _, _ in _once(Listing(images, meta=False), canonical=False):
        yield kind


def _metas(metas: list[SourceMeta | None]) -> tuple[SourceMeta | None, ...]:
    return tuple(metas) if any(m is not None for m in metas) else ()


# --- what the store says of an input, without reading it --------------------------------------

async def _infos(fs, paths: Sequence[str], limit: int) -> list[SourceMeta | None]:
    sem = asyncio.Semaphore(limit)

    async def one(path: str) -> SourceMeta | None:
        async with sem:
            try:
                return source_meta(await fs._info(path))
            except Exception:  # missing, forbidden, a passing failure: reading it decides
                return None

    return list(await asyncio.gather(*(one(p) for p in paths)))


def describe(urls: Sequence[str], concurrency: int = DESCRIBE_CONCURRENCY) -> list[SourceMeta | None]:
    """What the store says of each URL without reading it (None where it says nothing usable):
    a ``stat`` for local files; ``fs.info`` elsewhere — one ``HEAD`` per object on S3 and HTTP,
    ``concurrency`` at a time on stores with an async client. S3 has no batched ``HEAD``;
    listings already carry the metadata and never come here.

    Asked before the input is read, so the metadata recorded with a row never describes a
    newer version than the bytes the row was made from.
    """
    out: list[SourceMeta | None] = [None] * len(urls)
    groups: dict[int, tuple[Any, list[tuple[int, str]]]] = {}
    for i, url in enumerate(urls):
        if split_tar_uri(url) is not None:
            continue
        fs, path = storage.url_to_fs(url)
        if isinstance(fs, LocalFileSystem):
            out[i] = _stat_meta(path)
        elif getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
            groups.setdefault(id(fs), (fs, []))[1].append((i, path))
        else:
            try:
                fs.invalidate_cache(path)
                out[i] = source_meta(fs.info(path))
            except Exception:
                out[i] = None
    for fs, items in groups.values():
        from fsspec.asyn import sync

        for _, path in items:
            fs.invalidate_cache(path)  # s3fs answers info() from its listing cache: ask the store
        for (i, _), meta in zip(items, sync(fs.loop, _infos, fs, [p for _, p in items], concurrency), strict=True):
            out[i] = meta
    return out


def fill_meta(spec: ChunkSpec) -> ChunkSpec:
    """``spec`` with :class:`SourceMeta` for the inputs the listing said nothing of (manifests,
    brace lists, a single URL), from :func:`describe`; unchanged when the listing said it all."""
    if spec.shard is not None:
        if spec.meta_of(0) is not None:
            return spec
        meta = describe([spec.shard])[0]
        return replace(spec, meta=(meta,)) if meta is not None else spec
    missing = [i for i in range(len(spec.uris)) if spec.meta_of(i) is None]
    if not missing:
        return spec
    found = describe([spec.uris[i] for i in missing])
    metas = [spec.meta_of(i) for i in range(len(spec.uris))]
    for i, meta in zip(missing, found, strict=True):
        metas[i] = meta
    return replace(spec, meta=_metas(metas))
