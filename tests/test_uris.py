"""One set of manifest columns and one tar URI spelling for shard-imagenet and segment-corpus."""
from __future__ import annotations

import pytest

from weakseg.tasks.ingest.sources import list_source
from weakseg.tasks.segment.inputs import canonical_uri, iter_inputs
from weakseg.tasks.uris import MANIFEST_COLUMNS, manifest_column, split_tar_uri, tar_uri


def test_the_first_known_column_names_the_images():
    assert manifest_column(["labels", "path", "uri"]) == "uri"
    assert manifest_column(["image_id", "image_uri"]) == "image_uri"
    assert manifest_column(["labels"]) is None


@pytest.mark.parametrize("column", MANIFEST_COLUMNS)
def test_both_listers_accept_every_manifest_column(tmp_path, column):
    value = "a" if column == "image_id" else "JPEGImages/a.jpg"
    (tmp_path / "m.csv").write_text(f"{column},labels\n{value},cat\n")
    expected = str(tmp_path / "JPEGImages" / "a.jpg")
    items, _ = list_source(str(tmp_path / "m.csv"), "manifest")
    assert [i.uri.removeprefix("file://") for i in items] == [expected]
    assert [url for _, url in iter_inputs(str(tmp_path / "m.csv"))] == [expected]


def test_tar_uris_are_built_and_split_one_way():
    assert tar_uri("m.jpg", "/data/s.tar") == "tar://m.jpg::file:///data/s.tar"
    assert tar_uri("m.jpg", "s3://b/s.tar") == "tar://m.jpg::s3://b/s.tar"
    assert split_tar_uri("tar://m.jpg::s3://b/s.tar") == ("m.jpg", "s3://b/s.tar")
    assert split_tar_uri("s3://b/m.jpg") is None
    assert canonical_uri(tar_uri("m.jpg", "/data/./s.tar")) == "tar://m.jpg::file:///data/s.tar"


@pytest.mark.parametrize("url", [
    "a.jpg", "./d/../a.jpg", "file:///data/./a.jpg", "S3://B/k//./x.jpg", "https://u:pw@h.example/a.jpg?sig=s&w=1",
    "tar://m.jpg::shards/./s.tar", "memory:///bucket/../a.jpg", "memory://a/b.jpg", "x/a://b.jpg",
])
def test_a_canonical_uri_is_its_own_canonical_uri(url):
    """The engine makes each input canonical once and carries it (inputs.stored_and_key): so a
    canonical URI must be its own, and its stored URI and key those of any spelling. Before,
    ``memory:///a`` became ``memory:/a``, a local path the next time (and never read)."""
    from weakseg.tasks.segment.inputs import input_key, stored_and_key, stored_uri

    canonical = canonical_uri(url)
    assert canonical_uri(canonical) == canonical
    assert stored_and_key(canonical) == (stored_uri(url), input_key(url))
    assert canonical_uri("memory:///bucket/../a.jpg") == "memory:///a.jpg"
