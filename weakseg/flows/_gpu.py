"""The Prefect ``gpu`` concurrency limit: one slot per process that runs on a GPU."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["GPU_LIMIT", "gpu_slot", "limit_slot"]

GPU_LIMIT = "gpu"


def gpu_slot(device: str) -> contextlib.AbstractContextManager[None]:
    """One slot of the ``gpu`` concurrency limit for a resolved CUDA device; nothing on CPU
    (so CPU runs need no server)."""
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    return limit_slot(GPU_LIMIT)


def _active_limit(name: str) -> bool:
    """Whether the server has an active global concurrency limit ``name`` (one read)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return bool(client.read_global_concurrency_limit_by_name(name).active)
        except ObjectNotFound:
            return False


@contextlib.contextmanager
def limit_slot(name: str) -> Iterator[None]:
    """One slot of the global concurrency limit ``name`` while the block runs, when the server has
    that limit (active); else nothing.

    Why look first: Prefect's ``concurrency()`` queues every acquisition through one service
    per limit name, and each took 1-2 s even where no such limit exists (most servers). On an
    H200 that held segment-corpus at 144 images/s, 250 without it (bench/gpu.sh). The read is
    one request; a server that cannot answer it is left to ``concurrency()``, as before.
    """
    try:
        exists = _active_limit(name)
    except Exception:  # let concurrency() meet (and report) whatever is wrong with the server
        exists = True
    if not exists:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(name, occupy=1):
        yield
