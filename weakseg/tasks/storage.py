"""Object storage through fsspec: local paths, ``file://``, ``s3://``, ``memory://``.

Credentials and the S3 endpoint come from the standard AWS environment variables (or a
Prefect block), never from URLs or parameters, so nothing secret is logged or written.
Writes are atomic: a reader sees the old object or the new one, never half of one.
"""
from __future__ import annotations

import io
import json
import os
import posixpath
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .._atomic import atomic_write

__all__ = [
    "duckdb_connection", "exists", "join", "parquet_bytes", "read_bytes", "read_json", "redact", "redact_url",
    "to_url", "url_to_fs", "write_bytes", "write_json"
]

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


def write_bytes(url: str, data: bytes) -> None:
    """Write a whole object atomically.

    Locally: a temporary file in the same folder, fsync, then rename. Object stores
    replace an object in one PUT, so readers never see a partial object there either.
    """
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        atomic_write(path, data)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, data)


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=False).encode() + b"\n")


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
