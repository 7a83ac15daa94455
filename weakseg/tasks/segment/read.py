"""Reading a chunk's inputs: each input's bytes, or the error that prevented reading it.

Inputs over ``max_bytes`` are refused on their size before they are read (a stat, the tar
header, or a ranged read of ``max_bytes + 1``) and become error rows. A passing failure is
tried once more, then raises :class:`TransientInputError`, so the whole chunk is retried
instead of recording an error row that would blame the input (:func:`is_transient`): an
expired token, throttling, a 5xx answer, and a connection that was reset, refused, closed
part-way through a body or timed out (a tar read half-way when the network failed is not a
truncated tar). URIs are stored canonical and without credentials (:func:`~.inputs.stored_uri`).
"""
from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from fsspec.implementations.local import LocalFileSystem

from .. import storage
from ..images import DEFAULT_MAX_BYTES, IMAGE_EXTENSIONS, ImageError
from ..uris import tar_uri
from .inputs import ChunkSpec, SourceMeta, canonical_uri, input_key, stored_and_key, stored_uri

__all__ = ["InputRecord", "TransientInputError", "archive_uri", "is_transient", "read_chunk", "read_file",
           "read_shard"]


@dataclass
class InputRecord:
    uri: str  # as stored: canonical, without credentials (:func:`stored_uri`)
    data: bytes | None
    error: BaseException | None = None
    meta: SourceMeta | None = None  # from the listing (see :class:`SourceMeta`)
    key: str = ""  # image_key (:func:`~.inputs.input_key`)


class TransientInputError(OSError):
    """Reading failed for a reason that passes (expired token, throttling, 5xx): the chunk is
    retried whole instead of recording a permanent error row."""


# Error codes of S3/GCS/Azure and HTTP statuses that say "try again later" (credentials that
# expired and get refreshed, throttling, an overloaded or restarting service).
_TRANSIENT_CODES = re.compile(
    r"ExpiredToken|RequestExpired|TokenRefreshRequired|InvalidToken|SlowDown|Throttl|TooManyRequests|"
    r"RequestLimitExceeded|ServiceUnavailable|Service Unavailable|InternalError|RequestTimeout|"
    r"\b(?:HTTP|status|code)[ :=]*(?:408|429|500|502|503|504)\b",
    re.IGNORECASE,
)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
# The network failed, not the input: a connection reset, refused, closed before the body's end
# or timed out. Built-in ConnectionError and TimeoutError (asyncio's and fsspec's timeouts are
# TimeoutError) are matched by class; the clients' own classes (aiohttp for HTTP and s3fs,
# botocore, urllib3, http.client) by name anywhere in the exception's class hierarchy, so
# none of those libraries need be imported here.
_NETWORK_CLASSES = frozenset({
    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError",
    "ContentLengthError", "TransferEncodingError", "ConnectionTimeoutError", "SocketTimeoutError",
    "ReadTimeoutError", "ConnectTimeoutError", "EndpointConnectionError", "ConnectionClosedError",
    "ResponseStreamingError", "IncompleteReadError", "IncompleteRead", "RemoteDisconnected", "ProtocolError",
    "ChunkedEncodingError",
})


def _network_failure(err: BaseException) -> bool:
    """``err``, or an exception it was raised from, is the network failing (see :data:`_NETWORK_CLASSES`)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _NETWORK_CLASSES for cls in type(err).__mro__):
            return True
        err = err.__cause__ or err.__context__
    return False


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` is worth retrying the chunk for (see :class:`TransientInputError`): a passing
    answer of the store (expired token, throttling, 5xx) or the network failing (reset, refused,
    closed part-way, timed out). A missing file, a folder and an input that is not a usable
    image are not."""
    if isinstance(err, TransientInputError):
        return True
    if isinstance(err, (FileNotFoundError, IsADirectoryError, ImageError)):
        return False
    if _network_failure(err):
        return True
    status = getattr(err, "status", None) or getattr(err, "code", None)
    if status in (408, 429, 500, 502, 503, 504):
        return True
    text = _URL.sub("", f"{type(err).__name__}: {err}")  # an image named 503.jpg is no status
    return bool(_TRANSIENT_CODES.search(text))


