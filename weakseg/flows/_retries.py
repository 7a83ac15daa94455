"""Retries for I/O tasks: transient failures are retried, permanent ones fail at once."""
from __future__ import annotations

from collections.abc import Callable

__all__ = ["IO_RETRIES", "retry_unless"]

IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 15]}


def retry_unless(*permanent: type[BaseException]) -> Callable:
    """A ``retry_condition_fn`` that gives up on ``permanent`` errors (retrying cannot fix a
    missing manifest or split) and retries anything else (storage hiccups)."""

    def condition(task, task_run, state) -> bool:
        try:
            state.result()
        except permanent:
            return False
        except Exception:
            return True
        return False

    return condition
