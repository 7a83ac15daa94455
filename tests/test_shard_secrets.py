"""No secret in any output of shard and train: credentials inside URLs (userinfo, presigned
query strings) served by a real HTTP server on 127.0.0.1 never reach the shards, the
manifest, errors.parquet, the checkpoint or the logs."""
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from weakseg.flows.shard_imagenet import shard_imagenet
from weakseg.flows.train_mil import train_mil
from weakseg.models import load_checkpoint

USERPASS = "alice:hunter2pw"
SIGNATURE = "X-Amz-Credential=AKIAWEAKSEGSECRET&X-Amz-Signature=f00dfeedsig"
SECRETS = ("hunter2pw", "AKIAWEAKSEGSECRET", "f00dfeedsig")


@pytest.fixture
def http_root(tmp_path, http_server):
    return tmp_path, http_server(tmp_path).replace("http://", f"http://{USERPASS}@")


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def logs(log_messages):
    return log_messages("prefect", "weakseg")


def _assert_clean(what: str, data: bytes | str) -> None:
    text = data if isinstance(data, str) else data.decode("latin-1")
    leaked = [s for s in SECRETS if s in text]
    assert not leaked, f"{what} holds {leaked}"


@pytest.mark.slow
def test_credentials_in_urls_reach_no_output(prefect_harness, http_root, logs):
    root, base = http_root
    (root / "img").mkdir()
    rows = ["uri,labels"]
    for i in range(8):
        (root / "img" / f"{i}.jpg").write_bytes(_jpeg(i))
        rows.append(f"{base}/img/{i}.jpg?{SIGNATURE}&v=1,{('cat', 'dog')[i % 2]}")
    rows.append(f"{base}/img/missing.jpg?{SIGNATURE},cat")  # a 404: an error row, and no secret in it
    (root / "list.csv").write_text("\n".join(rows) + "\n")

    dest = root / "shards"
    manifest = shard_imagenet(source=f"{base}/list.csv?{SIGNATURE}", dest=str(dest), layout="manifest",
                              shard_size=4, max_side=64)
    assert manifest["splits"]["train"]["samples"] == 8 and manifest["errors"]["count"] == 1
    assert manifest["parameters"]["source"] == base.replace(f"{USERPASS}@", "") + "/list.csv"
    for path in sorted(dest.rglob("*")):
        if path.is_file():
            _assert_clean(str(path), path.read_bytes())
    errors = pq.read_table(dest / "errors.parquet").to_pylist()
    _assert_clean("errors.parquet rows", repr(errors))
    assert errors[0]["image_uri"].endswith("/img/missing.jpg")

    out = root / "run"
    result = train_mil(shards=f"{base}/shards", out=str(out), epochs=1, steps_per_epoch=2, batch_size=4,
                       input_size=72, head_widths=[16, 16, 16], output_stride=8, num_workers=0, pretrained="none",
                       val_every=0, progress=False)
    assert result["step"] == 2
    ckpt = load_checkpoint(Path(out) / "model.pt")
    assert ckpt.manifest["url"] == base.replace(f"{USERPASS}@", "") + "/shards"
    for path in out.iterdir():
        _assert_clean(str(path), path.read_bytes())
    text = "\n".join(logs)
    assert "final checkpoint" in text and "generation" in text  # the flows' own log lines were captured
    _assert_clean("logs", text)

    state = shard_imagenet(source=f"{base}/nothing.csv?{SIGNATURE}", dest=str(root / "x"), layout="manifest",
                           return_state=True)
    assert state.is_failed() and "does not exist" in state.message
    _assert_clean("a failed listing's message", state.message)
    _assert_clean("logs of the failed run", "\n".join(logs))
