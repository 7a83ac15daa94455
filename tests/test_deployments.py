"""prefect.yaml for real: a Prefect server and a process worker as subprocesses on loopback,
`prefect --no-prompt deploy --all`, then `prefect deployment run ... --watch`."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("prefect server did not become healthy")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    """A real server (SQLite) and a process worker on the deployments' pool; stopped after."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
    }
    logs = home / "logs"
    logs.mkdir()
    server_log, worker_log = open(logs / "server.log", "wb"), open(logs / "worker.log", "wb")  # noqa: SIM115
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                              stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        _wait_healthy(env["PREFECT_API_URL"], server)
        # `make deploy` on a server without the work pool (before any `make worker`): it creates the pool.
        # -o: the venv's install stamp counts as up to date (this venv is the one under test).
        make = ["make", "-o", f"{sys.prefix}/.installed", "deploy", f"VENV={sys.prefix}",
                f"PREFECT_API_URL={env['PREFECT_API_URL']}"]
        deployed = subprocess.run(make, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        again = subprocess.run([*make[:3], "pool", *make[4:]], env=env, cwd=ROOT, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr  # the pool exists: nothing to do
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "weakseg-process"], env=env, cwd=ROOT,
                                  stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        yield env, logs
    finally:
        if worker is not None:
            _stop(worker)
        _stop(server)
        server_log.close()
        worker_log.close()


def run_deployment(env: dict, name: str, params: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess:
    cmd = [PREFECT, "deployment", "run", name, "--watch"]
    for key, value in params.items():
        cmd += ["--param", f"{key}={value}"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_segment_corpus_on_demand_deployment(prefect_stack, tmp_path):
    import numpy as np
    import pyarrow.dataset as ds
    from PIL import Image

    from weakseg.models import ModelConfig, create_model, save_checkpoint
    from weakseg.tasks.synthetic import SYNTHETIC_CLASSES, make_scenes

    env, logs = prefect_stack
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, scene in enumerate(make_scenes(5, seed=3)):
        Image.fromarray(scene.image).save(corpus / f"img{i}.jpg")
    (corpus / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    config = ModelConfig(num_classes=len(SYNTHETIC_CLASSES), head_widths=(16, 16, 16), output_stride=8)
    model, config = create_model(config, pretrained="none")
    save_checkpoint(tmp_path / "model.pt", model, config, SYNTHETIC_CLASSES, input_size=160)
    out = tmp_path / "out"

    run = run_deployment(env, "segment-corpus/on-demand",
                         {"images": str(corpus), "model": str(tmp_path / "model.pt"), "out": str(out),
                          "priors": "ilp", "run_id": "deployed"})
    detail = run.stdout + run.stderr + (logs / "worker.log").read_text(errors="replace")[-3000:]
    assert "Completed" in run.stdout, detail
    images = ds.dataset(out / "images", partitioning="hive").to_table().to_pylist()
    errors = ds.dataset(out / "errors", partitioning="hive").to_table().to_pylist()
    assert sorted(Path(r["image_uri"]).name for r in images if r["status"] == "ok") == [f"img{i}.jpg" for i in range(5)]
    assert [Path(r["image_uri"]).name for r in errors] == ["broken.jpg"]
    assert {r["run_id"] for r in images} == {"deployed"}
    assert np.all([r["width"] == 160 for r in images if r["status"] == "ok"])


def _set_defaults(env: dict, deployment: str, **params) -> None:
    """Change a deployment's default parameters on the server (what an operator does in the UI)."""
    script = (
        "import json, sys\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.actions import DeploymentUpdate\n"
        "with get_client(sync_client=True) as client:\n"
        "    d = client.read_deployment_by_name(sys.argv[1])\n"
        "    client.update_deployment(d.id, DeploymentUpdate(parameters={**d.parameters, **json.loads(sys.argv[2])}))\n"
    )
    subprocess.run([sys.executable, "-c", script, deployment, json.dumps(params)], env=env, check=True, timeout=120)


def _wait_for(path: Path, logs: Path, timeout: float = 360) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared; worker log:\n"
                               + (logs / "worker.log").read_text(errors="replace")[-4000:])
        time.sleep(2)


@pytest.mark.slow
def test_a_published_release_is_promoted_and_gets_thresholds_by_triggers(prefect_stack, tmp_path):
    """train (CLI, on the server) publishes -> promote-model/default runs on the worker -> choose-thresholds/default."""
    from weakseg.tasks import registry as reg
    from weakseg.tasks.synthetic import write_synthetic_dataset

    env, logs = prefect_stack
    data, shards, registry = tmp_path / "data", tmp_path / "shards", tmp_path / "registry"
    write_synthetic_dataset(str(data), n_train=16, n_val=4, size=96, classes=("dots", "stripes"), max_objects=1,
                            background_fraction=0.15)
    fast = {"ground_truth": str(data), "limit": 4, "max_side": 96, "tta": "1", "device": "cpu"}
    _set_defaults(env, "promote-model/default", **fast)
    _set_defaults(env, "choose-thresholds/default", **fast)
    weakseg = str(Path(sys.executable).parent / "weakseg")
    subprocess.run([weakseg, "shard", "--source", str(data / "labels.csv"), "--dest", str(shards), "--max-side",
                              "96"], env=env, check=True, capture_output=True, timeout=300)
    trained = subprocess.run([
        weakseg, "train", "--shards", str(shards), "--out", str(tmp_path / "model"), "--registry", str(registry),
        "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4", "--input-size", "96", "--pretrained", "none",
        "--head-widths", "16,16,16", "--output-stride", "8", "--num-workers", "0", "--checkpoint-every", "0",
        "--val-every", "0", "--no-progress", "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    model_id = reg.content_id((tmp_path / "model" / "model.pt").read_bytes())[0]

    _wait_for(registry / "current.json", logs)  # the gate ran on the worker, started by the trigger
    assert reg.read_pointer(str(registry))["model_id"] == model_id
    thresholds = registry / "thresholds" / f"{model_id}-ilp-sppxl-seg.json"
    _wait_for(thresholds, logs)  # and the promotion started choose-thresholds for the new release
    assert json.loads(thresholds.read_text())["search"]["model_id"] == model_id
