"""``--skip-existing``: which of a chunk's inputs need not be read at all.

Inputs this model already segmented whose listing metadata (size plus ETag or modification
time, :class:`~.inputs.SourceMeta`) is unchanged are counted skipped and never read. Inputs
without metadata are read and hashed, and skipped when the hash matches
(:func:`~.decode.prepare`, with the hashes :func:`skip_unchanged` returns).
"""
from __future__ import annotations

import dataclasses

from . import tables
from .inputs import ChunkSpec, stored_uri
from .read import archive_uri

__all__ = ["skip_unchanged"]


def skip_unchanged(spec: ChunkSpec, index: str | None) -> tuple[ChunkSpec | None, tables.Done, int]:
    """What is left to read of ``spec`` (None: nothing), the index's rows for it (content hashes,
    for inputs read and hashed), and how many inputs were skipped unread.

    A shard is skipped whole when its archive is unchanged and members of it were done; then
    members that failed before are not read again either (their bytes did not change).
    """
    if not index:
        return spec, tables.Done(), 0
    if spec.shard is not None:
        meta = spec.meta_of(0)
        members = tables.done_archive(index, archive_uri(spec.shard), meta.file_key) if meta else 0
        if members:
            return None, tables.Done(), members
        return spec, tables.Done(), 0
    done = tables.done_lookup(index, [stored_uri(u) for u in spec.uris])
    keep = [i for i, u in enumerate(spec.uris)
            if not done.unchanged(stored_uri(u), m.file_key if (m := spec.meta_of(i)) else None)]
    skipped = len(spec.uris) - len(keep)
    if not keep:
        return None, done, skipped
    if len(keep) == len(spec.uris):
        return spec, done, 0
    return dataclasses.replace(spec, uris=tuple(spec.uris[i] for i in keep),
                               meta=tuple(spec.meta_of(i) for i in keep) if spec.meta else ()), done, skipped
