"""SIGKILL at any moment, then a rerun with the same run id, gives exactly the tables of an
uninterrupted run (issue 37.9): same rows, same masks, no stray files, locally and on S3.

The crash matrix (``WEAKSEG_CRASH_BEFORE``, test_segment_guarantees.py) stops a run at chosen
write points; here the real CLI, with two host worker processes, is killed as a whole process
group at moments drawn from a seeded generator: a fraction of a whole run's work after the
CLI's run has started (its model pinned), so the schedule is reproducible while where each
kill lands in the run still depends on the machine's speed: every moment is a fair sample.
Each killed attempt starts where the last one left the output; the last rerun goes to the
end. Its tables and files are compared with those of a run that was never interrupted.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_segment_orchestration import CLASSES, TIMING, write_images

from weakseg.tasks.segment import tables

pytestmark = pytest.mark.slow

KILLS = 3
RUN_ID = "killed"
RUNS_VOLATILE = {"flow_run_id", "started_at", "ended_at", "images_per_second", "stage_seconds",
                 "device_busy_fraction", "run_date"}


OPTIONS = {"chunk_size": 2, "batch_size": 2, "workers": 2, "host_workers": 2, "device": "cpu", "priors": "ilp,sppxl",
           "max_side": 64, "tta": "1", "thumbnails": 0}


def _cli(images: str, model: str, out: str, env: dict[str, str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "weakseg.flows.cli", "segment", "--images", images, "--model", model, "--out", out,
            "--run-id", RUN_ID]
    for k, v in OPTIONS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _flow(images: str, model: str, out: str) -> None:
    from weakseg.flows.segment_corpus import segment_corpus

    state = segment_corpus(images=images, model=model, out=out, run_id=RUN_ID, return_state=True, **OPTIONS)
    assert state.is_completed(), state.message


class _Store:
    """The output as files: relative paths (every file, hidden and scratch ones included) and tables."""

    def __init__(self, url: str, fs) -> None:
        self.url, self.fs = url, fs

    def files(self) -> set[str]:
        _, root = tables.storage.url_to_fs(self.url)
        if not self.fs.exists(root):
            return set()
        self.fs.invalidate_cache()
        return {p[len(root.rstrip("/")) + 1:] for p in self.fs.find(root)}

    def rows(self, table: str) -> list[dict]:
        drop = TIMING | (RUNS_VOLATILE if table == "runs" else {"run_date"})
        rows = [{k: v for k, v in r.items() if k not in drop} for r in tables.read_table(self.url, table).to_pylist()]
        for r in rows:
            if "parameters" in r:  # where the tables go differs between the two outputs
                r["parameters"] = {k: v for k, v in json.loads(r["parameters"]).items() if k != "out"}
        return sorted(rows, key=repr)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_sigkill_at_random_moments_then_a_rerun_gives_the_uninterrupted_tables(prefect_harness, tmp_path, where,
                                                                               request, tiny_checkpoint, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    from weakseg.tasks.segment.lease import LEASE_ENV, STALE_LEASES

    monkeypatch.setenv(LEASE_ENV, "0.2")  # a killed attempt's lease is stale (its model copy removable) in 1.2 s

    write_images(tmp_path / "corpus", 14, side=48)
    model = str(tmp_path / "model.pt")
    Path(model).write_bytes(tiny_checkpoint(CLASSES, 0))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    if where == "s3":
        s3 = request.getfixturevalue("s3")
        base = f"s3://weakseg-test/kill-{os.getpid()}"
        stores = {name: _Store(f"{base}/{name}", s3) for name in ("reference", "killed")}
        env.update({k: os.environ[k] for k in os.environ if k.startswith("AWS_")})
    else:
        from fsspec.implementations.local import LocalFileSystem

        stores = {name: _Store(str(tmp_path / name), LocalFileSystem()) for name in ("reference", "killed")}
    images = str(tmp_path / "corpus")

    t0 = time.monotonic()
    _flow(images, model, stores["reference"].url)
    work = time.monotonic() - t0  # a whole run's work, without the CLI's start

    rng = random.Random(379)  # the schedule: reproducible
    killed = stores["killed"]
    moments = []
    for _ in range(KILLS):
        leases = {f for f in killed.files() if f.startswith("_state/live-")}
        proc = _cli(images, model, killed.url, env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and not {f for f in killed.files() if f.startswith("_state/live-")} - leases:
            assert time.monotonic() < deadline, "the CLI did not start its run in 120 s"
            time.sleep(0.05)  # until the attempt's lease appears: it pins its model, its work begins
        delay = rng.uniform(0.0, 1.1) * work
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=delay)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and everything it started (its own session)
            moments.append(round(delay, 2))
        proc.wait()
    assert moments, "no run was killed"
    # The rerun, to the end, once the last killed attempt's lease is stale (6 periods of 0.2 s): a
    # rerun that finishes sooner cannot tell that attempt from a live one and keeps its model copy.
    time.sleep(STALE_LEASES * 0.2)
    _flow(images, model, killed.url)

    reference = stores["reference"]
    for table in ("images", "regions", "masks", "errors", "runs"):
        a, b = reference.rows(table), killed.rows(table)
        assert a == b, (table, moments, len(a), len(b))
    assert len(reference.rows("images")) == 14
    assert killed.files() == reference.files(), (moments, killed.files() ^ reference.files())


def test_a_rerun_removes_what_killed_attempts_left_behind(prefect_harness, tmp_path, tiny_checkpoint):
    """What a killed attempt can leave (a writer killed between its temporary file and the rename,
    an output probe, a skip-existing index, the model copy of a flow run the API knows as over or
    not at all) is gone after the rerun; another run's files stay."""
    import tempfile as tf

    write_images(tmp_path / "corpus", 4, side=48)
    model = str(tmp_path / "model.pt")
    Path(model).write_bytes(tiny_checkpoint(CLASSES, 0))
    out = tmp_path / "out"
    _flow(str(tmp_path / "corpus"), model, str(out))
    [partition] = (out / "images").iterdir()
    state = out / "_state"

    def left(folder: Path, name: str) -> Path:  # as weakseg._atomic.atomic_write names its temporary file
        fd, path = tf.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        return Path(path)

    stray = [left(partition, f"{RUN_ID}-000001.parquet"), left(out / "runs" / partition.name, f"{RUN_ID}.parquet"),
             left(state, f"model-{RUN_ID}-{'a' * 64}.pt"), state / f"probe-{RUN_ID}-0123456789ab",
             state / f"done-{RUN_ID}-0123456789ab.parquet", state / f"model-{RUN_ID}-{'b' * 32}-{'a' * 64}.pt"]
    others = [left(partition, "other-000001.parquet"), state / "probe-other-0123456789ab",
              state / f"model-{RUN_ID}-{'c' * 32}-{'a' * 64}.pt", state / f"live-{RUN_ID}-{'c' * 32}"]  # live
    for p in (*stray, *others):
        p.touch()
    _flow(str(tmp_path / "corpus"), model, str(out))
    assert [p for p in stray if p.exists()] == []
    assert all(p.exists() for p in others)


def test_a_missing_skip_index_reads_instead_of_failing(tmp_path):
    index = str(tmp_path / "_state" / "done-gone.parquet")
    assert tables.done_lookup(index, ["/x/a.jpg"]).hashes == {}
    assert tables.done_archive(index, "/x/s.tar", (1, "e", None)) == []
