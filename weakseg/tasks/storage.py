"""Object storage through fsspec: local paths, ``file://``, ``s3://``, ``memory://``.

Credentials and the S3 endpoint come from the standard AWS environment variables (or a
Prefect block), never from URLs or parameters, so nothing secret is logged or written.
Writes are atomic: a reader sees the old object or the new one, never half of one.

Buckets are never created: a write into a bucket that does not exist fails (no ``makedirs``
on object stores, where it would create the bucket), and every command checks its output
URLs with :func:`require_buckets` before any work.

Conditional writes (:func:`read_version`, :func:`replace_if`) are the registry's
compare-and-swap: on S3 ``If-None-Match: *`` / ``If-Match: <ETag>`` (atomic in the store);
locally a lock file and a rename (create-if-absent: a hard link); on ``memory://`` a lock of
the process. Elsewhere the object is compared just before an unconditional write: a narrow
window, not a guarantee (see docs/registry.md).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import posixpath
import re
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem

from .._atomic import atomic_write, durable_temp

__all__ = [
    "BUCKET_STORES", "BucketError", "Version", "bucket_of", "duckdb_connection", "exists", "join", "parquet_bytes",
    "read_bytes", "read_json", "read_version", "redact", "redact_url", "replace_if", "require_buckets", "to_url",
    "url_to_fs", "write_bytes", "write_json"
]

log = logging.getLogger(__name__)

# Query parameters that carry a credential: AWS SigV2/SigV4 presigned URLs, GCS signed URLs,
# Azure SAS tokens, and the usual token/key/password names. Matched case-insensitively.
_SECRET_PARAMS = re.compile(
    r"^(x-amz-.*|x-goog-.*|signature|sig|expires|"
    r"awsaccesskeyid|skoid|sktid|token|access_token|id_token|refresh_token|api_key|apikey|key|"
    r"password|passwd|pwd|secret|client_secret|auth|authorization|credential|credentials|session_token)$",
    re.IGNORECASE,
)
REDACTED = "REDACTED"
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without what would leak a credential: userinfo and credential query parameters.

    The one rule for every URI that is stored, logged or shown (tables, errors, manifests,
    checkpoints, artifacts, flow parameters). Local paths and clean URLs come back unchanged.
    """
    url = os.fspath(url)
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("://", 1)[0] + "://" + REDACTED
    netloc = parts.netloc.rsplit("@", 1)[-1] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAMS.match(k) for k, _ in pairs):
            query = urlencode([(k, v) for k, v in pairs if not _SECRET_PARAMS.match(k)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact(text: str) -> str:
    """Every URL inside free text (an error message, a log line) passed through :func:`redact_url`."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for ``url``."""
    return fsspec.core.url_to_fs(os.fspath(url))


def to_url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A path that ``fs`` returned, as a URL: plain for local files, with the protocol otherwise."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL without touching its protocol."""
    url = os.fspath(url).rstrip("/")
    return posixpath.join(url, *parts) if parts else url


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def read_json(url: str) -> Any:
    return json.loads(read_bytes(url))


# Object stores whose first path component is a bucket (container): there ``makedirs`` of a
# path creates the bucket, so nothing here calls it, and a missing bucket is refused.
BUCKET_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})


class BucketError(ValueError):
    """An output URL in a bucket that does not exist (weakseg never creates buckets)."""


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    return {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)


def bucket_of(url: str) -> str | None:
    """The bucket (container) of an object-store URL; None for a store without buckets (local, memory)."""
    fs, path = url_to_fs(url)
    if not _protocols(fs) & BUCKET_STORES:
        return None
    return path.strip("/").split("/", 1)[0] or None


