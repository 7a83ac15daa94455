"""The registry's tasks shared by the flows: publish a release, resolve a model argument once per run, and
the events that a release was published or promoted (what the deployment triggers of prefect.yaml follow)."""
from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.events import emit_event

from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.tasks import registry as reg
from weakseg.tasks import storage
from weakseg.tasks.storage import redact, redact_url

__all__ = ["PROMOTED", "PUBLISHED", "announce", "publish_release", "registry_limit", "registry_slot",
           "resolve_model"]

PUBLISHED = "weakseg.release.published"  # by train-mil and refine-mil, after publishing with --registry
PROMOTED = "weakseg.release.promoted"  # by promote-model, after current.json moved


@task(**IO_RETRIES, retry_condition_fn=retry_unless(ValueError), cache_policy=NONE)
def publish_release(registry: str, checkpoint: str) -> dict[str, Any]:
    """A finished checkpoint as an immutable release (I/O: retried; a clash of bytes is not)."""
    release = reg.publish_checkpoint(registry, checkpoint)
    get_run_logger().info("released %s as %s", release.model_id, redact_url(release.model_url))
    return {"model_id": release.model_id, "url": release.model_url}


@task(**IO_RETRIES, retry_condition_fn=retry_unless(ValueError), cache_policy=NONE)
def resolve_model(model: str) -> reg.ResolvedModel:
    """A model argument (checkpoint, registry or its current.json) as the concrete checkpoint this run uses."""
    resolved = reg.resolve_model(model)
    if resolved.registry is not None:
        get_run_logger().info("model %s resolves to release %s", redact_url(model), resolved.model_id)
    return resolved


def announce(event: str, registry: str, model_id: str) -> None:
    """Emit ``event`` about a release to the Prefect API (nothing without one): its resource labels are
    what a deployment trigger templates (``{{ event.resource['weakseg.model'] }}``), credentials removed."""
    emit_event(event=event, resource={
        "prefect.resource.id": f"weakseg.release.{model_id}",
        "prefect.resource.name": model_id,
        "weakseg.model-id": model_id,
        "weakseg.registry": redact_url(registry),
        "weakseg.model": redact_url(reg.Release(registry, model_id, "", {}).model_url),
    })


def registry_limit(registry: str) -> str:
    """The name of the registry's global concurrency limit: one per registry, however its URL is spelt
    (``./models/registry``, its absolute path and ``file://`` name one limit)."""
    fs, path = storage.url_to_fs(registry)
    key = fs.unstrip_protocol(path.rstrip("/"))  # local paths come back absolute
    return f"weakseg-registry-{hashlib.sha256(redact_url(key).encode()).hexdigest()[:16]}"


def _ensure_limit(name: str) -> bool:
    """Create the limit (one slot) when the server has none by that name; whether it is active (an
    operator may deactivate it, or give it more slots)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return bool(client.read_global_concurrency_limit_by_name(name).active)
        except ObjectNotFound:
            pass
        with contextlib.suppress(ObjectAlreadyExists):  # created by a promotion that started at the same moment
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        return True


@contextlib.contextmanager
def registry_slot(registry: str) -> Iterator[None]:
    """The registry's slot of its global concurrency limit (created with one slot on first use) while
    the block compares and moves the pointer: promotions of one registry queue instead of scoring
    against a baseline that another is about to replace.

    Only an economy: the pointer's compare-and-swap (:func:`weakseg.tasks.registry.write_pointer`)
    holds without it, e.g. for promotions that reach the registry through another Prefect
    server. A server that cannot be asked is logged and the block runs without the slot. The
    slot is a lease: a killed run's slot comes back when its lease (300 s) runs out.
    """
    logger = get_run_logger()
    name = registry_limit(registry)
    try:
        active = _ensure_limit(name)
    except Exception as err:  # the compare-and-swap still holds; queueing is what is lost
        logger.warning("registry lock %s unavailable (%s: %s): comparing without it", name, type(err).__name__,
                       redact(str(err)))
        active = False
    if not active:
        yield
        return
    from prefect.concurrency.sync import concurrency

    logger.info("waiting for the registry's slot (global concurrency limit %s)", name)
    # Not strict: a lease the server fails to renew must not kill a promotion the pointer's swap guards anyway.
    with concurrency(name, occupy=1, strict=False):
        yield
