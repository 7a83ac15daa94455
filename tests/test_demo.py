"""A reduced-size demo, end to end: generate, shard, train, refine, promote, segment, evaluate, every variant."""
from pathlib import Path

import pytest

from weakseg.flows.demo import REFINED, REFINED_STEPS, demo
from weakseg.tasks.segment.priors import VARIANTS


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end_and_reuses_its_work(prefect_harness, tmp_path, capsys):
    workdir = tmp_path / "demo"
    report = demo(workdir=str(workdir), n_train=24, n_val=4, size=96, epochs=1, refine_epochs=1)
    assert set(report["mean_iou"]) == {*VARIANTS, *(f"refined {s}" for s in REFINED_STEPS), REFINED}
    assert all(0.0 <= v <= 1.0 for v in report["mean_iou"].values())
    assert report["duckdb"]["rows"], "the DuckDB query over the regions table returned nothing"
    assert len(list((workdir / "overlays").glob("*.png"))) == 4
    assert (workdir / "evaluation" / "demo-refined" / "metrics.json").is_file()  # the delivered run, evaluated
    assert report["duckdb"]["parameters"][1] == "demo-refined" and "?" in report["duckdb"]["sql"]  # values bound
    out = capsys.readouterr().out
    assert "mean IoU" in out and "ilp+sppxl" in out and "read_parquet(?" in out

    model = workdir / "model" / "model.pt"
    stamp = model.stat().st_mtime_ns
    refined = workdir / "refined" / "model.pt"
    assert refined.is_file()
    again = demo(workdir=str(workdir), n_train=24, n_val=4, size=96, epochs=1, refine_epochs=1)
    assert model.stat().st_mtime_ns == stamp  # reused, not retrained
    assert again["mean_iou"] == report["mean_iou"]
    assert Path(report["overlays"]).is_dir()


def test_the_demo_trains_at_stride_16_exactly_where_its_head_fits():
    """STRIDE_16_MIN_SIZE is the smallest input the demo's network takes at output stride 16 (smaller: stride 8)."""
    from weakseg.flows.demo import STRIDE_16_MIN_SIZE, TRAIN_OPTIONS
    from weakseg.models import ModelConfig, create_model

    model, _ = create_model(ModelConfig(num_classes=3, head_widths=tuple(TRAIN_OPTIONS["head_widths"]),
                                        output_stride=16), pretrained="none")
    assert model.min_input_size == STRIDE_16_MIN_SIZE
