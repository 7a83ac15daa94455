"""The pipelined chunk engine: same tables as the inline engine, one error policy, bounded queues, stage times."""
from __future__ import annotations

import io
from concurrent.futures import Future

import numpy as np
import pytest
import torch
from PIL import Image

from weakseg.tasks.segment import batching, chunk, decode, device, hostpool, queues, state, tables
from weakseg.tasks.segment.chunk import STAGES, SegmentOptions, host_workers, segment_chunk
from weakseg.tasks.segment.inference import load_model
from weakseg.tasks.segment.inputs import iter_chunks

CLASSES = ["background", "disk", "square"]
SIZES = [(80, 112), (112, 80), (80, 112), (96, 96), (80, 112), (112, 80), (96, 96)]  # three forward sizes


def _corpus(folder, sizes=SIZES, bad=True, black=()) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        buf = io.BytesIO()
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels * 0 if i in black else pixels).save(buf, "JPEG")
        (folder / f"{i:02d}.jpg").write_bytes(buf.getvalue())
    if bad:
        (folder / "bad.jpg").write_bytes(b"not an image")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_checkpoint):
    path = tmp_path_factory.mktemp("pipe") / "model.pt"
    path.write_bytes(tiny_checkpoint(CLASSES, 0))
    return load_model(str(path), "cpu")


def _segment(folder, out, bundle, workers, priors=("ilp", "sppxl"), chunk_size=100, batch_size=2, run_id="t"):
    opts = SegmentOptions(out=str(out), run_id=run_id, run_date="2026-01-01", model="unused", priors=priors,
                          batch_size=batch_size, host_workers=workers, thumbnails=2)
    return [segment_chunk(spec, opts, bundle) for spec in iter_chunks(str(folder), chunk_size)]


def _rows(out, table, drop=()):
    rows = tables.read_table(str(out), table).to_pylist()
    for r in rows:
        for k in drop:
            r.pop(k, None)
    return sorted(rows, key=lambda r: (r.get("image_key") or r.get("image_uri"), r.get("class_index") or 0))


def test_pipelined_engine_writes_what_the_inline_engine_writes(tmp_path, bundle):
    _corpus(tmp_path / "c")
    for priors in (("ilp", "sppxl"), ("ilp", "sppxl", "seg")):
        inline = _segment(tmp_path / "c", tmp_path / f"a{len(priors)}", bundle, 0, priors)
        piped = _segment(tmp_path / "c", tmp_path / f"b{len(priors)}", bundle, 3, priors)
        assert [(r.ok, r.failed) for r in inline] == [(r.ok, r.failed) for r in piped] == [(7, 1)]
        timing = ("inference_ms", "prior_ms", "processed_at")
        for table in ("images", "regions", "masks"):
            a = _rows(tmp_path / f"a{len(priors)}", table, timing)
            assert a == _rows(tmp_path / f"b{len(priors)}", table, timing), table
        errs = [_rows(tmp_path / f"{k}{len(priors)}", "errors", ("occurred_at",)) for k in "ab"]
        assert errs[0] == errs[1] and errs[0][0]["stage"] == "decode"
        assert len(piped[0].thumbnails) == 2


def test_batches_are_bucketed_by_forward_size(tmp_path, bundle, monkeypatch):
    _corpus(tmp_path / "c", bad=False)
    sizes: list[list[tuple[int, int]]] = []
    original = device.predict

    def spy(b, images, *args, **kwargs):
        sizes.append([im.shape[:2] for im in images])
        return original(b, images, *args, **kwargs)

    monkeypatch.setattr(device, "predict", spy)
    (r,) = _segment(tmp_path / "c", tmp_path / "out", bundle, 2, ("ilp",), batch_size=3)
    assert r.ok == len(SIZES)
    assert all(len(set(batch)) == 1 for batch in sizes)  # one forward size per batch: nothing padded between sizes
    assert [len(b) for b in sizes].count(3) == 1 and sum(len(b) for b in sizes) == len(SIZES)


