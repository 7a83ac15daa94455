"""``hookmem://``: fsspec's in-memory filesystem that runs test hooks on reads and writes.

To interleave two writers deterministically (a promotion lands while another scores), or to
stop a writer dead between two writes, as a killed process would. The store itself is
fsspec's ``MemoryFileSystem`` (shared with ``memory://``; use paths of your own).
"""
from __future__ import annotations

from collections.abc import Callable

import fsspec
from fsspec.implementations.memory import MemoryFileSystem

Hook = Callable[[str], None]


class HookFS(MemoryFileSystem):
    protocol = ("hookmem",)
    on_read: list[Hook] = []  # called with the path before every whole-object read
    on_write: list[Hook] = []  # called with the path before every whole-object write

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        if path.startswith("hookmem://"):
            path = path[len("hookmem://"):]
        return MemoryFileSystem._strip_protocol(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        for hook in list(self.on_read):
            hook(self._strip_protocol(path))
        return super().cat_file(path, start, end, **kwargs)

    def pipe_file(self, path, value, *args, **kwargs):
        for hook in list(self.on_write):
            hook(self._strip_protocol(path))
        return super().pipe_file(path, value, *args, **kwargs)

    @classmethod
    def reset(cls) -> None:
        cls.on_read.clear()
        cls.on_write.clear()


fsspec.register_implementation("hookmem", HookFS, clobber=True)
