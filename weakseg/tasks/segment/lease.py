"""A run attempt's lease: proof, in the output itself, that the attempt is still alive.

Two attempts of one run id may overlap (a retried deployment run and its predecessor), and an
attempt may be killed at any moment. Each pins its own model copy (``_state/model-{run_id}-
{attempt}-{sha256}.pt``); a later attempt must remove a killed one's copy but never a live
one's, whose workers may still load it. The attempt that pinned it touches
``_state/live-{run_id}-{attempt}`` every :func:`lease_seconds` while it runs; a copy whose lease
is missing or older than :data:`STALE_LEASES` periods belongs to an attempt that is over.
The lease lives where the copy does, so it holds on S3 and across machines, with or without a
Prefect server that knows the attempt.
"""
from __future__ import annotations

import logging
import os
import threading
from types import TracebackType

from .. import storage

__all__ = ["LEASE_ENV", "STALE_LEASES", "Lease", "lease_seconds", "lease_url"]

LEASE_ENV = "WEAKSEG_LEASE_SECONDS"  # the touch period; tests shorten it
STALE_LEASES = 6  # periods without a touch after which an attempt counts as over

_logger = logging.getLogger(__name__)


def lease_seconds() -> float:
    return float(os.environ.get(LEASE_ENV, "10"))


def lease_url(out: str, run_id: str, attempt: str) -> str:
    return storage.join(out, "_state", f"live-{run_id}-{attempt}")


class Lease:
    """Touch ``url`` now and then every :func:`lease_seconds` until the block ends (a daemon thread;
    a failed touch is logged and tried again at the next period, never fatal to the run)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weakseg-lease", daemon=True)

    def touch(self) -> None:
        storage.write_bytes(self.url, b"")

    def _run(self) -> None:
        while not self._stop.wait(lease_seconds()):
            try:
                self.touch()
            except Exception as err:
                _logger.warning("could not renew the run's lease %s: %s", storage.redact_url(self.url), err)

    def __enter__(self) -> Lease:
        self.touch()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
