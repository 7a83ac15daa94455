"""Where segment-corpus's host work runs (worker processes, or inline), and how pixels travel.

**Why processes.** On an accelerator the host, not the device, sets the rate: decoding,
superpixels and PNG encoding cost milliseconds an image, the forward pass a fraction of one.
Run as threads of the flow's process they share one interpreter lock: on an H200's host 16
threads took 63 ms an image each for ``ilp,sppxl``, against 17.5 ms on one idle core. Here
the host stages (:mod:`.decode`, :mod:`.encode`) run in a pool of worker processes.

**Why not torch's DataLoader.** Its workers belong to one iterator, a chunk here: every
chunk would start its workers anew, and a started worker imports torch (seconds) while a
chunk of 512 photos takes a fraction of a second on a GPU; persistent workers need one
dataset for the process's life. And the engine's second host stage, PNG encoding, comes
*after* the forward pass, which a DataLoader cannot host. So one
:class:`~concurrent.futures.ProcessPoolExecutor` per process, shared by the chunks in flight
and sized to the cores, started with ``forkserver`` (workers fork from a clean server that
never touched CUDA or the flow's threads, and import neither torch nor Prefect). Its jobs
are plain functions; with 0 workers the same functions run inline.

**Pixels.** Decoded photos, superpixel maps and label maps travel in shared memory on
``/dev/shm`` (:mod:`.handoff`: slots of one file every process of the pool maps, or a spool
file of their own), never pickled through the pool's pipe: that way a decoded 500x375 photo
with its superpixels cost the flow's process 1.5 ms of CPU. Spool folders of processes that
died are removed by the next pool started on the machine.

**Crashes.** A worker that dies (out of memory, a crash in a decoder) breaks the executor:
every job in flight fails with :class:`~concurrent.futures.process.BrokenProcessPool`.
:meth:`HostPool.submit` then starts a new executor, and the engine resubmits the failed
jobs one input each (:mod:`.chunk`): an input whose job breaks the pool on its own becomes
an ``errors`` row (``WorkerCrashed``), the others are processed as if nothing happened.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np

from . import handoff

__all__ = ["HOST_WORKERS_ENV", "BrokenProcessPool", "HostPool", "default_host_workers", "host_pool"]

_logger = logging.getLogger(__name__)
T = TypeVar("T")
HOST_WORKERS_ENV = "WEAKSEG_HOST_WORKERS"  # overrides the automatic pool size (default_host_workers)
SPOOL_PREFIX = "weakseg-spool-"
# Shared-memory slots of a pool (handoff.SLOT_BYTES each). An input decoded ahead holds one from its
# job until the device is done with it, an encode job one for its label maps: on 2 cores, two chunks
# of ilp at batch 8 held up to 127 at once (bench/host_pipeline.py); with 64, 4 in 10 went through
# spool files, which cost the flow's process more CPU than the slots' copies.
SLOTS_BASE, SLOTS_PER_WORKER = 96, 16
# Modules the fork server imports once, so a new worker starts in milliseconds: the jobs' own.
PRELOAD = ["weakseg.tasks.segment.decode", "weakseg.tasks.segment.encode"]


def default_host_workers(requested: int | None, accelerator: bool) -> int:
    """Worker processes for the host stages: ``requested``, else ``$WEAKSEG_HOST_WORKERS``, else
    every core but one (the flow's own process feeds the device) when the model runs on an
    accelerator, and none (0: inline) on the CPU, whose cores the forward pass already uses."""
    if requested is None and os.environ.get(HOST_WORKERS_ENV, "").strip():
        requested = int(os.environ[HOST_WORKERS_ENV])
    if requested is not None:
        if requested < 0:
            raise ValueError(f"host workers must be >= 0, not {requested}")
        return requested
    if not accelerator:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores - 1)


def _init_worker(spool: str, slots_path: str | None, slot_bytes: int, slot_count: int) -> None:
    handoff.init_worker(spool, slots_path, slot_bytes, slot_count)
    # One thread per worker: the pool is sized to the cores, and OpenCV's own threads would oversubscribe them.
    import cv2

    cv2.setNumThreads(1)


def _spool_root() -> str:
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else tempfile.gettempdir()


def _remove_dead_spools(root: str) -> None:
    """Spool folders of processes that no longer run (killed before they could clean up)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            if not name.startswith(SPOOL_PREFIX):
                continue
            pid = name[len(SPOOL_PREFIX):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- the pool -------------------------------------------------------------------------------


class _Inline(Executor):
    """Runs each job when it is submitted: the engine with 0 host workers (one thread, the same code)."""

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as err:  # delivered through the future, as a pool would
            future.set_exception(err)
        return future


class HostPool:
    """``workers`` processes (0: inline) running the host stages' jobs, restarted when one dies."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.restarts = 0  # executors replaced after a worker died
        self.spool: str | None = None
        self.slots: handoff.Slots | None = None
        self._lock = threading.Lock()
        self._executor: Executor = _Inline() if workers == 0 else self._start()

    @property
    def kind(self) -> str:
        """inline, processes, or threads (a daemonic process, which cannot start processes)."""
        if self.workers == 0:
            return "inline"
        return "processes" if isinstance(self._executor, ProcessPoolExecutor) else "threads"

    def _start(self) -> Executor:
        if multiprocessing.current_process().daemon:  # e.g. a Dask worker started with daemon=True
            _logger.warning("this process is daemonic and cannot start host worker processes; %d threads run "
                            "the host stages (start Dask workers with DASK_DISTRIBUTED__WORKER__DAEMON=False)",
                            self.workers)
            return ThreadPoolExecutor(self.workers, thread_name_prefix="weakseg-host")
        if self.spool is None:
            root = _spool_root()
            _remove_dead_spools(root)
            self.spool = tempfile.mkdtemp(prefix=f"{SPOOL_PREFIX}{os.getpid()}-", dir=root)
            count = SLOTS_BASE + SLOTS_PER_WORKER * self.workers
            self.slots = handoff.Slots.create(self.spool, handoff.SLOT_BYTES, count)
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        slots = (self.slots.path, self.slots.slot_bytes, self.slots.count) if self.slots else (None, 0, 0)
        return ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                   initargs=(self.spool, *slots))

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future:
        """``fn(*args)`` in a worker; a pool broken by a dead worker is replaced first."""
        with self._lock:
            executor = self._executor
        try:
            return executor.submit(fn, *args)
        except BrokenProcessPool:
            return self._replace(executor).submit(fn, *args)

    def _replace(self, broken: Executor) -> Executor:
        """A new executor for ``broken`` (once, whichever chunk notices first)."""
        with self._lock:
            if self._executor is broken:
                _logger.warning("a host worker process died; starting a new pool of %d", self.workers)
                broken.shutdown(wait=False, cancel_futures=True)
                self._executor = self._start()
                self.restarts += 1
            return self._executor

    def take_slot(self) -> int | None:
        """A shared-memory slot for a job's arrays (None: none free, or no worker processes)."""
        return self.slots.take() if self.slots is not None and self.kind == "processes" else None

    def give_slot(self, slot: int | None) -> None:
        if slot is not None and self.slots is not None:
            self.slots.give(slot)

    def pack(self, arrays: Mapping[str, np.ndarray]) -> handoff.Packed | dict[str, np.ndarray]:
        """Arrays for a job of this pool (:func:`~.handoff.pack`): in a slot (give it back with
        :meth:`release` once the job is done), a spool file, or as they are inline."""
        if self.kind != "processes":
            return dict(arrays)
        slot = self.take_slot()
        packed = handoff.pack(arrays, slot, self.slots, self.spool)
        if slot is not None and getattr(packed, "slot", None) != slot:  # did not fit
            self.give_slot(slot)
        return packed

    def unpack(self, packed: handoff.Packed | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return handoff.unpack(packed, self.slots)

    def release(self, packed: object) -> None:
        handoff.release(packed, self.slots)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self.slots is not None:
            self.slots.close()
        if self.spool:
            shutil.rmtree(self.spool, ignore_errors=True)


_POOLS: dict[tuple[int, int], HostPool] = {}
_POOLS_LOCK = threading.Lock()


def host_pool(workers: int) -> HostPool:
    """The process's shared pool of ``workers`` (chunks running side by side share it, so the
    workers stay sized to the cores); made on first use, shut down when the process exits."""
    key = (os.getpid(), workers)  # a forked child makes its own
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = HostPool(workers)
        return pool


@atexit.register
def _shutdown_pools() -> None:
    for (pid, _), pool in list(_POOLS.items()):
        if pid == os.getpid():
            with contextlib.suppress(Exception):
                pool.shutdown()
