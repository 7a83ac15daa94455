"""Task runners chosen by flow parameter: threads in one process, or a Dask cluster.

Prefect fixes a flow's task runner at decoration time, so the flows that fan out take the
runner the parameters ask for from here and submit their tasks to it straight from the flow,
inside ``with runner:`` (a subflow carrying the runner costs about 1 s a run). ``dask`` starts a
LocalCluster of worker processes on 127.0.0.1, or joins an existing cluster by address.
Tasks submitted to worker processes must be submitted inside :func:`api_for_workers`.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from weakseg.flows.params._shared import TaskRunnerKind

__all__ = ["TaskRunnerKind", "api_for_workers", "make_task_runner"]


def make_task_runner(kind: TaskRunnerKind, workers: int, address: str | None = None,
                     resources: dict[str, float] | None = None) -> TaskRunner:
    """``resources``: what each local Dask worker declares (e.g. ``{"GPU": 1}``); an existing
    cluster's workers declare their own (``dask worker ADDRESS --resources GPU=1``)."""
    if kind == "threads":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind != "dask":
        raise ValueError(f"unknown task runner {kind!r}: use threads or dask")
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as err:  # pragma: no cover - a dependency
        raise RuntimeError("task_runner='dask' needs prefect-dask (pip install prefect-dask)") from err
    if address:
        return DaskTaskRunner(address=address)
    import dask

    # Worker processes that may start processes of their own: segment-corpus's host stages
    # (weakseg.tasks.segment.hostpool). Dask makes them daemonic unless told otherwise.
    dask.config.set({"distributed.worker.daemon": False})
    return DaskTaskRunner(cluster_kwargs={
        "n_workers": workers, "threads_per_worker": 1, "processes": True,
        "host": "127.0.0.1", "dashboard_address": None, **({"resources": resources} if resources else {}),
    })


@contextlib.contextmanager
def api_for_workers(runner: TaskRunner) -> Iterator[None]:
    """Tasks submitted here tell worker processes which Prefect API this flow run uses.

    Without ``PREFECT_API_URL`` the flow talks to an ephemeral server that only its own
    process knows; each Dask worker process would start another one (timeouts, port
    clashes, task runs recorded nowhere). Task submission carries the current settings
    to the worker, so the ephemeral server's URL is put into them for the block. A Dask
    cluster on other machines needs a real server (``PREFECT_API_URL``) all can reach.
    Threads share this process's API: for them nothing is done. Enter it once around all
    the submissions: Prefect validates every setting again for it (~0.15 s).
    """
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    ctx = FlowRunContext.get()
    if isinstance(runner, ThreadPoolTaskRunner) or PREFECT_API_URL.value() or ctx is None or ctx.client is None:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: str(ctx.client.api_url).rstrip("/")}):
        yield
