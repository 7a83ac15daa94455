"""The Parquet tables of segment-corpus: schemas, per-chunk atomic files, run bookkeeping.

Layout: ``{out}/{table}/run_date=YYYY-MM-DD/{run_id}-{chunk:06d}.parquet`` for ``images``,
``regions``, ``masks`` and ``errors`` (one file per input chunk and table, so a run makes
few large files), and ``{out}/runs/run_date=YYYY-MM-DD/{run_id}.parquet``. Every file is
written whole through :func:`weakseg.tasks.storage.write_bytes` (temp file + rename, or one
PUT): a reader sees the old file or the new one. A rerun of a chunk rewrites the same
names, so no image appears twice for one run_id; a run's ``run_date`` is that of its first
attempt (found from existing files), so a rerun on a later day replaces rather than adds.
A chunk writes ``images`` last: an image listed there has its masks and regions.
"""
from __future__ import annotations

import io
import json
import posixpath
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from . import storage

__all__ = [
    "CHUNK_TABLES",
    "SCHEMAS",
    "OutputError",
    "build_done_index",
    "check_writable",
    "chunk_file",
    "done_in_chunk",
    "find_run_date",
    "read_table",
    "remove_file",
    "remove_stale_chunks",
    "runs_file",
    "write_rows",
]

CHUNK_TABLES = ("errors", "regions", "masks", "images")  # write order: images last