def require_buckets(urls: dict[str, str | None]) -> None:
    """Refuse output URLs whose bucket does not exist, before any work (``{option: url}``; None skipped).

    Writing would otherwise create the bucket (s3fs's ``makedirs``) or fail only after the
    work; a typo in ``--out`` must not do either. One :class:`BucketError` names every
    missing bucket.
    """
    problems = []
    for option, url in urls.items():
        if not url:
            continue
        bucket = bucket_of(url)
        if bucket is None:
            continue
        fs, _ = url_to_fs(url)
        try:
            found = fs.exists(bucket)
        except Exception as err:
            problems.append(f"{option} {redact_url(url)}: cannot check bucket {bucket!r}: {type(err).__name__}: "
                            f"{redact(str(err))}")
            continue
        if not found:
            problems.append(f"{option} {redact_url(url)}: bucket {bucket!r} does not exist")
    if problems:
        raise BucketError("; ".join(problems) + " (weakseg never creates buckets; create it, with its policies, "
                          "first)")


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object atomically.

    Locally: a temporary file in the same folder, fsync, then rename. Object stores
    replace an object in one PUT, so readers never see a partial object there either. A
    missing bucket is an error (FileNotFoundError from the store), never created.
    """
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        atomic_write(path, data)
        return
    parent = posixpath.dirname(path)
    if parent and not _protocols(fs) & BUCKET_STORES:
        fs.makedirs(parent, exist_ok=True)  # stores with folders (memory://, sftp...); buckets have none
    fs.pipe_file(path, data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=False).encode() + b"\n")


# ----------------------------------------------------------------------------- conditional writes


@dataclass(frozen=True)
class Version:
    """An object as read, to write over only if it is still that object (:func:`replace_if`)."""

    data: bytes
    etag: str | None = None  # the store's entity tag, where it has one (S3)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    try:
        from s3fs import S3FileSystem
    except ImportError:  # pragma: no cover - a dependency
        return False
    return isinstance(fs, S3FileSystem)


def read_version(url: str) -> Version | None:
    """The object at ``url`` and its version (None when absent), for :func:`replace_if`.

    On S3 the ETag is read before the bytes (HEAD, then GET): bytes newer than the tag can
    only make the conditional write fail and the caller read again, never succeed wrongly.
    """
    fs, path = url_to_fs(url)
    etag = None
    try:
        if _is_s3(fs):
            fs.invalidate_cache(path)
            etag = fs.info(path).get("ETag")
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    return Version(data, etag)


_MEMORY_LOCK = threading.Lock()  # memory:// lives in this process: one lock makes its compare-and-swap atomic
_UNCONDITIONAL: set[str] = set()  # stores already warned about (no conditional writes)


@contextlib.contextmanager
def _file_lock(path: str):
    """An exclusive ``flock`` on ``{path}.lock`` (a sibling file that stays; locks are per open file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _create_local(path: str, data: bytes) -> bool:
    """Create-if-absent: the bytes in a temporary file, then a hard link (fails if the name exists)."""
    tmp = durable_temp(path, data)
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _same(held: Version | None, now: Version | None) -> bool:
    if held is None or now is None:
        return held is now
    return held.data == now.data


def _s3_conflict(err: BaseException) -> bool | None:
    """True: the store refused the condition (412/409, or If-Match on a deleted key); None: it does not
    support conditional writes (501); False: another error."""
    cause = err.__cause__
    code = (getattr(cause, "response", None) or {}).get("Error", {}).get("Code", "")
    if isinstance(err, FileExistsError) or code in ("PreconditionFailed", "ConditionalRequestConflict"):
        return True
    if isinstance(err, FileNotFoundError) and code in ("NoSuchKey", "404"):
        return True
    if code in ("NotImplemented", "501") or (isinstance(err, OSError) and err.errno == errno.ENOSYS):
        return None
    return False


def replace_if(url: str, data: bytes, held: Version | None) -> bool:
    """Write ``data`` at ``url`` only if the object is still ``held`` (None: only if there is none).

    True when written; False when the object changed since it was read (read it again). S3:
    ``If-Match: <ETag>`` / ``If-None-Match: *`` in the PUT itself. Local files: under an
    exclusive lock on ``{path}.lock``, compare then rename (create-if-absent: a hard link).
    ``memory://``: under a lock of this process. Other stores: compare, then write
    unconditionally (warned once per store): a concurrent writer between the two can be lost.
    """
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        if held is None:
            return _create_local(path, data)
        with _file_lock(path):
            if not _same(held, read_version(url)):
                return False
            atomic_write(path, data)
            return True
    if isinstance(fs, MemoryFileSystem):
        with _MEMORY_LOCK:
            if not _same(held, read_version(url)):
                return False
            write_bytes(url, data)
            return True
    if not _same(held, read_version(url)):  # cheap, and all a store without conditions gets
        return False
    if _is_s3(fs):
        condition = {"mode": "create"} if held is None else {"IfMatch": held.etag} if held.etag else {}
        try:
            fs.pipe_file(path, data, **condition)
            return True
        except OSError as err:
            verdict = _s3_conflict(err)
            if verdict:
                return False
            if verdict is False:
                raise
            # The store rejects conditional PUTs (501): fall through to the unconditional write.
    store = "/".join(sorted(_protocols(fs)))
    if store not in _UNCONDITIONAL:
        _UNCONDITIONAL.add(store)
        log.warning("%s: no conditional writes on this store; compared just before writing instead (a "
                    "concurrent writer in between can be lost)", store)
    write_bytes(url, data)
    return True


def parquet_bytes(table, **options: Any) -> bytes:
    """A ``pyarrow.Table`` as the bytes of one Parquet file (``options`` go to ``pq.write_table``)."""
    import io

    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(table, sink, **options)
    return sink.getvalue()


def duckdb_connection(url: str):
    """A DuckDB connection that can read under ``url`` (fsspec registered for object stores)."""
    import duckdb

    con = duckdb.connect()
    fs, _ = url_to_fs(url)
    if "://" in url and not url.startswith("file://"):
        con.register_filesystem(fs)
    return con


def open_weights(source: str) -> str | io.BytesIO:
    """A ``--pretrained`` value as the models take it: ``auto``, ``none`` and local paths as they
    are; the bytes of any other URL (``s3://``, ``memory://``, ``file://``, ``http(s)://``...)."""
    if "://" not in source:
        return source
    try:
        data = read_bytes(source)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"pretrained weights not found: {redact_url(source)}") from err
    buf = io.BytesIO(data)
    buf.name = redact_url(source)
    return buf
