"""The registry's tasks shared by the flows: publish a release, resolve a model argument once per run, and
the events that a release was published or promoted (what the deployment triggers of prefect.yaml follow)."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.events import emit_event

from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.tasks import registry as reg
from weakseg.tasks.storage import redact_url

__all__ = ["PROMOTED", "PUBLISHED", "announce", "publish_release", "resolve_model"]

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
