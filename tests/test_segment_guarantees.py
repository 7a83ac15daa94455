"""What a reader of segment-corpus's tables relies on (README "Guarantees"), each on the real flow.

One model per run; one row per image per run whatever the URI's spelling; runs never touch
each other's files; a crash at any write point then a rerun on a later day leaves every
table consistent; inputs over --max-bytes are error rows, never read; no credential in any
output; failed runs say so and evaluate skips them.
"""
from __future__ import annotations

import hashlib
import http.server
import io
import os
import tarfile
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from samples import block_jpeg

from weakseg.tasks.images import DEFAULT_MAX_BYTES
from weakseg.tasks.segment import tables
from weakseg.tasks.segment.inputs import ChunkSpec, canonical_uri
from weakseg.tasks.segment.read import is_transient, read_chunk

CLASSES = ["background", "disk", "square"]
OTHER_CLASSES = ["background", "ant", "cat", "dog"]
SECRET = "s3cr3t-Kq7Vw"  # must never appear in any output


def write_images(folder: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"img{i:04d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(block_jpeg(rng, 40 + 4 * i))
    return names


@pytest.fixture(scope="module")
def models(tiny_checkpoint) -> dict[str, bytes]:
    return {"a": tiny_checkpoint(CLASSES, 0), "b": tiny_checkpoint(OTHER_CLASSES, 1)}


def run(images: str, model: str, out: str, **kw):
    from weakseg.flows.segment_corpus import segment_corpus

    params = {"max_side": 64, "chunk_size": 2, "batch_size": 2, "device": "cpu", "thumbnails": 0, "priors": "ilp",
              "workers": 1, **kw}
    return segment_corpus(images=images, model=model, out=out, return_state=True, **params)


def run_rows(out: str, table: str, run_id: str) -> list[dict]:
    return [r for r in tables.read_table(out, table).to_pylist() if r["run_id"] == run_id]


def assert_consistent(out: str, run_id: str, n_images: int, n_errors: int) -> None:
    """One partition; every image once, with its mask and regions; nothing of another image."""
    assert len({d for _, d, _ in tables.run_files(out, run_id)}) == 1
    keys = [r["image_key"] for r in run_rows(out, "images", run_id)]
    assert len(keys) == len(set(keys)) == n_images
    masks = [r["image_key"] for r in run_rows(out, "masks", run_id)]
    assert sorted(masks) == sorted(keys)
    assert {r["image_key"] for r in run_rows(out, "regions", run_id)} == set(keys)
    assert len(run_rows(out, "errors", run_id)) == n_errors
    assert len(run_rows(out, "runs", run_id)) == 1


# -- fast: the rules themselves ----------------------------------------------------------------


def test_canonical_uri_gives_one_spelling_per_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    same = ["a.jpg", "./a.jpg", f"{tmp_path}/a.jpg", f"file://{tmp_path}/a.jpg", f"{tmp_path}/x/../a.jpg"]
    assert {canonical_uri(u) for u in same} == {f"{tmp_path}/a.jpg"}
    assert canonical_uri("s3://b/k/./x//a.jpg") == "s3://b/k/x/a.jpg"
    assert canonical_uri("tar://m.jpg::shards/s.tar") == f"tar://m.jpg::file://{tmp_path}/shards/s.tar"


@pytest.mark.parametrize(("err", "transient"), [
    (PermissionError("An error occurred (ExpiredToken) when calling the GetObject operation: token expired"), True),
    (OSError("An error occurred (SlowDown) when calling the GetObject operation"), True),
    (PermissionError("An error occurred (AccessDenied) when calling the GetObject operation"), False),
    (FileNotFoundError("http://h/503.jpg"), False),
    (OSError("read failed for http://h/img-503.jpg"), False),
    (OSError("HTTP 503 Service Unavailable"), True),
])
def test_transient_errors_are_told_from_permanent_ones(err, transient):
    assert is_transient(err) is transient


def test_a_tar_member_over_max_bytes_is_an_error_record_never_read(tmp_path):
    url = tmp_path / "s.tar"
    with tarfile.open(url, "w") as tar:
        for name, size in (("big.jpg", 5000), ("small.jpg", 100)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"\0" * size))
    big, small = read_chunk(ChunkSpec(0, shard=str(url)), max_bytes=4096)
    assert big.data is None and big.error.kind == "TooLarge" and big.uri == f"tar://big.jpg::file://{url}"
    assert small.data == b"\0" * 100


