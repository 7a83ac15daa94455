"""Atomic local file writes, shared by checkpoints and object-storage helpers."""
from __future__ import annotations

import os
import tempfile

__all__ = ["atomic_write", "durable_temp"]

# mkstemp creates 0600 files; outputs are for analysts and other services to read.
_UMASK = os.umask(0)
os.umask(_UMASK)


def durable_temp(path: str | os.PathLike, data: bytes) -> str:
    """``data`` in a new temporary file beside ``path`` (same folder: same filesystem), fsynced and
    readable by others; the caller renames or links it into place and removes it on failure."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Temporary file in the same folder, fsync, rename: readers see old or new, never half."""
    tmp = durable_temp(path, data)
    try:
        os.replace(tmp, os.fspath(path))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
