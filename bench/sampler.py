"""A wall-clock profile of every thread of a process, from Python's own stacks (bench only).

Every few ms a daemon thread reads ``sys._current_frames()`` and counts, per kind of thread
(its name without the numbering: the device's thread, the host pool, the task runner's
threads), the innermost frame of weakseg or bench code and the innermost frame of all.
Waits count like work, which is the point: it shows where each thread spends its time, the
GIL's queue included. bench/gpu.py and bench/gpu_profile.py use it.
"""
from __future__ import annotations

import collections
import sys
import threading
from pathlib import Path

__all__ = ["StackSampler"]


class StackSampler:
    """Counts, per kind of thread, the innermost project frame and the innermost frame of all
    (``file:function:line``) every ``interval`` seconds: a wall-clock profile of every thread."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.samples = interval, 0
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def __enter__(self) -> StackSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                kind = names.get(ident, "?").rstrip("0123456789_").rstrip("-_")
                leaf, ours = _where(frame), None
                f = frame
                while f is not None and ours is None:
                    if "weakseg" in f.f_code.co_filename or "/bench/" in f.f_code.co_filename:
                        ours = _where(f)
                    f = f.f_back
                self.counts[kind][f"{ours} <- {leaf}" if ours != leaf else str(ours)] += 1

    def report(self, top: int = 12) -> dict:
        return {kind: {"samples": sum(c.values()), "top": dict(c.most_common(top))} for kind, c in self.counts.items()}


def _where(frame) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}"
