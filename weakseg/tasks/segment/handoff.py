"""How arrays cross between the flow's process and its host worker processes: shared memory.

Decoded pixels, superpixel maps and label maps are too large to pickle through a pipe at an
accelerator's rate (a 500x375 photo with its superpixels cost the flow's process 1.5 ms of CPU
that way). They travel in shared memory instead, in one of two forms (:class:`Packed`):

- a **slot** of the pool's slot file (:class:`Slots`): fixed-size regions of one file on
  ``/dev/shm``, mapped once by every process of the pool, whose pages stay in place. Only the
  flow's process takes and gives back slots: it takes one for each input it sends to be
  decoded (the worker writes the arrays there) and one for each label map it sends to be
  encoded, and gives it back once the arrays are no longer needed. Writing into a page
  already in place is a copy; a new file's pages are allocated and zeroed first, and freed
  again when it goes, which cost the flow's process more than the copy itself;
- a **spool file** of their own, when no slot is free or the arrays do not fit one (large
  photos): written by one process with a plain ``write`` (a full ``/dev/shm`` fails with
  ENOSPC, where a mapped page would kill the writer with SIGBUS), mapped by the other, removed
  once mapped.

Inline (no worker processes), arrays are passed as they are. The slot file's pages are
reserved when it is made (``posix_fallocate``): where ``/dev/shm`` is too small for it, the
pool runs with spool files alone.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import mmap
import os
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

__all__ = ["SLOT_BYTES", "Packed", "Slots", "init_worker", "pack", "release", "unpack"]

_logger = logging.getLogger(__name__)
SLOT_BYTES = 2 * 2**20  # a 500x375 photo (550 KiB) with its superpixel ids (370 KiB as uint16) fits twice
_ALIGN = 64

# In worker processes: where to write (init_worker); in the flow's process, the pool passes its own.
_SPOOL: str | None = None
_WORKER_SLOTS: Slots | None = None
_NAMES = itertools.count()


class Slots:
    """``count`` regions of ``slot_bytes`` in one shared file, mapped by every process of a pool.

    :meth:`take` and :meth:`give` are the flow process's: a slot is handed to a job with the
    job and given back when its arrays are done with, so no two jobs ever share one.
    """

    def __init__(self, path: str, slot_bytes: int, count: int, create: bool) -> None:
        self.path, self.slot_bytes, self.count = path, slot_bytes, count
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.posix_fallocate(fd, 0, slot_bytes * count)  # the pages, now: never a SIGBUS later
            self.map = mmap.mmap(fd, slot_bytes * count)
        except BaseException:
            os.close(fd)
            if create:
                os.unlink(path)
            raise
        os.close(fd)
        self._free: deque[int] = deque(range(count))
        self._lock = threading.Lock()

    @classmethod
    def create(cls, folder: str, slot_bytes: int, count: int, least: int = 8) -> Slots | None:
        """A new slot file in ``folder`` of ``count`` slots, or half as many (down to ``least``) where
        a small ``/dev/shm`` cannot hold them; None where not even those can be had."""
        while True:
            try:
                return cls(os.path.join(folder, "slots"), slot_bytes, count, create=True)
            except OSError as err:
                if count // 2 < least:
                    _logger.warning("no shared-memory slots (%s: %s); host workers hand arrays over in files",
                                    folder, err)
                    return None
                _logger.info("%d shared-memory slots do not fit in %s (%s); trying %d", count, folder, err,
                             count // 2)
                count //= 2

    def take(self) -> int | None:
        with self._lock:
            return self._free.popleft() if self._free else None

    def give(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def free(self) -> int:
        return len(self._free)

    def view(self, slot: int, offset: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self.map, dtype=dtype, count=count, offset=slot * self.slot_bytes + offset).reshape(shape)

    def close(self) -> None:
        with contextlib.suppress(BufferError):
            self.map.close()


@dataclass(frozen=True)
class Packed:
    """Named arrays in shared memory: in ``slot`` of the pool's slot file, or in the spool file
    ``path``; ``parts`` is (name, dtype, shape, offset) of each."""

    parts: tuple[tuple[str, str, tuple[int, ...], int], ...]
    slot: int | None = None
    path: str | None = None


def _layout(arrays: Mapping[str, np.ndarray]) -> tuple[list[tuple[str, str, tuple[int, ...], int]], int]:
    parts, offset = [], 0
    for name, a in arrays.items():
        parts.append((name, a.dtype.str, tuple(a.shape), offset))
        offset += -(-a.nbytes // _ALIGN) * _ALIGN
    return parts, offset


def pack(arrays: Mapping[str, np.ndarray], slot: int | None = None, slots: Slots | None = None,
         spool: str | None = None) -> Packed | dict[str, np.ndarray]:
    """``arrays`` ready to leave this process: into ``slot`` when they fit it, else a spool file,
    else (no spool: inline, or a full ``/dev/shm``) the arrays themselves. ``slots`` and ``spool``
    default to this worker's."""
    slots = slots or _WORKER_SLOTS
    spool = spool or _SPOOL
    if spool is None:
        return dict(arrays)
    parts, size = _layout(arrays)
    if slot is not None and slots is not None and size <= slots.slot_bytes:
        for (_, dtype, shape, offset), a in zip(parts, arrays.values(), strict=True):
            slots.view(slot, offset, dtype, shape)[...] = a
        return Packed(tuple(parts), slot=slot)
    path = os.path.join(spool, f"{os.getpid()}-{next(_NAMES)}")
    try:
        with open(path, "xb") as f:
            for (_, _, _, offset), a in zip(parts, arrays.values(), strict=True):
                f.seek(offset)
                f.write(memoryview(np.ascontiguousarray(a)).cast("B"))
    except OSError as err:  # ENOSPC on a full tmpfs: the pipe takes them
        _logger.debug("spool %s: %s; sending the arrays through the pipe", spool, err)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return dict(arrays)
    return Packed(tuple(parts), path=path)


def unpack(packed: Packed | Mapping[str, np.ndarray], slots: Slots | None = None) -> dict[str, np.ndarray]:
    """The arrays of :func:`pack`, in the receiving process, without copying them: views of the
    slot (valid until it is given back), or of the spool file (mapped copy-on-write, so they
    are writable; the file is removed, its memory goes back with the arrays)."""
    if not isinstance(packed, Packed):
        return dict(packed)
    if packed.slot is not None:
        slots = slots or _WORKER_SLOTS
        if slots is None:
            raise RuntimeError("arrays in a shared-memory slot, but this process has no slot file")
        return {name: slots.view(packed.slot, offset, dtype, shape) for name, dtype, shape, offset in packed.parts}
    try:
        with open(packed.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(packed.path)
    return {name: np.frombuffer(mapped, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)),
                                offset=offset).reshape(shape)
            for name, dtype, shape, offset in packed.parts}


def release(packed: object, slots: Slots | None) -> None:
    """What :func:`pack` took, given back: the slot to ``slots``, a spool file never mapped removed."""
    if not isinstance(packed, Packed):
        return
    if packed.slot is not None and slots is not None:
        slots.give(packed.slot)
    elif packed.path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(packed.path)


def init_worker(spool: str, slots_path: str | None, slot_bytes: int, count: int) -> None:
    """In a new worker process: its spool folder and its mapping of the pool's slot file."""
    global _SPOOL, _WORKER_SLOTS
    _SPOOL = spool
    _WORKER_SLOTS = Slots(slots_path, slot_bytes, count, create=False) if slots_path else None
