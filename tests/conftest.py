from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def msrc21() -> Path:
    """The real MSRC-21 photos; tests that need them skip cleanly when absent."""
    root = Path(os.environ.get("WEAKSEG_MSRC21", SHARED_DATA / "msrc21"))
    if not (root / "JPEGImages").is_dir():
        pytest.skip(f"MSRC-21 data not found at {root}")
    return root


@pytest.fixture(scope="session")
def prefect_harness():
    """A real Prefect API (temporary local server with SQLite) for flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    # Telemetry writes race the harness's own start-up on SQLite ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

    with prefect_test_harness(server_startup_timeout=120):
        yield


S3_SECRET = "weakseg-test-secret-Zq81x"  # must never appear in any output
S3_KEY_ID = "AKIAWEAKSEGTESTKEY01"


@pytest.fixture(scope="module")
def s3():
    """A real S3 API: moto's server on 127.0.0.1, found through the standard AWS variables."""
    import socket
    import urllib.request

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", S3_KEY_ID)
        mp.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()
        # moto keeps its backends per process, across server instances: start each module clean.
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
        fs = s3fs.S3FileSystem()
        fs.mkdir("weakseg-test")
        yield fs
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()