def test_bad_run_ids_are_refused_before_any_work(tmp_path, capsys):
    from weakseg.flows.cli import main

    for bad in ("../x", "a/b", "-x", "a b", "x" * 200):
        with pytest.raises(SystemExit) as exit_info:
            main(["segment", "--images", str(tmp_path), "--model", "m.pt", "--out", str(tmp_path / "o"),
                  "--run-id", bad])
        assert exit_info.value.code == 2, bad
    assert "--run-id" in capsys.readouterr().err
    with pytest.raises(ValueError):
        tables.chunk_file(str(tmp_path), "images", "2024-01-01", "../x", 0)


# -- the flow ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_replacing_the_model_file_mid_run_changes_nothing(prefect_harness, tmp_path, models):
    write_images(tmp_path / "c", 6)
    model, out = tmp_path / "model.pt", tmp_path / "out"
    model.write_bytes(models["a"])
    swapped_at: list[float] = []
    done = threading.Event()

    def swap() -> None:  # as train-mil finishing during a nightly run: an atomic replace of the file
        while not list((out / "images").glob("run_date=*/*.parquet")):
            if done.wait(0.005):
                return
        (tmp_path / "new.pt").write_bytes(models["b"])
        os.replace(tmp_path / "new.pt", model)
        swapped_at.append(time.time())

    watcher = threading.Thread(target=swap, daemon=True)
    watcher.start()
    try:
        state = run(str(tmp_path / "c"), str(model), str(out), run_id="swap", chunk_size=1)
    finally:
        done.set()
        watcher.join()
    assert state.is_completed(), state.message
    written = sorted(p.stat().st_mtime for p in (out / "images").rglob("*.parquet"))
    assert swapped_at and swapped_at[0] < written[-2], "the model was replaced only after the last chunks"
    (run_row,) = run_rows(str(out), "runs", "swap")
    assert run_row["model_id"] == hashlib.sha256(models["a"]).hexdigest()[:16] and run_row["classes"] == CLASSES
    images = run_rows(str(out), "images", "swap")
    assert len(images) == 6 and {r["model_id"] for r in images} == {run_row["model_id"]}
    for r in run_rows(str(out), "masks", "swap"):
        assert np.asarray(Image.open(io.BytesIO(r["mask_png"]))).max() < len(CLASSES)
    assert not list((out / "_state").rglob("*.pt"))  # the run's pinned copy is gone with the run


@pytest.mark.slow
def test_one_row_per_image_whatever_the_spelling(prefect_harness, tmp_path, monkeypatch, models):
    corpus = tmp_path / "c"
    names = write_images(corpus, 3)
    (tmp_path / "model.pt").write_bytes(models["a"])
    a, b, c = names
    spellings = [a, f"./{b}", f"{corpus}/{a}", f"file://{corpus}/{c}", f"sub/../{b}", f"file://{corpus}/{a}", c, a]
    (corpus / "list.txt").write_text("\n".join(spellings) + "\n")
    monkeypatch.chdir(tmp_path)
    out = str(tmp_path / "it's out")  # a quote: every path reaches DuckDB as a bound parameter
    state = run("c/list.txt", "model.pt", out, run_id="spell")
    assert state.name == "Completed", state.message
    assert state.result()["counts"]["listed"] == 3
    assert sorted(r["image_uri"] for r in run_rows(out, "images", "spell")) == [f"{corpus}/{n}" for n in names]
    assert_consistent(out, "spell", 3, 0)
    # Another working directory, another spelling (a file:// folder): every image is recognised.
    monkeypatch.chdir(corpus)
    state = run(f"file://{corpus}", "../model.pt", out, run_id="again", skip_existing=True)
    assert state.is_completed(), state.message
    assert state.result()["counts"] == {"listed": 3, "ok": 0, "failed": 0, "skipped": 3, "chunks": 2,
                                        "chunks_failed": 0}


