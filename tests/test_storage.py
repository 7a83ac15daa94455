import pytest

from weakseg.tasks import storage


@pytest.mark.parametrize("root", ["local", "memory://weakseg-test-storage"])
def test_round_trip_and_atomic_local_write(root, tmp_path):
    base = str(tmp_path) if root == "local" else root
    url = storage.join(base, "a", "b.json")
    assert not storage.exists(url)
    storage.write_json(url, {"x": [1, 2]})
    assert storage.read_json(url) == {"x": [1, 2]}
    storage.write_bytes(url, b"new")
    assert storage.read_bytes(url) == b"new"
    if root == "local":
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b.json"]  # no temp files left


def test_join_keeps_the_protocol():
    assert storage.join("s3://bucket/prefix/", "x", "y.tar") == "s3://bucket/prefix/x/y.tar"
    assert storage.join("/data", "m.json") == "/data/m.json"


def test_local_writes_are_readable_by_others(tmp_path):
    import os

    umask = os.umask(0)
    os.umask(umask)
    storage.write_bytes(str(tmp_path / "x.bin"), b"1")
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o666 & ~umask
