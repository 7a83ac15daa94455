"""The engine's last stage: one chunk's rows -> its four Parquet files, ``images`` last.

Each table's file is named ``{run_id}-{chunk:06d}.parquet`` and written atomically
(:func:`~.tables.write_rows`), so a retried chunk replaces its own files whole and a reader
never sees half of one. ``images`` is the commit marker: it is written after ``errors``,
``regions`` and ``masks``, so an image in ``images`` has its mask and regions.
"""
from __future__ import annotations

from concurrent.futures import Executor
from typing import Any

from . import tables

__all__ = ["ChunkWriter"]


class ChunkWriter:
    """Accumulates one chunk's rows (from the chunk's thread only); writes each table's file at the end."""

    def __init__(self, out: str, run_id: str, run_date: str, chunk: int) -> None:
        self.out, self.run_id, self.run_date, self.chunk = out, run_id, run_date, chunk
        self.rows: dict[str, list[dict[str, Any]]] = {t: [] for t in tables.CHUNK_TABLES}

    def _write(self, table: str) -> None:
        tables.crash_point(table, self.chunk)
        url = tables.chunk_file(self.out, table, self.run_date, self.run_id, self.chunk)
        if self.rows[table]:
            tables.write_rows(url, table, self.rows[table])
        else:  # nothing to write (e.g. all skipped): drop an earlier attempt's file of this name
            tables.remove_file(url)

    def flush(self, threads: Executor | None = None) -> None:
        """The tables before ``images`` side by side on ``threads`` (Arrow and fsspec release the
        GIL), ``images`` last."""
        first = tables.CHUNK_TABLES[:-1]
        if threads is None:
            for table in first:
                self._write(table)
        else:
            for future in [threads.submit(self._write, table) for table in first]:
                future.result()
        self._write(tables.CHUNK_TABLES[-1])