def _too_large(size: int, max_bytes: int) -> ImageError:
    return ImageError("TooLarge", f"{size:,} bytes is over the limit of {max_bytes:,} (--max-bytes); not read")


def _read_bounded(url: str, max_bytes: int) -> bytes:
    """The file's bytes, refusing (before reading) one over ``max_bytes``.

    Local files: their size (a stat) is checked first. Elsewhere one ranged read asks for at
    most ``max_bytes + 1`` bytes (one request, as before; never more than that is transferred).
    """
    fs, path = storage.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(f"is a directory: {path}")
        if st.st_size > max_bytes:
            raise _too_large(st.st_size, max_bytes)
    data = fs.cat_file(path, start=0, end=max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes)
    return data


def read_file(url: str, max_bytes: int, attempts: int = 2, meta: SourceMeta | None = None,
              names: tuple[str, str] | None = None) -> InputRecord:
    """One file as an :class:`InputRecord`; a passing failure that persists raises instead. ``names``:
    its stored URI and image_key where the caller has them (:func:`~.inputs.stored_and_key`)."""
    uri, key = names or stored_and_key(canonical_uri(url))
    for attempt in range(attempts):
        try:
            return InputRecord(uri, _read_bounded(url, max_bytes), meta=meta, key=key)
        except (FileNotFoundError, IsADirectoryError, ImageError) as err:
            return InputRecord(uri, None, err, key=key)  # vanished, a folder or too large: retrying will not help
        except Exception as err:  # one more try here; then a passing error retries the whole chunk
            last = attempt == attempts - 1
            if is_transient(err):
                if last:
                    raise TransientInputError(f"reading {uri}: {type(err).__name__}: "
                                              f"{storage.redact(str(err))}") from None
            elif last or isinstance(err, PermissionError):
                return InputRecord(uri, None, err, key=key)
    raise AssertionError("unreachable")


def _tar_uri(tar_url: str, member: str) -> str:
    return stored_uri(tar_uri(member, tar_url))


def _member(tar_url: str, member: str, data: bytes | None, error: BaseException | None = None,
            meta: SourceMeta | None = None) -> InputRecord:
    url = tar_uri(member, tar_url)
    return InputRecord(stored_uri(url), data, error, meta, input_key(url))


def archive_uri(tar_url: str) -> str:
    """The archive part of the stored URIs of ``tar_url``'s members (how the skip-existing index names it)."""
    return _tar_uri(tar_url, "member")[len("tar://member::"):]


def read_shard(url: str, max_bytes: int, meta: SourceMeta | None = None) -> Iterator[InputRecord]:
    """The images of a WebDataset tar (one per sample key, the first image-typed member)."""
    try:
        fs, path = storage.url_to_fs(url)
        f = fs.open(path, "rb")
    except Exception as err:
        if is_transient(err):
            raise TransientInputError(f"opening {stored_uri(url)}: {type(err).__name__}") from None
        yield InputRecord(stored_uri(url), None, err, key=input_key(url))
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
                if member.size > max_bytes:  # checked on the header: the member's bytes are skipped
                    yield _member(url, name, None, _too_large(member.size, max_bytes))
                    continue
                extracted = tar.extractfile(member)
                data = extracted.read() if extracted is not None else b""
                yield _member(url, name, data, meta=meta.member(member.offset_data, member.size) if meta else None)
    except Exception as err:  # a truncated or corrupt tar: what was read stays, the rest is one error
        if is_transient(err):
            raise TransientInputError(f"reading {stored_uri(url)}: {type(err).__name__}: "
                                      f"{storage.redact(str(err))}") from None
        yield InputRecord(stored_uri(url), None, err, key=input_key(url))


def read_chunk(spec: ChunkSpec, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[InputRecord]:
    """Each input of the chunk with its bytes, or with the error that prevented reading it.

    Raises :class:`TransientInputError` when an input failed for a passing reason.
    """
    if spec.shard is not None:
        yield from read_shard(spec.shard, max_bytes, spec.meta_of(0))
        return
    for i, url in enumerate(spec.uris):
        yield read_file(url, max_bytes, meta=spec.meta_of(i))

