"""Incremental runs and listings at scale: streamed listings (issue 36.4), network failures that are not
the input's fault (37.4), manifests of URLs decided from a HEAD (37.5), credential-only URL variants
(37.7).

The chunks run through the real engine (``segment_chunk``) with the skip-existing index built as
the flow builds it; HTTP through a real server on 127.0.0.1, S3 through moto's server. Bytes
read are counted where they leave the server.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
import struct
import tarfile
import tracemalloc

import numpy as np
import pytest
import torch
from conftest import QuietHandler
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from weakseg.tasks import storage
from weakseg.tasks.segment import inputs, tables
from weakseg.tasks.segment.chunk import ChunkResult, SegmentOptions, segment_chunk
from weakseg.tasks.segment.device import DeviceStage
from weakseg.tasks.segment.incremental import archive_verdict, caused_by_input
from weakseg.tasks.segment.inference import load_model
from weakseg.tasks.segment.inputs import iter_chunks
from weakseg.tasks.segment.read import TransientInputError, is_transient

CLASSES = ["background", "disk", "square"]
SECRET = "tok-Zq81x-secret"


def _jpeg(seed: int, h: int = 40, w: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    path.write_bytes(tiny_checkpoint(CLASSES, 0))
    return load_model(str(path), "cpu")


def _run(images: str, out: str, run_id: str, bundle, skip: bool = True, chunk_size: int = 4,
         host_workers: int = 0) -> ChunkResult:
    """segment-corpus's chunks without Prefect: the skip-existing index built as the flow builds it."""
    index = None
    if skip:
        index = storage.join(out, "_state", f"done-{run_id}.parquet")
        if not tables.build_done_index(out, bundle.model_id, index, run_id):
            index = None
    opts = SegmentOptions(out=out, run_id=run_id, run_date="2026-01-01", model="unused", priors=("ilp",),
                          batch_size=2, done_index=index, host_workers=host_workers)
    total = ChunkResult(-1)
    for spec in iter_chunks(images, chunk_size):
        r = segment_chunk(spec, opts, bundle)
        total.ok, total.failed, total.skipped = total.ok + r.ok, total.failed + r.failed, total.skipped + r.skipped
    return total


def _rows(out: str, table: str, run_id: str) -> list[dict]:
    return [r for r in tables.read_table(out, table).to_pylist() if r["run_id"] == run_id]


class _Counting(QuietHandler):
    """Serves a folder and records ``(path, body bytes)`` of every GET in ``served`` (HEADs send no body)."""

    served: list[tuple[str, int]]

    def copyfile(self, source, outputfile) -> None:
        data = source.read()
        self.served.append((self.path, len(data)))
        outputfile.write(data)