@pytest.mark.slow
def test_a_run_never_touches_files_of_a_run_whose_id_it_prefixes(prefect_harness, tmp_path, models):
    write_images(tmp_path / "c", 4)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "img.jpg").write_bytes((tmp_path / "c" / "img0000.jpg").read_bytes())
    (tmp_path / "model.pt").write_bytes(models["a"])
    out = str(tmp_path / "out")
    assert run(str(tmp_path / "c"), str(tmp_path / "model.pt"), out, run_id="test-retest", chunk_size=1).is_completed()
    before = sorted(p for _, _, p in tables.run_files(out, "test-retest"))
    assert len(before) == 4 * 3 + 1  # images, regions, masks per chunk; the runs row
    # "test" has one chunk: its stale-chunk cleanup must not take test-retest's chunks 1..3.
    assert run(str(tmp_path / "one"), str(tmp_path / "model.pt"), out, run_id="test").is_completed()
    assert sorted(p for _, _, p in tables.run_files(out, "test-retest")) == before
    assert_consistent(out, "test-retest", 4, 0)
    assert_consistent(out, "test", 1, 0)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["regions:0", "masks:0", "images:0", "regions:1", "runs"])
def test_a_crash_at_any_write_point_then_a_rerun_on_a_later_day_is_consistent(prefect_harness, tmp_path, monkeypatch,
                                                                             models, point):
    write_images(tmp_path / "c", 3)  # chunk 0: two images; chunk 1: one image and a corrupt file
    (tmp_path / "c" / "x_bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "model.pt").write_bytes(models["a"])
    out = tmp_path / "out"
    monkeypatch.setenv(tables.CRASH_ENV, point)
    with pytest.raises(tables.SimulatedCrash):
        run(str(tmp_path / "c"), str(tmp_path / "model.pt"), str(out), run_id="crash")
    monkeypatch.delenv(tables.CRASH_ENV)
    # The crash happened yesterday: its files lie where a run started then would have put them.
    yesterday = (date.today() - timedelta(days=1)).isoformat()
    for folder in out.glob("*/run_date=*"):
        folder.rename(folder.parent / f"run_date={yesterday}")
    state = run(str(tmp_path / "c"), str(tmp_path / "model.pt"), str(out), run_id="crash")
    assert state.name == "CompletedWithErrors", state.message
    assert_consistent(str(out), "crash", 3, 1)


@pytest.mark.slow
def test_an_input_over_max_bytes_is_an_error_row_never_read(prefect_harness, tmp_path, models):
    write_images(tmp_path / "c", 2)
    with open(tmp_path / "c" / "huge.jpg", "wb") as f:
        f.truncate(DEFAULT_MAX_BYTES + 1)  # sparse: costs no disk
    (tmp_path / "model.pt").write_bytes(models["a"])
    out = str(tmp_path / "out")
    state = run(str(tmp_path / "c"), str(tmp_path / "model.pt"), out, run_id="big")
    assert state.name == "CompletedWithErrors", state.message
    (err,) = run_rows(out, "errors", "big")
    assert (err["image_uri"], err["stage"], err["error_type"]) == (str(tmp_path / "c" / "huge.jpg"), "read", "TooLarge")
    assert len(run_rows(out, "images", "big")) == 2


class _Files(http.server.SimpleHTTPRequestHandler):
    """Serves a folder; ``flaky.jpg`` answers 503 to its first two requests (a busy server)."""

    flaky_left = 2

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        if self.path.startswith("/flaky.jpg") and type(self).flaky_left > 0:
            type(self).flaky_left -= 1
            self.send_error(503, "Service Unavailable")
            return
        super().do_GET()


@pytest.mark.slow
def test_no_secret_reaches_any_output_and_a_busy_server_retries_the_chunk(prefect_harness, tmp_path, models,
                                                                         monkeypatch, http_server, log_messages):
    from prefect.client.orchestration import get_client

    from weakseg.flows import segment_corpus as module

    root = tmp_path / "www"
    write_images(root, 2)
    (root / "flaky.jpg").write_bytes((root / "img0000.jpg").read_bytes())
    (root / "model.pt").write_bytes(models["a"])
    base = http_server(root, type("Files", (_Files,), {"flaky_left": 2}))
    (tmp_path / "list.txt").write_text("\n".join([
        f"{base.replace('http://', f'http://alice:{SECRET}@')}/img0000.jpg?token={SECRET}&w=1",
        f"{base}/img0001.jpg?X-Amz-Credential={SECRET}&X-Amz-Signature={SECRET}",
        f"{base}/missing.jpg?sig={SECRET}",
        f"{base}/flaky.jpg?access_token={SECRET}",
    ]) + "\n")
    monkeypatch.setattr(module.segment_chunk_task, "retry_delay_seconds", [0, 0])
    text = log_messages("", "prefect", "prefect.flow_runs", "prefect.task_runs", "weakseg")
    out = str(tmp_path / "out")
    state = run(str(tmp_path / "list.txt"), f"{base}/model.pt?token={SECRET}", out, run_id="secret",
                chunk_size=4, thumbnails=2)
    assert state.name == "CompletedWithErrors", state.message
    images = run_rows(out, "images", "secret")
    assert sorted(r["image_uri"] for r in images) == [f"{base}/flaky.jpg", f"{base}/img0000.jpg?w=1",
                                                       f"{base}/img0001.jpg"]
    assert [(r["image_uri"], r["error_type"]) for r in run_rows(out, "errors", "secret")] == \
        [(f"{base}/missing.jpg", "FileNotFoundError")]
    shown = [str(state.message), str(state.result()), "\n".join(text)]
    for table in ("images", "regions", "masks", "errors", "runs"):
        shown.append(str(tables.read_table(out, table).to_pylist()))
    shown += [p.read_bytes().decode("latin-1") for p in Path(out).rglob("*") if p.is_file()]
    with get_client(sync_client=True) as client:
        shown += [f"{a.key} {a.description} {a.data}" for a in client.read_artifacts()]
    assert text and all(SECRET not in t for t in shown)


@pytest.mark.slow
def test_failed_runs_say_so_and_evaluate_skips_them(prefect_harness, tmp_path, models, tiny_checkpoint):
    from weakseg.flows.cli import main
    from weakseg.tasks import storage

    names = write_images(tmp_path / "good", 2)
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"x{i}.jpg").write_bytes(b"corrupt" * i)
    (tmp_path / "model.pt").write_bytes(models["a"])
    (tmp_path / "nan.pt").write_bytes(tiny_checkpoint(CLASSES, 0, nan=True))
    out = str(tmp_path / "out")
    common = ["--model", str(tmp_path / "model.pt"), "--out", out, "--device", "cpu", "--priors", "ilp",
              "--max-side", "64", "--thumbnails", "0"]
    assert main(["segment", "--images", str(tmp_path / "good"), "--run-id", "good", *common]) == 0
    assert main(["segment", "--images", str(tmp_path / "bad"), "--run-id", "bad", *common]) == 1  # all inputs failed
    assert [r["state"] for r in run_rows(out, "runs", "bad")] == ["Failed"]
    # A model whose outputs are NaN cannot serve: the run fails before any chunk.
    state = run(str(tmp_path / "good"), str(tmp_path / "nan.pt"), out, run_id="nan")
    assert state.is_failed() and "cannot serve" in state.message
    # evaluate: the latest run failed, so the default is the latest one that did not.
    gt = tmp_path / "gt"
    for name in names:
        w, h = Image.open(tmp_path / "good" / name).size
        storage.write_bytes(str(gt / "SegmentationClass" / name.replace(".jpg", ".png")),
                            _png(np.zeros((h, w), np.uint8)))
    (gt / "ImageSets" / "Segmentation").mkdir(parents=True)
    (gt / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(n[:-4] for n in names) + "\n")
    (gt / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    assert main(["evaluate", "--predictions", out, "--ground-truth", str(gt), "--out", str(tmp_path / "ev")]) == 0
    assert storage.read_json(str(tmp_path / "ev" / "metrics.json"))["run_id"] == "good"
    assert main(["evaluate", "--predictions", out, "--ground-truth", str(gt), "--out", str(tmp_path / "ev2"),
                 "--include-failed"]) == 1  # the failed run has no mask to score


def _png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG")
    return buf.getvalue()
