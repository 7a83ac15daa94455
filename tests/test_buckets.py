"""No command ever creates a bucket: every command that writes refuses an output in a bucket that
does not exist, before any work, through the real CLI against moto's S3 server."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from weakseg.flows.cli import main
from weakseg.tasks import storage

pytestmark = pytest.mark.slow

SMALL_TRAIN = ["--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--input-size", "96", "--pretrained",
               "none", "--head-widths", "16,16,16", "--output-stride", "8", "--num-workers", "0", "--checkpoint-every",
               "0", "--val-every", "0", "--device", "cpu"]
FAST_SCORE = ["--limit", "2", "--max-side", "64", "--tta", "1", "--device", "cpu"]
CYCLE_TRAIN = {"epochs": 1, "steps_per_epoch": 1, "batch_size": 2, "input_size": 96, "pretrained": "none",
               "head_widths": [16, 16, 16], "output_stride": 8, "num_workers": 0, "checkpoint_every": 0,
               "val_every": 0, "progress": False}
CYCLE_SCORE = {"max_side": 64, "tta": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, prefect_harness, tiny_checkpoint) -> dict[str, str]:
    """A tiny VOC-layout set, its shards, an untrained model of their classes and its segmentation of
    the set, all local: what each command needs to run to its end (and write) on code without the check."""
    from weakseg.flows.segment_corpus import segment_corpus
    from weakseg.flows.shard_imagenet import shard_imagenet
    from weakseg.tasks.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("bucket-inputs")
    data, shards = root / "data", root / "shards"
    write_synthetic_dataset(str(data), n_train=6, n_val=3, size=64, classes=("dots", "stripes"), max_objects=1,
                            background_fraction=0.2)
    manifest = shard_imagenet(source=str(data / "labels.csv"), dest=str(shards), max_side=64)
    model = root / "model.pt"
    model.write_bytes(tiny_checkpoint(list(manifest["classes"])))
    segment_corpus(images=str(data / "JPEGImages"), model=str(model), out=str(root / "tables"), priors="ilp",
                   max_side=64, tta="1", device="cpu", thumbnails=0, run_id="scored")
    return {"root": str(root), "data": str(data), "labels": str(data / "labels.csv"), "shards": str(shards),
            "model": str(model), "images": str(data / "JPEGImages"), "tables": str(root / "tables")}


def _commands(i: dict[str, str], local: str) -> dict[str, list[str]]:
    """One call per writing option; its missing bucket is ``weakseg-nb-{key}``."""
    return {
        "shard": ["shard", "--source", i["labels"], "--dest", "s3://weakseg-nb-shard/shards", "--max-side", "64"],
        "train": ["train", "--shards", i["shards"], "--out", "s3://weakseg-nb-train/run", *SMALL_TRAIN],
        "train-registry": ["train", "--shards", i["shards"], "--out", local, "--registry",
                           "s3://weakseg-nb-train-registry/registry", *SMALL_TRAIN],
        "refine": ["refine", "--shards", i["shards"], "--model", i["model"], "--out", "s3://weakseg-nb-refine/r",
                   "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2", "--input-size", "64",
                   "--num-workers", "0", "--max-side", "64", "--tta", "1", "--device", "cpu"],
        "segment": ["segment", "--images", i["images"], "--model", i["model"], "--out", "s3://weakseg-nb-segment/out",
                    "--priors", "ilp", "--max-side", "64", "--tta", "1", "--device", "cpu"],
        "evaluate": ["evaluate", "--predictions", i["tables"], "--ground-truth", i["data"],
                     "--out", "s3://weakseg-nb-evaluate/scores"],
        "thresholds": ["thresholds", "--model", i["model"], "--ground-truth", i["data"], "--priors", "ilp,bb",
                       "--out", "s3://weakseg-nb-thresholds/t.json", *FAST_SCORE],
        "promote": ["promote", "--model", i["model"], "--registry", "s3://weakseg-nb-promote/registry",
                    "--ground-truth", i["data"], *FAST_SCORE],
        "cycle": ["cycle", "--source", i["labels"], "--registry", str(Path(local) / "registry"), "--images",
                  i["images"], "--out", str(Path(local) / "tables"), "--work", "s3://weakseg-nb-cycle/{cycle_id}",
                  "--device", "cpu", "--priors", "ilp", "--no-refine", "--shard-options", '{"max_side": 64}',
                  "--train-options", json.dumps(CYCLE_TRAIN), "--promote-options", json.dumps(CYCLE_SCORE),
                  "--segment-options", json.dumps(CYCLE_SCORE)],
    }


@pytest.mark.parametrize("key", ["shard", "train", "train-registry", "refine", "segment", "evaluate", "thresholds",
                                 "promote", "cycle"])
def test_a_missing_bucket_is_refused_before_any_work_and_never_created(s3, inputs, tmp_path, capsys, key):
    local = tmp_path / "local"
    bucket = f"weakseg-nb-{key}"
    assert main(_commands(inputs, str(local))[key]) == 1
    err = capsys.readouterr().err
    assert f"bucket '{bucket}' does not exist" in err and "never creates buckets" in err, err
    s3.invalidate_cache()
    assert not s3.exists(bucket)
    assert not local.exists()  # nothing else was written either


def test_writing_into_a_missing_bucket_fails_and_creates_nothing(s3):
    with pytest.raises(FileNotFoundError):
        storage.write_bytes("s3://weakseg-nb-direct/a/b.json", b"{}")
    s3.invalidate_cache()
    assert not s3.exists("weakseg-nb-direct")
    with pytest.raises(storage.BucketError, match="'weakseg-nb-direct' does not exist"):
        storage.require_buckets({"--out": "s3://weakseg-nb-direct/a", "--registry": "s3://weakseg-test/ok",
                                 "--local": "/tmp/x"})