class _Resets(QuietHandler):
    """Sends half of a file, then resets the connection (``left[path]`` times per path); only reads
    of the data count (fsspec's ``exists`` on an HTTP URL is a GET too, without a Range header)."""

    left: dict[str, int]

    def copyfile(self, source, outputfile) -> None:
        data = source.read()
        if self.left.get(self.path, 0) <= 0 or "Range" not in self.headers:
            outputfile.write(data)
            return
        self.left[self.path] -= 1
        outputfile.write(data[: len(data) // 2])
        outputfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()  # an RST, part-way through the body

    def finish(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the socket is gone: nothing to flush
            super().finish()


# --- 36.4: listings as streams --------------------------------------------------------------------

def test_a_folder_is_listed_without_holding_it(tmp_path, monkeypatch):
    """20,000 files in one folder list within a few hundred kB of Python memory (the old listing held
    every entry and a digest per file: ~10 MB); spilled runs give the same sorted order."""
    flat = tmp_path / "flat"
    flat.mkdir()
    n = 10_000
    for i in range(n):
        (flat / f"img{i:06d}.jpg").write_bytes(b"x")
    monkeypatch.setattr(inputs, "SPILL_ENTRIES", 1000)
    tracemalloc.start()
    try:
        listed = sum(len(spec.uris) for spec in iter_chunks(str(flat), 256))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert listed == n
    assert peak < 3_000_000, f"{peak / 1e6:.1f} MB held while listing {n} files"

    tree = tmp_path / "tree"
    for name in ("a.jpg", "a0.jpg", "a/b.jpg", "a.b/c.jpg", "b/.hidden/x.jpg", ".y.jpg", "B.png", "a/z/q.tar"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"x")
    whole = list(inputs.iter_listing(str(tree)))
    monkeypatch.setattr(inputs, "SPILL_ENTRIES", 2)
    assert list(inputs.iter_listing(str(tree))) == whole
    # sorted by path as S3 lists keys ("." < "/" < "0"), hidden names skipped
    assert [u[len(str(tree)) + 1:] for _, u, _ in whole] == ["B.png", "a.b/c.jpg", "a.jpg", "a/b.jpg", "a/z/q.tar",
                                                             "a0.jpg"]


def test_an_s3_prefix_is_listed_page_by_page(s3, monkeypatch):
    """The first chunk of a prefix is cut after one ListObjectsV2 page, not after the whole listing."""
    import s3fs
    from flaky_proxy import FlakyProxy

    for i in range(30):  # one folder: its listing is several pages
        s3.pipe_file(f"weakseg-test/paged/img{i:03d}.jpg", b"x")
    s3.pipe_file("weakseg-test/paged/.hidden.jpg", b"x")
    monkeypatch.setattr(inputs, "S3_PAGE_KEYS", 10)
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    with FlakyProxy(endpoint, fail_every=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        chunks = iter_chunks("s3://weakseg-test/paged", 5)
        first = next(chunks)
        lists_for_first = proxy.methods["GET"]
        rest = list(chunks)
        lists_in_all = proxy.methods["GET"]
        cached = [k for k in storage.url_to_fs("s3://weakseg-test/paged")[0].dircache if "paged" in k]
        with pytest.raises(inputs.SourceError, match="does not exist"):
            next(iter_chunks("s3://weakseg-test/no-such-prefix", 5))
        with pytest.raises(inputs.SourceError, match="does not exist"):
            next(iter_chunks("s3://weakseg-no-such-bucket/x", 5))
        [one] = list(iter_chunks("s3://weakseg-test/paged/img007.jpg", 5))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    uris = [u for c in (first, *rest) for u in c.uris]
    assert uris == [f"s3://weakseg-test/paged/img{i:03d}.jpg" for i in range(30)]
    assert all(m is not None and m.etag for c in (first, *rest) for m in c.meta)
    # a one-key listing says it is a folder, then one page of 10: nothing listed whole, nothing cached
    assert lists_for_first == 2 and lists_in_all == 5, (lists_for_first, lists_in_all)  # 31 keys: 4 pages
    assert cached == []
    assert one.uris == ("s3://weakseg-test/paged/img007.jpg",)


# --- 37.4: a network failure is not the image's fault --------------------------------------------

def _network_errors() -> list[BaseException]:
    import aiohttp
    from botocore.exceptions import ReadTimeoutError
    from fsspec.exceptions import FSTimeoutError

    try:
        try:
            raise ConnectionResetError(104, "Connection reset by peer")
        except ConnectionResetError as reset:
            raise OSError("reading the body failed") from reset
    except OSError as wrapped:
        chained = wrapped
    return [ConnectionResetError(104, "Connection reset by peer"), TimeoutError(), FSTimeoutError(),
            ConnectionRefusedError(),
            aiohttp.ClientPayloadError("Response payload is not completed"), aiohttp.ServerDisconnectedError(),
            ReadTimeoutError(endpoint_url="http://s3"), BrokenPipeError(), chained]


def test_network_failures_are_transient_and_bad_inputs_are_not():
    from weakseg.tasks.images import ImageError

    for err in _network_errors():
        assert is_transient(err), repr(err)
    for err in (FileNotFoundError("gone.jpg"), ImageError("CorruptImage", "cannot decode"),
                ValueError("cannot open 503.jpg"), tarfile.ReadError("unexpected end of data"), PermissionError()):
        assert not is_transient(err), repr(err)


def test_a_connection_reset_mid_tar_retries_the_chunk(tmp_path, bundle, http_server):
    """A tar whose connection is reset half-way is a retried chunk (TransientInputError), not an error row
    that blames the archive and leaves its other members unread; a file reset on every try likewise."""
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "s.tar").write_bytes(_tar({f"m{i}.jpg": _jpeg(i, 64, 64 + i) for i in range(4)}))
    (shards / "a.jpg").write_bytes(_jpeg(9))
    left = {"/s.tar": 1, "/a.jpg": 2}
    base = http_server(shards, type("Resets", (_Resets,), {"left": left}))
    out = str(tmp_path / "out")
    opts = SegmentOptions(out=out, run_id="r", run_date="2026-01-01", model="unused", priors=("ilp",), batch_size=2)
    [spec] = list(iter_chunks(f"{base}/s.tar", 4))
    with pytest.raises(TransientInputError):
        segment_chunk(spec, opts, bundle)
    assert left["/s.tar"] == 0
    again = segment_chunk(spec, opts, bundle)  # what the task's retry does
    assert (again.ok, again.failed) == (4, 0)
    [file_spec] = list(iter_chunks(f"{base}/a.jpg", 4))
    with pytest.raises(TransientInputError):
        segment_chunk(file_spec, opts, bundle)


def test_tar_members_that_failed_for_other_reasons_are_redone(tmp_path, bundle, monkeypatch):
    """Run 1: one member's forward pass runs out of device memory (stage inference), one member is
    corrupt. Run 2 (--skip-existing): the archive is unchanged, yet it is read again and the
    first member processed; the corrupt one (its own bytes) and the done ones are skipped.
    Run 3: every member done; the archive is not opened."""
    members = {"a.jpg": _jpeg(1), "b.jpg": _jpeg(2, 56, 40), "c.jpg": _jpeg(3), "d.jpg": b"\xff\xd8 not a jpeg"}
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "s.tar").write_bytes(_tar(members))
    out = str(tmp_path / "out")
    original = DeviceStage.forward

    def out_of_memory_for_b(self, images):
        if any(tuple(p.size) == (56, 40) for p in images):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, images)

    with monkeypatch.context() as m:
        m.setattr(DeviceStage, "forward", out_of_memory_for_b)
        first = _run(str(corpus), out, "r1", bundle)
    assert (first.ok, first.failed) == (2, 2)
    errors = {r["image_uri"].split("::")[0]: (r["stage"], r["error_type"]) for r in _rows(out, "errors", "r1")}
    assert errors == {"tar://b.jpg": ("inference", "OutOfMemoryError"), "tar://d.jpg": ("decode", "NotAnImage")}

    second = _run(str(corpus), out, "r2", bundle)
    assert (second.ok, second.failed, second.skipped) == (1, 0, 3)
    assert [r["image_uri"].split("::")[0] for r in _rows(out, "images", "r2")] == ["tar://b.jpg"]

    opened: list[str] = []
    original_open = LocalFileSystem._open

    def counting(self, path, *args, **kwargs):
        opened.append(str(path))
        return original_open(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", counting)
    third = _run(str(corpus), out, "r3", bundle)
    assert (third.ok, third.failed, third.skipped) == (0, 0, 4)
    assert not [p for p in opened if p.endswith("s.tar")]


def test_a_tar_member_whose_worker_died_is_redone(tmp_path, bundle):
    """A member whose host worker died (WorkerCrashed, a real crash: the fault injection of
    decode.CRASH_ENV) is processed again by the next incremental run, the others skipped by hash."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "s.tar").write_bytes(_tar({"a.jpg": _jpeg(1), "kills-its-worker.jpg": _jpeg(2), "c.jpg": _jpeg(3)}))
    out = str(tmp_path / "out")
    first = _run(str(corpus), out, "w1", bundle, host_workers=1)
    assert (first.ok, first.failed) == (2, 1)
    second = _run(str(corpus), out, "w2", bundle, host_workers=1)
    assert (second.ok, second.failed, second.skipped) == (0, 1, 2)
    assert [(r["stage"], r["error_type"]) for r in _rows(out, "errors", "w2")] == [("decode", "WorkerCrashed")]


def test_which_errors_blame_the_input_and_what_an_archive_needs():
    assert caused_by_input("decode", "CorruptImage") and caused_by_input("read", "TooLarge")
    assert caused_by_input("read", "ReadError")  # a truncated tar
    for stage, kind in (("inference", "OutOfMemoryError"), ("decode", "WorkerCrashed"),
                        ("read", "ConnectionResetError"), ("read", "TimeoutError"), ("priors", "MemoryError"),
                        ("encode", "WorkerCrashed"), ("read", "PermissionError")):
        assert not caused_by_input(stage, kind), (stage, kind)
    arc = "/d/s.tar"
    done = [("tar://a::" + arc, "r1", "ok"), ("tar://b::" + arc, "r1", "ok")]
    assert archive_verdict(arc, done).whole and archive_verdict(arc, done).settled == 2
    # as an older version recorded a reset mid-archive: the members after it were never seen
    cut = [*done, (arc, "r1", "retry")]
    assert not archive_verdict(arc, cut).whole
    assert archive_verdict(arc, [*cut, ("tar://a::" + arc, "r2", "ok")]).whole  # r2 read it to the end
    assert archive_verdict(arc, [*done, (arc, "r1", "failed")]).whole  # a truncated archive: nothing more in it
    redo = [*done, ("tar://c::" + arc, "r1", "retry")]
    assert not archive_verdict(arc, redo).whole
    assert archive_verdict(arc, [*redo, ("tar://c::" + arc, "r2", "ok")]).whole
    bad = archive_verdict(arc, [*done, ("tar://d::" + arc, "r1", "failed")])
    assert bad.whole and bad.settled == 3 and bad.failed == {"tar://d::" + arc}


# --- 37.5: a manifest of URLs is incremental ------------------------------------------------------

def test_a_manifest_of_urls_is_decided_from_head(tmp_path, bundle, http_server):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(6):
        (photos / f"{i}.jpg").write_bytes(_jpeg(i, 40, 40 + i))
    served: list[tuple[str, int]] = []
    base = http_server(photos, type("Counting", (_Counting,), {"served": served}))
    (tmp_path / "list.txt").write_text("".join(f"{base}/{i}.jpg\n" for i in range(6)))
    out = str(tmp_path / "out")
    first = _run(str(tmp_path / "list.txt"), out, "u1", bundle)
    assert first.ok == 6 and sorted(p for p, _ in served) == [f"/{i}.jpg" for i in range(6)]
    assert all(r["source_size"] and r["source_mtime"] for r in _rows(out, "images", "u1"))

    served.clear()
    second = _run(str(tmp_path / "list.txt"), out, "u2", bundle)
    assert (second.ok, second.skipped) == (0, 6)
    assert served == []  # not one byte of an image

    (photos / "2.jpg").write_bytes(_jpeg(99, 40, 50))
    st = os.stat(photos / "2.jpg")
    os.utime(photos / "2.jpg", (st.st_atime, st.st_mtime + 5))  # HTTP dates are whole seconds
    served.clear()
    third = _run(str(tmp_path / "list.txt"), out, "u3", bundle)
    assert (third.ok, third.skipped) == (1, 5) and [p for p, _ in served] == ["/2.jpg"]


def test_brace_listed_shards_over_http_are_not_read_again(tmp_path, bundle, http_server):
    shards = tmp_path / "shards"
    shards.mkdir()
    for s in range(2):
        (shards / f"s-{s:03d}.tar").write_bytes(_tar({f"m{i}.jpg": _jpeg(10 * s + i) for i in range(2)}))
    served: list[tuple[str, int]] = []
    base = http_server(shards, type("Counting", (_Counting,), {"served": served}))
    out = str(tmp_path / "out")
    assert _run(f"{base}/s-{{000..001}}.tar", out, "b1", bundle).ok == 4
    served.clear()
    again = _run(f"{base}/s-{{000..001}}.tar", out, "b2", bundle)
    assert (again.ok, again.skipped) == (0, 4) and served == []


def test_an_s3_manifest_is_decided_from_head(tmp_path, bundle, s3, monkeypatch):
    import s3fs
    from flaky_proxy import FlakyProxy

    for i in range(4):
        s3.pipe_file(f"weakseg-test/inc-manifest/{i}.jpg", _jpeg(i))
    (tmp_path / "list.txt").write_text("".join(f"s3://weakseg-test/inc-manifest/{i}.jpg\n" for i in range(4)))
    out = str(tmp_path / "out")
    assert _run(str(tmp_path / "list.txt"), out, "s1", bundle).ok == 4
    s3.pipe_file("weakseg-test/inc-manifest/3.jpg", _jpeg(33))  # rewritten: a new ETag
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    with FlakyProxy(endpoint, fail_every=0) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        again = _run(str(tmp_path / "list.txt"), out, "s2", bundle)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    s3fs.S3FileSystem.clear_instance_cache()
    assert (again.ok, again.skipped) == (1, 3)
    assert proxy.methods["HEAD"] == 4 and proxy.methods["GET"] == 1, proxy.methods  # one object read: the new one
    assert [r["image_uri"] for r in _rows(out, "images", "s2")] == ["s3://weakseg-test/inc-manifest/3.jpg"]


# --- 37.7: URLs that differ only in a credential ----------------------------------------------------

def test_urls_differing_only_in_a_credential_are_distinct_inputs(tmp_path, bundle, http_server):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(_jpeg(1))
    (photos / "b.jpg").write_bytes(_jpeg(2))
    base = http_server(photos)
    (tmp_path / "list.txt").write_text("\n".join([
        f"{base}/a.jpg?token={SECRET}-1", f"{base}/a.jpg?token={SECRET}-2", f"{base}/b.jpg",
        f"{base}/a.jpg?token={SECRET}-1",  # the same URL again: one input
        f"{base}/./b.jpg",  # another spelling of b.jpg: one input
    ]) + "\n")
    [spec] = list(iter_chunks(str(tmp_path / "list.txt"), 8))
    assert len(spec.uris) == 3
    out = str(tmp_path / "out")
    first = _run(str(tmp_path / "list.txt"), out, "c1", bundle, chunk_size=8)
    assert first.ok == 3
    images = _rows(out, "images", "c1")
    assert sorted(r["image_uri"] for r in images) == [f"{base}/a.jpg", f"{base}/a.jpg", f"{base}/b.jpg"]
    keys = {r["image_key"] for r in images}
    assert len(keys) == 3 and {r["image_key"] for r in _rows(out, "masks", "c1")} == keys
    assert {r["image_key"] for r in _rows(out, "regions", "c1")} <= keys
    plain = next(r for r in images if r["image_uri"] == f"{base}/b.jpg")
    from weakseg.tasks.ingest.sources import image_key

    assert plain["image_key"] == image_key(f"{base}/b.jpg")  # a URL without credentials keeps its key
    assert SECRET not in str(tables.read_table(out, "images").to_pylist())
    again = _run(str(tmp_path / "list.txt"), out, "c2", bundle, chunk_size=8)
    assert (again.ok, again.skipped) == (0, 3)


def test_credential_variants_share_a_stored_uri_not_a_key():
    a, b = "https://h.example/s.tar?sig=a&w=1", "https://h.example/s.tar?sig=b&w=1"
    assert inputs.stored_uri(a) == inputs.stored_uri(b) == "https://h.example/s.tar?w=1"
    assert inputs.input_key(a) != inputs.input_key(b)
    assert inputs.input_key("tar://m.jpg::" + a) != inputs.input_key("tar://m.jpg::" + b)
    assert "sig" not in inputs.input_key(a) and len(inputs.input_key(a)) == 24
