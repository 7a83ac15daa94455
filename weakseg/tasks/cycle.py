"""The life cycle's layout and the checks that say which of its steps are finished.

One cycle writes into one folder (``{work}``, with ``{cycle_id}`` replaced: by default the
ISO week, so a weekly schedule starts a fresh folder each week and a rerun in the same week
resumes)::

    {work}/shards/manifest.json     shard-imagenet (the manifest is written last)
    {work}/model/model.pt           train-mil (written last, atomically; step checkpoints before it)
    {work}/refined/model.pt         refine-mil, when the cycle refines
    {work}/thresholds-{chain}.json  choose-thresholds, when the segment chain has bb or seg

A step is finished when its output is there *and* was made from this cycle's inputs, the
outputs of the steps before it as they are now: the shard manifest records this cycle's
source (and the shard options given), the trained ``model.pt`` was trained on the shards'
generation, the refined ``model.pt``'s parent (``refined_from``) is the trained release, the
thresholds file names the candidate (and the chain), the registry's pointer names the
candidate, the segmentation's ``runs`` row names it. So redoing a step (new shards, a
retraining) makes every later step's output stale, and each is redone; a rerun after a kill
or a failure skips every finished step and starts at the first unfinished one. Options of
a step other than the shard options are not compared: a rerun with other training options
reuses a finished training (start another cycle id, or remove ``model/``). Plain functions
over :mod:`weakseg.tasks.storage`, no Prefect.
"""
from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..models.checkpoint import load_checkpoint
from . import registry as reg
from . import storage
from .ingest.manifest import MANIFEST_NAME, load_manifest
from .train.trainer import list_checkpoints

__all__ = ["STEPS", "CycleLayout", "default_cycle_id", "promoted", "refined_done", "segmented", "shards_done",
           "stale_training", "thresholds_done", "trained_done"]

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


def _plain(value: Any) -> Any:
    """A value as JSON gives it back (tuples as lists), to compare an option with its recorded value."""
    return json.loads(json.dumps(value))


def shards_done(shards: str, source: str, options: Mapping[str, Any] | None = None) -> bool:
    """The shards are written (their manifest, swapped in last, is there) from this ``source`` with these
    shard ``options`` (those the manifest records)."""
    if not storage.exists(storage.join(shards, MANIFEST_NAME)):
        return False
    recorded = load_manifest(shards).get("parameters", {})
    if recorded.get("source") != storage.redact_url(source):
        return False
    return all(_plain(v) == recorded[k] for k, v in (options or {}).items() if k in recorded)


def _card(folder: str) -> dict[str, Any] | None:
    """The release card of ``{folder}/model.pt`` (what it was trained on, its parent), None when absent."""
    url = storage.join(folder, reg.MODEL)
    try:
        return reg.model_card(storage.read_bytes(url))
    except FileNotFoundError:
        return None
    except reg.RegistryError:
        return None  # not a whole checkpoint: not finished


def _same_shards(reference: Mapping[str, Any] | None, manifest: Mapping[str, Any]) -> bool:
    """A checkpoint's record of its training data names this manifest's shards (same generation, listing, classes)."""
    reference = reference or {}
    return (reference.get("generation") == manifest.get("generation")
            and reference.get("source_fingerprint") == manifest.get("source_fingerprint")
            and list(reference.get("classes") or []) == list(manifest.get("classes") or []))


def trained_done(folder: str, shards: str) -> bool:
    """A training finished on these shards: ``model.pt`` is there and records their generation."""
    card = _card(folder)
    return card is not None and _same_shards(card.get("manifest"), load_manifest(shards))


def stale_training(folder: str, shards: str) -> list[str]:
    """Checkpoints in ``folder`` of a training on other shards (``model.pt`` and the step checkpoints a
    resume would continue from), to remove before training on these: [] when there are none."""
    manifest = load_manifest(shards)
    steps = [url for _, url in list_checkpoints(folder)]
    final = _card(folder)
    newest = None
    if steps:
        newest = load_checkpoint(io.BytesIO(storage.read_bytes(steps[-1]))).manifest
    if (final is None or _same_shards(final.get("manifest"), manifest)) and (
            newest is None or _same_shards(newest, manifest)):
        return []
    return steps + ([storage.join(folder, reg.MODEL)] if final is not None else [])


def refined_done(folder: str, parent_id: str) -> bool:
    """A refinement of this parent finished: ``model.pt`` is there and its ``refined_from`` is ``parent_id``."""
    card = _card(folder)
    return card is not None and card.get("refined_from") == parent_id


def thresholds_done(url: str, model_id: str, chain: list[str] | None = None) -> bool:
    """δ were chosen for this model (and chain): the file exists, its search names the model, its
    ``priors`` the chain."""
    if not storage.exists(url):
        return False
    doc = storage.read_json(url)
    if chain is not None and doc.get("priors") not in (None, list(chain)):
        return False
    return doc.get("search", {}).get("model_id") == model_id


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