def test_buckets_hold_a_bounded_number_of_images():
    items = [(i, s) for i, s in enumerate("abcabdeafgha" * 5)]
    held, most = 0, 0

    def counted():
        nonlocal held, most
        for it in items:
            held += 1
            most = max(most, held)
            yield it

    out = []
    for batch in batching.buckets(counted(), key=lambda it: it[1], size=3, hold=4):
        held -= len(batch)
        assert len({k for _, k in batch}) == 1 and len(batch) <= 3
        out.extend(batch)
    assert sorted(out) == sorted(items) and most <= 5  # hold + the one just read


def test_buckets_weigh_large_images_by_their_pixels():
    """A photo of many pixels counts as several in the hold, so the pixels waiting stay bounded:
    one over the whole hold leaves (with its bucket) before the next image is read."""
    assert batching.hold_weight(375, 500) == batching.hold_weight(10, 10) == 1
    assert batching.hold_weight(3000, 4000) == 64
    items = [(0, "a", 1), (1, "a", 1), (2, "b", 9), (3, "c", 1), (4, "a", 1), (5, "c", 1), (6, "d", 3), (7, "a", 1)]
    read, held, most = [], 0, 0

    def counted():
        nonlocal held, most
        for it in items:
            assert held <= 4  # within the hold whenever the next image is read
            read.append(it[0])
            held += it[2]
            most = max(most, held)
            yield it

    out = []
    for batch in batching.buckets(counted(), key=lambda it: it[1], size=3, hold=4, weight=lambda it: it[2]):
        held -= sum(w for *_, w in batch)
        if any(i == 2 for i, *_ in batch):
            assert read[-1] == 2  # the heavy one went before image 3 was read
        out.extend(batch)
    assert sorted(out) == sorted(items) and most <= 4 + 9


def test_buckets_hold_deeper_on_an_accelerator():
    """The CPU's throughput hardly depends on the batch; an accelerator's does, so more images wait."""
    assert batching.bucket_hold(64, torch.device("cpu")) == 128
    assert batching.bucket_hold(64, torch.device("cuda")) == batching.bucket_hold(64, torch.device("mps")) == 512


class _CountingPool:
    """Runs jobs at once (inline) but counts how many were submitted and not yet asked for."""

    workers, restarts, kind, spool = 2, 0, "inline", None

    def __init__(self):
        self.outstanding, self.most = 0, 0

    def take_slot(self):
        return None

    def give_slot(self, slot):
        pass

    def pack(self, arrays):
        return dict(arrays)

    def unpack(self, packed):
        return dict(packed)

    def release(self, packed):
        pass

    def submit(self, fn, *args):
        f = Future()
        f.set_result(fn(*args))
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)
        orig = f.result

        def result(timeout=None):
            self.outstanding -= 1
            return orig(timeout)

        f.result = result
        return f


def _feed(tmp_path, bundle, sizes, batch_size=2):
    """The decode stage of one chunk of ``sizes`` photos over a counting pool: (items, pool, ahead)."""
    _corpus(tmp_path / "c", sizes=sizes, bad=False)
    (spec,) = list(iter_chunks(str(tmp_path / "c"), 100))
    opts = SegmentOptions(out=str(tmp_path / "o"), run_id="t", run_date="2026-01-01", model="x", batch_size=batch_size)
    result, pool = chunk.ChunkResult(0), _CountingPool()
    run = state.ChunkState(spec, opts, bundle, pool, result, state.Clock(result.stage_seconds))
    popts = decode.PrepareOptions(opts.max_bytes, opts.max_pixels, opts.priors, 16, opts.max_side, 0)
    feed = queues.Feed(run, popts, device.DeviceStage(bundle, opts, {}))
    return list(feed.items(queues.jobs(run, spec, tables.Done()))), pool, run.ahead


def test_decoding_runs_a_bounded_number_of_inputs_ahead(tmp_path, bundle):
    items, pool, ahead = _feed(tmp_path, bundle, [(32, 32)] * 30)
    assert len(items) == 30 and ahead == 10 and pool.most <= ahead + 1


