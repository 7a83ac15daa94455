"""--skip-existing decides from the listing's metadata first: an unchanged input is never read.

Reads are counted at fsspec's ``_open`` (every byte segment-corpus reads from a file or a tar
goes through it), so a test fails the moment an unchanged input is opened.
"""
from __future__ import annotations

import io
import os
import tarfile
from datetime import UTC, datetime

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from weakseg.tasks import storage
from weakseg.tasks.segment import tables
from weakseg.tasks.segment.chunk import ChunkResult, SegmentOptions, segment_chunk
from weakseg.tasks.segment.inference import load_model
from weakseg.tasks.segment.inputs import iter_chunks, source_meta

CLASSES = ["background", "disk", "square"]


def _jpeg(seed: int, side: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    path.write_bytes(tiny_checkpoint(CLASSES, 0))
    return load_model(str(path), "cpu")


@pytest.fixture
def opens(monkeypatch):
    """Paths opened through fsspec (local and memory://), in order."""
    seen: list[str] = []
    for cls in (LocalFileSystem, MemoryFileSystem):
        original = cls._open

        def counting(self, path, *args, _original=original, **kwargs):
            seen.append(str(path))
            return _original(self, path, *args, **kwargs)

        monkeypatch.setattr(cls, "_open", counting)
    return seen


def _run(images: str, out: str, run_id: str, bundle, skip: bool) -> ChunkResult:
    """segment-corpus's chunks without Prefect: the skip-existing index built as the flow builds it."""
    index = None
    if skip:
        index = storage.join(out, "_state", f"done-{run_id}.parquet")
        if not tables.build_done_index(out, bundle.model_id, index, run_id):
            index = None
    opts = SegmentOptions(out=out, run_id=run_id, run_date="2026-01-01", model="unused", priors=("ilp",),
                          batch_size=2, done_index=index)
    total = ChunkResult(-1)
    for spec in iter_chunks(images, 3):
        r = segment_chunk(spec, opts, bundle)
        total.ok, total.failed, total.skipped = total.ok + r.ok, total.failed + r.failed, total.skipped + r.skipped
    return total


def test_listing_metadata_by_kind(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"12345")
    (tmp_path / "list.txt").write_text("c/a.jpg\n")
    [spec] = list(iter_chunks(str(root), 8))
    meta = spec.meta[0]
    st = os.stat(root / "a.jpg")
    assert meta.size == 5 and meta.etag is None
    assert abs(meta.mtime.timestamp() - st.st_mtime) < 1e-5 and meta.mtime.tzinfo is not None
    [glob_spec] = list(iter_chunks(f"{root}/*.jpg", 8))
    assert glob_spec.meta[0].size == 5 and glob_spec.meta[0].mtime is not None
    [manifest] = list(iter_chunks(str(tmp_path / "list.txt"), 8))
    assert manifest.meta == () and manifest.meta_of(0) is None  # a manifest says nothing: read and hash
    storage.write_bytes("memory://skip-listing/x/b.jpg", b"abc")
    [mem] = list(iter_chunks("memory://skip-listing/x", 8))
    assert mem.meta[0].size == 3 and mem.meta[0].mtime is not None
    # s3fs's listing: ETag and LastModified
    s3 = source_meta({"name": "b/k.jpg", "size": 7, "type": "file", "ETag": '"9a0364b9e99bb480dd25e1f0284c8555"',
                      "LastModified": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)})
    assert (s3.size, s3.etag, s3.mtime) == (7, '"9a0364b9e99bb480dd25e1f0284c8555"', datetime(2026, 1, 2, 3, 4, 5,
                                                                                                tzinfo=UTC))
    assert source_meta({"name": "x", "size": 3, "type": "file"}) is None  # neither ETag nor a time


