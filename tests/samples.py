"""Test images as bytes, shared by the test modules (not shipped in the package)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def block_jpeg(rng: np.random.Generator, side: int, margin: int = 6) -> bytes:
    """A flat JPEG ``side x (side + margin)`` with a square of another colour: a photo-sized stand-in."""
    arr = np.full((side, side + margin, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    arr[margin // 2 + 1:side // 2, margin // 2 + 1:side // 2] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def latest_artifact(key: str):
    """The newest Prefect artifact of ``key`` (asserting there is one), from the running API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = [a for a in client.read_latest_artifacts() if a.key == key]
    assert found, f"no artifact {key}"
    return found[0]
