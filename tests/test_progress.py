"""Progress of long runs: the listing counted ahead, and the bar's Prefect artifact."""
from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from samples import latest_artifact as _latest

from weakseg.tasks.segment.inputs import ChunkSpec, iter_chunks
from weakseg.tasks.segment.runs import ListingCount, ListingTally


def test_a_tally_counts_files_and_estimates_shards_from_those_read():
    tally = ListingTally()
    for spec in (ChunkSpec(0, ("a", "b", "c")), ChunkSpec(1, ("d",)), ChunkSpec(2, shard="s0.tar"),
                 ChunkSpec(3, shard="s1.tar")):
        tally.add(spec)
    assert (tally.files, tally.shards) == (4, 2)
    assert tally.images(0, 0) is None  # no shard read yet: no estimate
    assert tally.images(10, 1) == 24  # the unread shard counts as the mean of those read
    assert ListingTally(files=7).images(0, 0) == 7


def test_the_listing_is_counted_ahead_in_the_background(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(b"not read")
    (folder / "sub" / "x.png").write_bytes(b"not read")
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{folder}/0.jpg\n{folder}/./0.jpg\n{folder}/1.jpg\n")  # the same file twice: once
    for images, expected in ((str(folder), 6), (str(manifest), 2)):
        assert _counted(images) == (expected, 0)


def _counted(images: str) -> tuple[int, int]:
    count = ListingCount(images)
    deadline = time.monotonic() + 30
    while not count.complete and time.monotonic() < deadline:
        time.sleep(0.05)
    assert count.complete
    return count.tally.files, count.tally.shards


def _processed(images: str) -> tuple[int, int]:
    """Files and shards of the run's own listing (what segment-corpus processes)."""
    tally = ListingTally()
    for spec in iter_chunks(images, 3):
        tally.add(spec)
    return tally.files, tally.shards


def test_the_count_ahead_is_the_number_of_inputs_the_run_processes(tmp_path):
    """Repeats dropped as the run drops them: in any spelling in a manifest (Parquet too), in a
    brace pattern that names a shard twice; a folder walk counted whole, shards apart."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i in range(7):
        (folder / f"{i}.jpg").write_bytes(b"not read")
    (folder / "sub" / "x.png").write_bytes(b"not read")
    (folder / "sub" / "s.tar").write_bytes(b"not read")
    (folder / "notes.txt").write_text("not an image")
    text = tmp_path / "list.txt"
    text.write_text(f"# comment\n{folder}/0.jpg\nphotos/0.jpg\n./photos/1.jpg\n{folder}/sub/../1.jpg\n"
                    f"file://{folder}/2.jpg\n{folder}/2.jpg\nphotos/3.jpg\n")
    table = tmp_path / "list.parquet"
    pq.write_table(pa.table({"image_uri": [f"{folder}/{i % 3}.jpg" for i in range(9)]}), table)
    braces = f"{tmp_path}/shards-{{0..2}}-{{a,b,a}}.tar"  # names each of 3 x 2 shards, 3 twice
    for images, expected in ((str(folder), (8, 1)), (str(text), (4, 0)), (str(table), (3, 0)),
                             (braces, (0, 6)), (f"{folder}/*.jpg", (7, 0))):
        assert _processed(images) == expected, images
        assert _counted(images) == expected, images


def test_the_count_ahead_stats_no_file(tmp_path, monkeypatch):
    """Counting needs names only: the folder's files are not stat'ed (the run's own listing
    stats each once, for its metadata), so the count costs the flow's process little."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(20):
        (folder / f"{i:02d}.jpg").write_bytes(b"not read")
    stats: list[str] = []
    real_stat = os.stat

    def counting_stat(path, *args, **kwargs):
        if str(path).endswith(".jpg"):
            stats.append(str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", counting_stat)
    assert _counted(str(folder)) == (20, 0)
    assert stats == []
    assert _processed(str(folder)) == (20, 0) and len(stats) == 20  # the spy sees the run's own


def test_progress_updates_its_artifact_and_learns_its_total_late(prefect_harness):
    from prefect import flow

    from weakseg.flows._progress import Progress

    @flow
    def steps() -> None:
        with Progress("weakseg-test-progress", "test", every_seconds=0) as progress:
            progress.update(2)
            assert _latest("weakseg-test-progress").data == 0.0  # no total yet: no percentage
            assert "2 img done" in _latest("weakseg-test-progress").description
            progress.set_total(8)
            progress.update(2, failed=1)
            art = _latest("weakseg-test-progress")
            assert art.data == pytest.approx(50.0) and "4/8 img done" in art.description
            assert "1 failed" in art.description and "ETA" in art.description
        assert _latest("weakseg-test-progress").data == pytest.approx(50.0)  # the total stays what it was set to
        with pytest.raises(RuntimeError), Progress("weakseg-test-broken", "test", every_seconds=0) as progress:
            progress.update(3)
            raise RuntimeError("the run broke")
        assert _latest("weakseg-test-broken").data == 0.0  # a run that broke is not shown complete
        with Progress("weakseg-test-lazy", "test", every_seconds=0) as progress:
            progress.update(5)
        assert _latest("weakseg-test-lazy").data == 100.0 and "5/5 img done" in _latest("weakseg-test-lazy").description

    steps()
