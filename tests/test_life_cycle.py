"""The life-cycle flow: every step once, a rerun after a failure that redoes none of the finished ones, and
one after a retraining that redoes every step made from the earlier training."""
from __future__ import annotations

from pathlib import Path

import pytest

from weakseg.flows.life_cycle import check_options, life_cycle
from weakseg.tasks import registry as reg
from weakseg.tasks import storage
from weakseg.tasks.segment import tables

SMALL = {
    "train_options": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "input_size": 96, "pretrained": "none",
                      "head_widths": [16, 16, 16], "output_stride": 8, "num_workers": 0, "checkpoint_every": 0,
                      "val_every": 0, "progress": False},
    "refine_options": {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "input_size": 96, "num_workers": 0,
                       "max_side": 96, "tta": "1", "progress": False},
    "thresholds_options": {"limit": 4, "max_side": 96, "tta": "1"},
    "promote_options": {"limit": 4, "max_side": 96, "tta": "1"},
    "segment_options": {"max_side": 96, "tta": "1"},
}


def test_options_a_step_does_not_take_are_refused_before_any_work():
    with pytest.raises(ValueError) as err:
        check_options({"train": {"epoch": 1}, "segment": {"out": "x"}})
    assert "train-mil has no parameter 'epoch'" in str(err.value) and "'out' is set by the cycle" in str(err.value)


@pytest.mark.slow
def test_the_cycle_resumes_at_the_first_unfinished_step_and_redoes_what_a_retraining_made_stale(prefect_harness,
                                                                                          tmp_path):
    from weakseg.tasks.synthetic import write_synthetic_dataset

    data, registry, out = tmp_path / "data", str(tmp_path / "registry"), str(tmp_path / "tables")
    write_synthetic_dataset(str(data), n_train=16, n_val=4, size=96, classes=("dots", "stripes"), max_objects=1,
                            background_fraction=0.15)
    args = dict(source=str(data / "labels.csv"), registry=registry, out=out, work=str(tmp_path / "cycles" /
                "{cycle_id}"), cycle_id="w1", ground_truth=str(data), priors="ilp,seg", device="cpu",
                return_state=True, **{**SMALL, "promote_options": {**SMALL["promote_options"], "tolerance": 1.0}})

    # First attempt: the corpus is missing, so the last step fails after the others finished.
    first = life_cycle(images=str(tmp_path / "no-such-corpus"), **args)
    assert first.is_failed()
    work = tmp_path / "cycles" / "w1"
    outputs = [work / "shards" / "manifest.json", work / "model" / "model.pt", work / "refined" / "model.pt",
               work / "thresholds-ilp-seg.json", Path(registry) / "current.json"]
    stamps = [p.stat().st_mtime_ns for p in outputs]
    assert reg.read_pointer(registry)["model_id"] == reg.content_id((work / "refined" / "model.pt").read_bytes())[0]

    second = life_cycle(images=str(data / "JPEGImages"), **args)
    assert second.is_completed(), second.message
    result = second.result()
    assert result["steps"] == {"shard": "reused", "train": "reused", "refine": "reused", "thresholds": "reused",
                               "promote": "reused", "segment": "ran"}
    assert [p.stat().st_mtime_ns for p in outputs] == stamps  # nothing finished was redone
    assert len(reg.promotion_history(registry)) == 1
    runs = tables.read_table(out, "runs").to_pylist()
    assert [(r["run_id"], r["model_id"]) for r in runs] == [("cycle-w1", result["candidate"]["model_id"])]

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:  # the overlays carry a legend of the classes found
        overlays = [a for a in client.read_latest_artifacts() if a.key == "segment-corpus-overlays"]
    assert overlays and "Legend" in overlays[0].data and "| background | 0 |" in overlays[0].data

    third = life_cycle(images=str(data / "JPEGImages"), **args).result()
    assert set(third["steps"].values()) == {"reused"}

    # Retrain (the trained model replaced, another seed): nothing made from the earlier training is
    # reused: refined again from the new one, δ chosen for the new candidate, gated, segmented with it.
    (work / "model" / "model.pt").unlink()
    args["train_options"] = {**SMALL["train_options"], "seed": 1}
    fourth = life_cycle(images=str(data / "JPEGImages"), **args).result()
    assert fourth["trained"]["model_id"] != result["trained"]["model_id"]
    assert fourth["steps"] == {"shard": "reused", "train": "ran", "refine": "ran", "thresholds": "ran",
                               "promote": "ran", "segment": "ran"}
    candidate = fourth["candidate"]["model_id"]
    assert reg.load_release(registry, candidate).card["refined_from"] == fourth["trained"]["model_id"]
    assert storage.read_json(str(work / "thresholds-ilp-seg.json"))["search"]["model_id"] == candidate
    assert reg.read_pointer(registry)["model_id"] == candidate != result["candidate"]["model_id"]
    runs = tables.read_table(out, "runs").to_pylist()
    assert [(r["run_id"], r["model_id"]) for r in runs] == [("cycle-w1", candidate)]


