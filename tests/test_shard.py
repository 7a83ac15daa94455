"""shard-imagenet on generated ImageNet-style trees, ImageFolder, synset tars, the MSRC-21
CSV, memory:// and local paths, with bad files of each kind."""
import io
import json
import tarfile
import tempfile
from pathlib import Path

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from weakseg.flows.shard_imagenet import shard_imagenet
from weakseg.tasks.ingest.label_maps import UnmappedLabelsError, build_label_map, ilsvrc_synsets
from weakseg.tasks.ingest.shard_writer import plan_shards
from weakseg.tasks.ingest.sources import SourceError, list_source

DOG, TABBY, TENCH = "n02085620", "n02123045", "n01440764"  # Chihuahua, tabby cat, tench (no VOC class)


def jpeg(seed: int, size=(80, 60)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


BAD = {
    "empty.JPEG": b"",
    "truncated.JPEG": jpeg(99)[:300],
    "notes.JPEG": b"not an image at all",
    "huge.png": None,  # filled in below: over the pixel limit used in the tests
}


def _huge() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (500, 500)).save(buf, "PNG")
    return buf.getvalue()


def write_tree(fs, root: str, per_class: int = 4, bad_in: str | None = DOG) -> None:
    for c, wnid in enumerate((DOG, TABBY, TENCH)):
        for i in range(per_class):
            fs.pipe_file(f"{root}/train/{wnid}/{wnid}_{i}.JPEG", jpeg(c * 100 + i))
    if bad_in:
        for name, data in BAD.items():
            fs.pipe_file(f"{root}/train/{bad_in}/{name}", _huge() if data is None else data)
    val_rows = ["ImageId,PredictionString"]
    for c, wnid in enumerate((DOG, TABBY, TENCH)):
        fs.pipe_file(f"{root}/val/ILSVRC2012_val_{c:08d}.JPEG", jpeg(1000 + c, (400, 300)))
        val_rows.append(f"ILSVRC2012_val_{c:08d},{wnid} 1 2 3 4")
    fs.pipe_file(f"{root}/LOC_val_solution.csv", "\n".join(val_rows).encode())


def read_shards(dest: str, manifest: dict, split: str) -> list[dict]:
    """Read shards back with webdataset itself (memory:// ones through a local copy)."""
    urls = [f"{dest}/{s['name']}" for s in manifest["shards"] if s["split"] == split]
    if dest.startswith("memory://"):
        local = Path(tempfile.mkdtemp())
        for url in urls:
            (local / Path(url).name).write_bytes(fsspec.filesystem("memory").cat_file(url))
        urls = [str(local / Path(u).name) for u in urls]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


# ---------------------------------------------------------------- label maps (pure)

def test_voc_label_map_follows_wordnet():
    lmap = build_label_map("voc", set(ilsvrc_synsets()), background_fraction=0.25, seed=0)
    assert lmap.classes[0] == "background" and len(lmap.classes) == 21
    expect = {"n02123045": "cat", "n02690373": "aeroplane", "n03792782": "bicycle", "n02835271": "bicycle",
              DOG: "dog", "n02106662": "dog", "n02403003": "cow", "n04310018": "train", "n03785016": "motorbike"}
    for wnid, name in expect.items():
        assert lmap.mapping[wnid] == name, wnid
    counts = lmap.details["ilsvrc_synsets_per_class"]
    assert counts["dog"] == 118 and counts["bird"] == 59 and counts["cat"] == 5 and counts["aeroplane"] == 1
    assert all(counts[c] >= 1 for c in lmap.classes if c != "background")
    unrelated = [w for w in ilsvrc_synsets() if lmap.mapping[w] in ("background", None)]
    kept = sum(lmap.mapping[w] == "background" for w in unrelated)
    assert 0.15 < kept / len(unrelated) < 0.35  # a seeded sample of about background_fraction


def test_identity_puts_background_first_and_csv_maps_must_cover_everything(tmp_path):
    assert build_label_map("identity", {"zebra", "background", "apple"}).classes == ("background", "apple", "zebra")
    text = "source_label,label\ncat,animal\ndog,animal\n"
    lmap = build_label_map("m.csv", {"cat", "dog"}, read_text=lambda _: text)
    assert lmap.classes == ("animal",) and lmap.map(["dog", "cat"]) == ["animal"]
    with pytest.raises(UnmappedLabelsError, match=r"2 source labels.*bird, fish"):
        build_label_map("m.csv", {"cat", "bird", "fish"}, read_text=lambda _: text)


