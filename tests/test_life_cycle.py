"""The life-cycle flow: every step once, and a rerun after a failure that redoes none of the finished ones."""
from __future__ import annotations

from pathlib import Path

import pytest

from weakseg.flows.life_cycle import check_options, life_cycle
from weakseg.tasks import registry as reg
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
def test_the_cycle_resumes_at_the_first_unfinished_step(prefect_harness, tmp_path):
    from weakseg.tasks.synthetic import write_synthetic_dataset

    data, registry, out = tmp_path / "data", str(tmp_path / "registry"), str(tmp_path / "tables")
    write_synthetic_dataset(str(data), n_train=16, n_val=4, size=96, classes=("dots", "stripes"), max_objects=1,
                            background_fraction=0.15)
    args = dict(source=str(data / "labels.csv"), registry=registry, out=out, work=str(tmp_path / "cycles" /
                "{cycle_id}"), cycle_id="w1", ground_truth=str(data), priors="ilp,seg", device="cpu",
                return_state=True, **SMALL)

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