def _manifest(folder, generation: str, source: str) -> dict:
    """A shard manifest as shard-imagenet writes it (only what the cycle's checks read)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    doc = {"format": "weakseg.shards", "format_version": 1, "generation": {"id": generation, "folder": ""},
           "classes": ["a", "b"], "source_fingerprint": f"listing-{generation}", "splits": {}, "shards": [],
           "parameters": {"source": source, "max_side": 96}}
    (folder / "manifest.json").write_text(json.dumps(doc))
    return doc


def _checkpoint(path, shards: str, manifest: dict, parent: str | None = None, seed: int = 0) -> str:
    import torch

    from weakseg.models import ModelConfig, checkpoint_bytes, create_model
    from weakseg.tasks.train.trainer import manifest_reference

    torch.manual_seed(seed)
    model, config = create_model(ModelConfig(num_classes=2, head_widths=(16, 16, 16), output_stride=16),
                                 pretrained="none")
    data = checkpoint_bytes(model, config, ["a", "b"], input_size=64, manifest=manifest_reference(shards, manifest),
                            training_state={"refined_from": {"model_id": parent}} if parent else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return reg.content_id(data)[0]


def test_a_step_is_finished_only_when_its_output_was_made_from_this_cycles_inputs(tmp_path):
    from weakseg.tasks import cycle

    layout = cycle.CycleLayout(str(tmp_path / "w1"))
    old = _manifest(tmp_path / "w1" / "shards", "gen-1", "./labels.csv")
    assert cycle.shards_done(layout.shards, "./labels.csv", {"max_side": 96})
    assert not cycle.shards_done(layout.shards, "./other.csv")  # another source: shard again
    assert not cycle.shards_done(layout.shards, "./labels.csv", {"max_side": 128})  # other options too

    trained = _checkpoint(tmp_path / "w1" / "model" / "model.pt", layout.shards, old)
    assert cycle.trained_done(layout.model_dir, layout.shards)
    _checkpoint(tmp_path / "w1" / "refined" / "model.pt", layout.shards, old, parent=trained, seed=1)
    assert cycle.refined_done(layout.refined_dir, trained)

    retrained = _checkpoint(tmp_path / "w1" / "model" / "model.pt", layout.shards, old, seed=2)  # a retraining
    assert retrained != trained and cycle.trained_done(layout.model_dir, layout.shards)
    assert not cycle.refined_done(layout.refined_dir, retrained)  # its refinement is of the earlier training

    _manifest(tmp_path / "w1" / "shards", "gen-2", "./labels.csv")  # the shards were made again, differently
    assert not cycle.trained_done(layout.model_dir, layout.shards)
    assert cycle.stale_training(layout.model_dir, layout.shards) == [f"{layout.model_dir}/model.pt"]
