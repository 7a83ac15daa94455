"""Object storage through fsspec: local paths, ``file://``, ``s3://``, ``memory://``.

Credentials and the S3 endpoint come from the standard AWS environment variables (or a
Prefect block), never from URLs or parameters, so nothing secret is logged or written.
Writes are atomic: a reader sees the old object or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import posixpath
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .._atomic import atomic_write

__all__ = ["exists", "join", "read_bytes", "read_json", "to_url", "url_to_fs", "write_bytes", "write_json"]


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
