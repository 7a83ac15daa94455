"""Image references every stage reads the same way: manifest columns and ``tar://`` member URIs.

A CSV or Parquet manifest names its images in the first of :data:`MANIFEST_COLUMNS` it has
(shard-imagenet and segment-corpus accept the same ones); ``image_id`` means the VOC layout
beside the manifest, ``JPEGImages/<id>.jpg``. A member of a tar archive is
``tar://<member>::<archive URL>``, the archive always a URL (``file://`` for a local path).
"""
from __future__ import annotations

from collections.abc import Iterable

__all__ = ["MANIFEST_COLUMNS", "manifest_column", "manifest_ref", "split_tar_uri", "tar_uri"]

MANIFEST_COLUMNS = ("image_uri", "uri", "path", "image_id")


def manifest_column(columns: Iterable[str] | None) -> str | None:
    """The column a manifest with these columns names its images in, or None."""
    names = set(columns or ())
    return next((c for c in MANIFEST_COLUMNS if c in names), None)


def manifest_ref(value: str, column: str) -> str:
    """A manifest cell as a reference (relative ones are resolved beside the manifest)."""
    return f"JPEGImages/{value}.jpg" if column == "image_id" else value


def tar_uri(member: str, archive: str) -> str:
    """The URI of ``member`` inside the tar at ``archive`` (a URL or a local path)."""
    return f"tar://{member}::{archive if '://' in archive else 'file://' + archive}"


def split_tar_uri(uri: str) -> tuple[str, str] | None:
    """``(member, archive)`` of a ``tar://member::archive`` URI, else None."""
    if not uri.startswith("tar://") or "::" not in uri:
        return None
    member, archive = uri[len("tar://"):].split("::", 1)
    return member, archive
