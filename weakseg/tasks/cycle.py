"""The life cycle's layout and the checks that say which of its steps are finished.

One cycle writes into one folder (``{work}``, with ``{cycle_id}`` replaced: by default the
ISO week, so a weekly schedule starts a fresh folder each week and a rerun in the same week
resumes)::

    {work}/shards/manifest.json     shard-imagenet (the manifest is written last)
    {work}/model/model.pt           train-mil (written last, atomically; step checkpoints before it)
    {work}/refined/model.pt         refine-mil, when the cycle refines
    {work}/thresholds-{chain}.json  choose-thresholds, when the segment chain has bb or seg

A step is finished when its output is there *and* belongs to this cycle's model: the
thresholds file names the candidate's id, the registry's pointer names the candidate, the
segmentation's ``runs`` row names the current release. A rerun after a kill or a failure
skips every finished step and starts at the first unfinished one. Plain functions over
:mod:`weakseg.tasks.storage`, no Prefect.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime

from . import registry as reg
from . import storage
from .ingest.manifest import MANIFEST_NAME

__all__ = ["STEPS", "CycleLayout", "checkpoint_done", "default_cycle_id", "promoted", "segmented", "shards_done",
           "thresholds_done"]

STEPS = ("shard", "train", "refine", "thresholds", "promote", "segment")


def default_cycle_id(now: datetime) -> str:
    """The ISO week of ``now`` (``2025-W07``): one cycle per week, a rerun in the same week resumes it."""
    year, week, _ = now.isocalendar()
    return f"{year}-W{week:02d}"


@dataclass(frozen=True)
class CycleLayout:
    """Where one cycle's steps write (see the module docstring)."""

    root: str

    @classmethod
    def for_cycle(cls, work: str, cycle_id: str) -> CycleLayout:
        return cls(work.replace("{cycle_id}", cycle_id))

    @property
    def shards(self) -> str:
        return storage.join(self.root, "shards")

    @property
    def model_dir(self) -> str:
        return storage.join(self.root, "model")

    @property
    def refined_dir(self) -> str:
        return storage.join(self.root, "refined")

    def thresholds(self, chain: str) -> str:
        return storage.join(self.root, f"thresholds-{chain.replace(',', '-')}.json")


def shards_done(shards: str) -> bool:
    """The shards are written: their manifest (swapped in last) is there."""
    return storage.exists(storage.join(shards, MANIFEST_NAME))


def checkpoint_done(folder: str) -> bool:
    """A training (or refinement) finished: its final ``model.pt`` is there."""
    return storage.exists(storage.join(folder, reg.MODEL))


def thresholds_done(url: str, model_id: str) -> bool:
    """δ were chosen for this model: the file exists and its search names the model."""
    if not storage.exists(url):
        return False
    return storage.read_json(url).get("search", {}).get("model_id") == model_id


def promoted(registry: str, model_id: str) -> bool:
    """The registry's pointer names the model."""
    pointer = reg.read_pointer(registry)
    return pointer is not None and pointer.get("model_id") == model_id


def segmented(out: str, run_id: str, model_id: str) -> bool:
    """The segmentation run ended (its ``runs`` row is written) with this model, not Failed."""
    import pyarrow.parquet as pq

    from .segment import tables

    fs, _ = storage.url_to_fs(out)
    for table, _, path in tables.run_files(out, run_id):
        if table == "runs":
            with fs.open(path, "rb") as f:
                rows = pq.read_table(io.BytesIO(f.read()), columns=["model_id", "state"]).to_pylist()
            return any(r["model_id"] == model_id and r["state"] != "Failed" for r in rows)
    return False
