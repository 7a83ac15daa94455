"""The registry's tasks shared by the flows: publish a release, resolve a model argument once per run."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from weakseg.flows._retries import IO_RETRIES, retry_unless
from weakseg.tasks import registry as reg
from weakseg.tasks.storage import redact_url

__all__ = ["publish_release", "resolve_model"]


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
