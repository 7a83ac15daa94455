"""prefect.yaml for real: a Prefect server and a process worker as subprocesses on loopback,
`prefect --no-prompt deploy --all`, then `prefect deployment run ... --watch`."""
from __future__ import annotations

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
        subprocess.run([PREFECT, "work-pool", "create", "weakseg-process", "--type", "process"], env=env, check=True,
                       capture_output=True)
        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "weakseg-process"], env=env, cwd=ROOT,
                                  stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        deployed = subprocess.run([PREFECT, "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT,
                                  capture_output=True, text=True, timeout=300)
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
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