def test_unchanged_local_corpus_is_not_read(tmp_path, bundle, opens):
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(5):
        (root / f"{i}.jpg").write_bytes(_jpeg(i))
    out = str(tmp_path / "out")
    first = _run(str(root), out, "r1", bundle, skip=False)
    assert (first.ok, first.skipped) == (5, 0)
    rows = {r["image_uri"]: r for r in tables.read_table(out, "images").to_pylist()}
    a = rows[str(root / "0.jpg")]
    st = os.stat(root / "0.jpg")
    assert a["source_size"] == st.st_size and abs(a["source_mtime"].timestamp() - st.st_mtime) < 1e-5
    assert a["source_etag"] is None and a["source_member_offset"] is None

    opens.clear()
    again = _run(str(root), out, "r2", bundle, skip=True)
    assert (again.ok, again.skipped, again.failed) == (0, 5, 0)
    assert not [p for p in opens if str(root) in p], opens  # not one image byte read

    # Touched but identical: read, hashed, skipped. Changed: read and segmented again.
    os.utime(root / "1.jpg", (st.st_atime + 10, st.st_mtime + 10))
    (root / "2.jpg").write_bytes(_jpeg(99))
    opens.clear()
    third = _run(str(root), out, "r3", bundle, skip=True)
    assert (third.ok, third.skipped) == (1, 4)
    assert sorted(os.path.basename(p) for p in opens if str(root) in p) == ["1.jpg", "2.jpg"]
    r3 = [r for r in tables.read_table(out, "images").to_pylist() if r["run_id"] == "r3"]
    assert [r["image_uri"] for r in r3] == [str(root / "2.jpg")]


def test_manifest_inputs_are_described_before_reading(tmp_path, bundle, opens):
    """A manifest's listing says nothing of its files: each is stat'ed (a HEAD for URLs) before it is
    read, and the images row records it, so a later run of any listing decides without reading."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(2):
        (root / f"{i}.jpg").write_bytes(_jpeg(i))
    (tmp_path / "list.txt").write_text("corpus/0.jpg\ncorpus/1.jpg\n")
    out = str(tmp_path / "out")
    _run(str(tmp_path / "list.txt"), out, "m1", bundle, skip=False)
    sizes = {r["image_uri"]: r["source_size"] for r in tables.read_table(out, "images").to_pylist()}
    assert sizes == {str(root / f"{i}.jpg"): os.stat(root / f"{i}.jpg").st_size for i in range(2)}
    opens.clear()
    again = _run(str(root), out, "m2", bundle, skip=True)  # the same files, now from a folder listing
    assert (again.ok, again.skipped) == (0, 2)
    third = _run(str(tmp_path / "list.txt"), out, "m3", bundle, skip=True)  # and from the manifest again
    assert (third.ok, third.skipped) == (0, 2)
    assert not [p for p in opens if str(root) in p]  # not one image byte read


def test_unchanged_shard_is_not_opened(bundle, opens):
    base, out = "memory://skip-shards/corpus", "memory://skip-shards/out"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(3):
            data = _jpeg(10 + i)
            info = tarfile.TarInfo(f"s{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    shard = f"{base}/train-000000.tar"
    storage.write_bytes(shard, buf.getvalue())
    assert _run(base, out, "t1", bundle, skip=False).ok == 3
    member = next(r for r in tables.read_table(out, "images").to_pylist() if r["image_uri"].startswith("tar://s001"))
    assert member["source_size"] == len(buf.getvalue()) and member["source_member_size"] > 0
    assert member["source_member_offset"] % 512 == 0 and member["source_mtime"] is not None

    opens.clear()
    again = _run(base, out, "t2", bundle, skip=True)
    assert (again.ok, again.skipped) == (0, 3)
    assert not [p for p in opens if "train-000000.tar" in p]

    storage.write_bytes(shard, buf.getvalue())  # rewritten, same bytes: a new modification time
    opens.clear()
    third = _run(base, out, "t3", bundle, skip=True)
    assert (third.ok, third.skipped) == (0, 3)
    assert [p for p in opens if "train-000000.tar" in p]


def test_s3_listing_gives_etag_and_time(s3):
    s3.pipe("weakseg-test/skip-listing/a.jpg", b"12345")
    [spec] = list(iter_chunks("s3://weakseg-test/skip-listing", 8))
    meta = spec.meta[0]
    assert meta.size == 5 and meta.etag and meta.mtime is not None
    s3.pipe("weakseg-test/skip-listing/a.jpg", b"54321")  # rewritten: same size, a new ETag
    [again] = list(iter_chunks("s3://weakseg-test/skip-listing", 8))
    assert again.meta[0].file_key != meta.file_key
