"""Where a run's time goes: per-stage busy seconds and the device-busy fraction, per chunk and per run."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from weakseg.tasks.segment import tables
from weakseg.tasks.segment.chunk import STAGES, SegmentOptions, segment_chunk
from weakseg.tasks.segment.inference import load_model
from weakseg.tasks.segment.inputs import iter_chunks
from weakseg.tasks.segment.runs import mean_batch, stage_table, stage_timing

CLASSES = ["background", "disk", "square"]


def _corpus(folder, n: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        (folder / f"{i}.jpg").write_bytes(buf.getvalue())
    (folder / "bad.jpg").write_bytes(b"not an image")


def test_chunk_stages(tmp_path, tiny_checkpoint):
    _corpus(tmp_path / "c", 5)
    (tmp_path / "model.pt").write_bytes(tiny_checkpoint(CLASSES, 0))
    bundle = load_model(str(tmp_path / "model.pt"), "cpu")
    opts = SegmentOptions(out=str(tmp_path / "out"), run_id="t", run_date="2026-01-01", model="unused",
                          priors=("ilp", "sppxl"), batch_size=2)
    results = [segment_chunk(spec, opts, bundle) for spec in iter_chunks(str(tmp_path / "c"), 4)]
    assert sum(r.ok for r in results) == 5 and sum(r.failed for r in results) == 1
    for r in results:
        assert set(r.stage_seconds) == set(STAGES)
        assert all(v >= 0 for v in r.stage_seconds.values())
        # inline, two threads work side by side: the chunk's (read, decode, priors, encode, write) and
        # the device's (forward, postprocess); each adds up to at most the chunk's wall time
        device = r.stage_seconds["forward"] + r.stage_seconds["postprocess"]
        assert device <= r.seconds and sum(r.stage_seconds.values()) - device <= r.seconds
        assert r.stage_seconds["forward"] == pytest.approx(r.forward_seconds, abs=1e-3)
        for stage in ("read", "decode", "forward", "priors", "encode", "write"):
            assert r.stage_seconds[stage] > 0, stage
    wall = sum(r.seconds for r in results)  # one worker, one after the other
    timing = stage_timing(results, wall)
    assert 0 < timing["device_busy_fraction"] <= 1
    assert sum(timing["stage_seconds"].values()) <= 2 * wall
    rows = stage_table(results, wall)
    assert [r["stage"] for r in rows[:-1]] == list(STAGES)


def _one_chunk(tmp_path, tiny_checkpoint, shapes: list[tuple[int, int]], batch_size: int) -> list:
    """One chunk of random PNG photos of ``shapes`` (h, w), segmented with ``ilp``."""
    folder = tmp_path / "c"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, shape in enumerate(shapes):
        Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "model.pt").write_bytes(tiny_checkpoint(CLASSES, 0))
    bundle = load_model(str(tmp_path / "model.pt"), "cpu")
    opts = SegmentOptions(out=str(tmp_path / "out"), run_id="t", run_date="2026-01-01", model="unused",
                          priors=("ilp",), batch_size=batch_size)
    results = [segment_chunk(spec, opts, bundle) for spec in iter_chunks(str(folder), len(shapes))]
    assert [r.ok for r in results] == [len(shapes)]
    return results


def test_forward_passes_are_counted_and_hold_one_size_each(tmp_path, tiny_checkpoint):
    """Six photos of one size and two of another, batch 4: the sizes cannot share a batch, so
    three forward passes (4, 2 and 2 images), 2.67 images a pass: what a run reports so a user
    sees how far their corpus's size mix keeps batches from --batch-size."""
    shapes = [(48, 64) if i % 4 else (80, 64) for i in range(8)]  # photos 0 and 4 are the odd size
    results = _one_chunk(tmp_path, tiny_checkpoint, shapes, batch_size=4)
    assert (results[0].forward_batches, results[0].forward_images) == (3, 8)
    assert mean_batch(results) == 2.67 and mean_batch([]) == 0.0


def test_photos_a_few_pixels_apart_share_forward_passes(tmp_path, tiny_checkpoint):
    """80x64 and 75x64 photos pad to one 80x64 input (stride 16), so batch 6 takes all six in one
    pass; the two 96x64 photos make a second. Each keeps its own forward size and mask size."""
    shapes = [(96, 64), (80, 64), (75, 64), (80, 64), (96, 64), (75, 64), (80, 64), (75, 64)]
    results = _one_chunk(tmp_path, tiny_checkpoint, shapes, batch_size=6)
    assert (results[0].forward_batches, results[0].forward_images) == (2, 8)  # by forward size: 3 passes
    images = tables.read_table(str(tmp_path / "out"), "images").to_pylist()
    assert sorted((r["height"], r["width"], r["forward_height"], r["forward_width"]) for r in images) == sorted(
        (h, w, h, w) for h, w in shapes)


@pytest.mark.slow
def test_runs_row_records_stages(prefect_harness, tmp_path, tiny_checkpoint):
    from weakseg.flows.segment_corpus import segment_corpus

    _corpus(tmp_path / "c", 6)
    (tmp_path / "model.pt").write_bytes(tiny_checkpoint(CLASSES, 0))
    out, workers = str(tmp_path / "out"), 2
    state = segment_corpus(images=str(tmp_path / "c"), model=str(tmp_path / "model.pt"), out=out, priors="ilp",
                           chunk_size=2, batch_size=2, workers=workers, device="cpu", thumbnails=0, tta="1",
                           return_state=True)
    summary = state.result() if state.is_completed() else state.data.result()
    [row] = tables.read_table(out, "runs").to_pylist()
    stages = json.loads(row["stage_seconds"])
    assert set(stages) == set(STAGES) and all(v >= 0 for v in stages.values())
    wall = summary["timing"]["fanout_seconds"]
    assert sum(stages.values()) <= wall * workers
    assert sum(stages.values()) <= summary["timing"]["chunk_seconds"] + 1e-3
    assert 0 < row["device_busy_fraction"] <= 1
    assert summary["device_busy_fraction"] == row["device_busy_fraction"]
    assert (summary["timing"]["forward_batches"], summary["timing"]["mean_batch"]) == (3, 2.0)  # 6 photos, 2 a pass
