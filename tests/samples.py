"""Test images as bytes, shared by the test modules (not shipped in the package)."""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def block_jpeg(rng: np.random.Generator, side: int, margin: int = 6) -> bytes:
    """A flat JPEG ``side x (side + margin)`` with a square of another colour: a photo-sized stand-in."""
    arr = np.full((side, side + margin, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    arr[margin // 2 + 1:side // 2, margin // 2 + 1:side // 2] = rng.integers(0, 256, 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def image_statistics(labels: np.ndarray, prob_sum: np.ndarray, image_probs: np.ndarray,
                     classes: Sequence[str]) -> list[dict[str, Any]]:
    """The ``regions`` rows of a label map, computed from the map itself in numpy: the reference
    the engine's device-side statistics (``postprocess.Labelled``, ``encode.regions``) are checked against."""
    counts = np.bincount(labels.ravel(), minlength=256)
    total = labels.size
    regions = []
    for k in np.flatnonzero(counts[: len(classes)]):
        rows = np.flatnonzero((labels == k).any(axis=1))
        cols = np.flatnonzero((labels == k).any(axis=0))
        regions.append({
            "class_name": classes[k], "class_index": int(k), "pixel_count": int(counts[k]),
            "area_fraction": float(counts[k] / total), "mean_prob": float(prob_sum[k] / counts[k]),
            "image_prob": float(image_probs[k]), "bbox_x0": int(cols[0]), "bbox_y0": int(rows[0]),
            "bbox_x1": int(cols[-1] + 1), "bbox_y1": int(rows[-1] + 1),
        })
    regions.sort(key=lambda r: -r["pixel_count"])
    return regions


def latest_artifact(key: str):
    """The newest Prefect artifact of ``key`` (asserting there is one), from the running API."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        found = [a for a in client.read_latest_artifacts() if a.key == key]
    assert found, f"no artifact {key}"
    return found[0]