SCHEMAS: dict[str, pa.Schema] = {
    "images": pa.schema([
        ("run_id", pa.string()), ("model_id", pa.string()), ("image_key", pa.string()),
        ("image_uri", pa.string()), ("content_sha256", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("status", pa.string()), ("top_class", pa.string()), ("top_prob", pa.float32()),
        ("labels", pa.list_(pa.string())),
        ("class_probs", pa.list_(pa.struct([("name", pa.string()), ("prob", pa.float32())]))),
        ("priors", pa.string()), ("inference_ms", pa.float32()), ("prior_ms", pa.float32()),
        ("forward_width", pa.int32()), ("forward_height", pa.int32()), ("source_format", pa.string()),
        ("chunk", pa.int32()), ("processed_at", pa.timestamp("ms", tz="UTC")),
    ]),
    "regions": pa.schema([
        ("run_id", pa.string()), ("image_key", pa.string()), ("class_name", pa.string()),
        ("class_index", pa.int16()), ("pixel_count", pa.int64()), ("area_fraction", pa.float32()),
        ("mean_prob", pa.float32()), ("image_prob", pa.float32()), ("bbox_x0", pa.int32()),
        ("bbox_y0", pa.int32()), ("bbox_x1", pa.int32()), ("bbox_y1", pa.int32()),
    ]),
    "masks": pa.schema([
        ("run_id", pa.string()), ("image_key", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
        ("mask_png", pa.binary()),
    ]),
    "errors": pa.schema([
        ("run_id", pa.string()), ("image_uri", pa.string()), ("image_key", pa.string()), ("stage", pa.string()),
        ("error_type", pa.string()), ("message", pa.string()), ("chunk", pa.int32()),
        ("occurred_at", pa.timestamp("ms", tz="UTC")),
    ]),
    "runs": pa.schema([
        ("run_id", pa.string()), ("flow_run_id", pa.string()), ("model_id", pa.string()),
        ("model_uri", pa.string()), ("classes", pa.list_(pa.string())), ("priors", pa.string()),
        ("parameters", pa.string()), ("thresholds", pa.string()),
        ("counts", pa.struct([("listed", pa.int64()), ("ok", pa.int64()), ("failed", pa.int64()),
                              ("skipped", pa.int64()), ("chunks", pa.int64()), ("chunks_failed", pa.int64())])),
        ("state", pa.string()), ("started_at", pa.timestamp("ms", tz="UTC")),
        ("ended_at", pa.timestamp("ms", tz="UTC")), ("images_per_second", pa.float64()),
        ("weakseg_version", pa.string()),
    ]),
}

# Rows per row group: large for the narrow tables (one group per chunk file), smaller for
# masks so a reader that wants a few masks does not pull a whole chunk of PNGs.
ROW_GROUP_ROWS = {"images": 65536, "regions": 262144, "masks": 256, "errors": 65536, "runs": 1024}
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class OutputError(RuntimeError):
    """The output location cannot be used (not writable): fails the run before any work."""


def chunk_file(out: str, table: str, run_date: str, run_id: str, chunk: int) -> str:
    return storage.join(out, table, f"run_date={run_date}", f"{run_id}-{chunk:06d}.parquet")


def remove_file(url: str) -> None:
    fs, path = storage.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


def _to_parquet(table: str, rows: Sequence[Mapping[str, Any]]) -> bytes:
    data = pa.Table.from_pylist(list(rows), schema=SCHEMAS[table])
    buf = io.BytesIO()
    pq.write_table(data, buf, compression="zstd", row_group_size=ROW_GROUP_ROWS[table], write_statistics=True)
    return buf.getvalue()


def write_rows(url: str, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` as one Parquet file with the table's schema, atomically."""
    storage.write_bytes(url, _to_parquet(table, rows))


def read_table(out: str, table: str) -> pa.Table:
    """A whole table (all partitions) with ``run_date``, for tests and small outputs."""
    import pyarrow.dataset as ds

    fs, root = storage.url_to_fs(storage.join(out, table))
    if not fs.exists(root):
        return SCHEMAS[table].empty_table()
    return ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive",
                      exclude_invalid_files=False).to_table()


def _run_files(out: str, table: str, run_id: str) -> list[str]:
    fs, root = storage.url_to_fs(storage.join(out, table))
    return sorted(fs.glob(posixpath.join(root, "run_date=*", f"{run_id}-*.parquet")) +
                  fs.glob(posixpath.join(root, "run_date=*", f"{run_id}.parquet")))


def find_run_date(out: str, run_id: str) -> str | None:
    """The run_date partition an earlier attempt of ``run_id`` wrote to, if any."""
    for table in ("runs", "images", "errors"):
        for path in _run_files(out, table, run_id):
            m = re.search(r"run_date=(\d{4}-\d{2}-\d{2})/", path)
            if m:
                return m.group(1)
    return None


def remove_stale_chunks(out: str, run_date: str, run_id: str, n_chunks: int) -> int:
    """Delete this run's chunk files numbered ``>= n_chunks`` (left by an earlier, longer listing)."""
    removed = 0
    for table in CHUNK_TABLES:
        fs, root = storage.url_to_fs(storage.join(out, table, f"run_date={run_date}"))
        for path in fs.glob(posixpath.join(root, f"{run_id}-*.parquet")):
            m = re.search(rf"{re.escape(run_id)}-(\d+)\.parquet$", path)
            if m and int(m.group(1)) >= n_chunks:
                fs.rm(path)
                removed += 1
    return removed


def check_writable(out: str, run_id: str) -> None:
    """Write and delete a probe object; raises :class:`OutputError` saying why not."""
    probe = storage.join(out, "_state", f"probe-{run_id}")
    try:
        storage.write_bytes(probe, b"ok")
        fs, path = storage.url_to_fs(probe)
        fs.rm(path)
    except Exception as err:
        raise OutputError(f"output {out} is not writable: {type(err).__name__}: {err}") from None


def _duckdb_connection(out: str):
    import duckdb

    con = duckdb.connect()
    fs, _ = storage.url_to_fs(out)
    if "://" in out and not out.startswith("file://"):
        con.register_filesystem(fs)
    return con


def build_done_index(out: str, model_id: str, index_url: str, run_id: str = "") -> int:
    """Write the (image_uri, content_sha256) pairs already segmented by ``model_id``, sorted.

    Rows of ``run_id`` itself are left out: a rerun of a run rewrites its own files.

    DuckDB streams and sorts out of core, so memory stays bounded however large the
    output; the sorted file lets :func:`done_in_chunk` prune row groups by statistics.
    Returns the number of pairs (0 when there is no output yet).
    """
    fs, root = storage.url_to_fs(storage.join(out, "images"))
    if not fs.exists(root) or not fs.glob(posixpath.join(root, "run_date=*", "*.parquet")):
        return 0
    con = _duckdb_connection(out)
    pattern = storage.join(out, "images", "**", "*.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        local = posixpath.join(tmp, "done.parquet")
        con.execute(
            f"COPY (SELECT DISTINCT image_uri, content_sha256 FROM read_parquet('{pattern}', hive_partitioning=true) "
            f"WHERE model_id = $model_id AND run_id <> $run_id ORDER BY image_uri) "
            f"TO '{local}' (FORMAT parquet, ROW_GROUP_SIZE 16384)",
            {"model_id": model_id, "run_id": run_id},
        )
        n = con.execute(f"SELECT count(*) FROM read_parquet('{local}')").fetchone()[0]
        with open(local, "rb") as f:
            storage.write_bytes(index_url, f.read())
    con.close()
    return int(n)


def done_in_chunk(index_url: str, uris: Iterable[str]) -> dict[str, set[str]]:
    """``{image_uri: {content_sha256, ...}}`` already done, restricted to ``uris``."""
    uris = list(uris)
    if not uris:
        return {}
    fs, path = storage.url_to_fs(index_url)
    table = pq.read_table(path, filesystem=fs, filters=[("image_uri", "in", uris)])
    done: dict[str, set[str]] = {}
    for uri, sha in zip(table.column("image_uri").to_pylist(), table.column("content_sha256").to_pylist(),
                        strict=True):
        done.setdefault(uri, set()).add(sha)
    return done


def runs_file(out: str, run_date: str, run_id: str) -> str:
    return storage.join(out, "runs", f"run_date={run_date}", f"{run_id}.parquet")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
