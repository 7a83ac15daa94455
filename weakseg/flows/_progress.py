"""Progress of a long flow, in two places at once: a tqdm bar in the terminal (the CLI) and a
Prefect progress artifact (the UI of a deployment run), updated together.

The bar counts items (images), shows their rate and, once the total is known, an ETA; the
artifact holds the percentage done and a one-line description (done, rate, failed, ETA),
written at most every ``every_seconds`` and at the end, so a run of millions of images does
not make millions of API calls.
"""
from __future__ import annotations

import time
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from tqdm.auto import tqdm

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


class Progress:
    """``with Progress("segment-corpus-progress", "segment-corpus") as p: p.update(n, failed=k)``.

    ``total`` may be set later (:meth:`set_total`), when a lazy listing ends: until then the
    bar shows counts and rate without an ETA, and the artifact 0 %.
    """

    def __init__(self, key: str, desc: str, unit: str = "img", total: int | None = None,
                 every_seconds: float = 2.0, enabled: bool | None = None) -> None:
        self.key, self.unit, self.every = key, unit, every_seconds
        self.done = self.failed = 0
        self.total = total
        self.started = time.monotonic()
        self._last = 0.0
        # enabled None: a bar in a terminal only (not in a worker's or a test's captured output)
        self.bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                        disable=None if enabled is None else not enabled)
        self.artifact = create_progress_artifact(0.0, key=key, description=self.describe())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.close(finished=kind is None)

    @property
    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_seconds(self) -> float | None:
        if self.total is None or self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate

    def describe(self) -> str:
        text = f"{self.done}" + (f"/{self.total}" if self.total is not None else "") + f" {self.unit} done"
        text += f", {self.rate:.2f} {self.unit}/s, {self.failed} failed"
        eta = self.eta_seconds()
        return text + (f", ETA {_duration(eta)}" if eta is not None else "")

    def percent(self) -> float:
        if not self.total:
            return 100.0 if self.total == 0 else 0.0
        return min(100.0, 100.0 * self.done / self.total)

    def set_total(self, total: int) -> None:
        """The number of items, once known: the bar gets an ETA, the artifact a percentage."""
        self.total = total
        self.bar.total = total
        self.bar.refresh()
        self._publish(force=True)

    def update(self, n: int = 1, failed: int = 0) -> None:
        self.done += n
        self.failed += failed
        self.bar.update(n)
        if failed or self.failed:
            self.bar.set_postfix(failed=self.failed, refresh=False)
        self._publish()

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.every:
            self._last = now
            update_progress_artifact(self.artifact, self.percent(), description=self.describe())

    def close(self, finished: bool = True) -> None:
        """The last artifact update; ``finished``: every item was seen (the total is what was done)."""
        if finished and self.total is None:
            self.total = self.done
        self._publish(force=True)
        self.bar.close()
