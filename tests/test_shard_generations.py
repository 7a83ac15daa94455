"""Immutable, verified shards: a re-shard killed half-way (a real `weakseg shard` process,
SIGKILLed) leaves the manifest's generation whole, training reads only that generation, and
training refuses shards that differ from their manifest."""
import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from weakseg.models import load_checkpoint

SMALL = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "input_size": 72, "head_widths": [16, 16, 16],
         "output_stride": 8, "num_workers": 0, "pretrained": "none", "val_every": 0, "progress": False}


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _add_class(src: Path, name: str, n: int, seed: int) -> None:
    (src / name).mkdir(parents=True)
    for i in range(n):
        (src / name / f"{name}_{i}.jpg").write_bytes(_jpeg(seed + i))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tars_written_since(root: Path, t0: float) -> list[Path]:
    return [p for p in root.rglob("*.tar") if p.stat().st_mtime > t0]


def _killed_reshard(src: Path, dest: Path, expect_written: int) -> None:
    """`weakseg shard` in a subprocess, SIGKILLed once all shards but the blocked one are written."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    cmd = [sys.executable, "-m", "weakseg.flows.cli", "shard", "--source", str(src), "--dest", str(dest),
           "--shard-size", "2", "--max-side", "64", "--workers", "2"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 150
        while len(_tars_written_since(dest, t0)) < expect_written:
            assert proc.poll() is None, "the re-shard ended instead of blocking on the FIFO"
            assert time.time() < deadline, "the re-shard wrote too few shards"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_killed_reshard_then_train_uses_the_old_generation_or_refuses(prefect_harness, tmp_path):
    from weakseg.flows.shard_imagenet import shard_imagenet
    from weakseg.flows.train_mil import train_mil

    src, dest = tmp_path / "src", tmp_path / "shards"
    _add_class(src, "cat", 4, 0)
    _add_class(src, "dog", 4, 100)
    old = shard_imagenet(source=str(src), dest=str(dest), shard_size=2, max_side=64)
    assert old["classes"] == ["cat", "dog"] and all("/" not in s["name"] for s in old["shards"])  # the contract
    manifest_bytes = (dest / "manifest.json").read_bytes()

    # a new class sorted first shifts every index (ant=0, cat=1, dog=2); a FIFO blocks one shard for ever
    _add_class(src, "ant", 3, 200)
    os.mkfifo(src / "ant" / "ant_blocked.jpg")
    _killed_reshard(src, dest, expect_written=6 - 1)  # 12 inputs in shards of 2: all but the blocked one

    assert (dest / "manifest.json").read_bytes() == manifest_bytes
    for shard in old["shards"]:  # nothing the manifest names was rewritten
        assert _sha(dest / shard["name"]) == shard["sha256"], shard["name"]

    result = train_mil(shards=str(dest), out=str(tmp_path / "run"), **SMALL)
    ckpt = load_checkpoint(tmp_path / "run" / "model.pt")
    assert ckpt.classes == ["cat", "dog"] and result["samples_skipped"] == 0
    assert ckpt.manifest["generation"] == old["generation"]

    # an in-place rewrite (what an interrupted re-shard did before generations): refused, clearly
    new = sorted(p for p in dest.rglob("train-*.tar") if p.parent != dest)
    victim = dest / old["shards"][0]["name"]
    shutil.copyfile(new[0], victim)
    state = train_mil(shards=str(dest), out=str(tmp_path / "run2"), return_state=True, **SMALL)
    assert state.is_failed()
    assert victim.name in state.message and "manifest" in state.message and "weakseg shard" in state.message


def test_tampered_shard_of_the_same_size_is_refused_before_any_sample(tmp_path):
    """Same size, other bytes: the sha256 check refuses the shard; other class names: refused too."""
    from weakseg.tasks.ingest.manifest import ShardMismatchError, load_manifest, shard_specs
    from weakseg.tasks.train.augment import AugmentConfig, TrainTransform
    from weakseg.tasks.train.shard_reader import train_pipeline, write_synthetic_shards

    write_synthetic_shards(str(tmp_path), n_train=8, n_val=0, size=48, per_shard=8)
    manifest = load_manifest(str(tmp_path))
    specs = shard_specs(str(tmp_path), manifest, "train")
    transform = TrainTransform(AugmentConfig(input_size=48))
    classes = manifest["classes"]
    it = iter(train_pipeline(list(specs), len(classes), transform, shuffle_buffer=2, specs=specs, classes=classes))
    assert next(it)["image"].shape == (48, 48, 3)  # the untouched shards are read

    shifted = [classes[-1], *classes[:-1]]  # the same names, other indices: a re-shard with another class list
    it = iter(train_pipeline(list(specs), len(classes), transform, shuffle_buffer=2, specs=specs, classes=shifted))
    with pytest.raises(ShardMismatchError, match="another class list"):
        next(it)

    shard = tmp_path / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[600] ^= 0xFF
    shard.write_bytes(bytes(data))
    it = iter(train_pipeline(list(specs), len(classes), transform, shuffle_buffer=2, specs=specs, classes=classes))
    with pytest.raises(ShardMismatchError, match="sha256"):
        next(it)
