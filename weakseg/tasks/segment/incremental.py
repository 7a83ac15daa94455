"""``--skip-existing``: which of a chunk's inputs need not be read at all, and which must be redone.

**Metadata first.** Every input gets its :class:`~.inputs.SourceMeta` (size plus ETag or
modification time) before it is read: from the listing (folders, globs, S3 prefixes), else
from the store (:func:`~.inputs.describe`: a ``stat``, or a ``HEAD`` per object for
manifests of URLs, brace-listed shards, a single URL). It is recorded with the input's
``images`` row, so a later run can decide without reading. Inputs this model already
segmented whose metadata is unchanged are counted skipped and never read. The others are
read and hashed, and skipped when the hash matches (:func:`~.decode.prepare`, with the
hashes :func:`skip_unchanged` returns).

**Whose fault.** An input is done when it has an ``ok`` row (in ``images``) or an error row
caused by its own bytes (:data:`CAUSED_BY_INPUT`). Every other failure is redone by the
next incremental run: a forward pass out of device memory (stage ``inference``), a host
worker that died (``WorkerCrashed``), a read that failed on the network in a version that
recorded such failures, post-processing and encoding failures, any error type not listed.
For files this needs nothing: a file without an ``ok`` row is read again. A tar whose
archive is unchanged is skipped whole only when every member is done and some run read
the archive to its end (:func:`archive_verdict`); otherwise it is read again, members
with an ``ok`` row are skipped by hash, members that failed by their own bytes are skipped
unprocessed, and the rest are processed. An error row carries no metadata of its own, so
only a tar member's (through its archive's) can be known to belong to unchanged bytes: a
file that failed by its own bytes is read, and fails, again.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import tables
from .inputs import ChunkSpec, fill_meta, stored_and_key
from .read import archive_uri

__all__ = ["CAUSED_BY_INPUT", "ArchiveDone", "archive_verdict", "caused_by_input", "skip_unchanged"]

# (stage, error_type) of the errors rows that the input's own bytes caused: the same bytes fail
# the same way again, so an unchanged input with one of these is not redone. A closed list:
# what is not here (stage inference or priors or encode, WorkerCrashed, any read failure on the
# network or the store, an error type this list does not know) is redone by the next run.
# The size limits are here too: an unchanged tar member over --max-bytes or --max-pixels is not
# retried by a run with a higher limit; run that one without --skip-existing.
CAUSED_BY_INPUT: frozenset[tuple[str, str]] = frozenset({
    ("read", "TooLarge"),  # over --max-bytes, refused on its size
    ("decode", "EmptyFile"), ("decode", "NotAnImage"), ("decode", "CorruptImage"),  # images.decode_image
    ("decode", "TooManyPixels"),  # over --max-pixels
    # a corrupt or truncated tar archive (the rest of it is one error row of the archive)
    *(("read", kind) for kind in ("ReadError", "HeaderError", "EmptyHeaderError", "TruncatedHeaderError",
                                  "EOFHeaderError", "InvalidHeaderError", "SubsequentHeaderError",
                                  "CompressionError", "StreamError", "EOFError", "BadGzipFile")),
})


def caused_by_input(stage: str, error_type: str) -> bool:
    """Whether an errors row (``stage``, ``error_type``) blames the input's own bytes (:data:`CAUSED_BY_INPUT`)."""
    return (stage, error_type) in CAUSED_BY_INPUT


@dataclass(frozen=True)
class ArchiveDone:
    """What the index says of an unchanged tar."""

    whole: bool  # every member done and the archive read to its end: skip it unread
    settled: int  # members done (ok, or failed by their own bytes)
    failed: frozenset[str]  # members failed by their own bytes: not processed when the tar is read again


def archive_verdict(archive: str, rows: list[tuple[str, str, str]]) -> ArchiveDone:
    """Decide from the index's rows for an unchanged archive (``(image_uri, run_id, outcome)``,
    :func:`~.tables.done_archive`).

    Skipped whole when some run wrote ``images`` rows of it without its reading being cut
    short (an error row of the archive itself not caused by its bytes: such a run never saw
    the members after that point), and no member is left with only errors not caused by its
    bytes. A member with no row at all was skipped by its hash in the run that read the
    archive: done.
    """
    ok_runs = {run for _, run, outcome in rows if outcome == "ok"}
    if not ok_runs:
        return ArchiveDone(False, 0, frozenset())
    cut_short = {run for uri, run, outcome in rows if uri == archive and outcome == "retry"}
    ok = {uri for uri, _, outcome in rows if outcome == "ok"}
    failed = {uri for uri, _, outcome in rows if outcome == "failed" and uri != archive} - ok
    redo = {uri for uri, _, outcome in rows if outcome == "retry" and uri != archive} - ok - failed
    return ArchiveDone(bool(ok_runs - cut_short) and not redo, len(ok | failed), frozenset(failed))


def skip_unchanged(spec: ChunkSpec, index: str | None) -> tuple[ChunkSpec | None, tables.Done, int]:
    """What is left to read of ``spec`` (None: nothing) with every input's metadata
    (:func:`~.inputs.fill_meta`, with or without an index: it is recorded for the next run), the
    index's rows for it (content hashes for inputs read and hashed; a tar's members failed by
    their own bytes), and how many inputs were skipped unread."""
    spec = fill_meta(spec)
    if not index:
        return spec, tables.Done(), 0
    if spec.shard is not None:
        meta = spec.meta_of(0)
        if meta is None:
            return spec, tables.Done(), 0
        archive = archive_uri(spec.shard)
        verdict = archive_verdict(archive, tables.done_archive(index, archive, meta.file_key))
        if verdict.whole:
            return None, tables.Done(), verdict.settled
        return spec, tables.Done(failed=verdict.failed), 0
    stored = [stored_and_key(u)[0] for u in spec.uris]  # the spec's URIs are canonical
    done = tables.done_lookup(index, stored)
    keep = [i for i, u in enumerate(stored) if not done.unchanged(u, m.file_key if (m := spec.meta_of(i)) else None)]
    skipped = len(spec.uris) - len(keep)
    if not keep:
        return None, done, skipped
    if len(keep) == len(spec.uris):
        return spec, done, 0
    return dataclasses.replace(spec, uris=tuple(spec.uris[i] for i in keep),
                               meta=tuple(spec.meta_of(i) for i in keep) if spec.meta else ()), done, skipped
