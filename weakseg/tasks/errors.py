"""One ``errors`` row for every input a stage skips: the same columns in shard-imagenet's
``errors.parquet`` and segment-corpus's ``errors`` table.

Columns a stage has no value for are null: shard-imagenet has no ``run_id``, ``chunk`` or
``occurred_at`` (its errors table is reproducible byte for byte, like its shards);
segment-corpus has no ``split``. URIs and messages are written without credentials.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa

from .storage import redact, redact_url

__all__ = ["ERRORS_SCHEMA", "ErrorRecord"]

ERRORS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("image_uri", pa.string()), ("image_key", pa.string()), ("split", pa.string()),
    ("stage", pa.string()), ("error_type", pa.string()), ("message", pa.string()), ("chunk", pa.int32()),
    ("occurred_at", pa.timestamp("ms", tz="UTC")),
])


@dataclass(frozen=True)
class ErrorRecord:
    """An input that was skipped: where (``stage``: read, decode, inference, priors) and why."""

    image_uri: str
    image_key: str
    stage: str
    error_type: str
    message: str
    run_id: str | None = None
    split: str | None = None
    chunk: int | None = None
    occurred_at: datetime | None = None

    def row(self) -> dict[str, Any]:
        """The table row: URI and message redacted, the message capped at 2,000 characters."""
        return {**asdict(self), "image_uri": redact_url(self.image_uri),
                "message": redact(self.message)[:2000] or self.error_type}
