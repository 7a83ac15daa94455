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
