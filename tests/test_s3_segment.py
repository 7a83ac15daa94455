"""segment-corpus on s3:// against a real S3 API (moto's server) that fails some requests."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from samples import block_jpeg

from weakseg.models import ModelConfig, checkpoint_bytes, create_model
from weakseg.tasks.segment import tables

pytestmark = pytest.mark.slow

CLASSES = ["background", "disk", "square"]


def test_transient_s3_failures_during_segment_corpus_are_retried(prefect_harness, s3, monkeypatch):
    import s3fs
    from flaky_proxy import FlakyProxy

    from weakseg.flows.segment_corpus import segment_corpus

    n = 12
    rng = np.random.default_rng(0)
    for i in range(n):
        s3.pipe_file(f"weakseg-test/seg-src/img{i:03d}.jpg", block_jpeg(rng, 48 + 4 * i))
    torch.manual_seed(0)
    model, config = create_model(ModelConfig(num_classes=len(CLASSES), head_widths=(16, 16, 16), output_stride=16),
                                 pretrained="none")
    s3.pipe_file("weakseg-test/seg-model/model.pt", checkpoint_bytes(model, config, CLASSES, input_size=96))

    out = "s3://weakseg-test/seg-out"
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    with FlakyProxy(endpoint, fail_every=4, drop_every=9) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        state = segment_corpus(images="s3://weakseg-test/seg-src", model="s3://weakseg-test/seg-model/model.pt",
                               out=out, run_id="flaky", chunk_size=3, batch_size=3, max_side=96, device="cpu",
                               priors="ilp", thumbnails=0, return_state=True)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # read the result straight from moto
    s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.failed > 5 and proxy.dropped > 2, (proxy.requests, proxy.failed, proxy.dropped)
    assert state.is_completed() and state.name == "Completed", state.message
    assert state.result()["counts"] == {"listed": n, "ok": n, "failed": 0, "skipped": 0, "chunks": 4,
                                        "chunks_failed": 0}
    images = tables.read_table(out, "images").to_pylist()
    assert len(images) == len({r["image_key"] for r in images}) == n
    assert tables.read_table(out, "masks").num_rows == n
    assert tables.read_table(out, "errors").num_rows == 0
    assert [r["state"] for r in tables.read_table(out, "runs").to_pylist()] == ["Completed"]
    for path in s3.find("weakseg-test/seg-out"):
        if path.endswith(".parquet"):
            with s3.open(path, "rb") as f:
                pq.read_table(f)  # every object whole
    assert not [p for p in s3.find("weakseg-test/seg-out") if "/_state/" in p]


def test_an_output_bucket_that_does_not_exist_is_refused_not_created(prefect_harness, s3):
    from weakseg.flows.segment_corpus import segment_corpus

    s3.pipe_file("weakseg-test/nb-src/img.jpg", block_jpeg(np.random.default_rng(1), 48))
    model, config = create_model(ModelConfig(num_classes=len(CLASSES), head_widths=(16, 16, 16), output_stride=16),
                                 pretrained="none")
    s3.pipe_file("weakseg-test/nb-model/model.pt", checkpoint_bytes(model, config, CLASSES, input_size=96))
    state = segment_corpus(images="s3://weakseg-test/nb-src", model="s3://weakseg-test/nb-model/model.pt",
                           out="s3://weakseg-no-such-bucket/out", device="cpu", priors="ilp", thumbnails=0,
                           return_state=True)
    assert state.is_failed() and "does not exist" in state.message, state.message
    s3.invalidate_cache()
    assert not s3.exists("weakseg-no-such-bucket")