def test_decoding_ahead_is_bounded_in_pixels(tmp_path, bundle):
    """Photos of many pixels are decoded fewer at a time: a 1000x1500 photo weighs 8 of 500x375."""
    items, pool, ahead = _feed(tmp_path, bundle, [(1000, 1500)] * 6)
    assert len(items) == 6 and batching.hold_weight(1000, 1500) == 8
    assert pool.most <= max(pool.workers, ahead // 8) + 1


def test_one_error_policy_in_every_stage(tmp_path, bundle, monkeypatch):
    """A failing image is an errors row at its stage; the rest of its batch is segmented. The host
    stage's failure is injected inline (a monkeypatch does not reach worker processes); the
    device's with worker processes too."""
    _corpus(tmp_path / "c", sizes=[(48, 64)] * 6, black=(1,))
    real_inputs, real_label = decode.compute_prior_inputs, device.label_batch

    def inputs(rgb, priors):
        if rgb.max() < 8:  # image 01, all black
            raise RuntimeError("superpixels exploded")
        return real_inputs(rgb, priors)

    def label(preds, ins, *args, **kwargs):
        if any(p.size == (48, 64) and float(p.image_probs.sum()) == poisoned[0] for p in preds):
            raise RuntimeError("device fault")
        return real_label(preds, ins, *args, **kwargs)

    real_forward = device.DeviceStage.forward
    poisoned = [None]

    def forward(self, images):
        preds = real_forward(self, images)
        for img, p in zip(images, preds, strict=True):
            if float(np.asarray(img.at(img.size)).mean()) == poisoned_mean[0]:
                poisoned[0] = float(p.image_probs.sum()) + 1.0  # a mark on image 03's prediction
                p.image_probs = p.image_probs + 1.0 / len(p.image_probs)
        return preds

    rgb03 = np.asarray(Image.open(tmp_path / "c" / "03.jpg").convert("RGB"))
    poisoned_mean = [float(rgb03.mean())]
    monkeypatch.setattr(decode, "compute_prior_inputs", inputs)
    monkeypatch.setattr(device, "label_batch", label)
    monkeypatch.setattr(device.DeviceStage, "forward", forward)
    for workers in (0, 2):
        (r,) = _segment(tmp_path / "c", tmp_path / f"o{workers}", bundle, workers, batch_size=3, run_id=f"w{workers}")
        errors = {e["image_uri"].rsplit("/", 1)[1]: e for e in tables.read_table(str(tmp_path / f"o{workers}"),
                                                                                 "errors").to_pylist()}
        assert errors["bad.jpg"]["stage"] == "decode"
        assert errors["03.jpg"]["stage"] == "priors" and "device fault" in errors["03.jpg"]["message"]
        if workers == 0:
            assert (r.ok, r.failed) == (4, 3)
            assert errors["01.jpg"]["stage"] == "priors" and "exploded" in errors["01.jpg"]["message"]
        else:
            assert (r.ok, r.failed) == (5, 2)
        assert len(tables.read_table(str(tmp_path / f"o{workers}"), "images")) == r.ok


def test_a_failed_forward_is_errors_rows_for_its_batch_only(tmp_path, bundle, monkeypatch):
    """A batch whose forward pass fails (out of device memory) runs again image by image: only an
    image that fails alone is an errors row."""
    _corpus(tmp_path / "c", sizes=[(48, 64), (48, 64), (40, 40)], bad=False)
    original = device.predict

    def predict(b, images, *args, **kwargs):
        if images[0].shape[:2] == (40, 40) or len(images) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return original(b, images, *args, **kwargs)

    monkeypatch.setattr(device, "predict", predict)
    (r,) = _segment(tmp_path / "c", tmp_path / "o", bundle, 2)
    assert (r.ok, r.failed) == (2, 1)
    (err,) = tables.read_table(str(tmp_path / "o"), "errors").to_pylist()
    assert err["stage"] == "inference" and err["image_uri"].endswith("02.jpg") and "out of memory" in err["message"]
    assert len(tables.read_table(str(tmp_path / "o"), "images")) == 2


def _spool_files() -> list[str]:
    """Files left in this process's pools' spools, and shared-memory slots not given back."""
    pools = [p for (pid, _), p in hostpool._POOLS.items() if pid == __import__("os").getpid() and p.spool]
    taken = [f"slot {p.slots.count - p.slots.free()} of {p.slots.count} taken" for p in pools
             if p.slots is not None and p.slots.free() != p.slots.count]
    return [f for p in pools for f in __import__("os").listdir(p.spool) if f != "slots"] + taken


def test_a_worker_killed_mid_chunk_loses_and_repeats_nothing(tmp_path, bundle):
    """SIGKILL to a host worker while a chunk runs: the pool is replaced, the jobs it held run again
    one input each, and every image is segmented exactly once; nothing stays in the spool."""
    import os
    import signal
    import threading

    _corpus(tmp_path / "c", sizes=[(64, 80)] * 40, bad=False)
    pool = hostpool.host_pool(2)
    (spec,) = list(iter_chunks(str(tmp_path / "c"), 100))
    opts = SegmentOptions(out=str(tmp_path / "o"), run_id="k", run_date="2026-01-01", model="unused",
                          priors=("ilp", "sppxl"), batch_size=4, host_workers=2)
    restarts = pool.restarts
    done: list = []
    runner = threading.Thread(target=lambda: done.append(segment_chunk(spec, opts, bundle)))
    runner.start()
    victims = []
    while not victims and runner.is_alive():
        victims = list(getattr(pool._executor, "_processes", {}) or {})
    if victims:
        os.kill(victims[0], signal.SIGKILL)
    runner.join(300)
    (r,) = done
    assert pool.restarts == restarts + 1
    images = tables.read_table(str(tmp_path / "o"), "images").to_pylist()
    assert (r.ok, r.failed) == (40, 0) and len(images) == 40 == len({i["image_uri"] for i in images})
    assert _spool_files() == []


def test_an_input_that_kills_its_worker_is_an_errors_row(tmp_path, bundle):
    """An input whose decoding kills the worker process every time (conftest names it to the fault
    injection of decode.CRASH_ENV) is an errors row WorkerCrashed; the rest of the chunk is segmented."""
    _corpus(tmp_path / "c", sizes=[(48, 64)] * 5, bad=False)
    (tmp_path / "c" / "02.jpg").rename(tmp_path / "c" / decode_crash_name())
    (r,) = _segment(tmp_path / "c", tmp_path / "o", bundle, 2, batch_size=2)
    (err,) = tables.read_table(str(tmp_path / "o"), "errors").to_pylist()
    assert (r.ok, r.failed) == (4, 1) and err["error_type"] == "WorkerCrashed" and err["stage"] == "decode"
    assert err["image_uri"].endswith(decode_crash_name())
    assert len(tables.read_table(str(tmp_path / "o"), "images")) == 4 and _spool_files() == []


def decode_crash_name() -> str:
    import os

    return os.environ[decode.CRASH_ENV]


def test_stage_times_with_a_pool(tmp_path, bundle):
    _corpus(tmp_path / "c")
    workers = 2
    for r in _segment(tmp_path / "c", tmp_path / "o", bundle, workers, chunk_size=4):
        assert set(r.stage_seconds) == set(STAGES)
        assert r.stage_seconds["forward"] == pytest.approx(r.forward_seconds, abs=1e-3)
        assert r.forward_seconds < r.seconds
        for stage in ("read", "decode", "forward", "postprocess", "priors", "encode", "write"):
            assert 0 < r.stage_seconds[stage] <= r.seconds * (workers + 1), stage  # busy seconds over the threads


def test_host_workers(monkeypatch):
    monkeypatch.delenv(hostpool.HOST_WORKERS_ENV, raising=False)
    cores = len(__import__("os").sched_getaffinity(0))
    assert host_workers(3, torch.device("cpu")) == 3
    assert host_workers(None, torch.device("cuda")) == max(1, cores - 1)  # one core feeds the device
    assert host_workers(None, torch.device("cpu")) == 0  # the forward pass keeps the cores busy: inline
    monkeypatch.setenv(hostpool.HOST_WORKERS_ENV, "5")
    assert host_workers(None, torch.device("cpu")) == 5
    with pytest.raises(ValueError):
        host_workers(-1, torch.device("cpu"))
