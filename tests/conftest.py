from __future__ import annotations

import functools
import http.server
import logging
import os
import threading
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The fault injection of weakseg.tasks.segment.decode.CRASH_ENV: a host worker asked to prepare a file of
# this name exits at once. Set before any worker process starts (they inherit the environment once);
# no other test input has this name.
os.environ.setdefault("WEAKSEG_CRASH_PREPARING", "kills-its-worker.jpg")


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


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder without logging every request."""

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_server():
    """``serve(folder, handler=QuietHandler) -> base URL``: a folder over HTTP on 127.0.0.1,
    shut down when the test ends."""
    servers = []

    def serve(directory, handler: type[http.server.BaseHTTPRequestHandler] = QuietHandler) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler,
                                                                                      directory=str(directory)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def log_messages():
    """``collect(*logger_names) -> list``: every message of those loggers from now until the test
    ends (run loggers do not reach caplog reliably)."""
    handlers: list[tuple[logging.Logger, logging.Handler]] = []

    def collect(*names: str) -> list[str]:
        import prefect.main  # noqa: F401  configures logging on first import, dropping handlers added before
        messages: list[str] = []
        handler = _Collect(messages)
        for name in names:
            logger = logging.getLogger(name)
            logger.addHandler(handler)
            handlers.append((logger, handler))
        return messages

    yield collect
    for logger, handler in handlers:
        logger.removeHandler(handler)


def _tiny_checkpoint(classes: list[str], seed: int = 0, head_widths: tuple[int, ...] = (16, 16, 16),
                     input_size: int = 64, nan: bool = False) -> bytes:
    from weakseg.models import ModelConfig, checkpoint_bytes, create_model

    torch.manual_seed(seed)
    model, config = create_model(ModelConfig(num_classes=len(classes), head_widths=head_widths, output_stride=16),
                                 pretrained="none")
    if nan:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
    return checkpoint_bytes(model, config, classes, input_size=input_size)


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """``make(classes, seed=0, head_widths=(16, 16, 16), input_size=64, nan=False) -> bytes``: an
    untrained small-head checkpoint (no pretrained weights), NaN weights on request."""
    return _tiny_checkpoint


@pytest.fixture(scope="session")
def background_run(tmp_path_factory, prefect_harness) -> tuple[str, str, str]:
    """``(data, shards, model.pt)``: objects on photo backgrounds tagged with their objects only (like VOC),
    sharded and trained briefly with a learnt background; shared by the background and refinement tests."""
    from weakseg.flows.shard_imagenet import shard_imagenet
    from weakseg.flows.train_mil import train_mil
    from weakseg.tasks.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("background-run")
    data, shards, out = str(root / "data"), str(root / "shards"), str(root / "model")
    write_synthetic_dataset(data, n_train=96, n_val=16, size=96, classes=("dots", "stripes"), max_objects=1,
                            background_fraction=0.15)
    shard_imagenet(source=f"{data}/labels.csv", dest=shards, max_side=96)
    train_mil(shards=shards, out=out, epochs=4, steps_per_epoch=20, batch_size=16, input_size=96,
              head_widths=[64, 64, 64], output_stride=8, lr=3e-3, num_workers=0, checkpoint_every=0, val_every=0,
              progress=False, rotation=0.0, scale=[1.0, 1.0])
    return data, shards, f"{out}/model.pt"
