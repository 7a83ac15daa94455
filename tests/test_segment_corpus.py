"""segment-corpus end to end on a generated corpus with bad files of every kind (local and memory://)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from weakseg.tasks import storage
from weakseg.tasks.segment import tables

pytestmark = pytest.mark.slow

CLASSES = ["background", "disk", "square", "stripes"]
GOOD = ["a_rgb.jpg", "b_large.jpg", "c_gray.png", "d_rgba.png", "e_cmyk.jpg", "f_16bit.png", "g_exif.jpg",
        "h_tiny.png", "i_palette.gif"]
BAD = {  # name -> (stage, error_type)
    "x_empty.jpg": ("decode", "EmptyFile"),
    "x_truncated.jpg": ("decode", "CorruptImage"),
    "x_corrupt.png": ("decode", "CorruptImage"),
    "x_notimage.png": ("decode", "NotAnImage"),
    "x_huge.png": ("decode", "TooManyPixels"),
}
MAX_PIXELS = 300_000


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def corpus_files(seed: int = 0) -> dict[str, tuple[bytes, tuple[int, int] | None]]:
    """name -> (bytes, displayed (width, height) for good images)."""
    rng = np.random.default_rng(seed)

    def rgb(h, w):
        return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)

    files: dict[str, tuple[bytes, tuple[int, int] | None]] = {}
    files["a_rgb.jpg"] = (_jpeg(rgb(90, 120)), (120, 90))
    files["b_large.jpg"] = (_jpeg(rgb(400, 600)), (600, 400))  # over max_side: shrunk for the forward pass
    files["c_gray.png"] = (_png(Image.fromarray(rgb(50, 70)[..., 0], "L")), (70, 50))
    files["d_rgba.png"] = (_png(Image.fromarray(rng.integers(0, 256, (64, 48, 4), dtype=np.uint8), "RGBA")), (48, 64))
    buf = io.BytesIO()
    Image.fromarray(rgb(60, 80)).convert("CMYK").save(buf, format="JPEG")
    files["e_cmyk.jpg"] = (buf.getvalue(), (80, 60))
    files["f_16bit.png"] = (_png(Image.fromarray(rng.integers(0, 65535, (40, 52), dtype=np.uint16))), (52, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 100 wide x 60 high, displayed 60 x 100
    files["g_exif.jpg"] = (_jpeg(rgb(60, 100), exif=exif.tobytes()), (60, 100))
    files["h_tiny.png"] = (_png(Image.fromarray(rgb(3, 5))), (5, 3))
    files["i_palette.gif"] = (_png(Image.fromarray(rgb(30, 30)).convert("P")), (30, 30))
    good = files["a_rgb.jpg"][0]
    files["x_empty.jpg"] = (b"", None)
    files["x_truncated.jpg"] = (good[: len(good) // 2], None)
    png = bytearray(_png(Image.fromarray(rgb(40, 40))))
    idat = png.index(b"IDAT") + 8
    png[idat:idat + 64] = bytes(rng.integers(0, 256, 64, dtype=np.uint8))  # damaged pixel data
    files["x_corrupt.png"] = (bytes(png), None)
    files["x_notimage.png"] = (b"this is not an image\n" * 10, None)
    files["x_huge.png"] = (_png(Image.new("L", (800, 800))), None)
    return files


def write_corpus(root: str, files) -> None:
    for name, (data, _) in files.items():
        storage.write_bytes(storage.join(root, name), data)


@pytest.fixture(scope="module")
def model_bytes(tiny_checkpoint) -> bytes:
    return tiny_checkpoint(CLASSES, 0, head_widths=(32, 32, 32), input_size=128)


def run(images, model, out, **kw):
    from weakseg.flows.segment_corpus import segment_corpus

    params = {"max_side": 256, "max_pixels": MAX_PIXELS, "chunk_size": 4, "batch_size": 3, "device": "cpu",
              "thumbnails": 2, **kw}
    return segment_corpus(images=images, model=model, out=out, return_state=True, **params)


def check_tables(out: str, run_id: str, files, expected_good: set[str]) -> dict[str, pa.Table]:
    t = {name: tables.read_table(out, name) for name in ("images", "regions", "masks", "errors", "runs")}
    for name, table in t.items():
        for field in tables.SCHEMAS[name]:
            assert table.schema.field(field.name).type == field.type, (name, field.name)
        assert "run_date" in table.schema.names
    images = [r for r in t["images"].to_pylist() if r["run_id"] == run_id]
    names = {r["image_uri"].rsplit("/", 1)[-1] for r in images}
    assert names == expected_good
    keys = [r["image_key"] for r in images]
    assert len(keys) == len(set(keys))  # no image twice for a run_id
    masks = {r["image_key"]: r for r in t["masks"].to_pylist() if r["run_id"] == run_id}
    assert set(masks) == set(keys)
    for r in images:
        name = r["image_uri"].rsplit("/", 1)[-1]
        w, h = files[name][1]
        assert (r["width"], r["height"]) == (w, h), name
        mask = Image.open(io.BytesIO(masks[r["image_key"]]["mask_png"]))
        assert mask.mode == "L" and mask.size == (w, h), name
        values = set(np.unique(np.asarray(mask)).tolist())
        assert values <= {0, 1, 2, 3, 255}
        regions = [g for g in t["regions"].to_pylist() if g["run_id"] == run_id and g["image_key"] == r["image_key"]]
        assert sum(g["pixel_count"] for g in regions) == w * h - int((np.asarray(mask) == 255).sum())
        assert {g["class_index"] for g in regions} == values - {255}
        assert r["top_class"] in CLASSES and 0 < r["top_prob"] <= 1
        assert len(r["class_probs"]) == 4 and r["class_probs"][0]["name"] == r["top_class"]
        assert r["content_sha256"] and r["status"] == "ok"
    return t


def test_local_corpus_bad_files_rerun_and_skip_existing(prefect_harness, tmp_path, model_bytes):
    files = corpus_files()
    root = str(tmp_path / "corpus")
    write_corpus(root, files)
    (tmp_path / "corpus" / "sub").mkdir()
    (tmp_path / "model.pt").write_bytes(model_bytes)
    # A manifest that also lists a vanished file and an unreadable one (a folder).
    manifest = tmp_path / "list.txt"
    (tmp_path / "dir.jpg").mkdir()
    manifest.write_text("\n".join([f"corpus/{n}" for n in sorted(files)] + ["corpus/gone.jpg", "dir.jpg"]) + "\n")
    out = str(tmp_path / "out")
    model = str(tmp_path / "model.pt")

    state = run(str(manifest), model, out, run_id="r1", priors="ilp,sppxl,bb,seg")
    assert state.is_completed() and state.name == "CompletedWithErrors", state.message
    summary = state.result()
    assert summary["counts"] == {"listed": 16, "ok": 9, "failed": 7, "skipped": 0, "chunks": 4, "chunks_failed": 0}
    t = check_tables(out, "r1", files, set(GOOD))
    errors = {r["image_uri"].rsplit("/", 1)[-1]: (r["stage"], r["error_type"]) for r in t["errors"].to_pylist()}
    assert errors == {**BAD, "gone.jpg": ("read", "FileNotFoundError"), "dir.jpg": ("read", "IsADirectoryError")}
    runs = t["runs"].to_pylist()
    assert len(runs) == 1 and runs[0]["classes"] == CLASSES and runs[0]["state"] == "CompletedWithErrors"
    assert runs[0]["priors"] == "ilp,sppxl,bb,seg" and json.loads(runs[0]["parameters"])["chunk_size"] == 4
    # The default test-time view is the image at 1.25x its plain forward size (b_large: shrunk to 256 first).
    assert json.loads(runs[0]["parameters"])["tta"] == "1.25"
    forward = {r["image_uri"].rsplit("/", 1)[-1]: (r["forward_width"], r["forward_height"])
               for r in t["images"].to_pylist()}
    assert forward["b_large.jpg"] == (320, 214)
    # --min-side none (the default): photos smaller than the model's training input (128 px) are enlarged to it
    assert json.loads(runs[0]["parameters"])["min_side"] == 128
    sides = {name: size for name, (_, size) in files.items() if name in GOOD}
    small = [name for name, (w, h) in sides.items() if max(w, h) < 128]
    assert "a_rgb.jpg" in small and forward["a_rgb.jpg"] == (160, 120)  # 120 x 90 -> 128 x 96, at 1.25x that
    assert all(max(forward[name]) == 160 for name in small)
    used = json.loads(runs[0]["thresholds"])
    assert used["bb"] == used["seg"] == dict.fromkeys(CLASSES, 0.125)  # default 0.5/K
    assert used["sources"] == {"bb": "default (0.5/K)", "seg": "default (0.5/K)"}
    # One file per chunk and table; chunk 3 holds only bad inputs, so it has no images file.
    assert len(list((tmp_path / "out" / "images").rglob("*.parquet"))) == 3
    assert len(list((tmp_path / "out" / "errors").rglob("*.parquet"))) == 2

    # Rerun of the same run: same files replaced, no duplicate rows.
    state = run(str(manifest), model, out, run_id="r1", priors="ilp,sppxl,bb,seg")
    assert state.name == "CompletedWithErrors"
    t2 = check_tables(out, "r1", files, set(GOOD))
    for name in ("images", "regions", "masks", "errors", "runs"):
        assert t2[name].num_rows == t[name].num_rows, name

    # Incremental run: only new or changed images are processed.
    more = {"n_new1.jpg": (_jpeg(np.full((40, 40, 3), 90, np.uint8)), (40, 40)),
            "n_new2.png": (_png(Image.new("RGB", (33, 21), (10, 200, 30))), (33, 21))}
    changed = _jpeg(np.zeros((90, 120, 3), np.uint8))
    write_corpus(root, more)
    storage.write_bytes(storage.join(root, "a_rgb.jpg"), changed)
    files = {**files, **more, "a_rgb.jpg": (changed, (120, 90))}
    state = run(root, model, out, run_id="r2", skip_existing=True, priors="ilp", min_side=192, tta="1")
    summary = state.result()
    assert summary["counts"]["ok"] == 3 and summary["counts"]["skipped"] == len(GOOD) - 1
    t3 = check_tables(out, "r2", files, {"n_new1.jpg", "n_new2.png", "a_rgb.jpg"})
    forward = {r["image_uri"].rsplit("/", 1)[-1]: (r["forward_width"], r["forward_height"])
               for r in t3["images"].to_pylist() if r["run_id"] == "r2"}
    assert forward["n_new1.jpg"] == (192, 192) and forward["a_rgb.jpg"] == (192, 144)  # enlarged to min_side
    assert run(root, model, out, run_id="r3", min_side=512).is_failed()  # over max_side (256 here)
    assert not (tmp_path / "out" / "_state" / "done-r2.parquet").exists()


def test_memory_filesystem_with_shards(prefect_harness, model_bytes):
    files = corpus_files(seed=1)
    root, out, model = "memory://sc-corpus/photos", "memory://sc-out/tables", "memory://sc-models/m.pt"
    write_corpus(root, {k: v for k, v in files.items() if k in ("a_rgb.jpg", "c_gray.png", "x_empty.jpg")})
    storage.write_bytes(model, model_bytes)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, name in (("s000", "b_large.jpg"), ("s001", "x_notimage.png"), ("s002", "h_tiny.png")):
            data = files[name][0]
            info = tarfile.TarInfo(f"{key}.{name.rsplit('.', 1)[1]}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            meta = json.dumps({"labels": []}).encode()
            info = tarfile.TarInfo(f"{key}.json")
            info.size = len(meta)
            tar.addfile(info, io.BytesIO(meta))
    storage.write_bytes(storage.join(root, "shards", "train-000000.tar"), buf.getvalue())
    state = run(root, model, out, run_id="mem", priors="ilp,sppxl")
    assert state.name == "CompletedWithErrors", state.message
    images = tables.read_table(out, "images").to_pylist()
    uris = sorted(r["image_uri"] for r in images)
    assert uris[:2] == ["memory://sc-corpus/photos/a_rgb.jpg", "memory://sc-corpus/photos/c_gray.png"]
    assert uris[2:] == [f"tar://{k}::memory://sc-corpus/photos/shards/train-000000.tar"
                        for k in ("s000.jpg", "s002.png")]
    errors = {(r["error_type"], r["stage"]) for r in tables.read_table(out, "errors").to_pylist()}
    assert errors == {("EmptyFile", "decode"), ("NotAnImage", "decode")}
    masks = tables.read_table(out, "masks").to_pylist()
    sizes = {(r["width"], r["height"]) for r in masks}
    assert sizes == {(120, 90), (70, 50), (600, 400), (5, 3)}
    # DuckDB reads the tables straight from the fsspec filesystem.
    import duckdb
    import fsspec

    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("memory"))
    query = f"select count(*) from read_parquet('{out}/images/**/*.parquet', hive_partitioning=true)"
    n = con.execute(query).fetchone()
    assert n[0] == 4
    # The command line, incremental: files and shard members already done are skipped. The files and
    # the shard are unchanged (listing metadata), so none is read: the empty file, never segmented, is
    # read and fails again; the shard is skipped whole, its member that failed by its own bytes counted
    # skipped with it (every input of the corpus is counted: listed 6).
    from weakseg.flows.cli import main

    assert main(["segment", "--images", root, "--model", model, "--out", out, "--run-id", "mem2", "--skip-existing",
                 "--priors", "ilp", "--device", "cpu", "--batch-size", "2"]) == 0
    runs = {r["run_id"]: r["counts"] for r in tables.read_table(out, "runs").to_pylist()}
    assert runs["mem2"]["skipped"] == 5 and runs["mem2"]["ok"] == 0 and runs["mem2"]["failed"] == 1
    assert runs["mem2"]["listed"] == 6


def test_fails_fast_on_missing_model_or_unwritable_output(prefect_harness, tmp_path, model_bytes):
    root = str(tmp_path / "c")
    write_corpus(root, {k: v for k, v in corpus_files().items() if k == "a_rgb.jpg"})
    state = run(root, str(tmp_path / "no-model.pt"), str(tmp_path / "out"))
    assert state.is_failed() and "does not exist" in state.message
    assert not (tmp_path / "out" / "images").exists()
    (tmp_path / "model.pt").write_bytes(model_bytes)
    (tmp_path / "afile").write_text("x")
    state = run(root, str(tmp_path / "model.pt"), str(tmp_path / "afile" / "out"))
    assert state.is_failed() and "not writable" in state.message
    state = run(str(tmp_path / "nowhere"), str(tmp_path / "model.pt"), str(tmp_path / "out2"))
    assert state.is_failed() and "does not exist" in state.message


def test_a_chunk_that_cannot_be_written_fails_the_run_after_retries(prefect_harness, tmp_path, model_bytes,
                                                                    monkeypatch):
    from weakseg.flows import segment_corpus as module

    files = {k: v for k, v in corpus_files().items() if k in GOOD[:4]}
    root = str(tmp_path / "c")
    write_corpus(root, files)
    (tmp_path / "model.pt").write_bytes(model_bytes)
    real = tables.write_rows
    attempts = []

    def flaky(url, table, rows):
        if table == "images" and url.endswith("-000001.parquet"):
            attempts.append(url)
            raise OSError("disk full")
        return real(url, table, rows)

    monkeypatch.setattr(tables, "write_rows", flaky)
    monkeypatch.setattr(module.segment_chunk_task, "retry_delay_seconds", [0, 0])
    state = run(root, str(tmp_path / "model.pt"), str(tmp_path / "out"), run_id="w", chunk_size=2, priors="ilp")
    assert state.is_failed() and "1 of 2 chunks failed" in state.message and "disk full" in state.message
    assert len(attempts) == 3  # the first try and two retries
    images = tables.read_table(str(tmp_path / "out"), "images")
    assert images.num_rows == 2  # chunk 0 is written; chunk 1's images are missing, and the run says so
    assert tables.read_table(str(tmp_path / "out"), "runs").to_pylist()[0]["state"] == "Failed"


def test_thresholds_file_chosen_for_another_chain_is_used_with_a_warning(prefect_harness, tmp_path, model_bytes,
                                                                          log_messages):
    from weakseg.tasks.evaluate.thresholds import write_thresholds

    root = str(tmp_path / "c")
    write_corpus(root, {k: v for k, v in corpus_files().items() if k == "a_rgb.jpg"})
    (tmp_path / "model.pt").write_bytes(model_bytes)
    url = str(tmp_path / "t.json")
    write_thresholds(url, "bb", CLASSES, dict.fromkeys(CLASSES, 0.2), {"tta": "1"}, priors=["ilp", "sppxl", "bb"])
    messages = log_messages("prefect.task_runs")
    state = run(root, str(tmp_path / "model.pt"), str(tmp_path / "out"), run_id="t1", priors="ilp,bb",
                thresholds=url)
    assert state.is_completed(), state.message
    assert any("chosen for priors ilp,sppxl,bb; this run applies ilp,bb" in m for m in messages), messages
    # δ chosen on plain maps, applied to the default views (1.25 for this MIL model): said, not refused
    assert any("chosen on the maps of the views 1; this run averages 1.25" in m for m in messages), messages
    used = json.loads(tables.read_table(str(tmp_path / "out"), "runs").to_pylist()[0]["thresholds"])
    assert used["bb"] == dict.fromkeys(CLASSES, 0.2) and used["sources"]["bb"] == url
    messages.clear()
    assert run(root, str(tmp_path / "model.pt"), str(tmp_path / "out"), run_id="t2", priors="ilp,sppxl,bb",
               thresholds=url, tta="1").is_completed()
    assert not any("views" in m for m in messages), messages  # same chain, same views: nothing to say
