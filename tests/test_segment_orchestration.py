"""segment-corpus beyond one process: Dask worker processes, a killed run, concurrent writers."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from weakseg.models import ModelConfig, checkpoint_bytes, create_model
from weakseg.tasks.segment import tables

pytestmark = pytest.mark.slow

CLASSES = ["background", "disk", "square"]
TIMING = {"inference_ms", "prior_ms", "processed_at", "occurred_at"}  # differ between runs by nature


def write_images(folder: Path, n: int, side: int = 64, seed: int = 0) -> list[str]:
    """``n`` small JPEGs of random blobs (sizes vary so batches pad)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        h, w = side + int(rng.integers(0, side // 2)), side + int(rng.integers(0, side // 2))
        arr = np.full((h, w, 3), rng.integers(0, 256, 3), dtype=np.uint8)
        y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        arr[y:y + h // 3, x:x + w // 3] = rng.integers(0, 256, 3)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        name = f"img{i:04d}.jpg"
        (folder / name).write_bytes(buf.getvalue())
        names.append(name)
    return names


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    torch.manual_seed(0)
    config = ModelConfig(num_classes=len(CLASSES), head_widths=(16, 16, 16), output_stride=16)
    model, config = create_model(config, pretrained="none")
    path = tmp_path_factory.mktemp("model") / "model.pt"
    path.write_bytes(checkpoint_bytes(model, config, CLASSES, input_size=96))
    return str(path)


def run(images: str, model: str, out: str, **kw):
    from weakseg.flows.segment_corpus import segment_corpus

    params = {"max_side": 128, "chunk_size": 4, "batch_size": 4, "device": "cpu", "thumbnails": 0,
              "priors": "ilp,sppxl", **kw}
    return segment_corpus(images=images, model=model, out=out, return_state=True, **params)


def rows(out: str, table: str, run_id: str) -> list[dict]:
    """A run's rows without timing columns, in a stable order."""
    t = tables.read_table(out, table).to_pylist()
    picked = [{k: v for k, v in r.items() if k not in TIMING and k != "run_date"} for r in t if r["run_id"] == run_id]
    return sorted(picked, key=lambda r: (r["image_key"], r.get("class_index", 0)))


def assert_same(a, b, where: str) -> None:
    """Equal, floats to 1e-5 relative: a Dask worker runs torch on one thread, which may sum in another order."""
    if isinstance(a, float) and isinstance(b, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-7), where
    elif isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_one_row_per_image(out: str, run_id: str, n: int) -> None:
    for table in ("images", "masks"):
        keys = [r["image_key"] for r in rows(out, table, run_id)]
        assert len(keys) == n and len(set(keys)) == n, (table, len(keys), len(set(keys)))
    image_keys = {r["image_key"] for r in rows(out, "images", run_id)}
    region_keys = {r["image_key"] for r in rows(out, "regions", run_id)}
    assert region_keys == image_keys


def test_dask_worker_processes_write_the_rows_of_the_thread_runner(prefect_harness, tmp_path, model_path):
    images = str(tmp_path / "corpus")
    write_images(tmp_path / "corpus", 22)  # 6 chunks, the last one short
    threads = run(images, model_path, str(tmp_path / "threads"), run_id="same", workers=2)
    dask = run(images, model_path, str(tmp_path / "dask"), run_id="same", task_runner="dask", workers=2)
    assert threads.is_completed() and dask.is_completed(), (threads.message, dask.message)
    summary = dask.result()
    assert summary["counts"]["ok"] == 22 and summary["counts"]["chunks"] == 6
    timing = summary["timing"]
    assert timing["workers"] and all(w.rsplit(":", 1)[1] != str(os.getpid()) for w in timing["workers"])
    # The model is read once per worker process, then served from that process's cache.
    assert timing["model_loads"] == len(timing["workers"]), timing
    for table in ("images", "regions", "masks"):
        a, b = rows(str(tmp_path / "threads"), table, "same"), rows(str(tmp_path / "dask"), table, "same")
        assert len(a) == len(b) > 0, table
        assert_same(a, b, table)


def test_a_killed_run_rerun_with_its_run_id_has_every_image_once(prefect_harness, tmp_path, model_path):
    from prefect.settings import PREFECT_API_URL

    n = 48
    write_images(tmp_path / "corpus", n, side=160)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "weakseg.flows.cli", "segment", "--images", str(tmp_path / "corpus"),
            "--model", model_path, "--out", str(out), "--run-id", "killed", "--chunk-size", "2", "--workers", "1",
            "--batch-size", "2", "--device", "cpu", "--priors", "ilp,sppxl", "--max-side", "160",
            "--thumbnails", "0"]
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    first = out / "images"
    deadline = time.monotonic() + 90
    try:
        while not list(first.rglob("killed-000000.parquet")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no chunk written in 90 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the CLI and anything it started (its own session)
        proc.wait()
    written = len(list(first.rglob("killed-*.parquet")))
    assert 1 <= written < n // 2, written  # killed mid-run
    assert not (out / "runs").exists()

    state = run(str(tmp_path / "corpus"), model_path, str(out), run_id="killed", chunk_size=2, workers=1,
                batch_size=2, max_side=160)
    assert state.is_completed(), state.message
    assert state.result()["counts"] == {"listed": n, "ok": n, "failed": 0, "skipped": 0, "chunks": n // 2,
                                        "chunks_failed": 0}
    assert_one_row_per_image(str(out), "killed", n)
    for path in out.rglob("*.parquet"):
        pq.read_table(path)  # every file whole (temp files of the killed writer are hidden: .name.tmp)
    assert len(tables.read_table(str(out), "runs").to_pylist()) == 1


def test_concurrent_runs_on_one_output_do_not_corrupt_each_other(prefect_harness, tmp_path, model_path):
    n = 20
    write_images(tmp_path / "corpus", n)
    out = str(tmp_path / "out")
    states: dict[str, object] = {}

    def go(name: str, run_id: str) -> None:
        states[name] = run(str(tmp_path / "corpus"), model_path, out, run_id=run_id, chunk_size=2, workers=2)

    threads = [threading.Thread(target=go, args=(name, run_id))
               for name, run_id in (("a", "run-a"), ("b", "run-b"), ("c1", "shared"), ("c2", "shared"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert set(states) == {"a", "b", "c1", "c2"}
    for name, state in states.items():
        assert state.is_completed(), (name, state.message)
    for path in Path(out).rglob("*.parquet"):
        pq.read_table(path)
    assert not [p for p in Path(out).rglob("*") if p.name.endswith(".tmp")]
    for run_id in ("run-a", "run-b", "shared"):
        assert_one_row_per_image(out, run_id, n)
    runs = [r["run_id"] for r in tables.read_table(out, "runs").to_pylist()]
    assert sorted(runs) == ["run-a", "run-b", "shared"]
    assert not list((Path(out) / "_state").glob("*"))  # probes and skip indexes cleaned up


def _restrictions_plugin():
    """A scheduler plugin that records each submitted task's resource restrictions (in-process cluster)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    class Restrictions(SchedulerPlugin):
        name = "weakseg-test-restrictions"

        def __init__(self) -> None:
            self.seen: list[dict] = []

        def update_graph(self, scheduler, *, keys, **kwargs) -> None:
            for key in keys:
                ts = scheduler.tasks.get(key)
                if ts is not None:
                    self.seen.append(dict(ts.resource_restrictions or {}))

    return Restrictions()


def test_cuda_chunks_ask_dask_for_a_gpu_and_fail_fast_without_one(prefect_harness, tmp_path, model_path,
                                                                 monkeypatch):
    from distributed import LocalCluster

    from weakseg.tasks.segment import model

    images = str(tmp_path / "corpus")
    write_images(tmp_path / "corpus", 6)
    kw = {"device": "cuda", "task_runner": "dask", "chunk_size": 3, "priors": "ilp"}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None, protocol="tcp",
                      host="127.0.0.1") as cpu_only:
        state = run(images, model_path, str(tmp_path / "none"), dask_address=cpu_only.scheduler_address, **kw)
    assert state.is_failed() and "--resources GPU=1" in state.message, state.message
    assert not (tmp_path / "none" / "images").exists()

    # Workers in this process, so "cuda" can be mapped to the CPU here: the restriction is what is checked.
    real = model.resolve_device
    monkeypatch.setattr(model, "resolve_device", lambda d: real("cpu") if d == "cuda" else real(d))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None, protocol="tcp",
                      host="127.0.0.1", resources={"GPU": 1}) as gpu:
        plugin = _restrictions_plugin()
        gpu.scheduler.add_plugin(plugin)
        state = run(images, model_path, str(tmp_path / "gpu"), dask_address=gpu.scheduler_address, **kw)
    assert state.is_completed(), state.message
    assert state.result()["counts"]["ok"] == 6
    assert plugin.seen and all(r == {"GPU": 1} for r in plugin.seen), plugin.seen


def _dask_worker_pids() -> list[int]:
    """This process's spawned children that are Dask worker processes (the nannies live here)."""
    import psutil

    pids = []
    for child in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if "spawn_main" in cmd:
            pids.append(child.pid)
    return pids


def test_a_killed_dask_worker_process_loses_no_image(prefect_harness, tmp_path, model_path):
    n = 40
    write_images(tmp_path / "corpus", n, side=160)
    out = tmp_path / "out"
    box: dict[str, object] = {}

    def go() -> None:
        box["state"] = run(str(tmp_path / "corpus"), model_path, str(out), run_id="dk", chunk_size=2, batch_size=2,
                           max_side=160, task_runner="dask", workers=2)

    thread = threading.Thread(target=go)
    thread.start()
    deadline = time.monotonic() + 120
    killed = None
    while thread.is_alive() and time.monotonic() < deadline:
        if list((out / "images").rglob("dk-000000.parquet")) and (pids := _dask_worker_pids()):
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.05)
    thread.join(timeout=240)
    assert killed is not None, "no worker process to kill"
    # The nanny restarts the worker and the scheduler gives its chunk to a live one (the chunk's
    # files have fixed names, so a half-done attempt is simply redone): the run completes as is.
    state = box["state"]
    assert state.is_completed(), state.message
    assert state.result()["counts"]["ok"] == n and state.result()["counts"]["chunks_failed"] == 0
    assert_one_row_per_image(str(out), "dk", n)


def test_two_live_runs_with_one_run_id_never_remove_each_others_model_copy(prefect_harness, tmp_path, model_path):
    """A retried deployment run overlapping its predecessor: the first run has pinned its model and waits
    for a Dask worker while the second, with the same run id, runs to the end. The first run's worker
    then loads its pinned copy: still there, both runs finish."""
    from distributed import LocalCluster

    images, out = str(tmp_path / "corpus"), tmp_path / "out"
    write_images(tmp_path / "corpus", 4)
    with LocalCluster(n_workers=0, threads_per_worker=1, processes=True, dashboard_address=None,
                      host="127.0.0.1") as cluster:
        first: dict = {}
        waiting = threading.Thread(target=lambda: first.update(state=run(
            images, model_path, str(out), run_id="retried", priors="ilp", task_runner="dask",
            dask_address=cluster.scheduler_address)))
        waiting.start()
        deadline = time.monotonic() + 120
        while not list((out / "_state").glob("model-retried-*.pt")):
            assert time.monotonic() < deadline and waiting.is_alive(), first
            time.sleep(0.2)
        second = run(images, model_path, str(out), run_id="retried", priors="ilp")  # threads, in this process
        assert second.is_completed(), second.message
        cluster.scale(1)  # a worker process: it reads the first run's pinned copy from storage
        waiting.join(timeout=300)
    assert first["state"].is_completed(), first["state"].message
    assert first["state"].result()["counts"]["ok"] == 4
    assert not list((out / "_state").glob("*.pt"))  # each run removed its own copy