def test_plan_respects_sample_and_byte_limits():
    from weakseg.tasks.ingest.sources import Item

    items = [Item(f"/x/{i}.jpg", ("a",), None, size=100) for i in range(25)]
    plans = plan_shards(items, [["a"]] * 25, ["train"] * 25, shard_size=10, shard_max_bytes=350, seed=0)
    assert [len(p.items) for p in plans] == [3] * 8 + [1]
    assert [p.name for p in plans][:2] == ["train-000000.tar", "train-000001.tar"]
    again = plan_shards(items, [["a"]] * 25, ["train"] * 25, shard_size=10, shard_max_bytes=350, seed=0)
    assert [i.uri for p in again for i in p.items] == [i.uri for p in plans for i in p.items]


def test_missing_or_empty_source_fails_fast(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        list_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="holds no images"):
        list_source(str(tmp_path / "empty"))


# ---------------------------------------------------------------- the flow, for real

@pytest.mark.slow
def test_ilsvrc_tree_voc_map_bad_files_and_byte_identical_rerun(prefect_harness, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    src, dest = str(tmp_path / "ilsvrc"), str(tmp_path / "shards")
    write_tree(fs, src)
    kw = {"label_map": "voc", "background_fraction": 1.0, "shard_size": 3, "max_side": 128, "max_pixels": 150_000}
    manifest = shard_imagenet(source=src, dest=dest, **kw)

    assert manifest["classes"][0] == "background" and "dog" in manifest["classes"]
    assert manifest["splits"]["train"]["samples"] == 12 and manifest["splits"]["val"]["samples"] == 3
    assert manifest["errors"]["count"] == 4
    assert manifest["label_map"]["ilsvrc_synsets_per_class"]["dog"] == 118
    counts = manifest["splits"]["train"]["class_counts"]
    assert counts["dog"] == 4 and counts["cat"] == 4 and counts["background"] == 4

    errors = pq.read_table(f"{dest}/errors.parquet").to_pylist()
    assert sorted(Path(e["image_uri"]).name for e in errors) == sorted(BAD)
    assert {e["error_type"] for e in errors} == {"EmptyFile", "CorruptImage", "NotAnImage", "TooManyPixels"}

    train = read_shards(dest, manifest, "train")
    assert len(train) == 12
    classes = manifest["classes"]
    for s in train:
        meta = s["json"]
        assert "." not in s["__key__"]
        assert classes[s["cls"]] == meta["label_names"][0]
        assert meta["wnid"] in (DOG, TABBY, TENCH)
        expected = {DOG: "dog", TABBY: "cat", TENCH: "background"}[meta["wnid"]]
        assert meta["label_names"] == [expected]
    first_shard_classes = {s["json"]["wnid"] for s in train[:3]}
    assert len(first_shard_classes) > 1  # shuffled: a shard is not one class
    val = read_shards(dest, manifest, "val")
    assert all(min(s["jpg"].size) <= 128 for s in val)  # 400x300 shrunk
    assert {s["json"]["width"] for s in val} == {400}

    # rerun: nothing rewritten; delete a shard: recreated byte for byte
    before = {p.name: p.read_bytes() for p in Path(dest).glob("*.tar")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in Path(dest).glob("*.tar")}
    again = shard_imagenet(source=src, dest=dest, **kw)
    assert again["shards"] == manifest["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in Path(dest).glob("*.tar")} == mtimes
    victim = Path(dest) / "train-000001.tar"
    victim.unlink()
    shard_imagenet(source=src, dest=dest, **kw)
    assert victim.read_bytes() == before[victim.name]
    victim.write_bytes(b"cut")  # damaged: written again, to the bytes the manifest records
    shard_imagenet(source=src, dest=dest, **kw)
    assert victim.read_bytes() == before[victim.name]


@pytest.mark.slow
def test_imagefolder_on_memory_and_synset_tars(prefect_harness, tmp_path):
    mem = fsspec.filesystem("memory")
    for c, name in enumerate(("Apple", "background", "zebra")):
        for i in range(3):
            ext = ("jpg", "JPEG", "Png")[i]
            data = jpeg(c * 10 + i)
            if ext == "Png":
                buf = io.BytesIO()
                Image.open(io.BytesIO(data)).save(buf, "PNG")
                data = buf.getvalue()
            mem.pipe_file(f"/folder-src/{name}/img{i}.{ext}", data)
    mem.pipe_file("/folder-src/zebra/.DS_Store", b"junk")  # hidden files are not inputs
    manifest = shard_imagenet(source="memory://folder-src", dest="memory://folder-dest", val_fraction=0.34)
    assert manifest["classes"] == ["background", "Apple", "zebra"]
    total = sum(s["samples"] for s in manifest["splits"].values())
    assert total == 9 and manifest["errors"]["count"] == 0
    assert len(read_shards("memory://folder-dest", manifest, "train")) == manifest["splits"]["train"]["samples"]

    tars = tmp_path / "synsets"
    tars.mkdir()
    for c, wnid in enumerate((DOG, TENCH)):
        with tarfile.open(tars / f"{wnid}.tar", "w") as tar:
            for i in range(2):
                data = jpeg(c * 10 + i)
                info = tarfile.TarInfo(f"{wnid}_{i}.JPEG")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            bad = tarfile.TarInfo(f"{wnid}_bad.JPEG")
            bad.size = 5
            tar.addfile(bad, io.BytesIO(b"12345"))
    dest = str(tmp_path / "synset-shards")
    manifest = shard_imagenet(source=str(tars), dest=dest)
    assert manifest["classes"] == [TENCH, DOG]
    assert manifest["splits"]["train"]["samples"] == 4 and manifest["errors"]["count"] == 2
    samples = read_shards(dest, manifest, "train")
    assert all(s["json"]["source"].startswith("tar://") for s in samples)


@pytest.mark.slow
def test_msrc21_multilabel_csv(prefect_harness, msrc21, tmp_path):
    dest = str(tmp_path / "msrc")
    manifest = shard_imagenet(source=str(msrc21 / "labels.csv"), dest=dest, max_side=96, shard_size=200)
    assert manifest["multilabel"] is True
    assert manifest["splits"]["train"]["samples"] == 355 and manifest["splits"]["val"]["samples"] == 236
    assert len(manifest["classes"]) == 21
    val = read_shards(dest, manifest, "val")
    assert len(val) == 236
    assert max(len(s["json"]["labels"]) for s in val) > 1
    by_id = {Path(s["json"]["source"]).stem: s["json"]["label_names"] for s in val}
    rows = {r.split(",")[0]: r.split(",")[2].split(";") for r in (msrc21 / "labels.csv").read_text().split()[1:]}
    some = next(iter(by_id))
    assert sorted(by_id[some]) == sorted(rows[some])


def test_unmapped_labels_fail_before_any_work(prefect_harness, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    src = str(tmp_path / "src")
    write_tree(fs, src, per_class=1, bad_in=None)
    (tmp_path / "map.csv").write_text(f"source_label,label\n{DOG},dog\n")
    state = shard_imagenet(source=src, dest=str(tmp_path / "out"), label_map=str(tmp_path / "map.csv"),
                           return_state=True)
    assert state.is_failed()
    assert TABBY in state.message and TENCH in state.message
    assert not (tmp_path / "out").exists()
    json.dumps(state.message)


@pytest.mark.slow
def test_dask_worker_processes_write_the_same_shards_as_threads(prefect_harness, tmp_path):
    fs = fsspec.filesystem("file", auto_mkdir=True)
    src = str(tmp_path / "src")
    write_tree(fs, src, per_class=3)
    threads = shard_imagenet(source=src, dest=str(tmp_path / "threads"), shard_size=2, max_pixels=150_000)
    dask = shard_imagenet(source=src, dest=str(tmp_path / "dask"), shard_size=2, max_pixels=150_000,
                          task_runner="dask", workers=2)
    assert dask["shards"] == threads["shards"]  # names, counts and sha256 of every shard
    assert dask["errors"]["count"] == threads["errors"]["count"] == 4


def test_ilsvrc_val_labels_from_the_devkit_list(tmp_path):
    from scipy.io import savemat

    fs = fsspec.filesystem("file", auto_mkdir=True)
    root = tmp_path / "ilsvrc"
    fs.pipe_file(f"{root}/train/{DOG}/a.JPEG", jpeg(1))
    for i in range(3):
        fs.pipe_file(f"{root}/val/ILSVRC2012_val_{i + 1:08d}.JPEG", jpeg(10 + i))
    synsets = np.zeros((2, 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    synsets[0, 0] = (np.array([[1]]), np.array([TABBY]))
    synsets[1, 0] = (np.array([[7]]), np.array([DOG]))
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    savemat(data / "meta.mat", {"synsets": synsets})
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("7\n1\n7\n")
    items, layout = list_source(str(root))
    val = {Path(i.uri).name: i.labels[0] for i in items if i.split == "val"}
    assert layout == "ilsvrc"
    assert val == {"ILSVRC2012_val_00000001.JPEG": DOG, "ILSVRC2012_val_00000002.JPEG": TABBY,
                   "ILSVRC2012_val_00000003.JPEG": DOG}
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("7\n1\n")
    with pytest.raises(SourceError, match="2 labels for 3"):
        list_source(str(root))


def _sparse_tar_member(tar_path: Path, name: str, size: int) -> None:
    """A tar whose one member declares ``size`` bytes of zeros, stored sparse (costs no disk)."""
    info = tarfile.TarInfo(name)
    info.size = size
    with open(tar_path, "wb") as f:
        f.write(info.tobuf(format=tarfile.GNU_FORMAT))
        f.truncate(512 + -(-size // 512) * 512 + 1024)


@pytest.mark.slow
def test_cut_synset_tar_and_oversized_inputs_are_error_rows(prefect_harness, tmp_path):
    """A per-synset tar cut short inside a member, a 100 MiB tar member and a 100 MiB file:
    error rows (the big ones refused before reading), not a failed flow."""
    tars = tmp_path / "synsets"
    tars.mkdir()
    with tarfile.open(tars / f"{DOG}.tar", "w") as tar:
        for i in range(3):
            data = jpeg(i)
            info = tarfile.TarInfo(f"{DOG}_{i}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        last_data_at = tar.offset - -(-len(data) // 512) * 512
    with open(tars / f"{DOG}.tar", "r+b") as f:
        f.truncate(last_data_at + 100)  # the third member's data ends 100 bytes in
    _sparse_tar_member(tars / f"{TENCH}.tar", f"{TENCH}_huge.JPEG", 100 * 2**20)
    dest = tmp_path / "tar-shards"
    manifest = shard_imagenet(source=str(tars), dest=str(dest))
    assert manifest["splits"]["train"]["samples"] == 2
    errors = {Path(e["image_uri"].split("::")[0]).name: e for e in pq.read_table(dest / "errors.parquet").to_pylist()}
    assert errors[f"{DOG}_2.JPEG"]["error_type"] == "TruncatedInput"
    assert errors[f"{TENCH}_huge.JPEG"]["error_type"] == "TooLarge"  # segment-corpus's name
    assert "--max-bytes" in errors[f"{TENCH}_huge.JPEG"]["message"]

    folder = tmp_path / "folder"
    for c, name in enumerate(("cat", "dog")):
        (folder / name).mkdir(parents=True)
        (folder / name / "a.jpg").write_bytes(jpeg(c))
    with open(folder / "cat" / "huge.jpg", "wb") as f:
        f.truncate(100 * 2**20)
    manifest = shard_imagenet(source=str(folder), dest=str(tmp_path / "folder-shards"))
    rows = pq.read_table(tmp_path / "folder-shards" / "errors.parquet").to_pylist()
    assert manifest["splits"]["train"]["samples"] == 2 and len(rows) == 1
    assert rows[0]["error_type"] == "TooLarge" and rows[0]["stage"] == "read"


def test_a_generation_never_writes_where_the_current_manifest_points():
    from weakseg.tasks.ingest.manifest import generation_folder

    assert generation_folder(None, "g2") == ""  # an empty dest: the contract's names
    assert generation_folder({"generation": {"id": "g2", "folder": ""}}, "g2") == ""  # a rerun: reuse
    assert generation_folder({"generation": {"id": "g2", "folder": "gen-g2"}}, "g2") == "gen-g2"
    assert generation_folder({"generation": {"id": "g1", "folder": ""}}, "g2") == "gen-g2"
    assert generation_folder({"classes": []}, "g2") == "gen-g2"  # a manifest without generations
    assert generation_folder({}, "g2") == "gen-g2"  # an unreadable one


def test_listing_keeps_what_a_damaged_tar_still_holds(tmp_path):
    """Cut inside the second member's header: the first member is listed and readable; the
    lost rest is one item whose read fails with the reason; reads are bounded by max_bytes."""
    from weakseg.tasks.ingest.sources import InputTooLarge, TruncatedInput, open_item_reader

    with tarfile.open(tmp_path / f"{DOG}.tar", "w") as tar:
        for i in range(2):
            data = jpeg(i)
            info = tarfile.TarInfo(f"{DOG}_{i}.JPEG")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            if i == 0:
                cut = tar.offset + 200
    with open(tmp_path / f"{DOG}.tar", "r+b") as f:
        f.truncate(cut)
    items, layout = list_source(str(tmp_path))
    assert layout == "synset-tars" and len(items) == 2
    good, lost = sorted(items, key=lambda i: i.problem is not None)
    assert good.member == f"{DOG}_0.JPEG" and lost.problem and str(cut) in lost.problem
    with open_item_reader() as reader:
        assert reader.read(good) == jpeg(0)
        with pytest.raises(TruncatedInput, match="members after that are lost"):
            reader.read(lost)
    with open_item_reader(max_bytes=100) as reader, pytest.raises(InputTooLarge, match="--max-bytes 100"):
        reader.read(good)
