"""The pipeline on s3:// URLs against a real S3 API (moto's server), and no leaked secrets."""
import pyarrow.parquet as pq
import pytest
from conftest import S3_KEY_ID, S3_SECRET
from test_shard import BAD, write_tree

from weakseg.flows.shard_imagenet import shard_imagenet
from weakseg.flows.train_mil import train_mil
from weakseg.models import load_checkpoint
from weakseg.tasks import storage


def _all_objects(fs, root: str) -> dict[str, bytes]:
    return {p: fs.cat_file(p) for p in fs.find(root)}


@pytest.mark.slow
def test_shard_and_train_on_s3_without_leaking_credentials(prefect_harness, s3):
    write_tree(s3, "weakseg-test/src", per_class=4)
    manifest = shard_imagenet(source="s3://weakseg-test/src", dest="s3://weakseg-test/shards", label_map="voc",
                              background_fraction=1.0, shard_size=4, max_side=96, max_pixels=150_000)
    assert manifest["splits"]["train"]["samples"] == 12 and manifest["errors"]["count"] == len(BAD)
    with s3.open("weakseg-test/shards/errors.parquet", "rb") as f:
        assert pq.read_table(f).num_rows == len(BAD)

    result = train_mil(shards="s3://weakseg-test/shards", out="s3://weakseg-test/model", epochs=1,
                       steps_per_epoch=2, batch_size=4, input_size=96, head_widths=[16, 16, 16], output_stride=8,
                       num_workers=0, progress=False, checkpoint_every=0)
    assert result["checkpoint"] == "s3://weakseg-test/model/model.pt"
    ckpt = load_checkpoint(s3.open("weakseg-test/model/model.pt", "rb"))
    assert ckpt.classes == manifest["classes"] and "dog" in ckpt.classes
    assert storage.read_json("s3://weakseg-test/shards/manifest.json")["shards"][0]["name"].endswith(".tar")

    objects = _all_objects(s3, "weakseg-test")
    outputs = {k: v for k, v in objects.items() if not k.startswith("weakseg-test/src/")}
    assert any(k.endswith("model.pt") for k in outputs) and any(k.endswith(".tar") for k in outputs)
    for name, data in outputs.items():
        assert S3_SECRET.encode() not in data, name
        assert S3_KEY_ID.encode() not in data, name

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(), limit=200)
        runs = client.read_flow_runs(limit=50)
    assert logs, "the harness should have recorded logs"
    for text in [log.message for log in logs] + [str(run.parameters) for run in runs]:
        assert S3_SECRET not in text and S3_KEY_ID not in text


@pytest.mark.slow
def test_transient_s3_failures_are_retried(prefect_harness, s3, monkeypatch):
    import os

    import s3fs
    from flaky_proxy import FlakyProxy

    write_tree(s3, "weakseg-test/flaky-src", per_class=3, bad_in=None)
    with FlakyProxy(os.environ["AWS_ENDPOINT_URL"], fail_every=4, drop_every=9) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        s3fs.S3FileSystem.clear_instance_cache()
        manifest = shard_imagenet(source="s3://weakseg-test/flaky-src", dest="s3://weakseg-test/flaky-shards",
                                  shard_size=2, max_side=64)
        s3fs.S3FileSystem.clear_instance_cache()
    assert proxy.failed > 5 and proxy.dropped > 2, (proxy.failed, proxy.dropped)
    assert manifest["splits"]["train"]["samples"] == 9 and manifest["errors"]["count"] == 0
    for shard in manifest["shards"]:
        assert s3.info(f"weakseg-test/flaky-shards/{shard['name']}")["size"] == shard["bytes"]


@pytest.mark.slow
def test_shard_train_segment_evaluate_all_on_s3(prefect_harness, s3):
    from weakseg.flows.evaluate_segmentation import evaluate_segmentation
    from weakseg.flows.segment_corpus import segment_corpus
    from weakseg.tasks.synthetic import write_synthetic_dataset

    root = "s3://weakseg-test/pipeline"
    write_synthetic_dataset(f"{root}/voc", n_train=12, n_val=4, size=96, seed=1)
    shard_imagenet(source=f"{root}/voc/labels.csv", dest=f"{root}/shards", max_side=96)
    train_mil(shards=f"{root}/shards", out=f"{root}/model", epochs=1, steps_per_epoch=2, batch_size=4,
              input_size=96, head_widths=[16, 16, 16], output_stride=8, num_workers=0, progress=False,
              checkpoint_every=0)
    run = segment_corpus(images=f"{root}/voc/JPEGImages", model=f"{root}/model/model.pt", out=f"{root}/tables",
                         priors="ilp,sppxl", run_id="s3-run", device="cpu")
    assert run["counts"]["ok"] == 16
    metrics = evaluate_segmentation(predictions=f"{root}/tables", ground_truth=f"{root}/voc", split="val",
                                    run_id="s3-run")
    assert metrics["images"]["scored"] == 4 and metrics["images"]["masks_without_ground_truth"] == 12
    assert 0.0 <= metrics["mean_iou"] <= 1.0
    assert s3.exists("weakseg-test/pipeline/tables/evaluation/metrics.json")
    for name, data in _all_objects(s3, "weakseg-test/pipeline").items():
        assert S3_SECRET.encode() not in data and S3_KEY_ID.encode() not in data, name
