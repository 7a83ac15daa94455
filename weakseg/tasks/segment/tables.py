"""The Parquet tables of segment-corpus: schemas, per-chunk atomic files, run bookkeeping.

Layout: ``{out}/{table}/run_date=YYYY-MM-DD/{run_id}-{chunk:06d}.parquet`` for ``images``,
``regions``, ``masks`` and ``errors`` (one file per input chunk and table, so a run makes
few large files), and ``{out}/runs/run_date=YYYY-MM-DD/{run_id}.parquet``. Every file is
written whole through :func:`weakseg.tasks.storage.write_bytes` (temp file + rename, or one
PUT): a reader sees the old file or the new one. A rerun of a chunk rewrites the same
names, so no image appears twice for one run_id; a run's ``run_date`` is that of its first
attempt (the earliest partition holding any file of the run, in any table), so a rerun on
a later day replaces rather than adds, and :func:`remove_stale_chunks` then deletes every
file of the run that the rerun did not write. A file belongs to a run only when its name
parses exactly as ``{run_id}-{chunk:06d}.parquet`` (``{run_id}.parquet`` in ``runs``):
never by prefix. A chunk writes ``images`` last: it is the commit marker, and an image
listed there has its masks and regions.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from .. import storage
from ..errors import ERRORS_SCHEMA
from .inputs import listing_key

__all__ = [
    "CHUNK_TABLES",
    "SCHEMAS",
    "Done",
    "OutputError",
    "build_done_index",
    "check_run_id",
    "check_writable",
    "chunk_file",
    "crash_point",
    "done_archive",
    "done_in_chunk",
    "done_lookup",
    "find_run_date",
    "read_table",
    "remove_file",
    "remove_stale_chunks",
    "run_files",
    "runs_file",
    "write_rows",
]

_logger = logging.getLogger(__name__)
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
        # what the listing said of the input (null where it said nothing, e.g. a manifest):
        # size, ETag and/or modification time; a tar member's are its archive's, plus its own place
        ("source_size", pa.int64()), ("source_etag", pa.string()), ("source_mtime", pa.timestamp("us", tz="UTC")),
        ("source_member_offset", pa.int64()), ("source_member_size", pa.int64()),
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
    "errors": ERRORS_SCHEMA,  # shared with shard-imagenet's errors.parquet
    "runs": pa.schema([
        ("run_id", pa.string()), ("flow_run_id", pa.string()), ("model_id", pa.string()),
        ("model_uri", pa.string()), ("classes", pa.list_(pa.string())), ("priors", pa.string()),
        ("parameters", pa.string()), ("thresholds", pa.string()),
        ("counts", pa.struct([("listed", pa.int64()), ("ok", pa.int64()), ("failed", pa.int64()),
                              ("skipped", pa.int64()), ("chunks", pa.int64()), ("chunks_failed", pa.int64())])),
        ("state", pa.string()), ("started_at", pa.timestamp("ms", tz="UTC")),
        ("ended_at", pa.timestamp("ms", tz="UTC")), ("images_per_second", pa.float64()),
        ("weakseg_version", pa.string()),
        ("stage_seconds", pa.string()),  # JSON: busy seconds per chunk stage, summed over the chunks
        ("device_busy_fraction", pa.float64()),  # forward seconds / wall seconds of the chunks' fan-out
    ]),
}

# Rows per row group: large for the narrow tables (one group per chunk file), smaller for
# masks so a reader that wants a few masks does not pull a whole chunk of PNGs.
ROW_GROUP_ROWS = {"images": 65536, "regions": 262144, "masks": 256, "errors": 65536, "runs": 1024}
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class OutputError(RuntimeError):
    """The output location cannot be used (not writable): fails the run before any work."""


# Fault injection, for the crash tests only: ``WEAKSEG_CRASH_BEFORE=images:1`` makes the writer
# stop dead just before chunk 1's ``images`` file (``runs`` for the runs row, no chunk), as a
# killed process would. Unset in production; nothing else reads it.
CRASH_ENV = "WEAKSEG_CRASH_BEFORE"


class SimulatedCrash(BaseException):
    """The process "dies" here (a BaseException: no retry, no handler, no runs row)."""


def crash_point(table: str, chunk: int | None = None) -> None:
    """Raise :class:`SimulatedCrash` when :data:`CRASH_ENV` names this write point."""
    wanted = os.environ.get(CRASH_ENV)
    if wanted and wanted == (table if chunk is None else f"{table}:{chunk}"):
        raise SimulatedCrash(f"simulated crash before writing {wanted}")


def chunk_file(out: str, table: str, run_date: str, run_id: str, chunk: int) -> str:
    check_run_id(run_id)
    return storage.join(out, table, f"run_date={run_date}", f"{run_id}-{chunk:06d}.parquet")


def remove_file(url: str) -> None:
    fs, path = storage.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path)


def _to_parquet(table: str, rows: Sequence[Mapping[str, Any]]) -> bytes:
    data = pa.Table.from_pylist(list(rows), schema=SCHEMAS[table])
    return storage.parquet_bytes(data, compression="zstd", row_group_size=ROW_GROUP_ROWS[table],
                                 write_statistics=True)


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


def check_run_id(run_id: str) -> str:
    """``run_id`` when it is a valid run id (:data:`RUN_ID`), else ``ValueError``."""
    if not isinstance(run_id, str) or not RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} is not valid: letters, digits, '_', '.', '-', starting with a letter "
                         "or digit, at most 128 characters")
    return run_id


def _owner(name: str, run_id: str, table: str) -> bool:
    """Whether file ``name`` of ``table`` belongs to ``run_id``: an exact parse, never a prefix match.

    Chunk tables hold ``{run_id}-{chunk:06d}.parquet`` and ``runs`` holds ``{run_id}.parquet``;
    run ``test`` never owns ``test-retest-000001.parquet`` (run ``test-retest``'s chunk 1).
    """
    if table == "runs":
        return name == f"{run_id}.parquet"
    return _chunk_number(name, run_id) is not None


def _chunk_number(name: str, run_id: str) -> int | None:
    m = re.fullmatch(rf"{re.escape(run_id)}-(\d{{6,}})\.parquet", name)
    return int(m.group(1)) if m else None


def run_files(out: str, run_id: str) -> list[tuple[str, str, str]]:
    """Every file of ``run_id`` in every table and run_date partition: ``(table, run_date, path)``."""
    check_run_id(run_id)
    found = []
    for table in (*CHUNK_TABLES, "runs"):
        fs, root = storage.url_to_fs(storage.join(out, table))
        pattern = f"{run_id}.parquet" if table == "runs" else f"{run_id}-*.parquet"
        for path in sorted(fs.glob(posixpath.join(root, "run_date=*", pattern))):
            m = re.search(r"run_date=(\d{4}-\d{2}-\d{2})/([^/]+)$", path)
            if m and _owner(m.group(2), run_id, table):
                found.append((table, m.group(1), path))
    return found


def find_run_date(out: str, run_id: str) -> str | None:
    """The run_date partition of ``run_id``'s first attempt (the earliest holding any of its files).

    Every table counts: a first attempt killed after writing only a chunk's masks and
    regions still fixes the date, so a rerun on a later day replaces those files.
    """
    dates = [date for _, date, _ in run_files(out, run_id)]
    return min(dates) if dates else None


def remove_stale_chunks(out: str, run_date: str, run_id: str, n_chunks: int, before: datetime | None = None) -> int:
    """Delete ``run_id``'s files that this attempt did not write: chunks ``>= n_chunks`` (an earlier,
    longer listing) and any file of the run in another run_date partition. Never another run's.

    With ``before`` (this attempt's start), also what killed attempts of the run left behind,
    last modified before it: their temporary files (a writer killed between its temporary file
    and the rename, :func:`weakseg._atomic.atomic_write`) and their scratch files in
    ``_state/`` (output probes, skip-existing indexes). A live attempt of the same run id that
    started earlier loses its index then: its remaining chunks read and hash every input
    instead of skipping (:func:`done_lookup`), the same rows. Pinned model copies of other
    attempts go only when their attempt's lease has gone stale (:mod:`.lease`): a live
    attempt's workers may still load its copy.
    """
    fs, _ = storage.url_to_fs(out)
    removed = 0
    for _, date, path in run_files(out, run_id):  # paths inside ``fs``
        chunk = _chunk_number(posixpath.basename(path), run_id)
        if date != run_date or (chunk is not None and chunk >= n_chunks):
            fs.rm(path)
            removed += 1
    if before is not None:
        for path in _leftovers(out, run_id, before):
            fs.rm(path)
            removed += 1
    return removed


def _leftovers(out: str, run_id: str, before: datetime) -> list[str]:
    """Temporary and scratch files of ``run_id`` last modified before ``before``, and the pinned model
    copies and leases of its attempts that are over (see :func:`remove_stale_chunks`)."""
    from .inputs import source_meta
    from .lease import STALE_LEASES, lease_seconds

    check_run_id(run_id)
    rid = re.escape(run_id)
    temp = re.compile(rf"\.{rid}(-\d{{6,}})?\.parquet\..+\.tmp")
    scratch = re.compile(rf"(probe-{rid}-[0-9a-f]+|\.?done-{rid}-[0-9a-f]+\.parquet(\..+\.tmp)?"
                         rf"|\.(model|live)-{rid}-[0-9a-f]+(-[0-9a-f]+)?(\.pt)?\..+\.tmp)")
    pinned = re.compile(rf"model-{rid}-(?P<attempt>[0-9a-f]+)-[0-9a-f]{{64}}\.pt")
    leased = re.compile(rf"live-{rid}-(?P<attempt>[0-9a-f]+)")
    live_since = datetime.now(UTC) - timedelta(seconds=STALE_LEASES * lease_seconds())
    copies: dict[str, str] = {}  # attempt -> its pinned copy, older than ``before``
    leases: dict[str, datetime] = {}  # attempt -> its lease's last touch
    found = []
    for table in (*CHUNK_TABLES, "runs", "_state"):
        fs, root = storage.url_to_fs(storage.join(out, table))
        if table != "_state" and not isinstance(fs, LocalFileSystem):  # object stores write whole objects
            continue
        if not fs.exists(root):
            continue
        fs.invalidate_cache(root)
        pattern = scratch if table == "_state" else temp
        for path, info in fs.find(root, detail=True, maxdepth=None if table != "_state" else 1).items():
            meta = source_meta(info)
            if meta is None or meta.mtime is None:
                continue
            name = posixpath.basename(path)
            lease, copy = (leased.fullmatch(name), pinned.fullmatch(name)) if table == "_state" else (None, None)
            if lease is not None:
                leases[lease["attempt"]] = meta.mtime
                if meta.mtime < min(before, live_since):
                    found.append(path)
            elif copy is not None:
                if meta.mtime < before:
                    copies[copy["attempt"]] = path
            elif pattern.fullmatch(name) and meta.mtime < before:
                found.append(path)
    found += [path for attempt, path in copies.items() if leases.get(attempt, live_since) <= live_since]
    return found


def check_writable(out: str, run_id: str) -> None:
    """Write and delete a probe object; raises :class:`OutputError` saying why not.

    An object-store output whose bucket does not exist is refused (writing would create it).
    """
    try:
        storage.require_buckets({"output": out})
    except storage.BucketError as err:
        raise OutputError(str(err)) from None
    probe = storage.join(out, "_state", f"probe-{run_id}")
    try:
        storage.write_bytes(probe, b"ok")
        fs, path = storage.url_to_fs(probe)
        fs.rm(path)
    except Exception as err:
        raise OutputError(f"output {storage.redact_url(out)} is not writable: {type(err).__name__}: "
                          f"{storage.redact(str(err))}") from None


# The skip-existing index: what the model already did with each input, sorted by image_uri.
# Rows of `images` (outcome "ok": uri, content hash, listing metadata) and, for tar members, the
# errors rows of the runs that read their archive (outcome "failed": caused by the input's own
# bytes, never redone while the archive is unchanged; "retry": anything else, redone), with the
# archive's metadata as that run listed it; a member row carries its run_id.
_DONE_COLUMNS = {"source_size": "BIGINT", "source_etag": "VARCHAR", "source_mtime": "TIMESTAMPTZ"}
_ARCHIVE_OF = ("CASE WHEN starts_with(image_uri, 'tar://') AND contains(image_uri, '::') "
               "THEN substr(image_uri, strpos(image_uri, '::') + 2) {otherwise} END")
_DONE_SQL = (
    "WITH img AS (SELECT run_id, image_uri, content_sha256, {listing}, "
    + _ARCHIVE_OF.format(otherwise="") + " AS archive_uri "
    "FROM read_parquet($images, hive_partitioning=true, union_by_name=true) "
    "WHERE model_id = $model_id AND run_id <> $run_id) "
    "SELECT DISTINCT image_uri, content_sha256, source_size, source_etag, source_mtime, archive_uri, "
    "CASE WHEN archive_uri IS NULL THEN NULL ELSE run_id END AS run_id, 'ok' AS outcome FROM img "
    "{errors} ORDER BY image_uri"
)
_DONE_ERRORS_SQL = (
    "UNION ALL SELECT DISTINCT e.image_uri, CAST(NULL AS VARCHAR), a.source_size, a.source_etag, a.source_mtime, "
    "a.archive_uri, e.run_id, CASE WHEN list_contains($own_bytes, e.stage || ':' || e.error_type) "
    "THEN 'failed' ELSE 'retry' END "
    "FROM (SELECT run_id, image_uri, stage, error_type, " + _ARCHIVE_OF.format(otherwise="ELSE image_uri")
    + " AS archive_uri FROM read_parquet($errors, hive_partitioning=true, union_by_name=true) "
    "WHERE run_id <> $run_id) e "
    "JOIN (SELECT DISTINCT run_id, archive_uri, source_size, source_etag, source_mtime FROM img "
    "WHERE archive_uri IS NOT NULL) a ON e.run_id = a.run_id AND e.archive_uri = a.archive_uri "
)


def _has_files(out: str, table: str) -> bool:
    fs, root = storage.url_to_fs(storage.join(out, table))
    return fs.exists(root) and bool(fs.glob(posixpath.join(root, "run_date=*", "*.parquet")))


def build_done_index(out: str, model_id: str, index_url: str, run_id: str = "") -> int:
    """Write what ``model_id`` already did with each input, sorted by URI (see the index's columns
    above); returns how many (uri, content hash, listing metadata) rows say "ok" (0: nothing done yet).

    Rows of ``run_id`` itself are left out: a rerun of a run rewrites its own files. ``images``
    is the commit marker: an input counts as done only from there (written last by a chunk),
    and a tar member's errors rows count only from runs that wrote ``images`` rows of its
    archive (a chunk that did not finish wrote none). Which errors are the input's own fault
    is :data:`~.incremental.CAUSED_BY_INPUT`. Files written before the table had the
    ``source_*`` columns give nulls there (their inputs are hashed, as before).

    DuckDB sorts out of core and its result is streamed into the index file batch by batch,
    so memory stays bounded however large the output; every value (the output path too) is
    a bound parameter, never pasted into SQL. The sorted file lets :func:`done_lookup`
    prune row groups by statistics.
    """
    from .incremental import CAUSED_BY_INPUT

    if not _has_files(out, "images"):
        return 0
    con = storage.duckdb_connection(out)
    images = storage.join(out, "images", "**", "*.parquet")
    n = 0
    try:
        params: dict[str, Any] = {"images": images, "model_id": model_id, "run_id": run_id}
        present = {r[0] for r in con.sql("DESCRIBE SELECT * FROM read_parquet($pattern, hive_partitioning=true, "
                                         "union_by_name=true)", params={"pattern": images}).fetchall()}
        listing = ", ".join(c if c in present else f"CAST(NULL AS {t}) AS {c}" for c, t in _DONE_COLUMNS.items())
        errors = ""
        if _has_files(out, "errors"):
            errors = _DONE_ERRORS_SQL
            params |= {"errors": storage.join(out, "errors", "**", "*.parquet"),
                       "own_bytes": sorted(f"{stage}:{kind}" for stage, kind in CAUSED_BY_INPUT)}
        reader = con.sql(_DONE_SQL.format(listing=listing, errors=errors), params=params).to_arrow_reader(16384)
        with tempfile.TemporaryDirectory() as tmp:
            local = posixpath.join(tmp, "done.parquet")
            with pq.ParquetWriter(local, reader.schema) as writer:
                for batch in reader:
                    writer.write_batch(batch, row_group_size=16384)
                    n += batch.column("outcome").to_pylist().count("ok")
            with open(local, "rb") as f:
                storage.write_bytes(index_url, f.read())
    finally:
        con.close()
    return n


ListingKey = tuple[int, str | None, datetime | None]  # (size, etag, mtime) of a listed file: listing_key()


@dataclass
class Done:
    """What the skip-existing index holds for some inputs: content hashes and listing keys, by URI;
    for a tar read again, its members that failed by their own bytes (not redone)."""

    hashes: dict[str, set[str]] = field(default_factory=dict)
    listed: dict[str, set[ListingKey]] = field(default_factory=dict)
    failed: frozenset[str] = frozenset()

    def unchanged(self, uri: str, key: ListingKey | None) -> bool:
        """Done from a listing that said exactly this (:func:`~.inputs.listing_key`): no need to read it."""
        return key is not None and key in self.listed.get(uri, ())

    def hashed(self, uri: str, sha: str) -> bool:
        return sha in self.hashes.get(uri, ())


def _listing_key(size: Any, etag: Any, mtime: Any) -> ListingKey | None:
    if size is None or (etag is None and mtime is None):
        return None
    return listing_key(size, etag, mtime)


def _read_done(index_url: str, filters: list) -> pa.Table | None:
    """The index's rows that pass ``filters``; None when the index is gone (a rerun of the run removed
    a killed attempt's scratch while this one ran: the inputs are then read and hashed, never lost)."""
    fs, path = storage.url_to_fs(index_url)
    try:
        return pq.read_table(path, filesystem=fs, filters=filters)
    except FileNotFoundError:
        _logger.warning("skip-existing index %s is gone; reading and hashing this chunk's inputs",
                        storage.redact_url(index_url))
        return None


def done_lookup(index_url: str, uris: Iterable[str]) -> Done:
    """The index's "ok" rows for ``uris`` (stored URIs), as :class:`Done`."""
    uris = list(uris)
    done = Done()
    if not uris:
        return done
    table = _read_done(index_url, [("image_uri", "in", uris), ("outcome", "==", "ok")])
    if table is None:
        return done
    columns = [table.column(c).to_pylist() for c in ("image_uri", "content_sha256", *_DONE_COLUMNS)]
    for uri, sha, size, etag, mtime in zip(*columns, strict=True):
        done.hashes.setdefault(uri, set()).add(sha)
        key = _listing_key(size, etag, mtime)
        if key is not None:
            done.listed.setdefault(uri, set()).add(key)
    return done


def done_archive(index_url: str, archive_uri: str, key: ListingKey | None) -> list[tuple[str, str, str]]:
    """``(image_uri, run_id, outcome)`` of the index's rows for the tar at ``archive_uri`` (stored URI),
    from runs whose listing of it said exactly ``key``; [] when ``key`` is None.
    :func:`~.incremental.archive_verdict` decides from them."""
    if key is None:
        return []
    table = _read_done(index_url, [("archive_uri", "==", archive_uri)])
    if table is None:
        return []
    columns = [table.column(c).to_pylist() for c in ("image_uri", "run_id", "outcome", *_DONE_COLUMNS)]
    return [(uri, run, outcome) for uri, run, outcome, *listed in zip(*columns, strict=True)
            if _listing_key(*listed) == key]


def done_in_chunk(index_url: str, uris: Iterable[str]) -> dict[str, set[str]]:
    """``{image_uri: {content_sha256, ...}}`` already done, restricted to ``uris``."""
    return done_lookup(index_url, uris).hashes


def runs_file(out: str, run_date: str, run_id: str) -> str:
    check_run_id(run_id)
    return storage.join(out, "runs", f"run_date={run_date}", f"{run_id}.parquet")


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)
