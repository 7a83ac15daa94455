"""The Prefect ``gpu`` concurrency limit: one slot per process that runs on a GPU."""
from __future__ import annotations

import contextlib

__all__ = ["gpu_slot"]


def gpu_slot(device: str):
    """One slot of the ``gpu`` concurrency limit for a resolved CUDA device; nothing on CPU
    (so CPU runs need no server)."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    from prefect.concurrency.sync import concurrency

    return concurrency("gpu", occupy=1)
