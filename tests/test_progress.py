"""Progress of long runs: the listing counted ahead, and the bar's Prefect artifact."""
from __future__ import annotations

import time

import pytest
from samples import latest_artifact as _latest

from weakseg.tasks.segment.inputs import ChunkSpec
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
        count = ListingCount(images, chunk_size=2)
        deadline = time.monotonic() + 30
        while not count.complete and time.monotonic() < deadline:
            time.sleep(0.05)
        assert count.complete and (count.tally.files, count.tally.shards) == (expected, 0)


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
