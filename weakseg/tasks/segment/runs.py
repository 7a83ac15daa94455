"""A segment-corpus run's bookkeeping: its counts, final state, ``runs`` row and summary.

Plain functions over the chunks' :class:`~weakseg.tasks.segment.chunk.ChunkResult`; the
flow writes the row (:func:`weakseg.tasks.segment.tables.write_rows`) and returns the summary.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ... import __version__
from .. import storage
from . import tables
from .chunk import ChunkResult

__all__ = ["final_state", "run_counts", "run_summary", "runs_row"]


def run_counts(results: Sequence[ChunkResult], n_chunks: int, failed_chunks: Sequence[str]) -> dict[str, int]:
    """The ``runs.counts`` struct: inputs ok, failed, skipped and listed; chunks and failed chunks."""
    counts = {"ok": sum(r.ok for r in results), "failed": sum(r.failed for r in results),
              "skipped": sum(r.skipped for r in results), "chunks": n_chunks, "chunks_failed": len(failed_chunks)}
    counts["listed"] = counts["ok"] + counts["failed"] + counts["skipped"]
    return counts


def final_state(counts: Mapping[str, int], failed_chunks: Sequence[str], max_error_fraction: float) -> str:
    """Failed when a chunk is missing or more than ``max_error_fraction`` of the listed inputs
    (skipped ones included: they were done before) failed."""
    listed = counts["ok"] + counts["failed"] + counts["skipped"]
    if failed_chunks or (listed and counts["failed"] / listed > max_error_fraction):
        return "Failed"
    return "CompletedWithErrors" if counts["failed"] else "Completed"


def runs_row(*, run_id: str, flow_run_id: str, model: str, info: Mapping[str, Any], priors: Sequence[str],
             parameters: Mapping[str, Any], counts: Mapping[str, int], state: str, started_at: datetime,
             seconds: float) -> dict[str, Any]:
    """The run's one ``runs`` row; ``info`` is what preparing the run found (model, classes, thresholds)."""
    classes = info["classes"]
    thresholds = {**{p: dict(zip(classes, v, strict=True)) for p, v in info["thresholds"].items()},
                  "sources": {p: _public(v) for p, v in info["thresholds_source"].items()}}
    return {"run_id": run_id, "flow_run_id": flow_run_id, "model_id": info["model_id"], "model_uri": _public(model),
            "classes": classes, "priors": ",".join(priors) or "none", "parameters": tables.dumps(parameters),
            "thresholds": tables.dumps(thresholds), "counts": dict(counts), "state": state,
            "started_at": started_at, "ended_at": datetime.now(UTC),
            "images_per_second": counts["ok"] / seconds if seconds > 0 else 0.0, "weakseg_version": __version__}


def run_summary(row: Mapping[str, Any], results: Sequence[ChunkResult], start_seconds: float,
                fanout_seconds: float) -> dict[str, Any]:
    """What the flow returns: the ``runs`` row with ISO times, prior timings, errors by type, timing."""
    ok = max(row["counts"]["ok"], 1)
    return {**row, "started_at": row["started_at"].isoformat(), "ended_at": row["ended_at"].isoformat(),
            "prior_ms_per_image": {k: round(sum(r.prior_ms.get(k, 0.0) for r in results) / ok, 2)
                                   for k in sorted({k for r in results for k in r.prior_ms})},
            "errors_by_type": {k: sum(r.errors_by_type.get(k, 0) for r in results)
                               for k in sorted({k for r in results for k in r.errors_by_type})},
            "timing": {"runner_start_seconds": start_seconds, "fanout_seconds": fanout_seconds,
                       "chunk_seconds": sum(r.seconds for r in results),
                       "chunks_done": len(results), "workers": sorted({r.worker for r in results}),
                       "model_loads": sum(r.model_loads for r in results)}}


def _public(url: str | None) -> str | None:
    return None if url is None else storage.redact_url(url)
